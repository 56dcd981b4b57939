"""Weave tracing, only when it is configured.

An un-initialised `@weave.op` runs its function normally, so every stage is an op and the
trace exists exactly when `weave.init` ran. `weave.init` without a key prompts on stdin and
then fails offline, so we call it only when a W&B key is present and tracking is not
switched off, and otherwise say once that the run is untraced.
"""

from __future__ import annotations

import os

from loguru import logger

from codreamer.config import Settings


def _run_untraced(reason: str) -> bool:
    # WEAVE_DISABLED makes every op a plain call, without Weave's own "not initialised" print.
    os.environ["WEAVE_DISABLED"] = "true"
    logger.info("{}: running untraced (no Weave); local history and logs only", reason)
    return False


_traced: bool | None = None  # decided once per process


def init_tracking(settings: Settings) -> bool:
    """Initialise Weave when a key is set; return whether traces are recorded. Idempotent."""
    global _traced
    if _traced is None:
        _traced = _init(settings)
    return _traced


def _init(settings: Settings) -> bool:
    if not settings.wandb:
        return _run_untraced("tracking off (--no-wandb)")
    if settings.wandb_api_key is None:
        return _run_untraced("no WANDB_API_KEY")
    os.environ.setdefault("WANDB_API_KEY", settings.wandb_api_key.get_secret_value())
    import weave

    try:
        weave.init(settings.weave_project)
    except Exception as exc:  # an unreachable server must not stop training
        return _run_untraced(f"Weave init failed ({type(exc).__name__})")
    logger.info("Weave traces go to project {}", settings.weave_project)
    return True

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


def init_tracking(settings: Settings) -> bool:
    """Initialise Weave when a key is set; return whether traces are recorded."""
    if not settings.wandb:
        logger.info("tracking off (--no-wandb): no Weave traces; local history and logs only")
        return False
    if settings.wandb_api_key is None:
        logger.info("no WANDB_API_KEY: running untraced (no Weave); local history and logs only")
        return False
    os.environ.setdefault("WANDB_API_KEY", settings.wandb_api_key.get_secret_value())
    import weave

    try:
        weave.init(settings.weave_project)
    except Exception as exc:  # an unreachable server must not stop training
        logger.warning("Weave init failed ({}): running untraced", type(exc).__name__)
        return False
    logger.info("Weave traces go to project {}", settings.weave_project)
    return True

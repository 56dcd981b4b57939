"""Choosing the training backend from settings.

`embedded` (default) trains on this machine's CPU. `local` is ART's LocalBackend (unsloth +
vLLM, needs a CUDA GPU) and `serverless` is W&B's hosted training (needs WANDB_API_KEY);
both are imported only when chosen, so the default needs neither a GPU nor a network.
"""

from __future__ import annotations

from typing import Any

from codreamer.config import Settings
from codreamer.errors import UsageError


class BackendUnavailable(UsageError, RuntimeError):
    """The chosen backend cannot run here; the message says why and what to do."""


def check_backend_available(settings: Settings) -> None:
    """Raise BackendUnavailable before anything is written when the backend cannot run here."""
    if settings.backend == "local":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend 'local' (ART LocalBackend) needs a CUDA GPU and this machine has none; "
                "use --backend embedded (the CPU default) or run on a GPU machine"
            )
    elif settings.backend == "serverless" and settings.wandb_api_key is None:
        raise BackendUnavailable(
            "backend 'serverless' trains on W&B and needs WANDB_API_KEY: set it in the environment or in .env"
        )


def create_backend(settings: Settings) -> Any:
    if settings.backend == "embedded":
        from codreamer.backends.embedded.backend import EmbeddedBackend

        return EmbeddedBackend(
            settings.model_cache_dir,
            settings.grpo_config(),
            max_batch=settings.rollout_concurrency * 2,
            prefix_store_bytes=settings.prefix_store_mb * 2**20,
        )
    if settings.backend == "local":
        return _local_backend(settings)
    return _serverless_backend(settings)


def _local_backend(settings: Settings) -> Any:
    check_backend_available(settings)
    from art.local import LocalBackend

    return LocalBackend(path=str(settings.runs_dir))


def _serverless_backend(settings: Settings) -> Any:
    check_backend_available(settings)
    from art.serverless.backend import ServerlessBackend

    return ServerlessBackend(api_key=settings.wandb_api_key.get_secret_value())

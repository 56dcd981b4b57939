"""Choosing the training backend from settings.

`embedded` (default) trains on this machine's CPU. `local` is ART's LocalBackend (unsloth +
vLLM, needs a CUDA GPU) and `serverless` is W&B's hosted training (needs WANDB_API_KEY);
both are imported only when chosen, so the default needs neither a GPU nor a network.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
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
        if importlib.util.find_spec("unsloth") is None:  # ART trains with it; it is not in this project's lock
            raise BackendUnavailable(
                "backend 'local' (ART LocalBackend) trains with unsloth, which is not installed here; install "
                "ART's GPU extra (openpipe-art[backend]) in an environment of its own, or use --backend embedded"
            )
    elif settings.backend == "serverless" and settings.wandb_api_key is None:
        raise BackendUnavailable(
            "backend 'serverless' trains on W&B and needs WANDB_API_KEY: set it in the environment or in .env"
        )


def available_cpus() -> int:
    """Cores this process may actually run on: its CPU affinity, capped by a cgroup v2 quota
    (`cpu.max`, as containers set it); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def torch_threads(settings: Settings) -> int:
    """`--torch-threads`, else OMP_NUM_THREADS (torch's own variable), else `available_cpus()`.

    torch alone would start one thread per core of the machine, which oversubscribes a
    container or a pinned process; on a machine shared with other CPU-bound jobs even the
    available cores are too many (measured: 2 threads ~3x slower than 1 beside two other
    jobs), so such a machine should set 1.
    """
    if settings.torch_threads is not None:
        return settings.torch_threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    return available_cpus()


def create_backend(settings: Settings) -> Any:
    if settings.backend == "embedded":
        from codreamer.backends.embedded.backend import EmbeddedBackend

        threads = torch_threads(settings)
        return EmbeddedBackend(
            settings.model_cache_dir,
            settings.grpo_config(),
            max_batch=settings.rollout_concurrency * 2,
            threads=threads,
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

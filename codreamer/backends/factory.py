"""Choosing the training backend from settings.

`embedded` (default) trains on this machine's CPU. `local` is ART's LocalBackend (unsloth +
vLLM, needs a CUDA GPU) and `serverless` is W&B's hosted training (needs WANDB_API_KEY);
both are imported only when chosen, so the default needs neither a GPU nor a network.

ART's training options (`ART_TRAIN_OPTIONS`: loss, KL penalty, clipping, ...) set by the user
travel with the backend the factory builds (`train_options_of`) to every `backend.train` call
(`codreamer.pipeline.stages.grpo_update`); unset ones are not passed, so each backend keeps its
own default. The embedded backend honours them (`codreamer.backends.embedded.train_options`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codreamer.config import Settings
from codreamer.errors import UsageError

#: Settings passed to `backend.train` under the same keyword when set (not None). Each is a keyword
#: of ART 0.5.23's `LocalBackend.train` and `ServerlessBackend.train` (read from their signatures).
ART_TRAIN_OPTIONS: tuple[str, ...] = (
    "loss_fn",
    "kl_penalty_coef",
    "kl_penalty_reference_step",
    "kl_penalty_source",
    "epsilon",
    "epsilon_high",
    "normalize_advantages",
    "advantage_balance",
    "importance_sampling_level",
    "max_negative_advantage_importance_sampling_weight",
    "truncated_importance_sampling",
    "mask_prob_ratio",
    "packed_sequence_length",
)
#: Where a built backend carries the options (`train_options_of`); absent on backends built elsewhere.
TRAIN_OPTIONS_ATTR = "codreamer_train_options"
#: The default `--base-model`: the embedded backend's GGUF copy, which no ART backend can load.
EMBEDDED_BASE_MODEL: str = Settings.model_fields["base_model"].default
_BASE_MODEL_HINT = {
    "local": "a Hugging Face model id, e.g. Qwen/Qwen2.5-0.5B-Instruct",
    "serverless": (
        "a model of W&B's Serverless RL catalog, e.g. OpenPipe/Qwen3-14B-Instruct or Qwen/Qwen3-30B-A3B-Instruct-2507 "
        "(https://docs.wandb.ai/serverless-rl/available-models)"
    ),
}


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
    if settings.backend != "embedded" and settings.base_model == EMBEDDED_BASE_MODEL:
        raise BackendUnavailable(
            f"backend '{settings.backend}' cannot train --base-model {EMBEDDED_BASE_MODEL} (the embedded backend's "
            f"offline copy): set --base-model to {_BASE_MODEL_HINT[settings.backend]}"
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


def train_options(settings: Settings) -> dict[str, Any]:
    """The ART training options the user set (`ART_TRAIN_OPTIONS` that are not None), by ART's keyword."""
    return {name: value for name in ART_TRAIN_OPTIONS if (value := getattr(settings, name)) is not None}


def train_options_of(backend: Any) -> dict[str, Any]:
    """The training options `create_backend` attached to `backend` ({} for a backend built elsewhere)."""
    options = getattr(backend, TRAIN_OPTIONS_ATTR, None)
    return dict(options) if isinstance(options, Mapping) else {}


def create_backend(settings: Settings) -> Any:
    """The backend `--backend` names, carrying the user's ART training options (`train_options_of`)."""
    options = train_options(settings)
    if settings.backend == "embedded":
        from codreamer.backends.embedded.backend import EmbeddedBackend
        from codreamer.backends.embedded.policy import GRPOConfig

        threads = torch_threads(settings)
        backend = EmbeddedBackend(
            settings.model_cache_dir,
            GRPOConfig.from_settings(settings),
            max_batch=settings.rollout_concurrency * 2,
            threads=threads,
            prefix_store_bytes=settings.prefix_store_mb * 2**20,
        )
    elif settings.backend == "local":
        backend = _local_backend(settings)
    else:
        backend = _serverless_backend(settings)
    setattr(backend, TRAIN_OPTIONS_ATTR, options)
    return backend


def _local_backend(settings: Settings) -> Any:
    check_backend_available(settings)
    from art.local import LocalBackend

    return LocalBackend(path=str(settings.runs_dir))


def _serverless_backend(settings: Settings) -> Any:
    check_backend_available(settings)
    from art.serverless.backend import ServerlessBackend

    key = settings.wandb_api_key
    assert key is not None  # check_backend_available refuses serverless without a key
    return ServerlessBackend(api_key=key.get_secret_value())

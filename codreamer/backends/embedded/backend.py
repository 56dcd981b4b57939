"""The embedded CPU backend: ART's `Backend` protocol, in-process, with torch + peft.

`art.Backend` is a typing Protocol, so this is a plain class with the same methods. It
serves the current policy on a loopback OpenAI-compatible endpoint (so rollouts call it
exactly as they would call vLLM) and trains it with a real GRPO step on LoRA weights,
saving a checkpoint per step under the model's ART directory:
`<base_path>/<project>/models/<run_name>/checkpoints/<step:04d>/`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import art
import torch
from art.utils.output_dirs import get_model_dir
from loguru import logger

from codreamer.backends.embedded.batcher import SamplingBatcher
from codreamer.backends.embedded.policy import DEFAULT_PREFIX_STORE_BYTES, Policy
from codreamer.backends.embedded.server import PolicyServer
from codreamer.backends.embedded.sft import sft_sequence
from codreamer.backends.embedded.weights import load_embedded_model
from codreamer.backends.embedded.policy import GRPOConfig
from codreamer.backends.embedded.grpo import build_grpo_batch

CHECKPOINT_DIR_RE = re.compile(r"^\d{4,}$")
#: Trajectories per SFT optimizer step when ART's config says "auto".
DEFAULT_SFT_BATCH_SIZE = 8


def checkpoints_dir(model: art.Model) -> Path:
    return Path(get_model_dir(model, art_path=model.base_path)) / "checkpoints"


def checkpoint_steps(model: art.Model) -> list[int]:
    folder = checkpoints_dir(model)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and CHECKPOINT_DIR_RE.match(p.name))


class EmbeddedBackend:
    """CPU training and inference for one trainable model at a time."""

    def __init__(
        self,
        cache_dir: Path,
        grpo: GRPOConfig,
        *,
        max_batch: int = 16,
        threads: int | None = None,
        prefix_store_bytes: int = DEFAULT_PREFIX_STORE_BYTES,
    ) -> None:
        self.cache_dir = cache_dir
        self.grpo = grpo
        self.max_batch = max_batch
        self.prefix_store_bytes = prefix_store_bytes
        if threads:
            torch.set_num_threads(threads)
        self._policy: Policy | None = None
        self._server: PolicyServer | None = None
        self._model: art.TrainableModel | None = None
        self._step = 0
        self._api_key = secrets.token_urlsafe(24)

    # ---------------------------------------------------------------- ART Backend protocol
    async def register(self, model: art.Model) -> None:
        if not isinstance(model, art.TrainableModel):
            raise TypeError("the embedded backend serves trainable models only")
        if self._model is not None and self._model.name != model.name:
            raise RuntimeError("the embedded backend holds one model at a time; create another backend")
        self._model = model

    async def _prepare_backend_for_training(self, model: art.TrainableModel, config: Any = None) -> tuple[str, str]:
        if self._policy is None:
            self._policy = await anyio.to_thread.run_sync(self._build_policy)
            self._step = self._restore_latest(model)
        if self._server is None:
            batcher = SamplingBatcher(self._policy, max_batch=self.max_batch)
            self._server = PolicyServer(batcher, self._policy.tokenizer, self._api_key, model.name)
            await self._server.start()
        return self._server.base_url, self._api_key

    def _model_inference_name(self, model: art.Model, step: int | None = None) -> str:
        return model.name

    async def _get_step(self, model: art.TrainableModel) -> int:
        return self._step

    async def _delete_checkpoint_files(self, model: art.TrainableModel, steps_to_keep: list[int]) -> None:
        for step in checkpoint_steps(model):
            if step not in steps_to_keep:
                shutil.rmtree(checkpoints_dir(model) / f"{step:04d}", ignore_errors=True)

    @asynccontextmanager
    async def exact_adapter_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        if step != self._step:
            raise RuntimeError(f"the embedded backend serves only its current step {self._step}, not {step}")
        yield

    async def train(
        self,
        model: art.TrainableModel,
        trajectory_groups: Iterable[art.TrajectoryGroup],
        *,
        learning_rate: float | None = None,
        save_checkpoint: bool = True,
        **_backend_specific: Any,
    ) -> art.TrainResult:
        """One GRPO step on the given groups; the step counter advances even when no group
        has reward spread, so iterations and steps stay aligned (metrics say it was a no-op)."""
        policy = self._require_policy()
        batch = build_grpo_batch(trajectory_groups)
        lr = learning_rate if learning_rate is not None else self.grpo.learning_rate
        metrics: dict[str, float] = {"groups_used": float(batch.groups_used), "groups_skipped": float(batch.groups_skipped)}
        if batch.sequences:
            metrics |= await anyio.to_thread.run_sync(policy.train_step, batch.sequences, lr)
        else:
            logger.warning("no group had reward spread: the step makes no update")
        self._step += 1
        if save_checkpoint:
            await anyio.to_thread.run_sync(self._save_checkpoint, model, self._step)
        return art.TrainResult(step=self._step, metrics=metrics)

    async def _train_sft(
        self,
        model: art.TrainableModel,
        trajectories: Iterable[art.Trajectory],
        config: art.types.TrainSFTConfig,
        dev_config: Any = None,
        verbose: bool = False,
    ) -> AsyncIterator[dict[str, float]]:
        """ART's SFT path (`model.train_sft`): one optimizer step per batch of trajectories,
        mean negative log-likelihood of the assistant turns (`sft.sft_sequence`); then the
        step advances once and a checkpoint is saved, as ART's LocalBackend does."""
        policy = self._require_policy()
        end_of_turn = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
        sequences = [
            sft_sequence(t.messages_and_choices, t.tools, policy.tokenizer, end_of_turn, assistant_turns=config.assistant_turns)
            for t in trajectories
        ]
        if not sequences:
            raise ValueError("train_sft got no trajectories")
        size = config.batch_size if isinstance(config.batch_size, int) else DEFAULT_SFT_BATCH_SIZE
        batches = [sequences[i : i + size] for i in range(0, len(sequences), size)]
        rates = config.learning_rate if isinstance(config.learning_rate, list) else [config.learning_rate] * len(batches)
        if len(rates) < len(batches):
            raise ValueError(f"train_sft got {len(rates)} learning rates for {len(batches)} batches")
        trained_tokens = float(sum(s.trained_tokens for s in sequences))
        for number, (batch, rate) in enumerate(zip(batches, rates, strict=False), start=1):
            metrics = await anyio.to_thread.run_sync(policy.train_step, batch, rate)
            if verbose:
                logger.info("sft batch {}/{}: loss {:.4f}", number, len(batches), metrics["loss"])
            yield {
                "loss/train": metrics["loss"],
                "loss/grad_norm": metrics["grad_norm"],
                "loss/learning_rate": rate,
                "data/step_num_trajectories": float(len(sequences)),
                "data/step_trainable_assistant_tokens": trained_tokens,
                "data/step_num_gradient_steps": float(len(batches)),
            }
        self._step += 1
        await anyio.to_thread.run_sync(self._save_checkpoint, model, self._step)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    # --------------------------------------------------------------------------- internals
    def _require_policy(self) -> Policy:
        if self._policy is None:
            raise RuntimeError("register the model with `await model.register(backend)` before training")
        return self._policy

    def _build_policy(self) -> Policy:
        base, tokenizer = load_embedded_model(self.cache_dir)
        return Policy(base, tokenizer, self.grpo, prefix_store_bytes=self.prefix_store_bytes)

    def _restore_latest(self, model: art.TrainableModel) -> int:
        steps = checkpoint_steps(model)
        if not steps:
            return 0
        latest = steps[-1]
        self._require_policy().load(checkpoints_dir(model) / f"{latest:04d}")
        logger.info("resumed the policy from checkpoint step {}", latest)
        return latest

    def _save_checkpoint(self, model: art.TrainableModel, step: int) -> Path:
        """Write into a temporary folder, then rename: a crash never leaves half a checkpoint."""
        root = checkpoints_dir(model)
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"{step:04d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{step:04d}-", dir=root))
        try:
            self._require_policy().save(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @property
    def server(self) -> PolicyServer | None:
        return self._server



"""The embedded CPU backend: ART's `Backend` protocol, in-process, with torch + peft.

`art.Backend` is a typing Protocol, so this is a plain class with the same methods. It
serves the policy on a loopback OpenAI-compatible endpoint (so rollouts call it exactly as
they would call vLLM) and trains it with ART's tokenization and loss options on LoRA weights.

Steps on disk: `<base_path>/<project>/models/<run_name>/checkpoints/<step:04d>/` holds every
trained step's adapter in PEFT's format, whether or not `save_checkpoint` was set (as ART's
LocalBackend does: the adapter IS the step; `name@step` serving and a restart need it).
`save_checkpoint=False` only skips the optimizer state (also saved every
`optimizer_save_interval` steps); a restart from a step without it resumes the weights with a
fresh optimizer and says so. A step is never counted before its folder is written, so a
restart never loses a trained step. `embedded_model.json` in the model folder records the
model's identity; registering another run or base model under the same folder is refused.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import art
import torch
from art.adapter_leases import pin_inference_step, pinned_inference_step
from art.serving_capabilities import ServingCapabilities
from art.utils.output_dirs import get_model_dir
from loguru import logger

from codreamer.backends.embedded.batcher import SamplingBatcher
from codreamer.backends.embedded.checkpoints import AdapterCache, checkpoint_steps, checkpoints_dir, save_step
from codreamer.backends.embedded.grpo import GRPOBatch, build_grpo_batch
from codreamer.backends.embedded.policy import DEFAULT_PREFIX_STORE_BYTES, GRPOConfig, Policy, load_adapter
from codreamer.backends.embedded.server import PolicyServer
from codreamer.backends.embedded.sft import sft_sequence
from codreamer.backends.embedded.train_options import TrainOptions, parse_train_options
from codreamer.backends.embedded.weights import load_embedded_model

__all__ = ["EmbeddedBackend", "ModelIdentityError", "checkpoint_steps", "checkpoints_dir"]

#: Trajectories per SFT optimizer step when ART's config says "auto".
DEFAULT_SFT_BATCH_SIZE = 8
IDENTITY_FILE = "embedded_model.json"
STEP_NAME_RE = re.compile(r"^(?P<name>.+)@(?P<step>\d+)$")


class ModelIdentityError(ValueError):
    """A model registered under a folder (or a backend) that belongs to another model."""


def _identity(model: art.TrainableModel) -> dict[str, str]:
    return {"name": model.name, "run_name": model.run_name, "project": model.project, "base_model": model.base_model}


def check_identity(model: art.TrainableModel) -> None:
    """Refuse a model whose folder records another name, run or base model; record it otherwise."""
    folder = Path(get_model_dir(model, art_path=model.base_path))
    path = folder / IDENTITY_FILE
    ours = _identity(model)
    if path.is_file():
        theirs = json.loads(path.read_text())
        differ = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if differ:
            detail = ", ".join(f"{k} {old!r} on disk, {new!r} now" for k, (old, new) in differ.items())
            raise ModelIdentityError(f"{folder} belongs to another model ({detail}); use another run_name or project")
        return
    if checkpoint_steps(model):  # a run written before identities were recorded: its folder is its run name
        logger.warning("{} has checkpoints but no {}: adopting them as {}", folder, IDENTITY_FILE, ours)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ours, indent=2))


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
        self._leases: Counter[int] = Counter()
        self._adapters = AdapterCache()
        self._api_key = secrets.token_urlsafe(24)

    # ---------------------------------------------------------------- ART Backend protocol
    async def register(self, model: art.Model) -> None:
        if not isinstance(model, art.TrainableModel):
            raise TypeError("the embedded backend serves trainable models only")
        if self._model is not None and _identity(self._model) != _identity(model):
            raise ModelIdentityError(
                f"this embedded backend holds model {_identity(self._model)}; create another backend for {_identity(model)}"
            )
        check_identity(model)
        self._model = model

    async def _prepare_backend_for_training(self, model: art.TrainableModel, config: Any = None) -> tuple[str, str]:
        if self._policy is None:
            self._policy = await anyio.to_thread.run_sync(self._build_policy)
            self._step = await anyio.to_thread.run_sync(self._restore_latest, model)
        if self._server is None:
            batcher = SamplingBatcher(self._policy, max_batch=self.max_batch, adapter_loader=self._adapter_for_step)
            self._server = PolicyServer(
                batcher, self._policy.tokenizer, self._api_key, model.name, resolve=self._resolve_model
            )
            await self._server.start()
        # ART's client then requires and checks policy_token_spans on every choice, as with its LocalBackend
        object.__setattr__(
            model,
            "_serving_capabilities",
            ServingCapabilities(runtime="openai_compatible", protocol_version=0, policy_token_spans=True),
        )
        return self._server.base_url, self._api_key

    def _model_inference_name(self, model: art.Model, step: int | None = None) -> str:
        """`name@step` for a given (or leased) step; the plain name serves the latest step."""
        if step is None:
            step = pinned_inference_step(model.name)
        return model.name if step is None else f"{model.name}@{step}"

    async def _get_step(self, model: art.TrainableModel) -> int:
        if self._policy is None:
            steps = checkpoint_steps(model)
            return steps[-1] if steps else 0
        return self._step

    async def _delete_checkpoint_files(self, model: art.TrainableModel, steps_to_keep: list[int]) -> None:
        """Delete the other steps' folders, never the latest one (a restart resumes from it) nor a leased one."""
        keep = set(steps_to_keep) | {self._step} | {s for s, n in self._leases.items() if n > 0}
        for step in checkpoint_steps(model):
            if step not in keep:
                await anyio.to_thread.run_sync(_remove_step, checkpoints_dir(model) / f"{step:04d}")
                self._adapters.forget(step)

    @asynccontextmanager
    async def adapter_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        """Inference inside pins `model.get_inference_name()` to `name@step`; the step is kept on disk meanwhile."""
        self._check_servable(model, step)
        self._leases[step] += 1
        try:
            async with pin_inference_step(model.name, step):
                yield
        finally:
            self._leases[step] -= 1

    @asynccontextmanager
    async def exact_adapter_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        """Every token sampled inside comes from step `step` (served from disk when older)."""
        async with self.adapter_lease(model, step):
            yield

    async def train(
        self,
        model: art.TrainableModel,
        trajectory_groups: Iterable[art.TrajectoryGroup],
        *,
        learning_rate: float | None = None,
        save_checkpoint: bool = True,
        **options: Any,
    ) -> art.TrainResult:
        """One policy-gradient step with ART's keywords (`train_options`; unknown ones are refused).

        The step advances even when nothing is trainable (ART's LocalBackend does the same), so
        steps and iterations stay aligned; the metrics say why nothing was trained."""
        parsed = parse_train_options({"learning_rate": learning_rate, "save_checkpoint": save_checkpoint, **options})
        policy = self._require_policy()
        batch = build_grpo_batch(
            list(trajectory_groups),
            policy.tokenizer,
            normalize_advantages=parsed.scale,
            advantage_balance=parsed.advantage_balance,
            model_name=model.name,
            max_length=parsed.packed_sequence_length,
            allow_training_without_logprobs=parsed.allow_training_without_logprobs,
        )
        metrics = _batch_metrics(batch)
        if batch.sequences:
            lr = parsed.learning_rate if parsed.learning_rate is not None else self.grpo.learning_rate
            reference = self._kl_reference(model, parsed) if parsed.kl_penalty_coef > 0 else None
            metrics |= await anyio.to_thread.run_sync(policy.train_step, batch.sequences, lr, parsed.loss(), reference)
        else:
            logger.warning("the step makes no update: {}", _why_nothing(batch))
        await self._commit_step(model, parsed)
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
        end_of_turn = int(policy.tokenizer.convert_tokens_to_ids("<|im_end|>"))  # type: ignore[arg-type]  # one token: one id
        sequences = [
            sft_sequence(
                t.messages_and_choices, t.tools, policy.tokenizer, end_of_turn, assistant_turns=config.assistant_turns
            )
            for t in trajectories
        ]
        if not sequences:
            raise ValueError("train_sft got no trajectories")
        size = config.batch_size if isinstance(config.batch_size, int) else DEFAULT_SFT_BATCH_SIZE
        batches = [sequences[i : i + size] for i in range(0, len(sequences), size)]
        rates = (
            config.learning_rate if isinstance(config.learning_rate, list) else [config.learning_rate] * len(batches)
        )
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
        await self._commit_step(model, TrainOptions())

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
        policy = self._require_policy()
        if not policy.load(checkpoints_dir(model) / f"{latest:04d}"):
            logger.warning(
                "step {} was saved without optimizer state: resuming its weights with a fresh optimizer", latest
            )
        policy.version = latest
        logger.info("resumed the policy from step {}", latest)
        return latest

    async def _commit_step(self, model: art.TrainableModel, options: TrainOptions) -> None:
        """Write the next step's folder, then count it: the step on disk is the step."""
        policy = self._require_policy()
        step = self._step + 1
        with_optimizer = options.save_checkpoint or step % options.optimizer_save_interval == 0
        await anyio.to_thread.run_sync(lambda: save_step(policy, checkpoints_dir(model), step, with_optimizer))
        self._step = policy.version = step

    def _kl_reference(self, model: art.TrainableModel, options: TrainOptions) -> Any:
        if options.kl_ref_adapter_path is not None:
            return load_adapter(Path(options.kl_ref_adapter_path))
        if options.kl_penalty_reference_step is not None:
            return self._adapter_for_step(options.kl_penalty_reference_step)
        return "base"

    def _check_servable(self, model: art.TrainableModel, step: int) -> None:
        if step != self._step and step not in checkpoint_steps(model):
            raise LookupError(f"step {step} of {model.name} is neither the current step {self._step} nor on disk")

    def _adapter_for_step(self, step: int) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise LookupError("no model registered")
        folder = checkpoints_dir(self._model) / f"{step:04d}"
        if not folder.is_dir():
            raise LookupError(f"step {step} of {self._model.name} is not on disk")
        return self._adapters.get(step, folder)

    def _resolve_model(self, requested: str) -> int | None:
        """The step a request's `model` names (None: the latest); LookupError when it names nothing served."""
        if self._model is None:
            raise LookupError("no model registered")
        if requested == self._model.name:
            return None
        match = STEP_NAME_RE.match(requested)
        if match is None or match["name"] != self._model.name:
            raise LookupError(
                f"model {requested!r} is not served here; serving {self._model.name!r} and {self._model.name}@<step>"
            )
        self._check_servable(self._model, int(match["step"]))
        return int(match["step"])

    @property
    def server(self) -> PolicyServer | None:
        return self._server


def _remove_step(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _batch_metrics(batch: GRPOBatch) -> dict[str, float]:
    return {
        "groups_used": float(batch.groups_used),
        "groups_skipped": float(batch.groups_skipped),
        "groups_no_reward_spread": float(batch.groups_no_reward_spread),
        "groups_no_trainable_tokens": float(batch.groups_no_trainable_tokens),
        "sequences_too_long": float(batch.sequences_too_long),
    }


def _why_nothing(batch: GRPOBatch) -> str:
    parts = []
    if batch.groups_no_reward_spread:
        parts.append(f"{batch.groups_no_reward_spread} group(s) without reward spread")
    if batch.groups_no_trainable_tokens:
        parts.append(f"{batch.groups_no_trainable_tokens} group(s) with spread but no sampled tokens with log-probs")
    if batch.sequences_too_long:
        parts.append(f"{batch.sequences_too_long} sequence(s) longer than packed_sequence_length")
    return "; ".join(parts) or "no groups"

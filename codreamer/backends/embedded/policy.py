"""The trainable policy of the embedded backend: a LoRA-wrapped causal LM on CPU.

One object owns the weights, so sampling and GRPO updates never race: both take the same
lock. Sampling returns the chosen tokens' log-probabilities under the model's own
distribution (before temperature, as vLLM reports them), including the end-of-turn token that
ended the completion, so the trainer learns when to stop. Training (`policy_training`)
recomputes them under the current weights; the ratio to the sampled ones corrects stale
samples. Between weight changes, the keys and values of finished rows are kept
(`PrefixStore`) so a rollout's next turn prefills only its new tokens. A request may name an
older adapter (a LoRA state dict): it is swapped in for that batch and swapped back after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from codreamer.backends.embedded.kv_cache import (
    CachedRow,
    close_gaps,
    common_prefix_length,
    preallocated_cache,
    right_aligned_cache,
    row_keys_values,
)
from codreamer.backends.embedded.loss import LossConfig
from codreamer.backends.embedded.policy_training import micro_batch_loss, train_step
from codreamer.backends.embedded.prefix_store import PrefixStore
from codreamer.backends.embedded.sequences import (  # re-exported: callers import them from here
    MIN_SHARED_PREFIX,
    TrainSequence,
    batch_cost,
    micro_batches,
    trainable_shared_prefix,
)

__all__ = ["MIN_SHARED_PREFIX", "Policy", "Sample", "TrainSequence", "batch_cost", "trainable_shared_prefix"]
from codreamer.config import Settings, default_of

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
#: A LoRA state dict (peft's keys, as in `adapter_model.safetensors`).
AdapterState = Mapping[str, torch.Tensor]
#: Says whether a row's tokens so far end its completion (a `stop` string was produced).
StopCheck = Callable[[list[int]], bool]
#: Default memory for the keys/values of recent conversations (`PrefixStore`).
DEFAULT_PREFIX_STORE_BYTES = 512 * 2**20


class GRPOConfig(BaseModel):
    """One GRPO update on the embedded backend (defaults: the settings' defaults)."""

    model_config = ConfigDict(frozen=True)

    learning_rate: float = Field(default=default_of("learning_rate"), gt=0)
    lora_rank: int = Field(default=default_of("lora_rank"), ge=1)
    lora_alpha: int = Field(default=2 * default_of("lora_rank"), ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch_tokens: int = Field(default=2048, ge=64)
    seed: int = default_of("seed")

    @classmethod
    def from_settings(cls, settings: Settings) -> GRPOConfig:
        """LoRA alpha is twice the rank, the usual scale for a rank-r adapter."""
        return cls(
            learning_rate=settings.learning_rate,
            lora_rank=settings.lora_rank,
            lora_alpha=2 * settings.lora_rank,
            seed=settings.seed,
        )


@dataclass
class _Start:
    """Where a batch's decoding starts: the cache so far and the first forward's inputs."""

    cache: Cache
    step_ids: torch.Tensor
    attention: torch.Tensor
    step_pos: torch.Tensor
    computed_positions: int  # prompt positions the forward passes compute (padding included)
    has_gaps: bool = False  # rows start from stored prefixes: close the gaps after the prefill


@dataclass(frozen=True)
class Sample:
    """One sampled completion: token ids, their log-probabilities, why it stopped."""

    token_ids: list[int]  # the end-of-turn token that stopped it included, as vLLM returns it
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the k most likely (id, logprob)
    version: int = 0  # the policy step whose weights sampled it


def _top_k(logits: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of `logits`, the `k` most likely tokens and their log-probs (model distribution)."""
    values, indices = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def _row_generators(seed: int | Sequence[int | None] | None, rows: int) -> list[torch.Generator | None]:
    if seed is None:
        return [None] * rows
    seeds = [seed + row for row in range(rows)] if isinstance(seed, int) else list(seed)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    return [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]


def inverse_cdf_sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` (rows of a distribution), each row from its own generator.

    One uniform draw per row against the cumulative distribution (in float64, so the
    49k-entry sum keeps its precision). `torch.multinomial` draws an exponential per
    vocabulary entry instead, which costs several times more per decoding step.
    """
    cdf = probs.double().cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=gen, dtype=torch.float64) for gen in generators])
    chosen = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return chosen.clamp(max=probs.shape[-1] - 1)


@dataclass
class _Decoding:
    """The tokens each row has drawn so far, and which rows are still in the batch."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    top: list[list[list[tuple[int, float]]]]
    finished: list[bool]
    live: list[int]  # original row of each batch row still decoding

    @classmethod
    def start(cls, rows: int) -> _Decoding:
        return cls(
            [[] for _ in range(rows)],
            [[] for _ in range(rows)],
            [[] for _ in range(rows)],
            [False] * rows,
            list(range(rows)),
        )

    def record(
        self,
        chosen: list[int],
        logprobs: list[float],
        stop_ids: set[int],
        stop_check: StopCheck | None = None,
        top: list[list[tuple[int, float]]] | None = None,
    ) -> list[int]:
        """Append one step's tokens (an end-of-turn token too: it is part of the completion, as
        in vLLM, and the trainer must see it); returns the batch indices of the rows that go on."""
        keep = []
        for index, (row, token, logprob) in enumerate(zip(self.live, chosen, logprobs, strict=True)):
            self.tokens[row].append(token)
            self.logprobs[row].append(logprob)
            if top is not None:
                self.top[row].append(top[index])
            if token in stop_ids or (stop_check is not None and stop_check(self.tokens[row])):
                self.finished[row] = True
                continue
            keep.append(index)
        self.live = [self.live[index] for index in keep]
        return keep

    def samples(self, with_top: bool, version: int) -> list[Sample]:
        return [
            Sample(tokens, logprobs, "stop" if finished else "length", top if with_top else None, version)
            for tokens, logprobs, top, finished in zip(self.tokens, self.logprobs, self.top, self.finished, strict=True)
        ]


class Policy:
    """LoRA policy with sampling and a GRPO step; every public method is thread-safe."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: GRPOConfig,
        *,
        prefix_store_bytes: int = DEFAULT_PREFIX_STORE_BYTES,
    ) -> None:
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        self.model: PeftModel = get_peft_model(base, lora)
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=0.0)
        self._lock = threading.Lock()
        self._num_layers = int(base.config.num_hidden_layers)
        self._lora_merged = False
        self.prefix_store = PrefixStore(prefix_store_bytes)
        self.prompt_tokens = 0  # prompt tokens sampled from, since creation
        self.prefilled_positions = 0  # positions the prefills computed for them (padding included)
        self.version = 0  # the training step of the current weights (set by the backend)
        self.model.eval()

    # ----------------------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int | Sequence[int | None] | None = None,
        *,
        top_logprobs: int = 0,
        stop_check: StopCheck | None = None,
        version: int | None = None,
        adapter_loader: Callable[[int], AdapterState] | None = None,
    ) -> list[Sample]:
        """Sample one completion per prompt, batched with left padding and a KV cache.

        `seed` is one seed per row (or an int: row i gets seed + i). Each row draws from its
        own generator, so a request's tokens do not depend on which other requests happened
        to share its batch. `version` asks for the weights of that step: the current ones when
        it is the current step (checked under the lock, so a training step cannot slip in
        between), else `adapter_loader(version)`'s, swapped in for this call only.
        """
        generators = _row_generators(seed, len(prompts))
        with self._lock, self._weights_of(version, adapter_loader) as served:
            return self._sample_locked(
                prompts, max_new_tokens, temperature, generators, top_logprobs, stop_check, served
            )

    @contextmanager
    def _weights_of(self, version: int | None, adapter_loader: Callable[[int], AdapterState] | None) -> Iterator[int]:
        """Hold the lock's caller on step `version`'s weights (the current ones when None or current)."""
        if version is None or version == self.version:
            yield self.version
            return
        if adapter_loader is None:
            raise LookupError(
                f"step {version} is not the current step {self.version} and no older adapter can be loaded"
            )
        current = self._swap_adapter(adapter_loader(version))
        try:
            yield version
        finally:
            self._swap_adapter(current)

    def _swap_adapter(self, adapter: AdapterState) -> dict[str, torch.Tensor]:
        """Load `adapter` into the LoRA weights (unmerged); return the weights it replaced."""
        self._unmerge_lora()
        current = self.lora_state()
        set_peft_model_state_dict(self.model, dict(adapter))
        return current

    def lora_state(self) -> dict[str, torch.Tensor]:
        """A copy of the current LoRA weights, in peft's keys."""
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def _sample_locked(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        generators: list[torch.Generator | None],
        top_logprobs: int = 0,
        stop_check: StopCheck | None = None,
        version: int = 0,
    ) -> list[Sample]:
        self._merge_lora()
        start = self._start(prompts, max_new_tokens)
        cache, step_ids, attention, step_pos = start.cache, start.step_ids, start.attention, start.step_pos
        self.prompt_tokens += sum(len(p) for p in prompts)
        self.prefilled_positions += start.computed_positions
        rows = _Decoding.start(len(prompts))
        in_batch = rows.live
        for step in range(max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill needs the last position's logits only
            )
            logits = out.logits[:, -1, :].float()
            if step == 0 and start.has_gaps:
                attention = close_gaps(cache, attention, max_new_tokens)
            in_batch = rows.live
            chosen, chosen_logprobs = self._choose(logits, temperature, [generators[row] for row in in_batch])
            top = _top_k(logits, top_logprobs) if top_logprobs else None
            keep = rows.record(chosen.tolist(), chosen_logprobs.tolist(), self.stop_ids, stop_check, top)
            if not keep or step + 1 == max_new_tokens:
                break
            if len(keep) < len(chosen):  # drop finished rows: later steps compute only live ones
                kept = set(keep)
                self._store_rows(
                    prompts, rows, cache, attention, in_batch, [b for b in range(len(in_batch)) if b not in kept]
                )
                selected = torch.tensor(keep)
                cache.batch_select_indices(selected)
                attention, chosen, step_pos = attention[selected], chosen[selected], step_pos[selected]
            step_ids = chosen.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            attention = torch.cat([attention, torch.ones(len(keep), 1, dtype=attention.dtype)], dim=-1)
        self._store_rows(prompts, rows, cache, attention, in_batch, range(len(in_batch)))
        return rows.samples(bool(top_logprobs), version)

    @torch.inference_mode()
    def prompt_logprobs(
        self,
        prompt: list[int],
        top_logprobs: int = 0,
        version: int | None = None,
        adapter_loader: Callable[[int], AdapterState] | None = None,
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Log-prob of each prompt token given the tokens before it (None for the first), with
        the `top_logprobs` most likely tokens at each position: scores a given completion."""
        with self._lock, self._weights_of(version, adapter_loader):
            self._merge_lora()
            logits = self.model(input_ids=torch.tensor([prompt])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1).tolist()
        tops = _top_k(logits, top_logprobs) if top_logprobs else [[] for _ in chosen]
        return [None, *zip(chosen, tops, strict=True)]

    def _start(self, prompts: list[list[int]], max_new_tokens: int) -> _Start:
        """Prefill from the stored conversations when that computes fewer positions than
        prefilling the batch's common prefix once and each row's rest."""
        shared = self._shared_prefix_length(prompts)
        longest = max(len(p) for p in prompts)
        shared_cost = shared + len(prompts) * (longest - shared)
        if self.prefix_store.max_bytes and len(self.prefix_store):
            matches = [self.prefix_store.match(p, len(p) - 1) for p in prompts]
            stored_cost = len(prompts) * max(len(p) - length for p, (length, _) in zip(prompts, matches, strict=True))
            if max(length for length, _ in matches) >= MIN_SHARED_PREFIX and stored_cost < shared_cost:
                rows: list[CachedRow] = [
                    (entry.keys, entry.values, length) if entry is not None else (None, None, 0)
                    for length, entry in matches
                ]
                return self._start_from_store(prompts, rows, max_new_tokens, stored_cost)
        cache = preallocated_cache(self._num_layers, longest + max_new_tokens)
        if shared:
            self.model(
                input_ids=torch.tensor([prompts[0][:shared]]), past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            cache.batch_repeat_interleave(len(prompts))
        step_ids, suffix_mask = self._left_pad([p[shared:] for p in prompts])
        attention = torch.cat([torch.ones(len(prompts), shared, dtype=suffix_mask.dtype), suffix_mask], dim=-1)
        step_pos = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        return _Start(cache, step_ids, attention, step_pos, shared_cost)

    def _start_from_store(
        self, prompts: list[list[int]], rows: list[CachedRow], max_new_tokens: int, cost: int
    ) -> _Start:
        """Each row starts from its stored prefix (right-aligned); the rest is one left-padded pass."""
        lengths = [length for _, _, length in rows]
        suffixes = [p[length:] for p, length in zip(prompts, lengths, strict=True)]
        capacity = max(lengths) + max(len(s) for s in suffixes) + max_new_tokens
        cache, cached_mask = right_aligned_cache(rows, capacity)
        step_ids, suffix_mask = self._left_pad(suffixes)
        attention = torch.cat([cached_mask, suffix_mask], dim=-1)
        step_pos = torch.tensor(lengths).unsqueeze(-1) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        return _Start(cache, step_ids, attention, step_pos, cost, has_gaps=True)

    def _shared_prefix_length(self, prompts: list[list[int]]) -> int:
        """The prompts' common prefix, prefilled once (batch 1) and copied to every row.

        The rows of a GRPO group share the whole prompt, and every rollout shares the system
        prompt, so this removes most of a cold batch's prefill. At least one token of each
        prompt is left to the batched pass, which yields the next-token logits. 0: none worth it.
        """
        if len(prompts) < 2:
            return 0
        shared = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _store_rows(
        self,
        prompts: list[list[int]],
        rows: _Decoding,
        cache: Cache,
        attention: torch.Tensor,
        in_batch: list[int],
        batch_indices: Iterable[int],
    ) -> None:
        """Keep these batch rows' keys/values (prompt + the tokens fed back) for later turns."""
        if not self.prefix_store.max_bytes:
            return
        for index in batch_indices:
            row = in_batch[index]
            columns = attention[index].nonzero().squeeze(-1)
            keys, values = row_keys_values(cache, index, columns)
            self.prefix_store.add((prompts[row] + rows.tokens[row])[: len(columns)], keys, values)

    @staticmethod
    def _choose(
        logits: torch.Tensor, temperature: float, generators: list[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the next token per row (from the distribution at `temperature`); return it and its
        log-probability under the model's own distribution (temperature 1), as vLLM reports it:
        the value the trainer recomputes, so the importance ratio of a fresh sample is 1."""
        log_probs = torch.log_softmax(logits, dim=-1)
        if temperature <= 0:
            chosen = log_probs.argmax(dim=-1)
        elif temperature == 1.0:
            chosen = inverse_cdf_sample(log_probs.exp(), generators)
        else:
            chosen = inverse_cdf_sample(torch.softmax(logits / temperature, dim=-1), generators)
        return chosen, log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids, mask

    # ------------------------------------------------------------------------- LoRA merging
    def _lora_model(self) -> Any:
        """peft's LoraModel (typed loosely by peft)."""
        return self.model.base_model

    def _merge_lora(self) -> None:
        """Fold the LoRA deltas into the base weights for sampling.

        Decoding is bound by reading weights; unmerged, each of the 210 adapted layers also
        runs two small matmuls and peft's Python dispatch per token. Merging costs one
        B @ A per layer, once per training step. The base weights change by rounding only
        (W + dW - dW), about 1e-7 relative per step.
        """
        if not self._lora_merged:
            self._lora_model().merge_adapter()
            self._lora_merged = True
            self.prefix_store.clear()  # stored keys/values belong to the weights before

    def _unmerge_lora(self) -> None:
        """Training needs the adapters separate: the gradient is on A and B, not on W."""
        if self._lora_merged:
            self._lora_model().unmerge_adapter()
            self._lora_merged = False
            self.prefix_store.clear()  # training is about to change the weights

    # ----------------------------------------------------------------------------- training
    def train_step(
        self,
        sequences: list[TrainSequence],
        learning_rate: float,
        loss: LossConfig | None = None,
        reference: AdapterState | str | None = None,
    ) -> dict[str, float]:
        """One policy-gradient update (`policy_training.train_step`); `reference` ("base" or a
        LoRA state) gives the KL penalty's reference log-probs when `loss.kl_penalty_coef` > 0."""
        with self._lock:
            self._unmerge_lora()
            return train_step(self, sequences, learning_rate, loss or LossConfig(), reference)

    def micro_batches(self, sequences: list[TrainSequence]) -> list[list[TrainSequence]]:
        return micro_batches(sequences, self.config.micro_batch_tokens)

    def policy_loss(
        self, sequences: list[TrainSequence], normalizer: int, loss: LossConfig | None = None
    ) -> tuple[torch.Tensor, float]:
        """The loss of one micro-batch divided by `normalizer`, and the (detached) sum of its token log-probs."""
        self._unmerge_lora()
        value, logprob_sum, _ = micro_batch_loss(self, sequences, normalizer, loss or LossConfig(), None)
        return value, logprob_sum

    # -------------------------------------------------------------------------- checkpoints
    def save(self, directory: Path, *, optimizer: bool = True) -> None:
        """Write the adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
        loadable with `PeftModel.from_pretrained`) and, if asked, the optimizer state."""
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(str(directory), safe_serialization=True)
            if optimizer:
                torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> bool:
        """Restore LoRA weights (and the optimizer state when saved); False when it had none."""
        with self._lock:
            self._unmerge_lora()  # the merged deltas belong to the old adapter weights
            set_peft_model_state_dict(self.model, load_adapter(directory))
            optimizer_path = directory / OPTIMIZER_FILE
            if optimizer_path.is_file():
                self.optimizer.load_state_dict(torch.load(optimizer_path, weights_only=True))
                return True
            self.optimizer.state.clear()
            return False


def load_adapter(directory: Path) -> dict[str, torch.Tensor]:
    """The LoRA state saved in a checkpoint folder (peft's keys)."""
    return load_file(str(directory / ADAPTER_FILE))

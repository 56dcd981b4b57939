"""The trainable policy of the embedded backend: a LoRA-wrapped causal LM on CPU.

One object owns the weights, so sampling and GRPO updates never race: both take the same
lock. Sampling returns the chosen tokens' log-probabilities (what the OpenAI API calls
`logprobs`), and training recomputes them under the current weights for the loss, as an
on-policy GRPO step with one update per batch of groups. Between weight changes, the keys and
values of finished rows are kept (`PrefixStore`) so a rollout's next turn prefills only its
new tokens.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from codreamer.backends.embedded.kv_cache import (
    CachedRow,
    close_gaps,
    common_prefix_length,
    preallocated_cache,
    right_aligned_cache,
    row_keys_values,
)
from codreamer.backends.embedded.prefix_store import PrefixStore
from codreamer.config import Settings, default_of

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
#: A common prefix shorter than this is not worth a forward pass of its own.
MIN_SHARED_PREFIX = 16
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
            learning_rate=settings.learning_rate, lora_rank=settings.lora_rank, lora_alpha=2 * settings.lora_rank, seed=settings.seed
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

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-turn token) or "length"


@dataclass(frozen=True)
class TrainSequence:
    """Tokens to reinforce with one advantage: the completion, plus `prompt_spans`.

    `prompt_spans` are [start, end) ranges of `prompt_ids` that were sampled too: earlier
    turns of the same episode, which a multi-turn trajectory carries in its last prompt.
    Training them inside the last turn's sequence costs one forward pass instead of one per
    turn, with the same loss.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    prompt_spans: tuple[tuple[int, int], ...] = ()

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def trained_tokens(self) -> int:
        return len(self.completion_ids) + sum(end - start for start, end in self.prompt_spans)


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


def _tokens(seq: TrainSequence) -> list[int]:
    return seq.prompt_ids + seq.completion_ids


def _first_trained(seq: TrainSequence) -> int:
    return min([len(seq.prompt_ids), *(start for start, _ in seq.prompt_spans)])


def _shared_limit(seq: TrainSequence) -> int:
    """How much of `seq` a shared prefix may cover: up to the position that predicts its first trained token."""
    return _first_trained(seq) - 1


def trainable_shared_prefix(sequences: Sequence[TrainSequence]) -> int:
    """Length of the prefix all `sequences` share and none trains on (0 when not worth sharing)."""
    if len(sequences) < 2:
        return 0
    shared = min(common_prefix_length([_tokens(s) for s in sequences]), *(_shared_limit(s) for s in sequences))
    return shared if shared >= MIN_SHARED_PREFIX else 0


def batch_cost(sequences: Sequence[TrainSequence]) -> int:
    """Tokens a micro-batch computes: its shared prefix once, plus each row's padded rest."""
    shared = trainable_shared_prefix(sequences)
    return shared + len(sequences) * (max(s.length for s in sequences) - shared)


def _prefix_runs(ordered: Sequence[TrainSequence]) -> Iterator[list[TrainSequence]]:
    """Consecutive runs of token-sorted sequences, extended while sharing saves computed tokens."""
    run: list[TrainSequence] = []
    for seq in ordered:
        if run and batch_cost([*run, seq]) >= batch_cost(run) + seq.length:
            yield run
            run = []
        run.append(seq)
    if run:
        yield run


def _chunks(sequences: Sequence[TrainSequence], budget: int) -> list[list[TrainSequence]]:
    """Consecutive chunks whose `batch_cost` fits `budget` (a longer sequence goes alone)."""
    chunks: list[list[TrainSequence]] = []
    current: list[TrainSequence] = []
    for seq in sequences:
        if current and batch_cost([*current, seq]) > budget:
            chunks.append(current)
            current = []
        current.append(seq)
    if current:
        chunks.append(current)
    return chunks


@dataclass
class _Decoding:
    """The tokens each row has drawn so far, and which rows are still in the batch."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    live: list[int]  # original row of each batch row still decoding

    @classmethod
    def start(cls, rows: int) -> _Decoding:
        return cls([[] for _ in range(rows)], [[] for _ in range(rows)], [False] * rows, list(range(rows)))

    def record(self, chosen: list[int], logprobs: list[float], stop_ids: set[int]) -> list[int]:
        """Append one step's tokens; returns the batch indices of the rows that go on."""
        keep = []
        for index, (row, token, logprob) in enumerate(zip(self.live, chosen, logprobs, strict=True)):
            if token in stop_ids:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
            self.logprobs[row].append(logprob)
            keep.append(index)
        self.live = [self.live[index] for index in keep]
        return keep

    def samples(self) -> list[Sample]:
        return [
            Sample(tokens, logprobs, "stop" if finished else "length")
            for tokens, logprobs, finished in zip(self.tokens, self.logprobs, self.finished, strict=True)
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
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._trainable, lr=config.learning_rate, weight_decay=0.0)
        self._lock = threading.Lock()
        self._num_layers = int(base.config.num_hidden_layers)
        self._lora_merged = False
        self.prefix_store = PrefixStore(prefix_store_bytes)
        self.prompt_tokens = 0  # prompt tokens sampled from, since creation
        self.prefilled_positions = 0  # positions the prefills computed for them (padding included)
        self.model.eval()

    # ----------------------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int | Sequence[int | None] | None = None,
    ) -> list[Sample]:
        """Sample one completion per prompt, batched with left padding and a KV cache.

        `seed` is one seed per row (or an int: row i gets seed + i). Each row draws from its
        own generator, so a request's tokens do not depend on which other requests happened
        to share its batch.
        """
        with self._lock:
            return self._sample_locked(prompts, max_new_tokens, temperature, _row_generators(seed, len(prompts)))

    def _sample_locked(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        generators: list[torch.Generator | None],
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
            keep = rows.record(chosen.tolist(), chosen_logprobs.tolist(), self.stop_ids)
            if not keep or step + 1 == max_new_tokens:
                break
            if len(keep) < len(chosen):  # drop finished rows: later steps compute only live ones
                kept = set(keep)
                self._store_rows(prompts, rows, cache, attention, in_batch, [b for b in range(len(in_batch)) if b not in kept])
                selected = torch.tensor(keep)
                cache.batch_select_indices(selected)
                attention, chosen, step_pos = attention[selected], chosen[selected], step_pos[selected]
            step_ids = chosen.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            attention = torch.cat([attention, torch.ones(len(keep), 1, dtype=attention.dtype)], dim=-1)
        self._store_rows(prompts, rows, cache, attention, in_batch, range(len(in_batch)))
        return rows.samples()

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
                    (entry.keys, entry.values, length) if entry is not None else (None, None, 0) for length, entry in matches
                ]
                return self._start_from_store(prompts, rows, max_new_tokens, stored_cost)
        cache = preallocated_cache(self._num_layers, longest + max_new_tokens)
        if shared:
            self.model(input_ids=torch.tensor([prompts[0][:shared]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
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
        """Pick the next token per row; return it and its log-probability under the sampling distribution."""
        if temperature <= 0:
            log_probs = torch.log_softmax(logits, dim=-1)
            chosen = log_probs.argmax(dim=-1)
        else:
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            chosen = inverse_cdf_sample(log_probs.exp(), generators)
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
    def _merge_lora(self) -> None:
        """Fold the LoRA deltas into the base weights for sampling.

        Decoding is bound by reading weights; unmerged, each of the 210 adapted layers also
        runs two small matmuls and peft's Python dispatch per token. Merging costs one
        B @ A per layer, once per training step. The base weights change by rounding only
        (W + dW - dW), about 1e-7 relative per step.
        """
        if not self._lora_merged:
            self.model.base_model.merge_adapter()
            self._lora_merged = True
            self.prefix_store.clear()  # stored keys/values belong to the weights before

    def _unmerge_lora(self) -> None:
        """Training needs the adapters separate: the gradient is on A and B, not on W."""
        if self._lora_merged:
            self.model.base_model.unmerge_adapter()
            self._lora_merged = False
            self.prefix_store.clear()  # training is about to change the weights

    # ----------------------------------------------------------------------------- training
    def train_step(self, sequences: list[TrainSequence], learning_rate: float) -> dict[str, float]:
        """One GRPO update: maximise advantage-weighted log-likelihood of the sampled tokens.

        The step is on-policy (the samples come from the current weights and we update
        once), so the PPO ratio is 1 and the clipped objective reduces to this gradient.
        The loss is averaged over all completion tokens of the batch (token-level, as in
        DAPO), so long and short answers weigh by their length.
        """
        with self._lock:
            return self._train_locked(sequences, learning_rate)

    def _train_locked(self, sequences: list[TrainSequence], learning_rate: float) -> dict[str, float]:
        self._unmerge_lora()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        total_tokens = sum(s.trained_tokens for s in sequences)
        active = [s for s in sequences if s.advantage != 0.0]  # zero advantage: zero gradient
        self.model.train()
        loss_sum, logprob_sum = 0.0, 0.0
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with tqdm(total=sum(s.length for s in active), desc="train", unit="tok", unit_scale=True, leave=False) as bar:
                for micro in self.micro_batches(active):
                    loss, logprob_total = self.policy_loss(micro, normalizer=total_tokens)
                    loss.backward()
                    loss_sum += float(loss.detach())
                    logprob_sum += logprob_total
                    bar.update(sum(s.length for s in micro))
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.config.max_grad_norm)
            self.optimizer.step()
        finally:
            self.model.eval()
        active_tokens = sum(s.trained_tokens for s in active)
        return {
            "loss": loss_sum,
            "grad_norm": float(grad_norm),
            "num_sequences": float(len(sequences)),
            "num_tokens": float(total_tokens),
            "mean_logprob": logprob_sum / active_tokens if active_tokens else math.nan,
            "learning_rate": learning_rate,
        }

    def micro_batches(self, sequences: list[TrainSequence]) -> list[list[TrainSequence]]:
        """Split by a computed-token budget so activation memory stays bounded on any batch size.

        Sequences that share a prompt prefix (a GRPO group; rollouts share the system
        prompt) are kept together, so each micro-batch computes that prefix once
        (`batch_cost`). The rest are sorted by length, so each micro-batch pads little.
        """
        budget = self.config.micro_batch_tokens
        runs = list(_prefix_runs(sorted(sequences, key=_tokens)))
        loners = sorted((run[0] for run in runs if len(run) == 1), key=lambda s: s.length)
        shared = [chunk for run in runs if len(run) > 1 for chunk in _chunks(run, budget)]
        return shared + _chunks(loners, budget)

    def policy_loss(self, sequences: list[TrainSequence], normalizer: int) -> tuple[torch.Tensor, float]:
        """Sum of -advantage * log p(token) over completion tokens, divided by `normalizer`.

        The batch's shared prefix (untrained tokens only) runs once with batch size 1 and
        its keys/values are repeated for every row, inside the autograd graph, so the
        gradient is the same as with every row computed in full. Log-probs are computed
        only at positions that predict trained tokens, so full-vocabulary logits never
        exist for the prompt. Returns the loss and the (detached) sum of the token log-probs.
        """
        self._unmerge_lora()
        decoder = self.model.base_model.model.model
        shared = trainable_shared_prefix(sequences)
        cache = None
        if shared:
            cache = DynamicCache(config=decoder.config)
            decoder(input_ids=torch.tensor([_tokens(sequences[0])[:shared]]), past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(sequences))
        ids, mask, targets, advantages = self._right_pad(sequences, shared)
        attention = torch.cat([torch.ones(len(sequences), shared, dtype=mask.dtype), mask], dim=-1) if shared else mask
        positions = (shared + torch.arange(ids.shape[1])).unsqueeze(0) if shared else None
        hidden = decoder(
            input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=bool(shared)
        ).last_hidden_state
        rows, cols = torch.nonzero(targets[:, 1:] >= 0, as_tuple=True)
        logits = self.model.base_model.model.lm_head(hidden[rows, cols]).float()
        token_ids = targets[rows, cols + 1]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        loss = -(advantages[rows] * token_logprobs).sum() / max(normalizer, 1)
        return loss, float(token_logprobs.detach().sum())

    def _right_pad(self, sequences: list[TrainSequence], offset: int = 0) -> tuple[torch.Tensor, ...]:
        """Token ids from `offset` on, right-padded; targets hold the trained tokens, else -1."""
        width = max(s.length for s in sequences) - offset
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        targets = torch.full((len(sequences), width), -1, dtype=torch.long)
        for row, seq in enumerate(sequences):
            full = _tokens(seq)[offset:]
            ids[row, : len(full)] = torch.tensor(full, dtype=torch.long)
            mask[row, : len(full)] = 1
            start = len(seq.prompt_ids) - offset
            targets[row, start : len(full)] = ids[row, start : len(full)]
            for span_start, span_end in seq.prompt_spans:
                targets[row, span_start - offset : span_end - offset] = ids[row, span_start - offset : span_end - offset]
        advantages = torch.tensor([s.advantage for s in sequences], dtype=torch.float32)
        return ids, mask, targets, advantages

    # -------------------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """Write the LoRA weights and optimizer state (the caller makes it atomic)."""
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
            save_file(state, str(directory / ADAPTER_FILE))
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        """Restore LoRA weights and optimizer state saved by `save`."""
        with self._lock:
            self._unmerge_lora()  # the merged deltas belong to the old adapter weights
            set_peft_model_state_dict(self.model, load_file(str(directory / ADAPTER_FILE)))
            optimizer_path = directory / OPTIMIZER_FILE
            if optimizer_path.is_file():
                self.optimizer.load_state_dict(torch.load(optimizer_path, weights_only=True))

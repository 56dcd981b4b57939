"""The embedded policy's training step: forward passes over micro-batches and one optimizer step.

Kept apart from sampling (`policy.Policy`), which calls in here holding its lock with the
LoRA weights unmerged. The loss itself (importance ratio, clipping, KL shaping) is `loss.py`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft import set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from codreamer.backends.embedded.loss import LossConfig, LossStats, policy_loss_sum
from codreamer.backends.embedded.sequences import TrainSequence, tokens_of, trainable_shared_prefix

if TYPE_CHECKING:
    from collections.abc import Mapping

    from peft import PeftModel

    AdapterState = Mapping[str, torch.Tensor]


class _Config(Protocol):
    @property
    def max_grad_norm(self) -> float: ...


class Policy(Protocol):
    """What the training step uses of `policy.Policy` (which imports this module, not the reverse)."""

    @property
    def model(self) -> PeftModel: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def config(self) -> _Config: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def trainable(self) -> list[torch.nn.Parameter]: ...

    def micro_batches(self, sequences: list[TrainSequence]) -> list[list[TrainSequence]]: ...

    def lora_state(self) -> dict[str, torch.Tensor]: ...


def train_step(
    policy: Policy,
    sequences: list[TrainSequence],
    learning_rate: float,
    loss: LossConfig,
    reference: AdapterState | str | None,
) -> dict[str, float]:
    """One update: the loss of every trained token, summed over micro-batches and divided by the
    batch's trained-token count (token-level, as in DAPO), then one clipped AdamW step."""
    for group in policy.optimizer.param_groups:
        group["lr"] = learning_rate
    total_tokens = sum(s.trained_tokens for s in sequences)
    active = [s for s in sequences if s.advantage != 0.0]  # zero advantage (and no KL): zero gradient
    if loss.kl_penalty_coef > 0:
        active = list(sequences)
    refs = reference_logprobs(policy, active, reference) if loss.kl_penalty_coef > 0 else None
    policy.model.train()
    loss_sum, logprob_sum, stats = 0.0, 0.0, LossStats()
    try:
        policy.optimizer.zero_grad(set_to_none=True)
        with tqdm(total=sum(s.length for s in active), desc="train", unit="tok", unit_scale=True, leave=False) as bar:
            for micro in policy.micro_batches(active):
                ref = torch.cat([refs[id(s)] for s in micro]) if refs is not None else None
                value, logprobs, micro_stats = micro_batch_loss(policy, micro, total_tokens, loss, ref)
                value.backward()
                loss_sum += float(value.detach())
                logprob_sum += logprobs
                stats.add(micro_stats)
                bar.update(sum(s.length for s in micro))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable, policy.config.max_grad_norm)
        policy.optimizer.step()
    finally:
        policy.model.eval()
    return _metrics(sequences, loss_sum, float(grad_norm), logprob_sum, stats, learning_rate, loss)


def _metrics(
    sequences: list[TrainSequence],
    loss_sum: float,
    grad_norm: float,
    logprob_sum: float,
    stats: LossStats,
    lr: float,
    loss: LossConfig,
) -> dict[str, float]:
    metrics = {
        "loss": loss_sum,
        "grad_norm": grad_norm,
        "num_sequences": float(len(sequences)),
        "num_tokens": float(sum(s.trained_tokens for s in sequences)),
        "mean_logprob": logprob_sum / stats.tokens if stats.tokens else math.nan,
        "learning_rate": lr,
        "mean_importance_ratio": stats.ratio_sum / stats.tokens if stats.tokens else math.nan,
        "clipped_fraction": stats.clipped / stats.tokens if stats.tokens else math.nan,
    }
    if loss.kl_penalty_coef > 0:
        metrics["kl_policy_ref"] = stats.kl_sum / stats.tokens if stats.tokens else math.nan
    return metrics


def micro_batch_loss(
    policy: Policy, sequences: list[TrainSequence], normalizer: int, loss: LossConfig, ref: torch.Tensor | None
) -> tuple[torch.Tensor, float, LossStats]:
    """The micro-batch's summed loss divided by `normalizer`, its log-prob sum, its stats."""
    new, rows = trained_logprobs(policy, sequences)
    old = torch.tensor([lp for s in sequences for lp in s.old_logprobs()], dtype=torch.float32)
    advantages = torch.tensor([s.advantage for s in sequences], dtype=torch.float32)[rows]
    total, stats = policy_loss_sum(new, old, advantages, rows, loss, ref)
    return total / max(normalizer, 1), float(new.detach().sum()), stats


def trained_logprobs(policy: Policy, sequences: list[TrainSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every trained token (row-major: sequence by sequence, in position order) and
    the row of each.

    The batch's shared prefix (untrained tokens only) runs once with batch size 1 and its
    keys/values are repeated for every row, inside the autograd graph, so the gradient is the
    same as with every row computed in full. Log-probs are computed only at positions that
    predict trained tokens, so full-vocabulary logits never exist for the prompt.
    """
    causal_lm: Any = policy.model.base_model.model  # peft's LoraModel wraps the transformers model
    decoder = causal_lm.model
    shared = trainable_shared_prefix(sequences)
    cache = None
    if shared:
        cache = DynamicCache(config=decoder.config)
        decoder(input_ids=torch.tensor([tokens_of(sequences[0])[:shared]]), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(sequences))
    ids, mask, targets = _right_pad(policy.pad_id, sequences, shared)
    attention = torch.cat([torch.ones(len(sequences), shared, dtype=mask.dtype), mask], dim=-1) if shared else mask
    positions = (shared + torch.arange(ids.shape[1])).unsqueeze(0) if shared else None
    hidden = decoder(
        input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=bool(shared)
    ).last_hidden_state
    rows, cols = torch.nonzero(targets[:, 1:] >= 0, as_tuple=True)
    logits = causal_lm.lm_head(hidden[rows, cols]).float()
    token_ids = targets[rows, cols + 1]
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), rows


def _right_pad(pad_id: int, sequences: list[TrainSequence], offset: int = 0) -> tuple[torch.Tensor, ...]:
    """Token ids from `offset` on, right-padded; targets hold the trained tokens, else -1."""
    width = max(s.length for s in sequences) - offset
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        full = tokens_of(seq)[offset:]
        ids[row, : len(full)] = torch.tensor(full, dtype=torch.long)
        mask[row, : len(full)] = 1
        trained = torch.tensor(seq.trained_positions(), dtype=torch.long) - offset
        targets[row, trained] = ids[row, trained]
    return ids, mask, targets


@torch.no_grad()
def reference_logprobs(
    policy: Policy, sequences: list[TrainSequence], reference: AdapterState | str | None
) -> dict[int, torch.Tensor]:
    """Each sequence's trained-token log-probs under the KL reference: the base model (adapter
    disabled) or another LoRA state, swapped in for these passes and swapped back after."""
    out: dict[int, torch.Tensor] = {}
    saved = None
    if reference is not None and not isinstance(reference, str):
        saved = policy.lora_state()
        set_peft_model_state_dict(policy.model, dict(reference))
    try:
        for micro in policy.micro_batches(sequences):
            if isinstance(reference, str) or reference is None:
                with policy.model.disable_adapter():
                    values, rows = trained_logprobs(policy, micro)
            else:
                values, rows = trained_logprobs(policy, micro)
            for index, seq in enumerate(micro):
                out[id(seq)] = values[rows == index]
    finally:
        if saved is not None:
            set_peft_model_state_dict(policy.model, saved)
    return out

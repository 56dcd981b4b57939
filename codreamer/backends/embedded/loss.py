"""The embedded backend's policy-gradient loss, with ART's options (`art.loss.loss_fn` semantics).

Every trained token carries the log-probability the sampler reported for it (`old`). The
importance ratio `exp(new - old)` corrects tokens sampled by older weights (PipelineTrainer
trains on groups several steps stale); unknown `old` values count as on-policy (ratio 1).

- `cispo` (ART's default): `-clip(ratio, 1 - eps, 1 + eps_high).detach() * A * new`,
  eps 1.0 and eps_high 4.0 unless given: the gradient of REINFORCE, weighted by the clipped ratio.
- `ppo`: `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`, eps 0.2, eps_high = eps.
- `importance_sampling_level` "sequence" / "average" / "geometric_average" use the mean
  log-ratio of each sequence, as ART does; `max_negative_advantage_importance_sampling_weight`
  caps the ratio and `mask_prob_ratio` zeroes ratios outside the clip range.
- `kl_penalty_coef` > 0 shapes the advantages with the reference log-probs (the base model, or a
  given checkpoint): `A += coef * (mean_kl - kl_token)`, `kl_token = source - ref`, where source
  is the current learner (detached) or the sampler; the mean is over the micro-batch's tokens.

The loss is summed over tokens; the caller divides by the batch's trained-token count, so every
token weighs the same (token-level, as in DAPO) across micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossName = Literal["cispo", "ppo"]
ImportanceLevel = Literal["token", "sequence", "average", "geometric_average"]
KLSource = Literal["current_learner", "sample"]
#: exp() of a log-ratio beyond this overflows nothing in fp32 and no sane ratio gets there.
LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class LossConfig:
    """The loss options of one training step (ART's `train` keywords of the same names)."""

    loss_fn: LossName = "cispo"
    epsilon: float | None = None
    epsilon_high: float | None = None
    importance_sampling_level: ImportanceLevel = "token"
    max_negative_advantage_importance_sampling_weight: float | None = None
    mask_prob_ratio: bool = False
    kl_penalty_coef: float = 0.0
    kl_penalty_source: KLSource = "current_learner"

    def clip_range(self) -> tuple[float, float]:
        """(low, high) of the ratio clip, with ART's defaults per loss."""
        default, default_high = (0.2, None) if self.loss_fn == "ppo" else (1.0, 4.0)
        epsilon = default if self.epsilon is None else self.epsilon
        high = self.epsilon_high if self.epsilon_high is not None else default_high
        return 1.0 - epsilon, 1.0 + (epsilon if high is None else high)


@dataclass
class LossStats:
    """Sums over a micro-batch's tokens, for the step's metrics."""

    tokens: int = 0
    ratio_sum: float = 0.0
    clipped: int = 0
    kl_sum: float = 0.0

    def add(self, other: LossStats) -> None:
        self.tokens += other.tokens
        self.ratio_sum += other.ratio_sum
        self.clipped += other.clipped
        self.kl_sum += other.kl_sum


def _sequence_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each token gets the mean of `values` over its own row (sequence)."""
    count = int(rows.max()) + 1 if rows.numel() else 0
    sums = torch.zeros(count, dtype=values.dtype).index_add(0, rows, values)
    sizes = torch.zeros(count, dtype=values.dtype).index_add(0, rows, torch.ones_like(values))
    return (sums / sizes.clamp_min(1))[rows]


def _ratio(log_diff: torch.Tensor, rows: torch.Tensor, level: ImportanceLevel) -> torch.Tensor:
    token = torch.exp(log_diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if level == "token":
        return token
    sequence = torch.exp(_sequence_mean(log_diff, rows).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if level == "sequence":
        return sequence
    if level == "average":
        return (token + sequence) / 2
    return token.sqrt() * sequence.sqrt()


def policy_loss_sum(
    new: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    config: LossConfig,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Summed loss over trained tokens (1-D tensors aligned token by token; `rows`: the sequence of each)."""
    old = torch.where(torch.isfinite(old), old, new.detach())
    log_diff = new - old
    ratio = _ratio(log_diff, rows, config.importance_sampling_level)
    low, high = config.clip_range()
    stats = LossStats(tokens=int(new.numel()), ratio_sum=float(ratio.detach().sum()))
    stats.clipped = int(((ratio.detach() < low) | (ratio.detach() > high)).sum())
    if config.max_negative_advantage_importance_sampling_weight:
        ratio = ratio.clamp(max=config.max_negative_advantage_importance_sampling_weight)
    if config.mask_prob_ratio:
        ratio = torch.where((ratio > low) & (ratio < high), ratio, torch.zeros_like(ratio))
    if config.kl_penalty_coef > 0 and ref is not None:
        source = new.detach() if config.kl_penalty_source == "current_learner" else old.detach()
        kl = source - ref
        advantages = advantages + config.kl_penalty_coef * (kl.mean() - kl)
        stats.kl_sum = float(kl.sum())
    if config.loss_fn == "ppo":
        losses = -torch.min(ratio * advantages, ratio.clamp(low, high) * advantages)
    else:
        losses = -(ratio.detach().clamp(low, high) * advantages * new)
    return losses.sum(), stats

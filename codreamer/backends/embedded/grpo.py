"""From scored trajectory groups to GRPO training sequences.

GRPO needs no value model: each trajectory's advantage is its reward relative to the
other attempts at the same scenario, `(r - mean) / (std + eps)`. A group whose rewards
are all equal teaches nothing and is skipped (and counted). Every assistant turn of a
trajectory becomes one sequence, with the exact prompt and completion token ids the
sampler used, so the loss is computed on the tokens that were really generated.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openai.types.chat.chat_completion import Choice

from codreamer.backends.embedded.policy import TrainSequence

if TYPE_CHECKING:  # annotations only: importing ART costs seconds a bare GRPO step never needs
    import art

ADVANTAGE_EPS = 1e-6


class MissingTokenIds(ValueError):
    """A choice lacks `prompt_token_ids`/`token_ids`: it was not sampled by the embedded server."""


@dataclass(frozen=True)
class GRPOBatch:
    sequences: list[TrainSequence]
    groups_used: int
    groups_skipped: int


def group_advantages(rewards: list[float]) -> list[float]:
    """Rewards normalised within their group; all zeros when the group has no spread."""
    if len(rewards) < 2:
        return [0.0] * len(rewards)
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    if std < ADVANTAGE_EPS:
        return [0.0] * len(rewards)
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


def _choice_token_ids(choice: Choice | Mapping[str, Any]) -> tuple[list[int], list[int]]:
    extra = choice if isinstance(choice, Mapping) else (choice.model_extra or {})
    prompt_ids, token_ids = extra.get("prompt_token_ids"), extra.get("token_ids")
    if prompt_ids is None or token_ids is None:
        raise MissingTokenIds("a choice has no prompt_token_ids/token_ids; sample through the embedded server")
    return list(prompt_ids), list(token_ids)


def _is_choice(item: Any) -> bool:
    return isinstance(item, Choice) or (isinstance(item, Mapping) and "finish_reason" in item and "message" in item)


def _extends(later: TrainSequence, earlier: TrainSequence) -> bool:
    """True when `later`'s prompt begins with exactly `earlier`'s prompt + completion tokens."""
    head = earlier.length
    return len(later.prompt_ids) >= head and later.prompt_ids[:head] == earlier.prompt_ids + earlier.completion_ids


def _merge(earlier: TrainSequence, later: TrainSequence) -> TrainSequence:
    span = (len(earlier.prompt_ids), earlier.length)
    spans = (*earlier.prompt_spans, *([span] if earlier.completion_ids else []), *later.prompt_spans)
    return TrainSequence(later.prompt_ids, later.completion_ids, later.advantage, spans)


def trajectory_sequences(trajectory: art.Trajectory, advantage: float) -> list[TrainSequence]:
    """One sequence per assistant turn, folded into the next turn's sequence whenever that
    turn's prompt holds the earlier turn token for token (the usual case), so a multi-turn
    episode is usually one sequence. The fold is exact: the same tokens get the same loss."""
    sequences: list[TrainSequence] = []
    for item in trajectory.messages_and_choices:
        if not _is_choice(item):
            continue
        prompt_ids, token_ids = _choice_token_ids(item)
        current = TrainSequence(prompt_ids, token_ids, advantage)
        if sequences and _extends(current, sequences[-1]):
            current = _merge(sequences.pop(), current)
        if current.completion_ids or current.prompt_spans:
            sequences.append(current)
    return sequences


def build_grpo_batch(groups: Iterable[art.TrajectoryGroup]) -> GRPOBatch:
    sequences: list[TrainSequence] = []
    used = skipped = 0
    for group in groups:
        advantages = group_advantages([t.reward for t in group.trajectories])
        if not any(advantages):
            skipped += 1
            continue
        used += 1
        for trajectory, advantage in zip(group.trajectories, advantages, strict=True):
            sequences.extend(trajectory_sequences(trajectory, advantage))
    return GRPOBatch(sequences, used, skipped)

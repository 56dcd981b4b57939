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
from typing import Any

import art
from openai.types.chat.chat_completion import Choice

from codreamer.backends.embedded.policy import TrainSequence

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


def trajectory_sequences(trajectory: art.Trajectory, advantage: float) -> list[TrainSequence]:
    sequences = []
    for item in trajectory.messages_and_choices:
        if _is_choice(item):
            prompt_ids, token_ids = _choice_token_ids(item)
            if token_ids:
                sequences.append(TrainSequence(prompt_ids, token_ids, advantage))
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

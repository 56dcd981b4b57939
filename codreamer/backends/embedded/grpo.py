"""From scored trajectory groups to training sequences, with ART's own tokenizer.

The sequences come from `art.preprocessing.tokenize.tokenize_trajectory_groups`, the function
ART's LocalBackend trains from, so every form ART produces is trained by the same rules:
`messages_and_choices` (choices with the server's `prompt_token_ids`/`token_ids` and
log-probs; a turn whose prompt holds the earlier ones token for token is folded into one
sequence), `additional_histories`, and trajectories captured with `with art.Trajectory() as t:`
(`t.exchanges`, which need the server's exact token ids). Advantages are ART's: reward minus
the group mean, divided by the group's std unless `normalize_advantages=False`; a group whose
rewards are all equal (or that has one trajectory) teaches nothing and is counted apart from a
group that had spread but no trainable token (e.g. choices without log-probs).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openai.types.chat.chat_completion import Choice

from codreamer.backends.embedded.sequences import TrainSequence

if TYPE_CHECKING:  # annotations only: importing ART costs seconds a bare GRPO step never needs
    import art

ADVANTAGE_EPS = 1e-6


class MissingTokenIds(ValueError):
    """A choice lacks `prompt_token_ids`/`token_ids`: it was not sampled by the embedded server."""


@dataclass
class GRPOBatch:
    sequences: list[TrainSequence]
    groups_used: int = 0
    groups_no_reward_spread: int = 0  # all rewards equal, or a single trajectory
    groups_no_trainable_tokens: int = 0  # spread, but nothing sampled with log-probs to train
    sequences_too_long: int = 0  # longer than `packed_sequence_length`: left out, as ART does
    notes: list[str] = field(default_factory=list)

    @property
    def groups_skipped(self) -> int:
        return self.groups_no_reward_spread + self.groups_no_trainable_tokens


def group_advantages(rewards: list[float], scale: bool = True) -> list[float]:
    """Rewards centred within their group (and divided by its std when `scale`); all zeros without spread."""
    if len(rewards) < 2:
        return [0.0] * len(rewards)
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    if std < ADVANTAGE_EPS:
        return [0.0] * len(rewards)
    return [(r - mean) / (std + ADVANTAGE_EPS) if scale else r - mean for r in rewards]


def _as_choice(item: Any) -> Any:
    """A choice in dict form (as stored by some rollouts) becomes an OpenAI `Choice`, which ART reads."""
    if isinstance(item, Mapping) and "finish_reason" in item and "message" in item:
        return Choice.model_validate(dict(item))
    return item


def _normalised(trajectory: art.Trajectory) -> art.Trajectory:
    if trajectory.exchanges or not any(
        isinstance(i, Mapping) and "finish_reason" in i for i in trajectory.messages_and_choices
    ):
        return trajectory
    copy = trajectory.model_copy()
    object.__setattr__(copy, "messages_and_choices", [_as_choice(i) for i in trajectory.messages_and_choices])
    return copy


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of trained positions (position 0 has no predecessor and is never trained)."""
    spans: list[tuple[int, int]] = []
    for position, selected in enumerate(mask):
        if not selected or position == 0:
            continue
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return spans


def _balanced(advantage: float, balance: float) -> float:
    """ART's `advantage_balance`: > 0 shrinks negative advantages, < 0 shrinks positive ones."""
    if balance > 0 and advantage < 0:
        return advantage * (1 - balance)
    if balance < 0 and advantage > 0:
        return advantage * (1 + balance)
    return advantage


def to_sequence(token_ids: list[int], mask: list[int], logprobs: list[float], advantage: float) -> TrainSequence | None:
    """One ART tokenized result as a `TrainSequence` (None when it trains nothing); tokens after
    the last trained one cannot change the loss and are cut."""
    spans = _spans(mask)
    if not spans:
        return None
    start, end = spans[-1]
    sampled = tuple(float(logprobs[t]) for s, e in spans for t in range(s, e))
    return TrainSequence(list(token_ids[:start]), list(token_ids[start:end]), advantage, tuple(spans[:-1]), sampled)


def _tokenize(
    tokenizer: Any, group: art.TrajectoryGroup, scale: bool, model_name: str | None, allow: bool = False
) -> list[Any]:
    """ART's tokenizer on one group. Captured exchanges are trained for the served model: its
    plain name or `name@step` (the glob `name*`); a trajectory must use one of them (ART's rule)."""
    from art.preprocessing.tokenize import tokenize_trajectory_groups
    from art.trajectories._selection import public_model_selector

    try:
        return list(
            tokenize_trajectory_groups(
                tokenizer,
                [group],
                allow_training_without_logprobs=allow,
                scale_rewards=scale,
                shuffle_group_trajectories=False,
                model=public_model_selector(f"{model_name}*") if model_name else None,
            )
        )
    except RuntimeError as exc:
        if "prompt_token_ids" in str(exc):
            raise MissingTokenIds(f"{exc} (sample through the embedded server, which returns them)") from exc
        raise


def trajectory_sequences(trajectory: art.Trajectory, advantage: float, tokenizer: Any = None) -> list[TrainSequence]:
    """The sequences ART's tokenizer makes of one trajectory's main and additional histories
    (`assemble_vllm_training_sequences`), all trained with `advantage`."""
    from art.preprocessing.tokenize import assemble_vllm_training_sequences
    from art.trajectories import LegacyHistory

    trajectory = _normalised(trajectory)
    histories = [
        LegacyHistory(messages_and_choices=trajectory.messages_and_choices, tools=trajectory.tools),
        *trajectory.additional_histories,
    ]
    try:
        results = assemble_vllm_training_sequences(
            tokenizer=tokenizer,
            histories=histories,
            advantage=advantage,
            allow_training_without_logprobs=False,
            trajectory=trajectory,
        )
    except RuntimeError as exc:
        if "prompt_token_ids" in str(exc):
            raise MissingTokenIds(f"{exc} (sample through the embedded server, which returns them)") from exc
        raise
    sequences = [to_sequence(r.token_ids, r.assistant_mask, r.logprobs, advantage) for r in results]
    return [s for s in sequences if s is not None]


def build_grpo_batch(
    groups: Iterable[art.TrajectoryGroup],
    tokenizer: Any = None,
    *,
    normalize_advantages: bool = True,
    advantage_balance: float = 0.0,
    model_name: str | None = None,
    max_length: int | None = None,
    allow_training_without_logprobs: bool = False,
) -> GRPOBatch:
    """Training sequences for the groups, with ART's advantages and tokenization."""
    from art.utils.grpo import rewards_have_zero_variance

    batch = GRPOBatch([])
    for group in groups:
        group = group.model_copy(update={"trajectories": [_normalised(t) for t in group.trajectories]})
        if rewards_have_zero_variance([t.reward for t in group.trajectories]):
            batch.groups_no_reward_spread += 1
            continue
        made = []
        for result in _tokenize(tokenizer, group, normalize_advantages, model_name, allow_training_without_logprobs):
            seq = to_sequence(
                result.token_ids, result.assistant_mask, result.logprobs, _balanced(result.advantage, advantage_balance)
            )
            if seq is not None and max_length is not None and seq.length > max_length:
                batch.sequences_too_long += 1
                continue
            if seq is not None:
                made.append(seq)
        if made:
            batch.groups_used += 1
            batch.sequences.extend(made)
        else:
            batch.groups_no_trainable_tokens += 1
    return batch

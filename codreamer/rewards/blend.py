"""The reward mix: RULER, the offline rubric and online outcomes, blended into one number.

Each part is in [0, 1]. When a part is missing for a trajectory (no judge configured or the
judge failed, no outcome yet), its weight is dropped and the others are renormalised; the
weights actually used are returned with the total so they can be logged beside it. The
total returned here is the reward trained on and the reward logged: there is no other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from codreamer.config import Settings, default_of

PART_NAMES = ("ruler", "rubric", "online")


class RewardMixConfig(BaseModel):
    """Weights of the three parts and how online events map to a score."""

    model_config = ConfigDict(frozen=True)

    ruler_weight: float = Field(default=default_of("ruler_weight"), ge=0)
    rubric_weight: float = Field(default=default_of("rubric_weight"), ge=0)
    online_weight: float = Field(default=default_of("online_weight"), ge=0)
    replied_score: float = Field(default=1.0, ge=0, le=1, description="Online score of a replied email.")
    opened_score: float = Field(default=0.3, ge=0, le=1, description="Online score of an opened, unanswered email.")
    meeting_booked_score: float = Field(default=1.0, ge=0, le=1)
    unopened_score: float = Field(default=0.0, ge=0, le=1)
    bounced_score: float = Field(default=0.0, ge=0, le=1)
    unsubscribed_score: float = Field(default=0.0, ge=0, le=1)

    @classmethod
    def from_settings(cls, settings: Settings) -> RewardMixConfig:
        return cls(
            rubric_weight=settings.rubric_weight,
            ruler_weight=settings.ruler_weight,
            online_weight=settings.online_weight,
        )

    @model_validator(mode="after")
    def _some_weight(self) -> RewardMixConfig:
        if self.ruler_weight + self.rubric_weight + self.online_weight <= 0:
            raise ValueError("at least one of ruler_weight, rubric_weight, online_weight must be > 0")
        return self

    def weight(self, part: str) -> float:
        return float(getattr(self, f"{part}_weight"))


@dataclass(frozen=True)
class OutcomeFlags:
    """What happened to one sent email (the OR over its events)."""

    opened: bool = False
    replied: bool = False
    bounced: bool = False
    unsubscribed: bool = False
    meeting_booked: bool = False


def online_score(flags: OutcomeFlags, config: RewardMixConfig) -> float:
    """Worst outcome first: a bounce or an unsubscribe outweighs an open."""
    if flags.bounced:
        return config.bounced_score
    if flags.unsubscribed:
        return config.unsubscribed_score
    if flags.meeting_booked:
        return config.meeting_booked_score
    if flags.replied:
        return config.replied_score
    if flags.opened:
        return config.opened_score
    return config.unopened_score


@dataclass(frozen=True)
class BlendedReward:
    total: float
    parts: dict[str, float | None]
    weights_used: dict[str, float] = field(default_factory=dict)

    @property
    def renormalized(self) -> bool:
        return any(value is None for value in self.parts.values())

    def as_metrics(self) -> dict[str, float]:
        metrics = {f"reward/{name}": value for name, value in self.parts.items() if value is not None}
        metrics |= {f"reward_weight/{name}": w for name, w in self.weights_used.items()}
        metrics["reward/total"] = self.total
        metrics["reward/renormalized"] = float(self.renormalized)
        return metrics


def blend(parts: Mapping[str, float | None], config: RewardMixConfig) -> BlendedReward:
    """Weighted mean over the parts present (weight > 0 and value not None)."""
    present = {name: value for name, value in parts.items() if value is not None and config.weight(name) > 0}
    if not present:
        raise ValueError("no reward part is available for this trajectory (all missing or weighted 0)")
    total_weight = sum(config.weight(name) for name in present)
    weights = {name: config.weight(name) / total_weight for name in present}
    total = sum(weights[name] * float(value) for name, value in present.items())
    return BlendedReward(total=total, parts={name: parts.get(name) for name in PART_NAMES}, weights_used=weights)


def compute_rewards(
    trajectory_ids: Sequence[str],
    config: RewardMixConfig,
    *,
    rubric: Mapping[str, float],
    ruler: Mapping[str, float | None] | None = None,
    outcomes: Mapping[str, OutcomeFlags] | None = None,
) -> dict[str, BlendedReward]:
    """Blend the parts known for each trajectory id; ids absent from a mapping lack that part."""
    ruler, outcomes = ruler or {}, outcomes or {}
    results = {}
    for tid in trajectory_ids:
        flags = outcomes.get(tid)
        parts = {
            "ruler": ruler.get(tid),
            "rubric": rubric.get(tid),
            "online": online_score(flags, config) if flags is not None else None,
        }
        results[tid] = blend(parts, config)
    return results

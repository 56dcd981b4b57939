"""The reward mix: weights, renormalisation over present parts, online mapping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from codreamer.rewards.blend import OutcomeFlags, RewardMixConfig, blend, compute_rewards, online_score

MIX = RewardMixConfig(ruler_weight=0.5, rubric_weight=0.3, online_weight=0.2)


def test_all_parts_present_is_the_weighted_mean() -> None:
    result = blend({"ruler": 1.0, "rubric": 0.5, "online": 0.0}, MIX)
    assert result.total == pytest.approx(0.5 * 1.0 + 0.3 * 0.5)
    assert not result.renormalized
    assert result.weights_used == pytest.approx({"ruler": 0.5, "rubric": 0.3, "online": 0.2})


def test_missing_parts_are_renormalised_and_recorded() -> None:
    result = blend({"ruler": None, "rubric": 0.5, "online": 1.0}, MIX)
    assert result.total == pytest.approx((0.3 * 0.5 + 0.2 * 1.0) / 0.5)
    assert result.renormalized
    metrics = result.as_metrics()
    assert metrics["reward/renormalized"] == 1.0
    assert "reward/ruler" not in metrics and metrics["reward/total"] == result.total
    assert metrics["reward_weight/rubric"] == pytest.approx(0.6)


def test_a_zero_weight_part_is_ignored_even_when_present() -> None:
    mix = RewardMixConfig(ruler_weight=0.0, rubric_weight=1.0, online_weight=0.0)
    assert blend({"ruler": 0.0, "rubric": 0.7, "online": 0.0}, mix).total == pytest.approx(0.7)


def test_no_part_available_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match="no reward part"):
        blend({"ruler": None, "rubric": None, "online": None}, MIX)


def test_all_weights_zero_is_rejected() -> None:
    with pytest.raises(ValidationError, match="at least one"):
        RewardMixConfig(ruler_weight=0, rubric_weight=0, online_weight=0)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (OutcomeFlags(), 0.0),
        (OutcomeFlags(opened=True), 0.3),
        (OutcomeFlags(opened=True, replied=True), 1.0),
        (OutcomeFlags(opened=True, replied=True, bounced=True), 0.0),
        (OutcomeFlags(opened=True, unsubscribed=True), 0.0),
    ],
)
def test_online_mapping(flags: OutcomeFlags, expected: float) -> None:
    assert online_score(flags, RewardMixConfig()) == pytest.approx(expected)


def test_compute_rewards_uses_what_each_trajectory_has() -> None:
    results = compute_rewards(
        ["a", "b"],
        MIX,
        rubric={"a": 0.4, "b": 0.8},
        ruler={"a": 0.9, "b": None},
        outcomes={"b": OutcomeFlags(opened=True, replied=True)},
    )
    assert results["a"].total == pytest.approx((0.5 * 0.9 + 0.3 * 0.4) / 0.8)
    assert results["b"].total == pytest.approx((0.3 * 0.8 + 0.2 * 1.0) / 0.5)
    assert results["a"].parts["online"] is None and results["b"].parts["ruler"] is None

"""Held-out evaluation (`codreamer.pipeline.evaluation`): CI math, fixed seeds, summaries, storage."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import art
import numpy as np
import pytest

from codreamer.agent.rollout import RolloutConfig
from codreamer.domain import Company, Product, Prospect, Scenario
from codreamer.pipeline.evaluation import (
    EvalSummary,
    bootstrap_ci,
    compare_evaluations,
    eval_record,
    eval_seeds,
    generate_eval_groups,
    load_evaluations,
    store_evaluation,
    summarize_evaluation,
)

try:
    from loopback import Call, LoopbackOpenAI
except ImportError:  # pragma: no cover - when run as tests.test_evaluation
    from tests.loopback import Call, LoopbackOpenAI

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------ bootstrap
def test_two_values_hand_computation() -> None:
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], samples=20_000, seed=3) == (0.0, 1.0)


def test_skewed_values_hand_computation() -> None:
    # Means of 4 draws from [0, 0, 0, 1] are k/4 with k ~ Binomial(4, 1/4): P(0) = 0.316, so the
    # 2.5% quantile is 0; P(k <= 2) = 0.949 < 0.975 <= P(k <= 3) = 0.996, so the 97.5% one is 0.75.
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0], samples=20_000, seed=1) == (0.0, 0.75)


def test_large_sample_matches_normal_approximation() -> None:
    # 5000 values: the resampling runs in several chunks; the interval must match mean ± 1.96 s/sqrt(n).
    values = np.random.default_rng(7).normal(0.5, 0.2, size=5000)
    low, high = bootstrap_ci(values.tolist(), samples=2000, seed=0)
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=half * 0.15)
    assert high == pytest.approx(values.mean() + half, abs=half * 0.15)


def test_confidence_level_changes_width() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.55, 0.9]
    low95, high95 = bootstrap_ci(values, confidence=0.95, seed=0)
    low50, high50 = bootstrap_ci(values, confidence=0.5, seed=0)
    assert low95 < low50 < statistics.fmean(values) < high50 < high95


def test_deterministic_with_seed() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.6]
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_degenerate_inputs() -> None:
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([0.7]))  # one value: undefined, not zero-width
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [
        ([0.1, float("nan")], {}),
        ([0.1, 0.2], {"confidence": 1.0}),
        ([0.1, 0.2], {"confidence": 0.0}),
        ([0.1, 0.2], {"samples": 0}),
    ],
)
def test_bad_inputs_are_refused(values: list[float], kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        bootstrap_ci(values, **kwargs)


# ------------------------------------------------------------------------------ seeds
def test_eval_seeds_are_fixed_and_independent_of_position() -> None:
    plan = eval_seeds(["a", "b"], 3, seed=0)
    assert [(sid, i) for sid, i, _ in plan] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert plan == eval_seeds(["a", "b"], 3, seed=0)
    assert len({s for *_, s in plan}) == 6
    assert all(0 <= s < 2**31 for *_, s in plan)
    reordered = {(sid, i): s for sid, i, s in eval_seeds(["c", "b", "a"], 3, seed=0)}
    assert all(reordered[(sid, i)] == s for sid, i, s in plan)
    assert {s for *_, s in eval_seeds(["a"], 1, seed=1)} != {s for *_, s in eval_seeds(["a"], 1, seed=0)}


def test_eval_seeds_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        eval_seeds(["a", "a"], 1, seed=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        eval_seeds(["a"], 0, seed=0)


# ------------------------------------------------------------------------------ summaries
def traj(reward: float, seed: int, **metrics: float) -> art.Trajectory:
    return art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "hi"}],
        reward=reward,
        metrics={"turns": 2, **{k.replace("__", "/"): v for k, v in metrics.items()}},
        metadata={"seed": seed},
    )


def group(prospect: str, *trajectories: art.Trajectory, exceptions: int = 0) -> art.TrajectoryGroup:
    return art.TrajectoryGroup(
        list(trajectories),
        exceptions=[RuntimeError("boom")] * exceptions,
        metadata={"prospect_id": prospect, "scenario_id": f"s-{prospect}", "step": 0},
    )


def sample_groups(shift: float = 0.0) -> list[art.TrajectoryGroup]:
    return [
        group(
            "p1",
            traj(0.2 + shift, 11, rubric__length=1.0, reward__rubric=0.2),
            traj(0.4 + shift, 12, rubric__length=0.5, reward__rubric=0.4),
        ),
        group("p2", traj(0.6 + shift, 21, rubric__length=0.0, reward__rubric=0.6), exceptions=1),
    ]


def test_summary_means_cis_and_prospects() -> None:
    summary = summarize_evaluation(sample_groups(), step=3, bootstrap_samples=500, seed=2)
    assert summary.step == 3 and summary.n == 3 and summary.exceptions == 1
    assert set(summary.parts) == {"reward", "rubric/length", "reward/rubric"}  # "turns" is not a reward part
    total = summary.parts["reward"]
    assert total.mean == pytest.approx(0.4) and total.n == 3
    assert (total.ci_low, total.ci_high) == bootstrap_ci([0.2, 0.4, 0.6], samples=500, seed=2)
    assert summary.parts["rubric/length"].mean == pytest.approx(0.5)
    p1, p2 = summary.prospects["p1"], summary.prospects["p2"]
    assert p1.rewards == [0.2, 0.4] and p1.seeds == [11, 12] and p1.mean_reward == pytest.approx(0.3)
    assert p1.parts["rubric/length"] == pytest.approx(0.75) and p1.scenario_id == "s-p1"
    assert p2.n == 1 and p2.exceptions == 1


def test_summary_of_only_failures_has_no_total() -> None:
    summary = summarize_evaluation([group("p1", exceptions=2)], step=1)
    assert summary.n == 0 and summary.exceptions == 2 and summary.reward is None
    assert summary.prospects["p1"].mean_reward is None
    assert eval_record(summary, None) == {"eval/exceptions": 2, "eval/reward_count": 0}


def test_compare_against_previous_and_base() -> None:
    base = summarize_evaluation(sample_groups(), step=0, bootstrap_samples=200)
    previous = summarize_evaluation(sample_groups(0.05), step=1, bootstrap_samples=200)
    current = summarize_evaluation(sample_groups(0.1), step=2, bootstrap_samples=200)
    cmp = compare_evaluations(current, previous, base)
    assert cmp["delta_prev"] == pytest.approx(0.05) and cmp["delta_base"] == pytest.approx(0.1)
    assert cmp["ci_overlap_base"] is True
    assert cmp["base"]["paired_n"] == 3
    low, high = cmp["base"]["delta_ci"]  # every paired sample moved by exactly +0.1
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    assert cmp["base"]["prospects"]["p2"] == pytest.approx(0.1)
    assert cmp["base"]["parts"]["rubric/length"] == pytest.approx(0.0)

    first = compare_evaluations(base, None, None)
    assert first["delta_prev"] is None and first["delta_base"] is None and first["ci_overlap_prev"] is None


def test_cis_that_do_not_overlap() -> None:
    low = summarize_evaluation([group("p", traj(0.1, 1), traj(0.12, 2))], step=0)
    high = summarize_evaluation([group("p", traj(0.9, 1), traj(0.92, 2))], step=1)
    assert compare_evaluations(high, low, low)["ci_overlap_prev"] is False


def test_eval_record_flat_keys() -> None:
    base = summarize_evaluation(sample_groups(), step=0)
    current = summarize_evaluation(sample_groups(0.1), step=1)
    record = eval_record(current, compare_evaluations(current, base, base))
    assert record["eval/reward_mean"] == pytest.approx(0.5)
    assert record["eval/reward_ci_low"] <= 0.5 <= record["eval/reward_ci_high"]
    assert record["eval/rubric/length"] == pytest.approx(0.5)
    assert "eval/rubric/length_ci_low" in record and "eval/reward/rubric_ci_high" in record
    assert record["eval/delta_prev"] == pytest.approx(0.1) and record["eval/delta_base"] == pytest.approx(0.1)
    assert record["eval/reward_count"] == 3 and record["eval/exceptions"] == 1
    json.dumps(record, allow_nan=False)  # goes into the history as is


# ------------------------------------------------------------------------------ storage
def test_store_and_load_round_trip(tmp_path: Path) -> None:
    later = summarize_evaluation(sample_groups(0.1), step=12)
    single = summarize_evaluation([group("p", traj(0.3, 1))], step=2)  # CI undefined: stored as null
    path = store_evaluation(tmp_path, later)
    store_evaluation(tmp_path, single)
    assert path == tmp_path / "evals" / "step_0012.json"
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    (tmp_path / "evals" / "step_0005.json").write_text("{not json")
    loaded = load_evaluations(tmp_path)
    assert [s.step for s in loaded] == [2, 12]
    assert loaded[1] == later and loaded[0] == single
    assert loaded[0].reward is not None and loaded[0].reward.ci_low is None
    assert not list((tmp_path / "evals").glob(".*"))  # no temporary file left behind
    assert load_evaluations(tmp_path / "missing") == []


def test_summary_is_a_pydantic_model() -> None:
    summary = summarize_evaluation(sample_groups(), step=1)
    assert EvalSummary.model_validate_json(summary.model_dump_json()) == summary


# ------------------------------------------------------------------------------ generation
def _scenario(pid: str) -> Scenario:
    company = Company(
        name="Acme", industry="logistics", employees=50, headquarters="Oslo", recent_news="News.", tech_stack=[]
    )
    prospect = Prospect(
        prospect_id=pid,
        first_name="Ana",
        last_name="Kovac",
        email=f"{pid}@acme.example.com",
        title="VP Operations",
        seniority="vp",
        persona="analytical",
        pain_points=["manual invoicing"],
        company=company,
    )
    return Scenario(scenario_id=f"s-{pid}", split="heldout", prospect=prospect)


@pytest.mark.anyio
async def test_generate_uses_the_fixed_seeds() -> None:
    product = Product(
        name="FreightPilot",
        one_liner="Automates audits.",
        value_props=["fast"],
        call_to_action="a call",
        sender_name="Sam",
        sender_title="AE",
    )
    final = [Call("finalize_email", {"subject": "Hi", "body": "Hello Ana"})]
    scenarios = [_scenario("p001"), _scenario("p002")]
    config = RolloutConfig(max_turns=2, max_tokens=16, request_timeout_s=10)
    async with LoopbackOpenAI([final] * 4) as server:
        model = art.Model(
            name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
        )
        groups = await generate_eval_groups(model, scenarios, product=product, config=config, samples=2, seed=4, step=9)
        sent = sorted(request["seed"] for request in server.requests)
    expected = eval_seeds(["s-p001", "s-p002"], 2, seed=4)
    assert sent == sorted(s for *_, s in expected)
    assert [g.metadata["prospect_id"] for g in groups] == ["p001", "p002"]
    got = {
        (t.metadata["scenario_id"], t.metadata["sample_index"], t.metadata["seed"])
        for g in groups
        for t in g.trajectories
    }
    assert got == set(expected)

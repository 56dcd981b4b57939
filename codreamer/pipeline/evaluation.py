"""Held-out evaluation: fixed sampling, bootstrap confidence intervals, comparisons, storage.

Every evaluation of a run samples the same way: each held-out scenario is run `samples`
times with seeds that depend only on (run seed, scenario id, sample index), never on the
step (`eval_seeds`). Two evaluations therefore differ only by the policy, and a sample of
one is paired with the same sample of the other (`compare_evaluations` uses that pairing
for the confidence interval of the difference).

`summarize_evaluation` turns the scored groups into an `EvalSummary`: the mean of the total
reward and of every `reward/*` and `rubric/*` metric with a percentile-bootstrap 95% CI, and
the results per prospect. The CI resamples the evaluated rollouts (trajectories); it measures
the sampling noise of this policy on these held-out scenarios, not how far the scenarios
themselves stand for every possible prospect. Summaries are stored as
`<run_dir>/evals/step_NNNN.json` and flattened into the history record by `eval_record`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger
from pydantic import BaseModel, Field, ValidationError

from codreamer.storage import write_json_atomic

if TYPE_CHECKING:
    import art

    from codreamer.agent.rollout import RolloutConfig
    from codreamer.domain import Product, Scenario

__all__ = [
    "EVALS_DIR",
    "TOTAL",
    "EvalSummary",
    "PartStats",
    "ProspectResult",
    "behaviour_rates",
    "bootstrap_ci",
    "compare_evaluations",
    "eval_path",
    "eval_record",
    "eval_seeds",
    "generate_eval_groups",
    "load_evaluations",
    "store_evaluation",
    "summarize_evaluation",
]

EVALS_DIR = "evals"
#: The part name of the total reward (`trajectory.reward`, the number trained on).
TOTAL = "reward"
PART_PREFIXES = ("reward/", "rubric/")
#: An evaluated email is stored up to this many characters (for the report's before/after).
_EMAIL_CHARS = 2000
#: Bootstrap resamples are drawn in chunks of at most this many numbers, to bound memory.
_CHUNK_ELEMENTS = 1_000_000


# ------------------------------------------------------------------------------ statistics
def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of `values`.

    `samples` resamples of len(values) values with replacement are drawn with numpy's
    PCG64 generator seeded by `seed`, so the same inputs always give the same interval; the
    interval is the (1-confidence)/2 and (1+confidence)/2 quantiles of the resampled means.
    Degenerate inputs: no value, or a single one, has no spread to resample, so the interval
    is undefined and (nan, nan) is returned rather than a zero-width interval that would
    claim certainty; identical values give (v, v), which is what the bootstrap says.
    Non-finite values raise ValueError: a missing reward must be left out, not averaged.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError("values must be a flat sequence of numbers")
    if not np.all(np.isfinite(data)):
        raise ValueError("values must be finite (leave missing values out)")
    if data.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // data.size)
    means = np.concatenate(
        [
            data[rng.integers(0, data.size, size=(min(chunk, samples - start), data.size))].mean(axis=1)
            for start in range(0, samples, chunk)
        ]
    )
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def eval_seeds(scenario_ids: Iterable[str], samples: int, seed: int) -> list[tuple[str, int, int]]:
    """(scenario_id, sample_index, rollout seed) for every held-out rollout of an evaluation.

    The seed is a hash of (run seed, scenario id, sample index) only: it does not depend on
    the step, nor on where the scenario sits in the list, so every evaluation of a run (and
    a run with more held-out scenarios) samples each scenario exactly the same way.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    ids = list(scenario_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("scenario ids must be unique")
    return [(sid, index, _stable_seed(seed, sid, index)) for sid in ids for index in range(samples)]


def _stable_seed(seed: int, scenario_id: str, index: int) -> int:
    digest = hashlib.blake2b(f"eval|{seed}|{scenario_id}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31)


# ------------------------------------------------------------------------------ generation
async def generate_eval_groups(
    model: art.Model,
    scenarios: Sequence[Scenario],
    *,
    product: Product,
    config: RolloutConfig,
    samples: int,
    seed: int,
    step: int,
    concurrency: int = 8,
    max_exceptions: float = 0.5,
    rollout_timeout_s: float = 900.0,
) -> list[art.TrajectoryGroup]:
    """One group per held-out scenario with `samples` rollouts seeded by `eval_seeds`.

    Failed rollouts land in the group's `exceptions` (counted by `summarize_evaluation`);
    the call gives up only when more than `max_exceptions` of them failed. Each trajectory
    carries its seed and `sample_index` in metadata, which pairs samples across evaluations.
    """
    from codreamer.pipeline.fanout import RolloutJob, fan_out_rollouts

    jobs: dict[str, list[RolloutJob]] = {}
    by_id = {scenario.scenario_id: scenario for scenario in scenarios}
    for scenario_id, index, rollout_seed in eval_seeds(list(by_id), samples, seed):
        jobs.setdefault(scenario_id, []).append(RolloutJob(by_id[scenario_id], rollout_seed, {"sample_index": index}))
    return await fan_out_rollouts(
        model,
        list(jobs.values()),
        product=product,
        config=config,
        step=step,
        concurrency=concurrency,
        max_exceptions=max_exceptions,
        rollout_timeout_s=rollout_timeout_s,
        pbar_desc="eval",
    )


# ------------------------------------------------------------------------------ summaries
class PartStats(BaseModel):
    """Mean of one reward part over the evaluated rollouts, with its bootstrap CI.

    ci_low/ci_high are None when fewer than two values were available.
    """

    n: int
    mean: float
    std: float
    min: float
    max: float
    ci_low: float | None = None
    ci_high: float | None = None


class ProspectResult(BaseModel):
    """How the policy did on one held-out prospect: every sample, and the means."""

    prospect_id: str
    scenario_id: str | None = None
    n: int
    mean_reward: float | None
    parts: dict[str, float] = Field(default_factory=dict)
    rewards: list[float] = Field(default_factory=list)
    seeds: list[int | None] = Field(default_factory=list)
    exceptions: int = 0
    emails: list[dict[str, Any]] = Field(
        default_factory=list, description="Each sample's email (seed, subject, body, reward, auto_finalized)."
    )


class EvalSummary(BaseModel):
    """One held-out evaluation at one step (`evals/step_NNNN.json`)."""

    step: int
    n: int
    exceptions: int = 0
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    parts: dict[str, PartStats] = Field(default_factory=dict)
    prospects: dict[str, ProspectResult] = Field(default_factory=dict)
    behaviour: dict[str, float] = Field(
        default_factory=dict, description="What the agent did (`behaviour_rates`): self-finalised, looked up, ..."
    )

    @property
    def reward(self) -> PartStats | None:
        """The total reward's statistics (None when every rollout failed)."""
        return self.parts.get(TOTAL)


def behaviour_rates(trajectories: Sequence[art.Trajectory]) -> dict[str, float]:
    """What the agent did, as rates over episodes (and mean counts per episode).

    self_finalized: the agent called finalize_email itself; auto_finalized: it never did and
    the email was salvaged from its text; looked_up: it called a lookup tool (lookups after
    the email was submitted are not counted by the rollout, so this is "looked facts up
    before writing"); tool_calls / invalid_tool_calls: mean per episode. Empty when no episode.
    """
    if not trajectories:
        return {}
    count = len(trajectories)

    def share(predicate: Any) -> float:
        return sum(1 for t in trajectories if predicate(t.metadata)) / count

    return {
        "self_finalized": share(lambda m: not m.get("auto_finalized", True)),
        "auto_finalized": share(lambda m: bool(m.get("auto_finalized", True))),
        "looked_up": share(lambda m: (m.get("prospect_lookups") or 0) + (m.get("company_lookups") or 0) > 0),
        "tool_calls": sum(float(t.metadata.get("tool_calls") or 0) for t in trajectories) / count,
        "invalid_tool_calls": sum(float(t.metadata.get("invalid_tool_calls") or 0) for t in trajectories) / count,
    }


def _email_sample(trajectory: art.Trajectory) -> dict[str, Any]:
    meta = trajectory.metadata
    return {
        "seed": meta.get("seed"),
        "subject": str(meta.get("email_subject", "")),
        "body": str(meta.get("email_body", ""))[:_EMAIL_CHARS],
        "reward": float(trajectory.reward),
        "auto_finalized": bool(meta.get("auto_finalized", False)),
    }


def _part_values(trajectories: Sequence[art.Trajectory]) -> dict[str, list[float]]:
    """Total reward plus every finite reward/* and rubric/* metric, by part name."""
    values: dict[str, list[float]] = {TOTAL: []}
    for trajectory in trajectories:
        if math.isfinite(float(trajectory.reward)):
            values[TOTAL].append(float(trajectory.reward))
        for name, value in trajectory.metrics.items():
            if name.startswith(PART_PREFIXES) and value is not None and math.isfinite(float(value)):
                values.setdefault(name, []).append(float(value))
    return {name: found for name, found in values.items() if found}


def _part_stats(values: list[float], *, bootstrap_samples: int, seed: int) -> PartStats:
    low, high = bootstrap_ci(values, samples=bootstrap_samples, seed=seed)
    data = np.asarray(values, dtype=np.float64)
    return PartStats(
        n=len(values),
        mean=float(data.mean()),
        std=float(data.std()),
        min=float(data.min()),
        max=float(data.max()),
        ci_low=_finite_or_none(low),
        ci_high=_finite_or_none(high),
    )


def _group_key(group: art.TrajectoryGroup) -> tuple[str, str | None]:
    """(prospect id, scenario id) of a group, from its metadata or its first trajectory's."""
    meta: dict[str, Any] = dict(group.metadata or {})
    if group.trajectories:
        meta = {**group.trajectories[0].metadata, **meta}
    scenario = meta.get("scenario_id")
    prospect = meta.get("prospect_id", scenario)
    if prospect is None:
        raise ValueError("an evaluation group needs a prospect_id or scenario_id in its metadata")
    return str(prospect), None if scenario is None else str(scenario)


def _prospect_result(prospect_id: str, groups: list[art.TrajectoryGroup]) -> ProspectResult:
    members = [t for g in groups for t in g.trajectories]
    values = _part_values(members)
    scored = [t for t in members if math.isfinite(float(t.reward))]
    rewards = [float(t.reward) for t in scored]
    seeds = [None if t.metadata.get("seed") is None else int(t.metadata["seed"]) for t in scored]
    return ProspectResult(
        prospect_id=prospect_id,
        scenario_id=_group_key(groups[0])[1],
        n=len(members),
        mean_reward=float(np.mean(values[TOTAL])) if TOTAL in values else None,
        parts={name: float(np.mean(v)) for name, v in sorted(values.items()) if name != TOTAL},
        rewards=rewards,
        seeds=seeds,
        exceptions=sum(len(g.exceptions) for g in groups),
        emails=[_email_sample(t) for t in scored],
    )


def summarize_evaluation(
    groups: list[art.TrajectoryGroup], step: int, *, bootstrap_samples: int = 1000, seed: int = 0
) -> EvalSummary:
    """Means, bootstrap CIs (one per part, all with `seed`) and per-prospect results.

    Groups of the same prospect are merged. A part is reported over the rollouts that have
    it; failed rollouts (`group.exceptions`) are counted, never scored as zero.
    """
    trajectories = [t for g in groups for t in g.trajectories]
    parts = {
        name: _part_stats(values, bootstrap_samples=bootstrap_samples, seed=seed)
        for name, values in sorted(_part_values(trajectories).items())
    }
    by_prospect: dict[str, list[art.TrajectoryGroup]] = {}
    for group in groups:
        by_prospect.setdefault(_group_key(group)[0], []).append(group)
    prospects = {pid: _prospect_result(pid, members) for pid, members in by_prospect.items()}
    return EvalSummary(
        step=step,
        n=len(trajectories),
        exceptions=sum(len(g.exceptions) for g in groups),
        bootstrap_samples=bootstrap_samples,
        parts=parts,
        prospects=prospects,
        behaviour=behaviour_rates(trajectories),
    )


# ------------------------------------------------------------------------------ comparison
def _overlap(a: PartStats | None, b: PartStats | None) -> bool | None:
    if a is None or b is None or None in (a.ci_low, a.ci_high, b.ci_low, b.ci_high):
        return None
    return bool(a.ci_low <= b.ci_high and b.ci_low <= a.ci_high)  # type: ignore[operator]


def _paired_differences(current: EvalSummary, other: EvalSummary) -> list[float]:
    """Reward differences of the samples both evaluations drew with the same seed."""
    differences = []
    for prospect_id, result in current.prospects.items():
        before = other.prospects.get(prospect_id)
        if before is None:
            continue
        earlier = {s: r for s, r in zip(before.seeds, before.rewards, strict=True) if s is not None}
        differences += [r - earlier[s] for s, r in zip(result.seeds, result.rewards, strict=True) if s in earlier]
    return differences


def _versus(current: EvalSummary, other: EvalSummary | None) -> dict[str, Any]:
    if other is None:
        return {
            "step": None,
            "delta": None,
            "ci_overlap": None,
            "paired_n": 0,
            "delta_ci": None,
            "parts": {},
            "prospects": {},
        }
    mine, theirs = current.reward, other.reward
    delta = None if mine is None or theirs is None else mine.mean - theirs.mean
    pairs = _paired_differences(current, other)
    low, high = bootstrap_ci(pairs, samples=current.bootstrap_samples) if pairs else (float("nan"), float("nan"))
    prospects = {
        pid: result.mean_reward - other.prospects[pid].mean_reward  # type: ignore[operator]
        for pid, result in current.prospects.items()
        if pid in other.prospects and result.mean_reward is not None and other.prospects[pid].mean_reward is not None
    }
    return {
        "step": other.step,
        "delta": delta,
        "ci_overlap": _overlap(mine, theirs),
        "paired_n": len(pairs),
        "delta_ci": None if math.isnan(low) else (low, high),
        "parts": {
            name: stats.mean - other.parts[name].mean for name, stats in current.parts.items() if name in other.parts
        },
        "prospects": prospects,
    }


def compare_evaluations(current: EvalSummary, previous: EvalSummary | None, base: EvalSummary | None) -> dict[str, Any]:
    """How `current` moved against the previous evaluation and the base model (step 0).

    Keys: delta_prev / delta_base (difference of mean total reward, None when there is
    nothing to compare), ci_overlap_prev / ci_overlap_base (whether the two 95% CIs overlap;
    None when one is undefined), and `prev` / `base` with the details: the step compared to,
    a paired bootstrap CI of the difference (`delta_ci`, over samples drawn with the same seed
    in both evaluations, `paired_n` of them), the delta of every part, and of every prospect.
    """
    prev, first = _versus(current, previous), _versus(current, base)
    return {
        "step": current.step,
        "delta_prev": prev["delta"],
        "delta_base": first["delta"],
        "ci_overlap_prev": prev["ci_overlap"],
        "ci_overlap_base": first["ci_overlap"],
        "prev": prev,
        "base": first,
    }


# ------------------------------------------------------------------------------ storage
def eval_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVALS_DIR / f"step_{step:04d}.json"


def store_evaluation(run_dir: Path, summary: EvalSummary) -> Path:
    """Write `<run_dir>/evals/step_NNNN.json` atomically (a crash leaves the old file or none)."""
    path = eval_path(run_dir, summary.step)
    write_json_atomic(path, summary.model_dump(mode="json"))
    return path


def load_evaluations(run_dir: Path) -> list[EvalSummary]:
    """Every stored evaluation of a run, sorted by step; unreadable files are logged and skipped."""
    folder = Path(run_dir) / EVALS_DIR
    summaries = []
    for path in sorted(folder.glob("step_*.json")) if folder.is_dir() else []:
        try:
            summaries.append(EvalSummary.model_validate(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, ValidationError) as exc:
            logger.warning("skipping unreadable evaluation {}: {}", path.name, exc)
    return sorted(summaries, key=lambda s: s.step)


def eval_record(summary: EvalSummary, comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat `eval/*` keys for the iteration's history record.

    eval/reward_mean, _std, _min, _max, _count, _ci_low, _ci_high for the total; eval/<part>
    and eval/<part>_ci_low/_ci_high for every part (e.g. eval/rubric/length); eval/exceptions;
    eval/delta_prev, eval/delta_base, eval/ci_overlap_prev, eval/ci_overlap_base when compared,
    with the paired bootstrap CI of each difference (eval/delta_base_ci_low/_high, _paired_n);
    eval/behaviour/<rate> (`behaviour_rates`).
    """
    record: dict[str, Any] = {"eval/exceptions": summary.exceptions, "eval/reward_count": summary.n}
    total = summary.reward
    if total is not None:
        record |= {
            "eval/reward_mean": total.mean,
            "eval/reward_std": total.std,
            "eval/reward_min": total.min,
            "eval/reward_max": total.max,
            "eval/reward_ci_low": total.ci_low,
            "eval/reward_ci_high": total.ci_high,
        }
    record |= {f"eval/behaviour/{name}": value for name, value in summary.behaviour.items()}
    for name, stats in summary.parts.items():
        if name != TOTAL:
            record |= {
                f"eval/{name}": stats.mean,
                f"eval/{name}_ci_low": stats.ci_low,
                f"eval/{name}_ci_high": stats.ci_high,
            }
    if comparison is not None:
        for key in ("delta_prev", "delta_base", "ci_overlap_prev", "ci_overlap_base"):
            record[f"eval/{key}"] = comparison.get(key)
        for side in ("prev", "base"):
            details = comparison.get(side) or {}
            low, high = details.get("delta_ci") or (None, None)
            record |= {f"eval/delta_{side}_ci_low": low, f"eval/delta_{side}_ci_high": high}
            record[f"eval/delta_{side}_paired_n"] = details.get("paired_n", 0)
    return record

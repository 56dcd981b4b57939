"""What an iteration leaves behind in words and numbers: its history record and its log lines.

`iteration_record` assembles the one flat record an iteration appends to `iterations.jsonl`
(and logs to W&B): train reward statistics, rollout health, scoring counts, training
metrics, the evaluation, stage timings, failures, retries, LLM usage, peak memory. The key
names are what reports, `codreamer show` and W&B charts read, so they do not change. The
log lines (`progress_line`, `log_behaviour_line`, `log_evaluation`) are what a user watches.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import art
from loguru import logger

from codreamer.domain import Scenario
from codreamer.pipeline.evaluation import EvalSummary, behaviour_rates
from codreamer.pipeline.stages import RewardStats
from codreamer.rewards.scoring import ScoringSummary

if TYPE_CHECKING:
    from codreamer.pipeline.run import Run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stats_record(prefix: str, stats: RewardStats) -> dict[str, Any]:
    record = {f"{prefix}/reward_{k}": getattr(stats, k) for k in ("mean", "std", "min", "max", "count")}
    record |= {f"{prefix}/{name}": value for name, value in stats.parts.items()}
    return record


def _rollout_health(groups: list[art.TrajectoryGroup]) -> dict[str, float]:
    trajectories = [t for g in groups for t in g.trajectories]
    exceptions = sum(len(g.exceptions) for g in groups)
    auto = sum(1 for t in trajectories if t.metadata.get("auto_finalized"))
    return {
        "train/trajectories": float(len(trajectories)),
        "train/exceptions": float(exceptions),
        "train/auto_finalized_rate": auto / len(trajectories) if trajectories else float("nan"),
        **{f"train/behaviour/{name}": value for name, value in behaviour_rates(trajectories).items()},
    }


def iteration_record(
    run: Run,
    iteration: int,
    step: int,
    scenarios: Sequence[Scenario],
    groups: list[art.TrajectoryGroup],
    train_stats: RewardStats,
    scoring: ScoringSummary,
    train_metrics: dict[str, float],
    eval_fields: dict[str, Any],
    timings: dict[str, float],
    new_failures: int,
) -> dict[str, Any]:
    """The history record of iteration `iteration` (numbered from 1), model at `step` after it.

    `train_stats` are taken of the scored groups before training (as the rewards trained on).
    """
    return {
        "run_id": run.run_id,
        "iteration": iteration,
        "step": step,
        "recorded_at": datetime.now(UTC).isoformat(),
        "scenarios": [s.scenario_id for s in scenarios],
        **_stats_record("train", train_stats),
        **_rollout_health(groups),
        "score/judge_errors": scoring.judge_errors,
        "score/renormalized": scoring.renormalized,
        "score/outcomes_appended": scoring.outcomes_appended,
        "score/outcomes_held_back": scoring.outcomes_held_back,
        "score/outcomes_delivered_late": scoring.outcomes_delivered_late,
        **{f"train_metrics/{k}": v for k, v in train_metrics.items()},
        **eval_fields,
        **{f"time/{k}": v for k, v in timings.items()},
        "failures/new": new_failures,
        "failures/total": len(run.failures),
        **run.retries.as_metrics(),
        **run.usage.totals(),
        "peak_rss_mb": peak_rss_mb(),
    }


def progress_line(record: dict[str, Any], total: int) -> str:
    """`iter 2/3 step 3 reward ...` after each iteration."""
    times = " ".join(
        f"{k.split('/')[1].removesuffix('_s')} {v:.1f}s" for k, v in record.items() if k.startswith("time/")
    )
    line = (
        f"iter {record['iteration']}/{total} step {record['step']} "
        f"reward {record['train/reward_mean']:.3f}±{record['train/reward_std']:.3f} "
        f"[{record['train/reward_min']:.2f}, {record['train/reward_max']:.2f}]"
    )
    if record.get("eval/reward_mean") is not None:
        low, high = record.get("eval/reward_ci_low"), record.get("eval/reward_ci_high")
        line += f" eval {record['eval/reward_mean']:.3f}"
        if low is not None and high is not None:
            line += f" [{low:.2f}, {high:.2f}]"
    return f"{line} | {times} | peak {record['peak_rss_mb']:.0f} MB"


def log_behaviour_line(record: dict[str, Any]) -> None:
    """After an evaluated iteration: what the agent did on held-out, and the paired delta to the base."""
    low, high = record.get("eval/delta_base_ci_low"), record.get("eval/delta_base_ci_high")
    delta = record.get("eval/delta_base")
    versus = "" if delta is None or low is None else f"; vs base {delta:+.3f} (paired 95% CI [{low:+.3f}, {high:+.3f}])"
    logger.info(
        "held-out at step {}: self-finalised {:.0%}, looked up {:.0%}{}",
        record["step"],
        record.get("eval/behaviour/self_finalized", float("nan")),
        record.get("eval/behaviour/looked_up", float("nan")),
        versus,
    )


def log_evaluation(label: str, summary: EvalSummary, comparison: dict[str, Any] | None = None) -> None:
    """One line: held-out reward with its CI, the behaviour rates, and the paired delta to the base model."""
    total = summary.reward
    if total is None:
        logger.warning("{} (step {}): every held-out rollout failed", label, summary.step)
        return
    rates = summary.behaviour
    line = (
        f"{label} (step {summary.step}): held-out reward {total.mean:.3f} "
        f"[{total.ci_low if total.ci_low is not None else float('nan'):.2f}, "
        f"{total.ci_high if total.ci_high is not None else float('nan'):.2f}], "
        f"self-finalised {rates.get('self_finalized', float('nan')):.0%}, looked up {rates.get('looked_up', float('nan')):.0%}"
    )
    base = (comparison or {}).get("base") or {}
    if base.get("delta") is not None:
        low, high = base.get("delta_ci") or (float("nan"), float("nan"))
        line += f"; vs base {base['delta']:+.3f} (paired 95% CI [{low:+.3f}, {high:+.3f}], n={base.get('paired_n', 0)})"
    logger.info(line)

"""The stages of one learning-loop iteration, each an async `@weave.op`.

generate_trajectories -> score_trajectories -> grpo_update -> evaluate -> log_rewards_metrics.
Each takes what it needs and returns plain results, so the loop that chains them stays a
short, readable script and a Weave trace shows one node per stage.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import art
import weave
from loguru import logger

from codreamer.config import RolloutConfig
from codreamer.local_trace import traced
from codreamer.domain import Product, Scenario
from codreamer.pipeline.evaluation import EvalSummary, generate_eval_groups, summarize_evaluation
from codreamer.retry import RetryPolicy, retrying
from codreamer.rewards.scoring import RewardScorer, ScoringSummary
from codreamer.training.policy_client import open_policy_client
from codreamer.training.rollout import rollout


@dataclass(frozen=True)
class RolloutPlan:
    """Everything `generate_trajectories` needs besides the model and the scenarios."""

    product: Product
    config: RolloutConfig
    group_size: int
    concurrency: int
    max_exceptions: float
    seed: int
    rollout_timeout_s: float = 900.0


@dataclass
class RewardStats:
    """Summary of a set of rewards, with the mean of each reward part."""

    count: int = 0
    mean: float = float("nan")
    std: float = float("nan")
    min: float = float("nan")
    max: float = float("nan")
    parts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, trajectories: Sequence[art.Trajectory]) -> RewardStats:
        rewards = [t.reward for t in trajectories]
        if not rewards:
            return cls()
        part_names = sorted({k for t in trajectories for k in t.metrics if k.startswith(("rubric/", "reward/"))})
        parts = {
            name: statistics.fmean(float(t.metrics[name]) for t in trajectories if name in t.metrics) for name in part_names
        }
        return cls(
            count=len(rewards),
            mean=statistics.fmean(rewards),
            std=statistics.pstdev(rewards),
            min=min(rewards),
            max=max(rewards),
            parts=parts,
        )


def _group_seed(seed: int, step: int, scenario_index: int, member: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + scenario_index * 101 + member) % (2**31)


@weave.op
@traced
async def generate_trajectories(
    model: art.Model, scenarios: Sequence[Scenario], plan: RolloutPlan, *, step: int, pbar_desc: str = "rollouts"
) -> list[art.TrajectoryGroup]:
    """Run every scenario `group_size` times, at most `concurrency` rollouts in flight.

    A crashed rollout does not stop the others: it lands in its group's `exceptions`, and
    the stage gives up only when more than `max_exceptions` rollouts failed. A rollout that
    runs past `rollout_timeout_s` is cancelled and lands there as a `TimeoutError`.
    """
    limiter = asyncio.Semaphore(plan.concurrency)
    async with open_policy_client(model, plan.config.inference_client, max_connections=plan.concurrency) as client:

        async def bounded(scenario: Scenario, seed: int) -> art.Trajectory:
            async with limiter:
                try:
                    async with asyncio.timeout(plan.rollout_timeout_s):
                        return await rollout(
                            model, scenario, plan.product, plan.config, step=step, seed=seed, client=client
                        )
                except TimeoutError:
                    raise TimeoutError(
                        f"rollout of {scenario.scenario_id} (seed {seed}) timed out after {plan.rollout_timeout_s:g}s"
                    ) from None

        groups = [
            art.trajectory_group(
                (bounded(s, _group_seed(plan.seed, step, i, g)) for g in range(plan.group_size)),
                metadata={"scenario_id": s.scenario_id, "prospect_id": s.prospect.prospect_id, "step": step},
                return_exceptions=True,
            )
            for i, s in enumerate(scenarios)
        ]
        gathered = await art.gather_trajectory_groups(groups, pbar_desc=pbar_desc, max_exceptions=plan.max_exceptions)
    check_rollout_failures(gathered, len(scenarios) * plan.group_size, plan.max_exceptions)
    return gathered


class RolloutFailuresError(RuntimeError):
    """More rollouts failed than `max_exceptions` allows; `groups` holds what was gathered."""

    def __init__(self, message: str, groups: list[art.TrajectoryGroup]) -> None:
        super().__init__(message)
        self.groups = groups


def check_rollout_failures(groups: list[art.TrajectoryGroup], planned: int, max_exceptions: float) -> None:
    """Give the stage up when failed rollouts exceed `max_exceptions` (a count, or a fraction if < 1).

    ART records the exceptions of `return_exceptions=True` groups in the groups without
    applying its own `max_exceptions`, so the limit is enforced here, over all rollouts.
    """
    failed = [e for g in groups for e in g.exceptions]
    allowed = max_exceptions * planned if max_exceptions < 1 else max_exceptions
    if len(failed) > allowed:
        first = failed[0]
        raise RolloutFailuresError(
            f"{len(failed)} of {planned} rollouts failed (max_exceptions={max_exceptions:g}); "
            f"first: {first.type.removeprefix("<class '").removesuffix("'>")}: {first.message}",
            groups,
        )


@weave.op
@traced
async def score_trajectories(
    groups: list[art.TrajectoryGroup],
    scenarios: Sequence[Scenario],
    scorer: RewardScorer,
    *,
    step: int,
    emails_sent: bool,
) -> ScoringSummary:
    """Blend rubric, RULER and online outcomes into each trajectory's reward (parts in metrics)."""
    return await scorer.score(groups, scenarios, step=step, emails_sent=emails_sent)


@weave.op
@traced
async def grpo_update(
    backend: Any,
    model: art.TrainableModel,
    groups: list[art.TrajectoryGroup],
    *,
    learning_rate: float,
    retry: RetryPolicy | None = None,
) -> art.TrainResult:
    """One GRPO step, retried with exponential backoff and jitter on transient errors only.

    A permanent error (a bug, a bad batch) is raised at once: retrying it would only hide it.
    """
    async for attempt in retrying(retry or RetryPolicy(), "training"):
        with attempt:
            return await backend.train(model, groups, learning_rate=learning_rate)
    raise AssertionError("unreachable")  # AsyncRetrying either returns or re-raises


@weave.op
@traced
async def evaluate(
    model: art.Model,
    scenarios: Sequence[Scenario],
    plan: RolloutPlan,
    scorer: RewardScorer,
    *,
    step: int,
    samples: int,
    bootstrap_samples: int,
) -> tuple[list[art.TrajectoryGroup], EvalSummary]:
    """Score the current policy on held-out scenarios (never trained on), `samples` each.

    The seeds depend only on the run seed, scenario and sample index (`eval_seeds`), so two
    evaluations differ by the policy alone. Evaluation emails are not sent: no outcome is
    simulated or read for them, so their reward is the blend of the offline parts
    (renormalised, and recorded as such). Means come with bootstrap 95% intervals.
    """
    groups = await generate_eval_groups(
        model,
        scenarios,
        product=plan.product,
        config=plan.config,
        samples=samples,
        seed=plan.seed,
        step=step,
        concurrency=plan.concurrency,
        max_exceptions=plan.max_exceptions,
    )
    await score_trajectories(groups, scenarios, scorer, step=step, emails_sent=False)
    return groups, summarize_evaluation(groups, step, bootstrap_samples=bootstrap_samples, seed=plan.seed)


@weave.op
@traced
async def log_rewards_metrics(
    model: art.Model, train_groups: list[art.TrajectoryGroup], eval_groups: list[art.TrajectoryGroup], train_metrics: dict[str, float], *, step: int
) -> None:
    """Hand the scored groups and training metrics to ART's logger (history.jsonl, W&B when set)."""
    if train_groups:
        await model.log(train_groups, split="train", step=step)
    if eval_groups:
        await model.log(eval_groups, split="val", step=step)
    if train_metrics:
        await model.log(metrics=train_metrics, split="train", step=step)

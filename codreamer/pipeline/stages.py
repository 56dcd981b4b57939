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
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from codreamer.config import RolloutConfig
from codreamer.local_trace import traced
from codreamer.domain import Product, Scenario
from codreamer.rewards.scoring import RewardScorer, ScoringSummary
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
    the stage gives up only when more than `max_exceptions` rollouts failed.
    """
    limiter = asyncio.Semaphore(plan.concurrency)

    async def bounded(scenario: Scenario, seed: int) -> art.Trajectory:
        async with limiter:
            return await rollout(model, scenario, plan.product, plan.config, step=step, seed=seed)

    groups = [
        art.trajectory_group(
            (bounded(s, _group_seed(plan.seed, step, i, g)) for g in range(plan.group_size)),
            metadata={"scenario_id": s.scenario_id, "prospect_id": s.prospect.prospect_id, "step": step},
            return_exceptions=True,
        )
        for i, s in enumerate(scenarios)
    ]
    return await art.gather_trajectory_groups(groups, pbar_desc=pbar_desc, max_exceptions=plan.max_exceptions)


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


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: I/O and connection trouble, timeouts, out-of-memory on a busy host."""
    return isinstance(exc, ConnectionError | TimeoutError | OSError | MemoryError)


@weave.op
@traced
async def grpo_update(
    backend: Any, model: art.TrainableModel, groups: list[art.TrajectoryGroup], *, learning_rate: float, attempts: int
) -> art.TrainResult:
    """One GRPO step, retried with exponential backoff and jitter on transient errors only."""
    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(initial=1, max=30),
        retry=retry_if_exception(_is_transient),
        reraise=True,
        before_sleep=lambda state: logger.warning(
            "training step failed ({}), retry {} of {}", state.outcome.exception(), state.attempt_number, attempts - 1
        ),
    )
    async for attempt in retrying:
        with attempt:
            return await backend.train(model, groups, learning_rate=learning_rate)
    raise AssertionError("unreachable")  # AsyncRetrying either returns or re-raises


@weave.op
@traced
async def evaluate(
    model: art.Model, scenarios: Sequence[Scenario], plan: RolloutPlan, scorer: RewardScorer, *, step: int
) -> tuple[list[art.TrajectoryGroup], RewardStats]:
    """Score the current policy on held-out scenarios (never trained on), one sample each.

    Evaluation emails are not sent: no outcome is simulated or read for them, so their
    reward is the blend of the offline parts (renormalised, and recorded as such).
    """
    eval_plan = RolloutPlan(plan.product, plan.config, 1, plan.concurrency, plan.max_exceptions, plan.seed + 7919)
    groups = await generate_trajectories(model, scenarios, eval_plan, step=step, pbar_desc="eval")
    await score_trajectories(groups, scenarios, scorer, step=step, emails_sent=False)
    return groups, RewardStats.of([t for g in groups for t in g.trajectories])


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

"""The stages of one learning-loop iteration, each an async `@weave.op`.

generate_trajectories -> score_trajectories -> grpo_update -> evaluate -> log_rewards_metrics.
Each takes what it needs and returns plain results, so the loop that chains them stays a
short, readable script and a Weave trace shows one node per stage.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import art
import weave

from codreamer.agent.rollout import RolloutConfig
from codreamer.backends.factory import train_options_of
from codreamer.config import Settings
from codreamer.domain import Product, Scenario
from codreamer.local_trace import traced
from codreamer.pipeline.evaluation import EvalSummary, generate_eval_groups, summarize_evaluation
from codreamer.pipeline.fanout import RolloutJob, fan_out_rollouts
from codreamer.retry import RetryPolicy, retrying
from codreamer.rewards.scoring import RewardScorer, ScoringSummary


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

    @classmethod
    def from_settings(cls, settings: Settings, product: Product) -> RolloutPlan:
        """The rollout view of the settings, for the task's product."""
        return cls(
            product=product,
            config=RolloutConfig.from_settings(settings),
            group_size=settings.group_size,
            concurrency=settings.rollout_concurrency,
            max_exceptions=settings.max_exceptions,
            seed=settings.seed,
            rollout_timeout_s=settings.rollout_timeout_s,
        )


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
            name: statistics.fmean(float(t.metrics[name]) for t in trajectories if name in t.metrics)
            for name in part_names
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
    """Run every scenario `group_size` times (distinct seeds), one GRPO group per scenario.

    At most `concurrency` rollouts are in flight. A crashed rollout does not stop the others:
    it lands in its group's `exceptions`, and the stage gives up only when more than
    `max_exceptions` rollouts failed. A rollout that runs past `rollout_timeout_s` is
    cancelled and lands there as a `TimeoutError` (`codreamer.pipeline.fanout`).
    """
    jobs = [
        [RolloutJob(scenario, _group_seed(plan.seed, step, i, g)) for g in range(plan.group_size)]
        for i, scenario in enumerate(scenarios)
    ]
    return await fan_out_rollouts(
        model,
        jobs,
        product=plan.product,
        config=plan.config,
        step=step,
        concurrency=plan.concurrency,
        max_exceptions=plan.max_exceptions,
        rollout_timeout_s=plan.rollout_timeout_s,
        pbar_desc=pbar_desc,
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
    iteration: int | None = None,
) -> ScoringSummary:
    """Blend rubric, RULER and online outcomes into each trajectory's reward (parts in metrics)."""
    return await scorer.score(groups, scenarios, step=step, emails_sent=emails_sent, iteration=iteration)


@weave.op
@traced
async def grpo_update(
    backend: Any,
    model: art.TrainableModel,
    groups: list[art.TrajectoryGroup],
    *,
    learning_rate: float,
    retry: RetryPolicy | None = None,
    options: dict[str, Any] | None = None,
) -> art.TrainResult:
    """One GRPO step, retried with exponential backoff and jitter on transient errors only.

    `options` are ART's training keywords (`loss_fn`, `kl_penalty_coef`, ...; see
    `codreamer.backends.factory.ART_TRAIN_OPTIONS`) passed to `backend.train` as they are;
    the loop passes `train_options(settings)` (only the ones the user set, so an unset option
    keeps the backend's default). None: those the factory attached to the backend. A
    permanent error (a bug, a bad batch, an option the backend refuses) is raised at once:
    retrying it would only hide it.
    """
    extra = train_options_of(backend) if options is None else dict(options)
    async for attempt in retrying(retry or RetryPolicy(), "training"):
        with attempt:
            return await backend.train(model, groups, learning_rate=learning_rate, **extra)
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
        rollout_timeout_s=plan.rollout_timeout_s,
    )
    await score_trajectories(groups, scenarios, scorer, step=step, emails_sent=False)
    return groups, summarize_evaluation(groups, step, bootstrap_samples=bootstrap_samples, seed=plan.seed)


@weave.op
@traced
async def log_rewards_metrics(
    model: art.Model,
    train_groups: list[art.TrajectoryGroup],
    eval_groups: list[art.TrajectoryGroup],
    train_metrics: dict[str, float],
    *,
    step: int,
) -> None:
    """Hand the scored groups and training metrics to ART's logger (history.jsonl, W&B when set)."""
    if train_groups:
        await model.log(train_groups, split="train", step=step)
    if eval_groups:
        await model.log(eval_groups, split="val", step=step)
    if train_metrics:
        await model.log(metrics=train_metrics, split="train", step=step)

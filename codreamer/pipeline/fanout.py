"""One rollout fan-out for training and evaluation: bounded, timed out, failures counted.

Both `generate_trajectories` (GRPO groups) and `generate_eval_groups` (held-out samples)
run many episodes of `rollout` at once. They share this code so that both bound the
rollouts in flight, cancel a rollout that runs past its timeout, and give the stage up when
more rollouts failed than `max_exceptions` allows.

Every coroutine is built eagerly, with its scenario and seed bound as arguments: a lazy
generator handed to ART is consumed later, after the enclosing loop has moved on, and every
group would then hold rollouts of the last scenario (a bug this module replaced).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import art

from codreamer.agent.policy_client import open_policy_client
from codreamer.agent.rollout import rollout

if TYPE_CHECKING:
    from codreamer.agent.rollout import RolloutConfig
    from codreamer.domain import Product, Scenario

__all__ = ["RolloutFailuresError", "RolloutJob", "check_rollout_failures", "fan_out_rollouts"]


@dataclass(frozen=True)
class RolloutJob:
    """One episode to run: the scenario, its sampling seed, metadata to add to its trajectory."""

    scenario: Scenario
    seed: int
    extra_metadata: dict[str, Any] = field(default_factory=dict)


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


async def fan_out_rollouts(
    model: art.Model,
    groups_of_jobs: Sequence[Sequence[RolloutJob]],
    *,
    product: Product,
    config: RolloutConfig,
    step: int,
    concurrency: int,
    max_exceptions: float,
    rollout_timeout_s: float,
    pbar_desc: str,
) -> list[art.TrajectoryGroup]:
    """Run every job, at most `concurrency` at once; one trajectory group per inner sequence.

    A group's metadata names its scenario (all jobs of a group must share one). A crashed
    rollout lands in its group's `exceptions`; one that runs past `rollout_timeout_s` is
    cancelled and lands there as a `TimeoutError`; more failures than `max_exceptions`
    raise `RolloutFailuresError` (with what was gathered).
    """
    for jobs in groups_of_jobs:
        ids = {job.scenario.scenario_id for job in jobs}
        if len(ids) > 1:
            raise ValueError(f"a trajectory group must hold one scenario, got {sorted(ids)}")
    limiter = asyncio.Semaphore(concurrency)
    async with open_policy_client(model, config.inference_client, max_connections=concurrency) as client:

        async def one(job: RolloutJob) -> art.Trajectory:
            async with limiter:
                try:
                    async with asyncio.timeout(rollout_timeout_s):
                        trajectory = await rollout(
                            model, job.scenario, product, config, step=step, seed=job.seed, client=client
                        )
                except TimeoutError:
                    raise TimeoutError(
                        f"rollout of {job.scenario.scenario_id} (seed {job.seed}) timed out after {rollout_timeout_s:g}s"
                    ) from None
            trajectory.metadata.update(job.extra_metadata)
            return trajectory

        groups = [
            art.trajectory_group(
                [one(job) for job in jobs],  # a list, built now: see the module docstring
                metadata={
                    "scenario_id": jobs[0].scenario.scenario_id,
                    "prospect_id": jobs[0].scenario.prospect.prospect_id,
                    "step": step,
                },
                return_exceptions=True,
            )
            for jobs in groups_of_jobs
            if jobs
        ]
        gathered = await art.gather_trajectory_groups(groups, pbar_desc=pbar_desc, max_exceptions=max_exceptions)
    check_rollout_failures(gathered, sum(len(jobs) for jobs in groups_of_jobs), max_exceptions)
    return gathered

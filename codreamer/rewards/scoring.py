"""Scoring a batch of trajectory groups: rubric, RULER, online outcomes, then the blend.

For each trajectory the offline rubric is computed; for each group RULER is asked when a
judge is configured (groups concurrently); when the emails count as sent (training, not
evaluation) and the simulator is on, its outcomes are appended to the event log; the log
is then refreshed incrementally and each trajectory's outcomes are read back from it. The
parts are blended (`codreamer.rewards.blend`) and the total is written to
`trajectory.reward`, with every part in `trajectory.metrics`: the number trained on is the
number logged. A judge failure is recorded as `ruler/judge_error`, never as a zero.

An auto-finalised rollout (`metadata["auto_finalized"]`: the agent never called
`finalize_email`, its email was salvaged from its text) gets its rubric total multiplied by
`RewardScorer.auto_finalize_factor` (0.5 by default) before the blend, so that finishing the
task properly pays. All three numbers are logged: `rubric/total` (the email's own score),
`rubric/auto_finalize_factor` (1.0 or the factor) and `rubric/total_penalized` (their
product: what the blend's `reward/rubric` is).

Late simulated outcomes: when the simulator says an outcome arrives N iterations late
(`ProspectSimulator.delay_of`), it is written to the run's pending file (`pending_path`,
JSONL with the iteration it is due) instead of the event log, and delivered to the log by the
scoring of that iteration (`deliver_due`), before anything is read: the trajectory's own
scoring lacks it (its online part is renormalised away), the loop's delayed credit picks it up.
Delivery is exactly once in effect: a pending outcome keeps its event id, and the log counts
an id once, so a resumed scoring that delivers it again changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
import art
import weave

from codreamer.agent.rollout import email_from_trajectory
from codreamer.domain import Product, Scenario
from codreamer.events.models import FLAG_NAMES, OnlineOutcome
from codreamer.local_trace import traced
from codreamer.rewards.blend import OutcomeFlags, RewardMixConfig, compute_rewards
from codreamer.rewards.rubric import RubricScore, score_email
from codreamer.rewards.simulator import ProspectSimulator
from codreamer.storage import append_jsonl, read_jsonl


class OutcomeStore(Protocol):
    """What scoring needs of the event log."""

    def append(self, outcomes: Sequence[OnlineOutcome]) -> int: ...
    def refresh(self) -> Any: ...
    def __contains__(self, event_id: object) -> bool:
        """Whether an event with this id was read from the log."""
        ...

    def summaries(self, trajectory_ids: Sequence[str]) -> Mapping[str, Any]: ...
    def save_index(self) -> Any: ...
    @property
    def offset(self) -> int:
        """Bytes of the log read so far (kept in the resume state)."""
        ...


@dataclass(frozen=True)
class ScoringSummary:
    trajectories: int
    judge_errors: int
    renormalized: int
    outcomes_appended: int
    outcomes_held_back: int = 0  # simulated outcomes that arrive in a later iteration
    outcomes_delivered_late: int = 0  # held-back outcomes of earlier iterations delivered now


def _trajectories(groups: Sequence[art.TrajectoryGroup]) -> list[art.Trajectory]:
    return [t for g in groups for t in g.trajectories]


def _tid(trajectory: art.Trajectory) -> str:
    return str(trajectory.metadata["trajectory_id"])


def flag_mask(flags: Any) -> int:
    """The outcome flags as a bit mask (`codreamer.events.models.FLAG_NAMES` order)."""
    return sum(1 << bit for bit, name in enumerate(FLAG_NAMES) if getattr(flags, name, False))


def flags_of(summary: Any) -> OutcomeFlags:
    """An outcome summary (or anything with the flag attributes) as the blend's `OutcomeFlags`."""
    return OutcomeFlags(
        opened=bool(getattr(summary, "opened", False)),
        replied=bool(getattr(summary, "replied", False)),
        bounced=bool(getattr(summary, "bounced", False)),
        unsubscribed=bool(getattr(summary, "unsubscribed", False)),
        meeting_booked=bool(getattr(summary, "meeting_booked", False)),
    )


class RewardScorer:
    """Holds the reward configuration and the sources; `score` is called once per stage."""

    def __init__(
        self,
        product: Product,
        mix: RewardMixConfig,
        *,
        judge: Any | None = None,
        events: OutcomeStore | None = None,
        simulator: ProspectSimulator | None = None,
        auto_finalize_factor: float = 0.5,
        pending_path: Path | None = None,
    ) -> None:
        if not 0.0 <= auto_finalize_factor <= 1.0:
            raise ValueError(f"auto_finalize_factor must be in [0, 1], got {auto_finalize_factor}")
        self.product = product
        self.mix = mix
        self.judge = judge
        self.events = events
        self.simulator = simulator
        #: Multiplies the rubric total of a rollout whose email was auto-finalised.
        self.auto_finalize_factor = auto_finalize_factor
        #: Where late simulated outcomes wait for their iteration (None: none is held back).
        self.pending_path = pending_path

    def rubric_factor(self, trajectory: art.Trajectory) -> float:
        """`auto_finalize_factor` for an auto-finalised rollout, else 1.0."""
        return self.auto_finalize_factor if trajectory.metadata.get("auto_finalized") else 1.0

    async def score(
        self,
        groups: list[art.TrajectoryGroup],
        scenarios: Sequence[Scenario],
        *,
        step: int,
        emails_sent: bool,
        iteration: int | None = None,
    ) -> ScoringSummary:
        """Score `groups` in place. `iteration` (training only) is the clock of late simulated outcomes."""
        by_id = {s.scenario_id: s for s in scenarios}
        delivered = self.deliver_due(iteration) if emails_sent and iteration is not None else 0
        rubric = self._score_rubric(groups, by_id)
        judge_errors = await self._judge(groups)
        appended, held = self._simulate_outcomes(groups, by_id, rubric, step, iteration) if emails_sent else (0, 0)
        outcomes = self._read_outcomes(groups)
        ruler = {_tid(t): t.metrics.get("ruler/score") for t in _trajectories(groups)}
        totals = compute_rewards(
            [_tid(t) for t in _trajectories(groups)],
            self.mix,
            rubric={_tid(t): rubric[_tid(t)].total * self.rubric_factor(t) for t in _trajectories(groups)},
            ruler=ruler,
            outcomes=outcomes,
        )
        renormalized = 0
        for trajectory in _trajectories(groups):
            blended = totals[_tid(trajectory)]
            trajectory.metrics.update(blended.as_metrics())
            if (flags := outcomes.get(_tid(trajectory))) is not None:
                trajectory.metrics |= {
                    "outcome/opened": float(flags.opened),
                    "outcome/replied": float(flags.replied),
                    "outcome/flags": float(flag_mask(flags)),
                }
            trajectory.reward = blended.total
            renormalized += blended.renormalized
        return ScoringSummary(len(totals), judge_errors, renormalized, appended, held, delivered)

    def deliver_due(self, iteration: int) -> int:
        """Append the held-back simulated outcomes due by `iteration` to the event log (stamped
        now: the moment they arrive); returns how many were due. Repeats are counted once by the log."""
        if self.pending_path is None or self.events is None:
            return 0
        records, _ = read_jsonl(self.pending_path)
        due = [r for r in records if isinstance(r, dict) and int(r.get("due_iteration", 0)) <= iteration]
        fresh = {}
        for record in due:
            outcome = OnlineOutcome.model_validate(record["outcome"])
            fresh[outcome.event_id] = outcome.model_copy(update={"timestamp": datetime.now(UTC)})
        self.events.refresh()
        new = [o for o in fresh.values() if o.event_id not in self.events]
        if new:
            self.events.append(new)
        return len(new)

    @weave.op(name="score_rubric")
    @traced(name="score_rubric")
    def _score_rubric(self, groups: list[art.TrajectoryGroup], by_id: Mapping[str, Scenario]) -> dict[str, RubricScore]:
        scores = {}
        for group in groups:
            prospect = by_id[group.metadata["scenario_id"]].prospect
            for trajectory in group.trajectories:
                score = score_email(email_from_trajectory(trajectory), prospect, self.product)
                factor = self.rubric_factor(trajectory)
                trajectory.metrics.update(score.as_metrics())
                trajectory.metrics["rubric/auto_finalize_factor"] = factor
                trajectory.metrics["rubric/total_penalized"] = score.total * factor
                scores[_tid(trajectory)] = score
        return scores

    @weave.op(name="score_judge")
    @traced(name="score_judge")
    async def _judge(self, groups: list[art.TrajectoryGroup]) -> int:
        """RULER on every group at once; returns how many groups ended in a judge error."""
        if self.judge is None:
            return 0
        from codreamer.rewards.ruler import apply_judgement, judge_group

        errors = 0

        async def judge_one(group: art.TrajectoryGroup) -> None:
            nonlocal errors
            judgement = await judge_group(group, self.judge)
            apply_judgement(group, judgement)
            errors += judgement.judge_error is not None

        async with anyio.create_task_group() as tasks:
            for group in groups:
                if group.trajectories:
                    tasks.start_soon(judge_one, group)
        return errors

    @weave.op(name="score_simulate_outcomes")
    @traced(name="score_simulate_outcomes")
    def _simulate_outcomes(
        self,
        groups: list[art.TrajectoryGroup],
        by_id: Mapping[str, Scenario],
        rubric: Mapping[str, RubricScore],
        step: int,
        iteration: int | None = None,
    ) -> tuple[int, int]:
        """Simulate the outcome of every email that counts as sent (a non-empty body, the outbox's
        rule: an unsent email gets no outcome): (appended to the log now, held back for later)."""
        if self.simulator is None or self.events is None:
            return 0, 0
        now: list[OnlineOutcome] = []
        later: list[dict[str, Any]] = []
        for g in groups:
            prospect = by_id[g.metadata["scenario_id"]].prospect
            for t in g.trajectories:
                if not str(t.metadata.get("email_body") or "").strip():
                    continue
                outcome = self.simulator.simulate(_tid(t), prospect, email_from_trajectory(t), rubric[_tid(t)], step)
                delay = self.simulator.delay_of(_tid(t)) if self.pending_path is not None else 0
                if delay and iteration is not None:
                    later.append({"due_iteration": iteration + delay, "outcome": outcome.model_dump(mode="json")})
                else:
                    now.append(outcome)
        if later and self.pending_path is not None:
            append_jsonl(self.pending_path, later)
        return self.events.append(now), len(later)

    @weave.op(name="score_read_outcomes")
    @traced(name="score_read_outcomes")
    def _read_outcomes(self, groups: list[art.TrajectoryGroup]) -> dict[str, OutcomeFlags]:
        if self.events is None:
            return {}
        self.events.refresh()
        summaries = self.events.summaries([_tid(t) for t in _trajectories(groups)])
        return {tid: flags_of(summary) for tid, summary in summaries.items() if summary is not None}

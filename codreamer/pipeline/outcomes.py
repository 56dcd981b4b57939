"""The iteration's online-outcome steps: record what was sent, close windows, select the replay.

`record_outbox` writes the emails of the iteration's training rollouts to the run's outbox
(once per trajectory id, `codreamer.events.outbox`) before they are scored: that is when they
count as sent. `credit_before_step` runs after scoring, before the GRPO step: it stores the
scored trajectories for later credit, writes the attribution window's "no reply" events
(`codreamer.events.window`), and selects the replay of earlier groups whose outcome arrived
since the last step (`codreamer.pipeline.credit`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import art
from loguru import logger

from codreamer.events.outbox import Outbox, OutboxEntry
from codreamer.events.window import no_reply_events
from codreamer.pipeline.credit import ReplayLimits, ReplayPlan, select_replay, store_trajectories, unknown_outcomes
from codreamer.pipeline.history import read_history

if TYPE_CHECKING:
    from codreamer.pipeline.run import Run


def sent_entries(run_id: str, groups: list[art.TrajectoryGroup], iteration: int, step: int) -> list[OutboxEntry]:
    """The emails of `groups` that count as sent: every trajectory whose email has a body."""
    now = datetime.now(UTC)
    entries = []
    for group in groups:
        for trajectory in group.trajectories:
            meta = trajectory.metadata
            body = str(meta.get("email_body") or "")
            if not body.strip():
                continue
            entries.append(
                OutboxEntry(
                    trajectory_id=str(meta["trajectory_id"]),
                    prospect_id=str(meta.get("prospect_id", "")),
                    scenario_id=meta.get("scenario_id"),
                    run_id=run_id,
                    iteration=iteration,
                    step=step,
                    subject=str(meta.get("email_subject") or ""),
                    body=body,
                    sent_at=now,
                )
            )
    return entries


def record_outbox(run: Run, groups: list[art.TrajectoryGroup], iteration: int, step: int) -> int:
    """Record the iteration's sent emails in the run's outbox; returns how many were new."""
    added = Outbox.of_run(run.directory).record(sent_entries(run.run_id, groups, iteration, step))
    if added:
        logger.debug("outbox: {} email(s) of iteration {} recorded", added, iteration)
    return added


def apply_window(run: Run, iteration: int) -> int:
    """Write the due "no reply" events of the run's sent emails; returns how many."""
    events = run.scorer.events
    settings = run.settings
    if events is None or (settings.attribution_window_iterations is None and settings.attribution_window_s is None):
        return 0
    entries = Outbox.of_run(run.directory).entries()
    events.refresh()
    due = no_reply_events(
        entries,
        events.summaries([e.trajectory_id for e in entries]),
        events,
        iteration=iteration,
        window_iterations=settings.attribution_window_iterations,
        window_s=settings.attribution_window_s,
    )
    if due:
        events.append(due)
        logger.info("attribution window: {} sent email(s) without a reply count as 'no reply' now", len(due))
    return len(due)


def credit_before_step(run: Run, groups: list[art.TrajectoryGroup], iteration: int, step: int) -> ReplayPlan:
    """Store the scored groups, close the windows, and select the replay of this iteration's step."""
    events = run.scorer.events
    if events is None:
        return ReplayPlan()
    settings = run.settings
    store_trajectories(run.directory, groups, iteration=iteration, step=step)
    window = apply_window(run, iteration)
    records, _ = read_history(run.history_path)
    limits = ReplayLimits(settings.replay_max_groups, settings.replay_max_age, settings.replay_weight)
    plan = select_replay(run.directory, records, events, run.scorer.mix, iteration=iteration, limits=limits)
    plan.metrics["replay/window_events"] = float(window)
    plan.metrics["replay/outcomes_unknown"] = float(unknown_outcomes(events, run.directory.parent))
    if plan.metrics["replay/outcomes_received"]:
        logger.info(
            "delayed credit: {:.0f} outcome(s) arrived for earlier iterations (mean delay {:.1f} iteration(s)); "
            "replaying {:.0f} group(s), {:.0f} trajectories, reward change {:+.3f} on average",
            plan.metrics["replay/outcomes_received"],
            plan.metrics["replay/outcome_delay_iterations_mean"],
            plan.metrics["replay/groups"],
            plan.metrics["replay/trajectories"],
            plan.metrics["replay/reward_change_mean"],
        )
    if plan.metrics["replay/outcomes_unknown"]:
        logger.warning(
            "{:.0f} trajectory id(s) in the event log are in no outbox of this project (kept, not credited)",
            plan.metrics["replay/outcomes_unknown"],
        )
    return plan

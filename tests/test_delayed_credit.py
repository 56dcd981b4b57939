"""Issue 14: the outbox, delayed credit (re-score + replay with the sampled log-probs), the
attribution window, late simulator outcomes, and the replay markers' commit (no model).

The event log is the real `EventLog`; trajectories are hand-made `art.Trajectory`s whose choice
carries token ids and sampled log-probs as the embedded server returns them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import art
import pytest
import torch
from openai.types.chat.chat_completion import Choice

from codreamer.backends.embedded.grpo import to_sequence
from codreamer.backends.embedded.loss import LossConfig, policy_loss_sum
from codreamer.events.log import EventLog
from codreamer.events.models import OnlineOutcome
from codreamer.events.outbox import KnownTrajectories, Outbox, OutboxEntry, export_outbox
from codreamer.events.window import WINDOW_SOURCE, no_reply_events
from codreamer.pipeline.credit import ReplayLimits, ReplayPlan, select_replay, store_trajectories
from codreamer.pipeline.stages import grpo_update
from codreamer.rewards.blend import RewardMixConfig
from codreamer.rewards.simulator import ProspectSimulator

LOGPROBS = [-0.25, -1.5, -0.75]
MIX = RewardMixConfig(ruler_weight=0.0, rubric_weight=0.5, online_weight=0.5)


def _choice(tid: str) -> Choice:
    return Choice.model_validate(
        {
            "finish_reason": "stop",
            "index": 0,
            "message": {"role": "assistant", "content": f"email {tid}"},
            "logprobs": {
                "content": [
                    {"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": []}
                    for i, lp in enumerate(LOGPROBS)
                ]
            },
            "prompt_token_ids": [1, 2, 3],
            "token_ids": [7, 8, 9],
        }
    )


def _trajectory(tid: str, rubric: float, flags: int | None) -> art.Trajectory:
    metrics: dict[str, float] = {"rubric/total_penalized": rubric}
    if flags is not None:
        metrics["outcome/flags"] = float(flags)
    return art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "write"}, _choice(tid)],
        reward=rubric,
        metrics=metrics,
        metadata={"trajectory_id": tid, "scenario_id": "s1", "prospect_id": "p1", "step": 0},
    )


def _group(*members: tuple[str, float]) -> art.TrajectoryGroup:
    return art.TrajectoryGroup([_trajectory(t, r, None) for t, r in members], metadata={"scenario_id": "s1"})


def _outcome(tid: str, event_id: str, **flags: bool) -> OnlineOutcome:
    return OnlineOutcome(
        event_id=event_id, trajectory_id=tid, prospect_id="p1", step=0, timestamp=datetime.now(UTC), **flags
    )


# ------------------------------------------------------------------------------------ outbox
def _entry(tid: str, iteration: int = 1, sent_at: datetime | None = None) -> OutboxEntry:
    return OutboxEntry(
        trajectory_id=tid,
        prospect_id="p1",
        scenario_id="s1",
        run_id="r",
        iteration=iteration,
        step=iteration - 1,
        subject="Hi",
        body="Body, with a comma",
        sent_at=sent_at or datetime.now(UTC),
    )


def test_the_outbox_records_each_email_once_and_exports_jsonl_and_csv(tmp_path: Path) -> None:
    outbox = Outbox.of_run(tmp_path)
    old = datetime(2025, 1, 1, tzinfo=UTC)
    assert outbox.record([_entry("a", sent_at=old), _entry("b"), _entry("a")]) == 2
    assert outbox.record([_entry("a"), _entry("b"), _entry("c")]) == 1  # a resumed iteration records again
    assert [e.trajectory_id for e in outbox.entries()] == ["a", "b", "c"]
    assert [e.trajectory_id for e in outbox.entries(since=datetime(2025, 6, 1))] == ["b", "c"]
    lines = [json.loads(line) for line in export_outbox(outbox.entries(), "jsonl").splitlines()]
    assert lines[0]["trajectory_id"] == "a" and lines[0]["step"] == 0 and lines[0]["body"] == "Body, with a comma"
    rows = list(csv.DictReader(io.StringIO(export_outbox(outbox.entries(), "csv"))))
    assert [r["trajectory_id"] for r in rows] == ["a", "b", "c"] and rows[0]["body"] == "Body, with a comma"


def test_outcomes_for_ids_in_no_outbox_are_reported(tmp_path: Path) -> None:
    Outbox.of_run(tmp_path / "models" / "run-1").record([_entry("a")])
    known = KnownTrajectories(tmp_path / "models")
    assert known.unknown(["a", "zz", "zz"]) == ["zz"]
    Outbox.of_run(tmp_path / "models" / "run-2").record([_entry("zz")])
    assert known.unknown(["a", "zz"]) == []


def test_the_outbox_verb_exports_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from codreamer.cli import codreamer_main

    run = tmp_path / "codreamer" / "models" / "run-x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "run-x", "kind": "learn-loop", "status": "finished"}))
    Outbox.of_run(run).record([_entry("a"), _entry("b")])
    assert codreamer_main(["--runs-dir", str(tmp_path), "outbox", "run-x", "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trajectory_id,") and len(out) == 3
    assert codreamer_main(["--runs-dir", str(tmp_path), "outbox", "run-x", "--since", "not a time"]) == 2


# ------------------------------------------------------------------------------- delayed credit
def _committed(plan: ReplayPlan | None, trained: list[str]) -> dict[str, Any]:
    return {"train/trajectory_ids": trained, **(plan.record_fields() if plan else {})}


def test_a_late_outcome_replays_its_group_with_new_rewards_and_the_sampled_logprobs(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    store_trajectories(tmp_path, [_group(("a", 0.6), ("b", 0.6))], iteration=1, step=0)
    records = [_committed(None, ["a", "b"])]
    limits = ReplayLimits(max_groups=4, max_age=10, weight=1)
    assert select_replay(tmp_path, records, log, MIX, iteration=2, limits=limits).groups == []  # nothing arrived

    log.append([_outcome("a", "e1", opened=True, replied=True), _outcome("b", "e2")])
    plan = select_replay(tmp_path, records, log, MIX, iteration=2, limits=limits)
    assert len(plan.groups) == 1
    rewards = {t.metadata["trajectory_id"]: t.reward for t in plan.groups[0].trajectories}
    assert rewards == pytest.approx({"a": 0.5 * 0.6 + 0.5 * 1.0, "b": 0.5 * 0.6})
    assert plan.metrics["replay/outcomes_received"] == 2 and plan.metrics["replay/trajectories"] == 2
    assert plan.metrics["replay/outcome_delay_iterations_mean"] == 1.0
    assert plan.metrics["replay/reward_change_mean"] == pytest.approx(((0.8 - 0.6) + (0.3 - 0.6)) / 2)

    # Through the work file (a resumed iteration) the choices keep their token ids and log-probs...
    plan = ReplayPlan.load(json.loads(json.dumps(plan.dump())))
    choice = plan.groups[0].trajectories[0].messages_and_choices[-1]
    assert isinstance(choice, Choice) and choice.logprobs is not None
    assert [c.logprob for c in choice.logprobs.content or []] == LOGPROBS
    assert choice.model_extra == {"prompt_token_ids": [1, 2, 3], "token_ids": [7, 8, 9]}

    # ...and reach the backend's train call with their new rewards.
    seen: list[list[art.TrajectoryGroup]] = []

    class Recorder:
        async def train(self, model: Any, groups: list[art.TrajectoryGroup], **kwargs: Any) -> art.TrainResult:
            seen.append(groups)
            return art.TrainResult(step=1, metrics={})

    online = [_group(("c", 0.2), ("d", 0.9))]
    asyncio.run(grpo_update(Recorder(), None, online + plan.groups, learning_rate=1e-5, options={}))  # type: ignore[arg-type]
    trained = seen[0][1].trajectories
    assert [t.reward for t in trained] == pytest.approx([0.8, 0.3])
    assert [c.logprob for c in trained[0].messages_and_choices[-1].logprobs.content] == LOGPROBS  # type: ignore[union-attr]


def test_committed_markers_replay_no_outcome_twice_and_an_uncommitted_one_replays_again(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    store_trajectories(tmp_path, [_group(("a", 0.6), ("b", 0.2))], iteration=1, step=0)
    log.append([_outcome("a", "e1", opened=True)])
    limits = ReplayLimits()
    records = [_committed(None, ["a", "b"])]
    first = select_replay(tmp_path, records, log, MIX, iteration=2, limits=limits)
    assert first.metrics["replay/trajectories_credited"] == 1
    # Killed before iteration 2's record: its markers do not exist, the same replay is selected again.
    again = select_replay(tmp_path, records, log, MIX, iteration=2, limits=limits)
    assert again.marks == first.marks and len(again.groups) == 1
    # Committed with iteration 2's record: iteration 3 replays nothing...
    records.append(_committed(first, []))
    assert select_replay(tmp_path, records, log, MIX, iteration=3, limits=limits).groups == []
    # ...until a new outcome changes the email's flags (a reply after the open).
    log.append([_outcome("a", "e2", replied=True), _outcome("a", "e3", replied=True)])
    later = select_replay(tmp_path, records, log, MIX, iteration=3, limits=limits)
    assert later.metrics["replay/outcomes_received"] == 1 and len(later.groups) == 1


def test_uncommitted_trajectories_too_old_ones_and_the_limits(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    store_trajectories(tmp_path, [_group(("a", 0.6), ("b", 0.2))], iteration=1, step=0)
    store_trajectories(tmp_path, [_group(("x", 0.6), ("y", 0.2))], iteration=1, step=0)  # a killed attempt
    store_trajectories(tmp_path, [_group(("c", 0.6), ("d", 0.2))], iteration=3, step=2)
    log.append([_outcome(t, f"e-{t}", opened=True) for t in "axc"])
    records = [_committed(None, ["a", "b"]), _committed(None, ["c", "d"])]
    plan = select_replay(tmp_path, records, log, MIX, iteration=5, limits=ReplayLimits(max_groups=4, max_age=3))
    assert plan.metrics["replay/outcomes_too_old"] == 1 and plan.metrics["replay/outcomes_received"] == 1
    assert "x" not in plan.marks and len(plan.groups) == 1
    weighted = select_replay(tmp_path, records, log, MIX, iteration=5, limits=ReplayLimits(max_age=10, weight=3))
    assert [len(g.trajectories) for g in weighted.groups] == [6, 6]
    capped = select_replay(tmp_path, records, log, MIX, iteration=5, limits=ReplayLimits(max_groups=1, max_age=10))
    assert len(capped.groups) == 1 and capped.metrics["replay/groups_deferred"] == 1


def test_the_replayed_logprobs_are_the_old_side_of_the_importance_ratio() -> None:
    """Reference computation: CISPO's gradient on a replayed sequence is -clip(exp(new - old)) * A."""
    sequence = to_sequence([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1], [math.nan] * 3 + LOGPROBS, 0.5)
    assert sequence is not None and list(sequence.old_logprobs()) == LOGPROBS
    new = torch.tensor([-0.5, -1.0, -3.0], requires_grad=True)  # the moved policy
    old = torch.tensor(sequence.old_logprobs())
    loss, stats = policy_loss_sum(new, old, torch.full((3,), 0.5), torch.zeros(3, dtype=torch.long), LossConfig())
    loss.backward()
    ratio = torch.exp(new.detach() - old).clamp(0.0, 5.0)
    assert torch.allclose(new.grad, -ratio * 0.5)  # type: ignore[arg-type]
    assert stats.ratio_sum == pytest.approx(float(torch.exp(new.detach() - old).sum()))


# ------------------------------------------------------------------------- window and simulator
def test_the_window_says_no_reply_once_and_never_for_a_replied_email(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    entries = [_entry("a", iteration=1), _entry("b", iteration=1), _entry("c", iteration=3)]
    log.append([_outcome("b", "e1", replied=True)])
    log.refresh()
    due = no_reply_events(entries, log.summaries(["a", "b", "c"]), log, iteration=3, window_iterations=2, window_s=None)
    assert [(e.trajectory_id, e.source, e.opened) for e in due] == [("a", WINDOW_SOURCE, False)]
    log.append(due)
    log.refresh()
    later = no_reply_events(
        entries, log.summaries(["a", "b", "c"]), log, iteration=9, window_iterations=2, window_s=None
    )
    assert [e.trajectory_id for e in later] == ["c"]  # a has its window event, b was replied to
    old = [_entry("d", sent_at=datetime.now(UTC) - timedelta(hours=2))]
    assert len(no_reply_events(old, {}, log, iteration=1, window_iterations=None, window_s=3600)) == 1
    summary = log.summary("a")
    assert summary is not None and not summary.opened  # the email now has an online part: unopened


def test_the_simulator_answers_a_seeded_share_late() -> None:
    simulator = ProspectSimulator(7, late_share=0.5, late_iterations=2)
    delays = [simulator.delay_of(f"t{i}") for i in range(400)]
    assert set(delays) == {0, 2} and 150 < delays.count(2) < 250
    assert delays == [ProspectSimulator(7, late_share=0.5, late_iterations=2).delay_of(f"t{i}") for i in range(400)]
    assert {ProspectSimulator(7).delay_of(f"t{i}") for i in range(50)} == {0}

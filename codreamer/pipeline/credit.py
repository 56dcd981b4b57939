"""Delayed credit: outcomes that arrive after their step are credited, and trained on.

Every scored training trajectory is kept in the run's replay store
(`replay/trajectories.jsonl`: the trajectory with its choices, so with the log-probs its tokens
were sampled with, its iteration, step, scenario, reward parts and the outcome it was scored
with). Before each GRPO step, `select_replay` looks at the trajectories of earlier, committed
iterations (at most `replay_max_age` old) whose outcome in the event log differs from the one
they were last trained with: their original groups (same iteration, same scenario) are
re-scored, the blend of their stored rubric/RULER parts with the new online part, and replayed
in the step beside the online groups (at most `replay_max_groups`, oldest first; a group whose
re-scored rewards have no spread teaches nothing and is only credited). The policy has moved
since they were sampled: the loss's importance ratio against the stored sampled log-probs,
clipped (`codreamer.backends.embedded.loss`; ART's `art.loss` on ART's backends), corrects for
that. `replay_weight` N puts each replayed trajectory N times in its group (same advantages,
N times the tokens in the token-averaged loss).

Resume. The selection is saved with the iteration's `scored` stage (a resumed iteration trains
the same replay), and the replay markers (`replay/marks`: trajectory id -> the outcome key and
reward it was credited with) are part of the iteration's history record: committed with the
iteration, so a kill at any point replays no outcome twice and loses none (an uncommitted
iteration's markers do not exist, its outcomes are still "new"). Only trajectories whose
iteration committed (`train/trajectory_ids` of the history) are replayed: those of an attempt
killed before its commit are not what was trained.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import art

from codreamer.events.outbox import KnownTrajectories
from codreamer.pipeline.state import _dump_trajectory, _load_trajectory, dump_groups, load_groups
from codreamer.rewards.blend import RewardMixConfig, compute_rewards
from codreamer.rewards.scoring import flag_mask, flags_of
from codreamer.storage import append_jsonl, read_jsonl

STORE_FILE = Path("replay") / "trajectories.jsonl"
NO_OUTCOME = -1
"""The outcome key of a trajectory without any event (a flag mask otherwise)."""


def outcome_key(summary: Any | None) -> int:
    return NO_OUTCOME if summary is None else flag_mask(summary)


def _scored_key(trajectory: art.Trajectory) -> int:
    flags = trajectory.metrics.get("outcome/flags")
    return NO_OUTCOME if flags is None else int(flags)


def store_trajectories(directory: Path, groups: Sequence[art.TrajectoryGroup], *, iteration: int, step: int) -> int:
    """Append the scored trajectories to the replay store (fsync'd); a re-stored id is read as
    its last version (a resumed scoring's)."""
    now = datetime.now(UTC).isoformat()
    rows = [
        {
            "trajectory_id": str(t.metadata["trajectory_id"]),
            "scenario_id": str(group.metadata.get("scenario_id", t.metadata.get("scenario_id"))),
            "iteration": iteration,
            "step": step,
            "scored_at": now,
            "reward": t.reward,
            "rubric": t.metrics.get("rubric/total_penalized", t.metrics.get("reward/rubric")),
            "ruler": t.metrics.get("ruler/score"),
            "outcome_key": _scored_key(t),
            "trajectory": _dump_trajectory(t),
        }
        for group in groups
        for t in group.trajectories
    ]
    append_jsonl(directory / STORE_FILE, rows)
    return len(rows)


def load_store(directory: Path) -> dict[str, dict[str, Any]]:
    """Stored trajectories by id (the last version of each); a torn last line is skipped."""
    rows, _ = read_jsonl(directory / STORE_FILE)
    return {row["trajectory_id"]: row for row in rows if isinstance(row, dict) and "trajectory_id" in row}


def committed_marks(records: Iterable[Mapping[str, Any]]) -> tuple[set[str], dict[str, list[Any]]]:
    """(ids of trajectories trained online by committed iterations, the latest replay mark of each id)."""
    trained: set[str] = set()
    marks: dict[str, list[Any]] = {}
    for record in records:
        trained.update(record.get("train/trajectory_ids") or [])
        marks.update(record.get("replay/marks") or {})
    return trained, marks


@dataclass
class ReplayPlan:
    """The groups replayed in one step, the marks they commit, and the iteration's `replay/*` numbers."""

    groups: list[art.TrajectoryGroup] = field(default_factory=list)
    marks: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return {"groups": dump_groups(self.groups), "marks": self.marks, "metrics": self.metrics}

    @classmethod
    def load(cls, data: Mapping[str, Any] | None) -> ReplayPlan:
        if not data:
            return cls()
        return cls(load_groups(data["groups"]), dict(data["marks"]), dict(data["metrics"]))

    def record_fields(self) -> dict[str, Any]:
        """What the history record holds: the numbers, and the marks (committed with it)."""
        return {**self.metrics, "replay/marks": self.marks}


@dataclass
class ReplayLimits:
    max_groups: int = 4
    max_age: int = 10
    weight: int = 1


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _delay_s(row: Mapping[str, Any], summary: Any) -> float | None:
    last = getattr(summary, "last_timestamp", None)
    if last is None:
        return None
    return (last - datetime.fromisoformat(row["scored_at"])).total_seconds()


def _rescored(
    rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, Any], mix: RewardMixConfig, iteration: int
) -> list[art.Trajectory]:
    """The group's trajectories (original choices and log-probs) with the blend of their stored
    offline parts and their online part as known now."""
    tids = [row["trajectory_id"] for row in rows]
    flags = {tid: flags_of(summary) for tid, summary in summaries.items() if tid in tids}
    totals = compute_rewards(
        tids,
        mix,
        rubric={row["trajectory_id"]: row["rubric"] for row in rows if row["rubric"] is not None},
        ruler={row["trajectory_id"]: row["ruler"] for row in rows},
        outcomes=flags,
    )
    trajectories = []
    for row in rows:
        trajectory = _load_trajectory(row["trajectory"])
        blended = totals[row["trajectory_id"]]
        trajectory.metrics.update(blended.as_metrics())
        trajectory.metrics |= {
            "replay/reward_before": float(row["reward"]),
            "replay/sent_iteration": float(row["iteration"]),
            "replay/age": float(iteration - row["iteration"]),
        }
        if (flag := flags.get(row["trajectory_id"])) is not None:
            trajectory.metrics |= {
                "outcome/opened": float(flag.opened),
                "outcome/replied": float(flag.replied),
                "outcome/flags": float(flag_mask(flag)),
            }
        trajectory.metadata = {**trajectory.metadata, "replayed_in_iteration": iteration}
        trajectory.reward = blended.total
        trajectories.append(trajectory)
    return trajectories


def select_replay(
    directory: Path,
    records: Sequence[Mapping[str, Any]],
    events: Any,
    mix: RewardMixConfig,
    *,
    iteration: int,
    limits: ReplayLimits,
) -> ReplayPlan:
    """The replay of iteration `iteration`: see the module docstring. `events` is the event log."""
    plan = ReplayPlan()
    trained, marks = committed_marks(records)
    store = {tid: row for tid, row in load_store(directory).items() if tid in trained and row["iteration"] < iteration}
    events.refresh()
    summaries = events.summaries(list(store))
    changed: dict[str, tuple[int, float]] = {}  # tid -> (new key, reward before)
    for tid, row in store.items():
        before_key, before_reward = marks.get(tid, (row["outcome_key"], row["reward"]))
        now_key = outcome_key(summaries.get(tid))
        if now_key != before_key:
            changed[tid] = (now_key, float(before_reward))
    fresh = [tid for tid in changed if iteration - store[tid]["iteration"] <= limits.max_age]
    for tid in set(changed) - set(fresh):  # credited as too old: reported once, never replayed
        plan.marks[tid] = [changed[tid][0], changed[tid][1]]
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in store.values():
        groups[(row["iteration"], row["scenario_id"])].append(row)
    candidates = sorted({(store[tid]["iteration"], store[tid]["scenario_id"]) for tid in fresh})
    replayed: list[str] = []
    no_spread = deferred = 0
    for number, group_key in enumerate(candidates):
        if number >= limits.max_groups:
            deferred += 1
            continue
        trajectories = _rescored(groups[group_key], summaries, mix, iteration)
        for trajectory in trajectories:
            tid = str(trajectory.metadata["trajectory_id"])
            plan.marks[tid] = [outcome_key(summaries.get(tid)), trajectory.reward]
        rewards = [t.reward for t in trajectories]
        if len(rewards) < 2 or statistics.pstdev(rewards) < 1e-6:
            no_spread += 1
            continue
        replayed += [
            str(t.metadata["trajectory_id"]) for t in trajectories if str(t.metadata["trajectory_id"]) in changed
        ]
        copies = [t for t in trajectories for _ in range(limits.weight)]
        plan.groups.append(
            art.TrajectoryGroup(copies, metadata={"scenario_id": group_key[1], "replay_of_iteration": group_key[0]})
        )
    delays = [float(iteration - store[tid]["iteration"]) for tid in fresh]
    delays_s = [d for tid in fresh if (d := _delay_s(store[tid], summaries.get(tid))) is not None]
    new_rewards = {tid: mark[1] for tid, mark in plan.marks.items()}
    change = [new_rewards[tid] - changed[tid][1] for tid in replayed]
    plan.metrics = {
        "replay/outcomes_received": float(len(fresh)),
        "replay/outcomes_too_old": float(len(changed) - len(fresh)),
        "replay/outcome_delay_iterations_mean": _mean(delays),
        "replay/outcome_delay_s_mean": _mean(delays_s),
        "replay/groups": float(len(plan.groups)),
        "replay/trajectories": float(sum(len(g.trajectories) for g in plan.groups) // max(limits.weight, 1)),
        "replay/trajectories_credited": float(len(replayed)),
        "replay/groups_no_spread": float(no_spread),
        "replay/groups_deferred": float(deferred),
        "replay/reward_change_mean": _mean(change),
        "replay/reward_change_abs_mean": _mean([abs(c) for c in change]),
        "replay/weight": float(limits.weight),
    }
    return plan


def unknown_outcomes(events: Any, models_root: Path) -> int:
    """Trajectory ids with events in the log that no outbox of the project holds (kept, reported)."""
    return len(KnownTrajectories(models_root).unknown(events.trajectory_ids()))

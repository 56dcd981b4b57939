"""Benchmark of the event log: append throughput, summaries from scratch, incremental refresh,
opening from a saved index. Usage: `uv run python scripts/bench_events.py [--events 1000000]`.

Everything runs in one temporary directory, measured in this one run; medians over a few
repeats where a repeat is cheap. Numbers depend on the disk (fsync) and on what else is running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loguru import logger

from codreamer.events import EventLog, OnlineOutcome

GOAL_SCRATCH_S = 2.0
GOAL_INCREMENTAL_S = 0.050


def make_outcomes(count: int, start: int = 0, trajectories: int = 100_000) -> list[OnlineOutcome]:
    """Synthetic events (10 per trajectory by default); built without validation: it is our data."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        OnlineOutcome.model_construct(
            event_id=f"ev-{i:09d}",
            trajectory_id=f"traj-{i % trajectories:07d}",
            prospect_id=f"p{i % 48:03d}",
            step=i % 50,
            timestamp=t0 + timedelta(seconds=i),
            opened=i % 3 == 0,
            replied=i % 11 == 0,
            bounced=i % 97 == 0,
            unsubscribed=False,
            meeting_booked=i % 101 == 0,
            source="bench",
        )
        for i in range(start, start + count)
    ]


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median_of(repeats: int, action: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """Median wall time of `action` over `repeats` runs; `before` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(timed(action))
    return statistics.median(times)


def row(name: str, value: str, goal: str = "") -> str:
    return f"{name:<60} {value:>14}  {goal}"


def verdict(seconds: float, goal_s: float) -> str:
    unit, scale = ("ms", 1000) if goal_s < 1 else ("s", 1)
    return f"goal < {goal_s * scale:g} {unit}: {'met' if seconds < goal_s else 'MISSED'}"


def bench_append(directory: Path) -> list[str]:
    """Throughput of single appends (fsync-bound) and of batches, on a file of their own."""
    log = EventLog(directory / "append.jsonl")
    singles = iter([[one] for one in make_outcomes(200, start=10**8)])
    per_single = median_of(200, lambda: log.append(next(singles)))
    batches = iter([make_outcomes(1000, start=2 * 10**8 + k * 1000) for k in range(20)])
    per_batch = median_of(20, lambda: log.append(next(batches)))
    return [
        row("append, batches of 1 (median of 200; one fsync each)", f"{1 / per_single:,.0f} ev/s"),
        row("append, batches of 1000 (median of 20)", f"{1000 / per_batch:,.0f} ev/s"),
    ]


def write_log(path: Path, total: int) -> list[str]:
    started = time.perf_counter()
    outcomes = make_outcomes(total)
    generate_s = time.perf_counter() - started
    write_s = timed(lambda: [EventLog(path).append(outcomes[k : k + 10_000]) for k in range(0, total, 10_000)])
    size_mb = path.stat().st_size / 1e6
    return [
        row(f"generate {total:,} events (model_construct, not timed below)", f"{generate_s:.2f} s"),
        row(
            f"write them: append in batches of 10,000 ({size_mb:,.0f} MB)",
            f"{write_s:.2f} s",
            f"{total / write_s:,.0f} ev/s",
        ),
    ]


def bench_scratch(path: Path, total: int, repeats: int) -> tuple[EventLog, list[str]]:
    """A new EventLog reading the whole log: per-trajectory aggregates of every event."""
    logs: list[EventLog] = []

    def scratch() -> None:
        logs.append(EventLog(path))
        logs[-1].refresh()

    scratch_s = median_of(repeats, scratch)
    log = logs[-1]
    assert len(log) == total, (len(log), total)
    tids = log.trajectory_ids()
    lookup_s = timed(lambda: log.summaries(tids))
    return log, [
        row(
            f"summaries from scratch, {total:,} events (median of {repeats})",
            f"{scratch_s:.3f} s",
            verdict(scratch_s, GOAL_SCRATCH_S),
        ),
        row(f"  then OutcomeSummary objects for all {len(tids):,} trajectories", f"{lookup_s:.3f} s"),
    ]


def bench_incremental(log: EventLog, start: int) -> list[str]:
    """refresh() after another process-like writer appended 1,000 events."""
    batches = iter([make_outcomes(1000, start=start + k * 1000) for k in range(5)])
    seconds = median_of(5, log.refresh, before=lambda: EventLog(log.path).append(next(batches)))
    name = "incremental refresh after appending 1,000 events (median of 5)"
    return [row(name, f"{seconds * 1000:.1f} ms", verdict(seconds, GOAL_INCREMENTAL_S))]


def bench_index(log: EventLog, repeats: int, start: int) -> list[str]:
    save_s = median_of(repeats, log.save_index)
    index_mb = log.index_path.stat().st_size / 1e6
    open_s = median_of(repeats, lambda: EventLog.open(log.path))
    EventLog(log.path).append(make_outcomes(1000, start=start))
    reopened: list[EventLog] = []
    open_new_s = timed(lambda: reopened.append(EventLog.open(log.path)))
    assert len(reopened[0]) == len(log) + 1000
    return [
        row(f"save_index ({index_mb:,.0f} MB, median of {repeats})", f"{save_s:.3f} s"),
        row(f"open with the saved index + refresh, nothing new (median of {repeats})", f"{open_s:.3f} s"),
        row("open with the saved index + refresh of 1,000 new events", f"{open_new_s:.3f} s"),
    ]


def bench(directory: Path, total: int, repeats: int) -> list[str]:
    lines = [row("measurement", "result", "goal"), "-" * 100]
    lines += bench_append(directory)
    path = directory / "events.jsonl"
    lines += write_log(path, total)
    log, scratch_lines = bench_scratch(path, total, repeats)
    lines += scratch_lines
    lines += bench_incremental(log, start=total)
    lines += bench_index(log, repeats, start=total + 10**7)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING", diagnose=False)
    load = os.getloadavg()[0]
    print(f"event log benchmark: {args.events:,} events, {os.cpu_count()} CPU(s) visible, load average {load:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        for line in bench(Path(tmp), args.events, args.repeats):
            print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine slows every number)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
    return f"{name:<58} {value:>14}  {goal}"


def bench(directory: Path, total: int, repeats: int) -> list[str]:
    lines = [row("measurement", "result", "goal"), "-" * 96]
    path = directory / "events.jsonl"

    # append throughput (a separate file, so the big log keeps exactly `total` events)
    small = EventLog(directory / "append.jsonl")
    singles = make_outcomes(200, start=10**8)
    per_single = median_of(1, lambda: [small.append([one]) for one in singles]) / len(singles)
    lines.append(row("append, batches of 1 (one fsync each)", f"{1 / per_single:,.0f} ev/s"))
    batches = [make_outcomes(1000, start=2 * 10**8 + k * 1000) for k in range(20)]
    per_batch = median_of(1, lambda: [small.append(batch) for batch in batches]) / len(batches)
    lines.append(row("append, batches of 1000", f"{1000 / per_batch:,.0f} ev/s"))

    # the big log
    started = time.perf_counter()
    outcomes = make_outcomes(total)
    generate_s = time.perf_counter() - started
    write_s = timed(lambda: [EventLog(path).append(outcomes[k : k + 10_000]) for k in range(0, total, 10_000)])
    del outcomes
    size_mb = path.stat().st_size / 1e6
    lines.append(row(f"generate {total:,} events (pydantic model_construct)", f"{generate_s:.2f} s"))
    lines.append(row(f"write them: append in batches of 10,000 ({size_mb:,.0f} MB)", f"{write_s:.2f} s", f"{total / write_s:,.0f} ev/s"))

    # from scratch
    holder: dict[str, EventLog] = {}

    def scratch() -> None:
        holder["log"] = EventLog(path)
        holder["log"].refresh()

    scratch_s = median_of(repeats, scratch)
    log = holder["log"]
    assert len(log) == total, (len(log), total)
    lines.append(row(f"summaries from scratch over {total:,} events (median of {repeats})", f"{scratch_s:.3f} s", f"goal < {GOAL_SCRATCH_S:.0f} s"))
    lookup_s = timed(lambda: log.summaries(log.trajectory_ids()))
    lines.append(row(f"  then summaries() of all {len(log.trajectory_ids()):,} trajectories", f"{lookup_s:.3f} s"))

    # incremental
    extra = [make_outcomes(1000, start=total + k * 1000) for k in range(5)]
    batches_left = iter(extra)
    incremental_s = median_of(len(extra), log.refresh, before=lambda: EventLog(path).append(next(batches_left)))
    lines.append(row("incremental refresh after appending 1,000 events (median of 5)", f"{incremental_s * 1000:.1f} ms", f"goal < {GOAL_INCREMENTAL_S * 1000:.0f} ms"))

    # index
    save_s = median_of(repeats, log.save_index)
    index_mb = log.index_path.stat().st_size / 1e6
    lines.append(row(f"save_index ({index_mb:,.0f} MB)", f"{save_s:.3f} s"))
    open_s = median_of(repeats, lambda: EventLog.open(path))
    lines.append(row("open with the saved index + refresh (nothing new)", f"{open_s:.3f} s"))
    more = make_outcomes(1000, start=total + 10**7)
    EventLog(path).append(more)
    reopened: dict[str, EventLog] = {}
    open_new_s = timed(lambda: reopened.setdefault("log", EventLog.open(path)))
    assert len(reopened["log"]) == total + 6000
    lines.append(row("open with the saved index + refresh of 1,000 new events", f"{open_new_s:.3f} s"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(f"event log benchmark: {args.events:,} events, {os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        for line in bench(Path(tmp), args.events, args.repeats):
            print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine slows every number)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The online-outcome event log: durability, incremental reads, index, ingest and webhook."""

from __future__ import annotations

import asyncio
import hmac
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from loguru import logger

import codreamer.events.ingest as ingest_module
import codreamer.events.log as event_log
import codreamer.events.parse as event_parse
from codreamer.events import EventLog, OnlineOutcome
from codreamer.events.cli_commands import cmd_ingest, cmd_serve_events
from codreamer.events.ingest import IngestError, ingest_file
from codreamer.events.models import to_epoch_us
from codreamer.events.parse import CANONICAL_LINE
from codreamer.events.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    build_webhook_app,
    serve_events,
    sign,
    signed_headers,
)

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def outcome(n: int, trajectory: str | None = None, **flags: bool) -> OnlineOutcome:
    return OnlineOutcome(
        event_id=f"ev-{n}",
        trajectory_id=trajectory or f"traj-{n % 5}",
        prospect_id=f"p{n % 48:03d}",
        step=n % 7,
        timestamp=T0 + timedelta(seconds=n),
        source="test",
        **flags,
    )


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "outcomes" / "events.jsonl"


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="DEBUG")
    yield messages
    logger.remove(sink)


# --- the model -------------------------------------------------------------------------------


def test_naive_timestamps_are_utc_and_extra_fields_are_refused() -> None:
    naive = OnlineOutcome(event_id="e", trajectory_id="t", prospect_id="p", step=0, timestamp=datetime(2025, 1, 1, 9))
    assert naive.timestamp == datetime(2025, 1, 1, 9, tzinfo=UTC)
    shifted = OnlineOutcome(
        event_id="e", trajectory_id="t", prospect_id="p", step=0, timestamp="2025-01-01T11:00:00+02:00"
    )
    assert shifted.timestamp == naive.timestamp
    with pytest.raises(ValueError, match="event_id"):
        OnlineOutcome(event_id="", trajectory_id="t", prospect_id="p", step=0, timestamp=T0)
    with pytest.raises(ValueError, match="clicked"):
        OnlineOutcome.model_validate(
            {"event_id": "e", "trajectory_id": "t", "prospect_id": "p", "step": 0, "timestamp": T0, "clicked": True}
        )


# --- writing and reading ---------------------------------------------------------------------


def test_round_trip_summaries_or_the_flags(log_path: Path) -> None:
    log = EventLog(log_path)
    events = [
        outcome(1, "a", opened=True),
        outcome(2, "a", replied=True),
        outcome(3, "b"),
        outcome(4, "b", bounced=True, unsubscribed=True),
        outcome(5, "c", meeting_booked=True),
    ]
    assert log.append(events) == 5
    stats = log.refresh()
    assert (stats.events, stats.lines, stats.duplicates, stats.malformed_total) == (5, 5, 0, 0)
    a = log.summary("a")
    assert a is not None and (a.opened, a.replied, a.bounced, a.event_count) == (True, True, False, 2)
    assert (a.first_timestamp, a.last_timestamp) == (T0 + timedelta(seconds=1), T0 + timedelta(seconds=2))
    b = log.summary("b")
    assert b is not None and (b.opened, b.bounced, b.unsubscribed) == (False, True, True)
    assert log.summary("nobody") is None
    assert set(log.summaries(["a", "c", "nobody"])) == {"a", "c"}


def test_what_append_writes_takes_the_fast_path() -> None:
    """The column-wise reader must recognise the lines `append` writes (else it is just slow)."""
    shapes = [
        outcome(1),
        outcome(2, opened=True, replied=True, bounced=True, unsubscribed=True, meeting_booked=True),
        OnlineOutcome(
            event_id="x", trajectory_id="", prospect_id="", step=10**17, timestamp=T0 + timedelta(microseconds=5)
        ),
    ]
    for event in shapes:
        assert re.fullmatch(CANONICAL_LINE.removeprefix("^").removesuffix("$"), event.model_dump_json() + "\n"), event


def test_fast_and_general_paths_agree(log_path: Path) -> None:
    """Equivalent lines in non-canonical shapes (spaces, key order, escapes, unicode, offsets)
    give the same events; lines pydantic refuses are refused whatever their shape."""
    good = [
        b'{"event_id":"k1","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z",'
        b'"opened":true,"replied":false,"bounced":false,"unsubscribed":false,"meeting_booked":false,"source":"s"}',
        b'{"event_id": "k2", "trajectory_id": "t", "prospect_id": "p", "step": 1, '
        b'"timestamp": "2025-01-01T02:00:00+02:00", "replied": true}',
        b'{"trajectory_id":"t","event_id":"k3","prospect_id":"p","step":1,"timestamp":"2024-12-31T23:00:00"}',
        b'{"event_id":"k\\u00e94","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00.5Z"}',
        '{"event_id":"k5-é","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z"}'.encode(),
    ]
    bad = [
        # an extra key, a date that does not exist, an empty id, a negative step, a null flag
        b'{"event_id":"x1","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z","opened":true,"replied":false,"bounced":false,"unsubscribed":false,"meeting_booked":false,"source":"s","extra":1}',
        b'{"event_id":"x2","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-02-30T00:00:00Z","opened":true,"replied":false,"bounced":false,"unsubscribed":false,"meeting_booked":false,"source":"s"}',
        b'{"event_id":"","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z","opened":true,"replied":false,"bounced":false,"unsubscribed":false,"meeting_booked":false,"source":"s"}',
        b'{"event_id":"x4","trajectory_id":"t","prospect_id":"p","step":-1,"timestamp":"2025-01-01T00:00:00Z"}',
        b'{"event_id":"x5","trajectory_id":"t","prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z","opened":null}',
        b'{"event_id":"x6","trajectory_id":7,"prospect_id":"p","step":1,"timestamp":"2025-01-01T00:00:00Z"}',
    ]
    garbage = [
        b'x","trajectory_id":"a","prospect_id":"',
        b'","prospect_id":"b","trajectory_id":"',
        b'{"event_id":"\xff\xfe"}',
    ]
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"\n".join(good + bad + garbage) + b"\n")
    log = EventLog(log_path)
    stats = log.refresh()
    assert stats.events == len(good)
    assert stats.malformed == {"invalid_event": len(bad), "invalid_json": len(garbage)}
    assert all(event_id in log for event_id in ["k1", "k2", "k3", "ké4", "k5-é"])
    summary = log.summary("t")
    assert summary is not None and (summary.event_count, summary.opened, summary.replied) == (5, True, True)
    assert summary.first_timestamp == datetime(2024, 12, 31, 23, tzinfo=UTC)
    assert summary.last_timestamp == datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert [sample.line for sample in stats.samples] == [6, 7, 8, 9, 10]  # the first few, in file order
    assert "field extra" in stats.samples[0].detail and "timestamp" in stats.samples[1].detail


def test_fuzzed_lines_read_exactly_as_pydantic_reads_them() -> None:
    """The column-wise fast path may only change speed: on thousands of mutated lines, the
    events read (and the lines skipped) are exactly those of pydantic alone, line by line."""

    rng = random.Random(7)
    seeds = [
        outcome(n, opened=n % 2 == 0, replied=n % 3 == 0, meeting_booked=n % 5 == 0).model_copy(
            update={"timestamp": T0 + timedelta(days=n * 40, microseconds=n * 1234 % 3)}
        )
        for n in range(40)
    ]
    alphabet = list(b'"\\{}[],: 0123456789-+.TZtrufalsne') + [0, 9, 0x7F, 0xC3, 0xA9, 0xFF]
    lines = []
    for _ in range(3000):
        line = bytearray(rng.choice(seeds).model_dump_json().encode())
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            at = rng.randrange(len(line))
            action = rng.random()
            if action < 0.5:
                line[at] = rng.choice(alphabet)
            elif action < 0.75:
                del line[at]
            else:
                line.insert(at, rng.choice(alphabet))
        lines.append(bytes(line).replace(b"\n", b" "))
    data = b"\n".join(lines) + b"\n"

    expected, skipped = [], 0
    for row, line in enumerate(lines):
        try:
            event = OnlineOutcome.model_validate_json(line)
        except ValueError:
            skipped += 1
            continue
        expected.append((row, event.event_id, event.trajectory_id, event.flag_mask, to_epoch_us(event.timestamp)))
    parsed = event_parse.parse_chunk(data, len(data), 1, 0)
    assert parsed.events.rows() == expected
    assert parsed.blank + sum(parsed.malformed.values()) == skipped
    canonical = sum(
        re.fullmatch(CANONICAL_LINE.removeprefix("^").removesuffix("$"), line.decode(errors="replace") + "\n")
        is not None
        for line in lines
    )
    assert 500 < canonical < len(expected) < len(lines)  # each path accepted some lines, and refused some


def test_blank_malformed_and_torn_lines_are_skipped_and_counted(log_path: Path, captured_logs: list[str]) -> None:
    log = EventLog(log_path)
    log.append([outcome(1)])
    with open(log_path, "ab") as handle:
        handle.write(b"\n   \n{not json}\n[1, 2]\n")
        handle.write(outcome(2).model_dump_json().encode() + b"\n")
        handle.write(b'{"event_id":"torn","trajectory_id":"tr')  # a writer died mid-line
    torn_at = log_path.stat().st_size
    stats = log.refresh()
    assert (stats.events, stats.blank, stats.malformed) == (2, 2, {"invalid_json": 1, "invalid_event": 1})
    assert [(sample.line, sample.reason) for sample in stats.samples] == [(4, "invalid_json"), (5, "invalid_event")]
    assert log.offset < torn_at  # the unfinished line waits for a "\n"
    assert any("malformed" in message and "events.jsonl:4" in message for message in captured_logs)

    before = log_path.read_bytes()
    log.append([outcome(3)])
    after = log_path.read_bytes()
    assert after.startswith(before)  # the torn fragment is never rewritten
    assert after[len(before) :] == b"\n" + outcome(3).model_dump_json().encode() + b"\n"
    stats = log.refresh()
    assert (stats.events, stats.malformed) == (1, {"invalid_json": 1})  # the fragment, now a whole line
    assert "ev-3" in log and log.totals.malformed == {"invalid_json": 2, "invalid_event": 1}


def test_duplicates_count_once(log_path: Path) -> None:
    log = EventLog(log_path)
    log.append([outcome(1, "a", opened=True), outcome(1, "a", opened=True), outcome(2, "a")])
    log.append([outcome(1, "a", opened=True)])
    stats = log.refresh()
    assert (stats.events, stats.duplicates) == (2, 2)
    summary = log.summary("a")
    assert summary is not None and summary.event_count == 2
    result = log.append_new([outcome(2, "a"), outcome(3, "a"), outcome(3, "a")])
    assert (result.accepted, result.duplicates) == (1, 2)
    assert sum(b'"ev-3"' in line for line in raw_lines(log_path)) == 1  # known events are not even written
    summary = log.summary("a")
    assert summary is not None and summary.event_count == 3  # append_new reads its own events back


def test_a_duplicate_id_with_other_content_keeps_the_first(log_path: Path) -> None:
    log = EventLog(log_path)
    log.append([outcome(1, "a"), outcome(1, "a", replied=True)])
    log.refresh()
    summary = log.summary("a")
    assert summary is not None and not summary.replied


def test_an_event_appended_again_after_a_refresh_counts_once(log_path: Path) -> None:
    """The duplicate check across reads (`_drop_seen`'s slow path), not only within a chunk."""
    log = EventLog(log_path)
    log.append([outcome(1, "a", opened=True), outcome(2, "b")])
    assert log.refresh().events == 2
    # the same event id again, with other flags, plus a new event in the same chunk
    log.append([outcome(1, "a", replied=True, meeting_booked=True), outcome(3, "a")])
    stats = log.refresh()
    assert (stats.events, stats.duplicates) == (1, 1)
    summary = log.summary("a")
    assert summary is not None and summary.event_count == 2  # ev-1 once, ev-3
    assert summary.opened and not summary.replied and not summary.meeting_booked  # flags not merged twice
    assert len(log) == 3 and log.totals.duplicates == 1
    # and once more after a saved index, in a new process's view
    log.save_index()
    log.append([outcome(2, "b", bounced=True)])
    reopened = EventLog.open(log_path)
    b = reopened.summary("b")
    assert b is not None and b.event_count == 1 and not b.bounced and reopened.totals.duplicates == 2


def spy_on_parser(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, int]]:
    """Record (bytes parsed, file offset) of every chunk the log parses."""
    calls: list[tuple[bytes, int]] = []
    real_parse = event_parse.parse_chunk

    def spy(data: bytes, end: int, first_line: int, base: int) -> object:
        calls.append((data[:end], base))
        return real_parse(data, end, first_line, base)

    monkeypatch.setattr(event_parse, "parse_chunk", spy)
    return calls


def test_refresh_reads_only_new_bytes(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog(log_path)
    log.append([outcome(n) for n in range(10)])
    log.refresh()
    previous = log.offset
    assert previous == log_path.stat().st_size
    parsed = spy_on_parser(monkeypatch)
    log.append([outcome(10), outcome(11)])
    stats = log.refresh()
    new_bytes = log_path.read_bytes()[previous:]
    assert stats.events == 2 and stats.bytes_read == len(new_bytes)
    assert parsed == [(new_bytes, previous)]  # exactly the appended lines, nothing before them
    assert not log.refresh().bytes_read and len(parsed) == 1  # nothing new: nothing parsed

    with open(log_path, "ab") as handle:  # a line still being written
        handle.write(outcome(12).model_dump_json().encode()[:40])
    assert log.refresh().events == 0 and log.offset == previous + len(new_bytes)
    with open(log_path, "ab") as handle:
        handle.write(outcome(12).model_dump_json().encode()[40:] + b"\n")
    assert log.refresh().events == 1 and "ev-12" in log


def test_a_line_longer_than_a_read_chunk(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_log, "READ_CHUNK_BYTES", 64)
    log = EventLog(log_path)
    log.append([outcome(n) for n in range(20)])
    assert log.refresh().events == 20


def test_refresh_restarts_when_the_log_is_replaced(log_path: Path) -> None:
    log = EventLog(log_path)
    log.append([outcome(n, "a") for n in range(5)])
    log.refresh()
    replacement = log_path.with_name("other.jsonl")
    EventLog(replacement).append([outcome(100, "b"), outcome(101, "b")])
    os.replace(replacement, log_path)
    stats = log.refresh()
    assert stats.restarted and stats.events == 2
    assert log.summary("a") is None and len(log) == 2


# --- the index -------------------------------------------------------------------------------


def test_index_round_trip_and_incremental_open(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog.open(log_path)  # no log, no index: fine
    assert len(log) == 0 and log.save_index() is None
    log.append([outcome(n, opened=n % 2 == 0) for n in range(50)])
    log.append([outcome(3)])  # a duplicate, remembered in the totals
    log.refresh()
    assert log.save_index() == log.index_path

    reopened = EventLog.open(log_path)
    assert reopened.offset == log.offset and len(reopened) == 50
    assert reopened.summaries(log.trajectory_ids()) == log.summaries(log.trajectory_ids())
    assert reopened.totals.duplicates == 1

    log.append([outcome(50), outcome(51)])
    parsed = spy_on_parser(monkeypatch)
    again = EventLog.open(log_path)
    assert len(again) == 52 and parsed == [(log_path.read_bytes()[log.offset :], log.offset)]  # only the new lines


def test_an_interrupted_index_write_leaves_no_temporary_file(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog(log_path)
    log.append([outcome(n) for n in range(5)])
    log.refresh()

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C between the write and the rename

    monkeypatch.setattr(event_log.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log.save_index()
    monkeypatch.undo()
    assert [p.name for p in log_path.parent.iterdir()] == [log_path.name]

    # a second Ctrl-C during that clean-up kills the process: the next start removes its file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = log_path.parent / f".{log.index_path.name}.{dead.stdout.strip()}.0badf00d.tmp"
    stale.write_text("{half an index")
    mine = log_path.parent / f".{log.index_path.name}.{os.getpid()}.feedf00d.tmp"  # this process may still write it
    mine.write_text("{")
    reopened = EventLog.open(log_path)
    assert len(reopened) == 5 and not stale.exists() and mine.exists()
    mine.unlink()
    assert reopened.save_index() == log.index_path
    assert sorted(p.name for p in log_path.parent.iterdir()) == sorted([log_path.name, log.index_path.name])


@pytest.mark.parametrize("damage", ["truncate", "replace", "rewrite", "corrupt_index", "delete_log"])
def test_a_stale_or_broken_index_is_ignored(log_path: Path, damage: str, captured_logs: list[str]) -> None:
    log = EventLog(log_path)
    log.append([outcome(n, "a") for n in range(30)])
    log.refresh()
    log.save_index()
    if damage == "truncate":
        content = log_path.read_bytes()
        log_path.write_bytes(content[: len(content) // 2].rsplit(b"\n", 1)[0] + b"\n")
    elif damage == "replace":
        other = log_path.with_name("new.jsonl")
        EventLog(other).append([outcome(n, "b") for n in range(40)])
        os.replace(other, log_path)
    elif damage == "rewrite":  # same inode, same size, other bytes near the end
        content = bytearray(log_path.read_bytes())
        content[-60:-50] = b"X" * 10
        log_path.write_bytes(bytes(content))
    elif damage == "corrupt_index":
        log.index_path.write_text('{"version": 1, "identity": ')
    else:
        log_path.unlink()

    reopened = EventLog.open(log_path)
    if damage == "truncate":
        assert 0 < len(reopened) < 30
    elif damage == "replace":
        assert reopened.summary("a") is None and len(reopened) == 40
    elif damage == "rewrite":
        assert reopened.totals.malformed_total == 1 and len(reopened) == 29
    elif damage == "corrupt_index":
        assert len(reopened) == 30
    else:
        assert len(reopened) == 0
    assert any("ignoring" in message for message in captured_logs)


# --- several processes -------------------------------------------------------------------------


def test_eight_processes_appending_at_once(log_path: Path) -> None:
    """8 worker processes, 200 appends each, all at once: every event lands once, on its own line."""
    events = [outcome(n) for n in range(8 * 200)]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["codreamer.events.log"])  # workers start without re-importing
    with context.Pool(8) as pool:
        written = pool.starmap(EventLog(log_path).append, [([event],) for event in events], chunksize=200)
    assert sum(written) == len(events)
    log = EventLog(log_path)
    stats = log.refresh()
    assert (stats.events, stats.duplicates, stats.malformed_total, stats.blank) == (1600, 0, 0, 0)
    lines = [line for line in raw_lines(log_path) if line]
    assert len(lines) == 1600 and Counter(json.loads(line)["event_id"] for line in lines) == Counter(
        e.event_id for e in events
    )


_KILLED_WRITER = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from codreamer.events import EventLog, OnlineOutcome

log, acks = EventLog(Path(sys.argv[1])), open(sys.argv[2], "a")
for batch in range(100_000):
    events = [
        OnlineOutcome(event_id=f"k-{batch}-{i}", trajectory_id=f"t{i}", prospect_id="p", step=0,
                      timestamp=datetime.now(UTC), opened=True, source="kill-test")
        for i in range(50)
    ]
    log.append(events)
    acks.write("".join(event.event_id + "\\n" for event in events))
    acks.flush()
"""


def test_a_writer_killed_mid_append_loses_no_acknowledged_event(log_path: Path, tmp_path: Path) -> None:
    acks = tmp_path / "acks.txt"
    acks.touch()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(log_path), str(acks)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while acks.stat().st_size < 20_000 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    EventLog(log_path).append([outcome(1)])  # lands on a line of its own, torn tail or not
    log = EventLog(log_path)
    stats = log.refresh()
    acknowledged = [line for line in acks.read_text().split("\n") if line]
    assert acknowledged and all(event_id in log for event_id in acknowledged)
    in_file = Counter(
        json.loads(line)["event_id"]
        for line in raw_lines(log_path)
        if line.startswith(b'{"event_id"') and line.endswith(b"}")
    )
    assert all(in_file[event_id] == 1 for event_id in acknowledged)
    assert stats.duplicates == 0 and stats.malformed_total <= 1  # at most the one torn line
    assert "ev-1" in log


# --- ingest ----------------------------------------------------------------------------------


def test_ingest_jsonl_reports_bad_rows_and_is_idempotent(log_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "export.jsonl"
    rows = [
        outcome(1, "a", opened=True).model_dump(mode="json", exclude={"source"}),
        {"event_id": "x", "trajectory_id": "a", "prospect_id": "p", "step": -2, "timestamp": "2025-01-01T00:00:00Z"},
        outcome(2, "a", replied=True).model_dump(mode="json"),
    ]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n{broken\n[1]\n")
    log = EventLog.open(log_path)
    report = ingest_file(source, log)
    assert (report.format, report.rows, report.valid, report.appended, report.invalid) == ("jsonl", 5, 2, 2, 3)
    assert report.errors[0] == f"{source}:2: field step: Input should be greater than or equal to 0"
    assert report.errors[1].startswith(f"{source}:5: invalid JSON")
    assert report.errors[2] == f"{source}:6: expected a JSON object, got list"
    summary = log.summary("a")
    assert summary is not None and (summary.opened, summary.replied) == (True, True)
    assert EventLog.open(log_path).summary("a") == summary
    assert json.loads(raw_lines(log_path)[0])["source"] == "ingest"

    again = ingest_file(source, log)
    assert (again.appended, again.duplicates) == (0, 2)


def test_ingest_csv_with_boolean_columns(log_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "export.csv"
    source.write_text(
        "event_id,trajectory_id,prospect_id,step,timestamp,opened,replied,campaign\n"
        "e1,t1,p001,3,2025-01-01T10:00:00Z,yes,0,spring\n"
        "e2,t1,p001,3,2025-01-01 11:00:00,1,TRUE,spring\n"
        "e3,t2,p002,3,2025-01-01T10:00:00Z,maybe,no,spring\n"
        ",t3,p003,x,2025-01-01T10:00:00Z,no,no,spring\n"
    )
    log = EventLog.open(log_path)
    report = ingest_file(source, log)
    assert (report.format, report.valid, report.invalid) == ("csv", 2, 2)
    assert report.errors == [
        f"{source}:4: field opened: not a boolean: 'maybe' (use true/false, 1/0 or yes/no)",
        f"{source}:5: field step: Input should be a valid integer, unable to parse string as an integer",
    ]
    summary = log.summary("t1")
    assert summary is not None and (summary.opened, summary.replied, summary.event_count) == (True, True, 2)
    assert summary.last_timestamp == datetime(2025, 1, 1, 11, tzinfo=UTC)  # naive: UTC


def test_ingest_csv_with_an_event_column_derives_stable_ids(log_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "mailer-export.csv"
    source.write_text(
        "\ufeffTrajectory_ID,prospect_id,step,timestamp,event,source\n"
        "t1,p001,0,2025-01-01T10:00:00Z,delivered,mailer\n"
        "t1,p001,0,2025-01-01T10:05:00Z,open,mailer\n"
        "t1,p001,0,2025-01-01T10:05:00Z,open,mailer\n"
        "t1,p001,0,2025-01-02T08:00:00Z,Reply,mailer\n"
        "t2,p002,0,2025-01-01T10:00:00Z,click,\n"
        "t3,p003,0,2025-01-01T10:00:00Z,forwarded,mailer\n"
    )
    log = EventLog.open(log_path)
    report = ingest_file(source, log)
    assert (report.valid, report.appended, report.duplicates, report.invalid) == (5, 4, 1, 1)
    assert report.errors[0].startswith(f"{source}:7: field event: unknown event kind 'forwarded'")
    t1, t2 = log.summary("t1"), log.summary("t2")
    assert t1 is not None and (t1.opened, t1.replied, t1.event_count) == (True, True, 3)
    assert t2 is not None and t2.opened
    ids = [json.loads(line)["event_id"] for line in raw_lines(log_path) if line]
    assert all(event_id.startswith("row-") for event_id in ids)
    assert ingest_file(source, log).appended == 0  # the same export again adds nothing


def test_ingest_refuses_unusable_files(log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = EventLog.open(log_path)
    with pytest.raises(IngestError, match="file not found"):
        ingest_file(tmp_path / "missing.csv", log)
    headerless = tmp_path / "wrong.csv"
    headerless.write_text("id,when\n1,2\n")
    with pytest.raises(IngestError, match=r"wrong.csv:1: CSV header lacks column\(s\) trajectory_id"):
        ingest_file(headerless, log)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(IngestError, match="not UTF-8"):
        ingest_file(binary, log)

    assert cmd_ingest(log_path, tmp_path / "missing.csv") == 2
    good = tmp_path / "good.jsonl"
    good.write_text(outcome(1).model_dump_json() + "\n")
    assert cmd_ingest(log_path, good) == 0
    assert "1 valid (1 new" in capsys.readouterr().out
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text("{}\n")
    assert cmd_ingest(log_path, nothing) == 1


def _good_row(n: int) -> str:
    return outcome(n, "deep", opened=True).model_dump_json()


def test_ingest_counts_pathological_jsonl_lines_and_keeps_every_valid_row(
    log_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "MAX_LINE_BYTES", 10_000)
    source = tmp_path / "hostile.jsonl"
    with source.open("wb") as handle:
        handle.write(_good_row(1).encode() + b"\n")
        handle.write(b"[" * 5000 + b"]" * 5000 + b"\n")  # line 2: 5,000 deep
        handle.write(b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n")  # line 3: longer than the limit here
        handle.write(b'{"a":' * 1500 + b"1" + b"}" * 1500 + b"\n")  # line 4: deep objects
        handle.write(b'{"step": ' + b"9" * 5000 + b"}\n")  # line 5: a number Python will not convert
        handle.write(b'{"event_id": "\xff\xfe"}\n')  # line 6: not UTF-8
        handle.write(_good_row(2).encode() + b"\n")
    errors: list[str] = []
    report = ingest_file(source, EventLog.open(log_path), on_error=errors.append)
    assert (report.rows, report.valid, report.appended, report.invalid) == (7, 2, 2, 5)
    assert errors == report.errors and [e.split(": ", 1)[0] for e in errors] == [
        f"{source}:{n}" for n in (2, 3, 4, 5, 6)
    ]
    assert "nested too deeply" in errors[0] and "longer than 10000 bytes" in errors[1]
    assert "nested too deeply" in errors[2] and "not UTF-8" in errors[4]
    summary = EventLog.open(log_path).summary("deep")
    assert summary is not None and summary.event_count == 2


def test_ingest_a_csv_with_a_stray_quote_reports_that_line_and_keeps_the_rows_after_it(
    log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "stray.csv"
    source.write_text(
        "event_id,trajectory_id,prospect_id,step,timestamp,opened,note\n"
        "e1,t1,p001,1,2025-01-01T10:00:00Z,yes,fine\n"
        'e2,"t1,p001,1,2025-01-01T10:00:00Z,yes,opens a quote\n'
        'e3,t1,p001,1,2025-01-01T10:00:00Z,yes,"quoted, with a comma and ""quotes"""\n'
        'e4,t1,p001,1,2025-01-01T10:00:00Z,yes,"closed" then text\n'
        "e5,t1,p001,1,2025-01-01T10:00:00Z,yes,fine\n"
    )
    assert cmd_ingest(log_path, source) == 0
    captured = capsys.readouterr()
    assert f"{source}:3: unreadable CSV: a quoted cell does not close on this line" in captured.err
    assert f"{source}:5: unreadable CSV" in captured.err
    assert "5 row(s), 3 valid (3 new" in captured.out
    assert sorted(json.loads(line)["event_id"] for line in log_path.read_text().splitlines()) == ["e1", "e3", "e5"]


def test_ingest_reports_every_bad_line_and_streams_the_file(
    log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tracemalloc

    source = tmp_path / "mostly-bad.jsonl"
    bad = (
        '{"event_id": "x", "trajectory_id": "t", "prospect_id": "p", "step": -1, "timestamp": "2025-01-01T00:00:00Z", "pad": "'
        + "z" * 150
        + '"}\n'
    )
    with source.open("w") as handle:
        handle.write(_good_row(1) + "\n")
        for _ in range(30_000):
            handle.write(bad)
        handle.write(_good_row(2) + "\n")
    size = source.stat().st_size
    assert size > 6_000_000
    log = EventLog.open(log_path)
    seen: list[int] = []
    tracemalloc.start()
    try:
        report = ingest_file(source, log, on_error=lambda message: seen.append(len(message)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (report.valid, report.invalid, len(seen), len(report.errors)) == (
        2,
        30_000,
        30_000,
        ingest_module.MAX_ERRORS,
    )
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte file: not streamed"

    assert cmd_ingest(log_path, source) == 0
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 30_000
        and err[0].startswith(f"ingest: {source}:2: ")
        and err[-1].startswith(f"ingest: {source}:30001: ")
    )


def test_an_interrupted_ingest_keeps_the_rows_read_before(
    log_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "export.jsonl"
    source.write_text("".join(_good_row(n) + "\n" for n in range(5)))
    real = ingest_module._outcome
    calls = 0

    def fail_on_the_fourth(record: dict) -> OnlineOutcome:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return real(record)

    monkeypatch.setattr(ingest_module, "_outcome", fail_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest_file(source, EventLog.open(log_path), batch_size=1000)
    assert len(EventLog.open(log_path)) == 3  # the three rows validated before the interruption
    monkeypatch.undo()
    again = ingest_file(source, EventLog.open(log_path))
    assert (again.appended, again.duplicates) == (2, 3)


# --- webhook ---------------------------------------------------------------------------------

SECRET = "s3cret-for-tests-only-at-least-32-bytes"
NOW = 1_750_000_000  # the server clock of these tests


def post(app_log: EventLog, body: bytes, headers: dict[str, str], max_body_bytes: int = 1_000_000) -> tuple[int, dict]:
    async def scenario() -> tuple[int, dict]:
        app = build_webhook_app(app_log, SECRET, max_body_bytes=max_body_bytes, clock=lambda: NOW)
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/events", data=body, headers=headers)
            return response.status, await response.json()

    return asyncio.run(scenario())


def signed(body: bytes, at: int = NOW) -> dict[str, str]:
    return signed_headers(body, SECRET, at)


def test_webhook_accepts_signed_outcomes_once(log_path: Path, captured_logs: list[str]) -> None:
    log = EventLog(log_path)
    body = json.dumps(
        [outcome(1, "a", opened=True).model_dump(mode="json"), outcome(2, "a").model_dump(mode="json")]
    ).encode()
    assert post(log, body, signed(body)) == (200, {"accepted": 2, "duplicates": 0})
    assert post(log, body, signed(body)) == (200, {"accepted": 0, "duplicates": 2})
    single = outcome(3, "a", replied=True).model_dump_json().encode()
    assert post(log, single, signed(single)) == (200, {"accepted": 1, "duplicates": 0})
    summary = EventLog.open(log_path).summary("a")
    assert summary is not None and (summary.opened, summary.replied, summary.event_count) == (True, True, 3)
    assert not any(SECRET in message for message in captured_logs)


def test_webhook_refuses_bad_requests(log_path: Path, captured_logs: list[str]) -> None:
    log = EventLog(log_path)
    body = json.dumps([outcome(1).model_dump(mode="json")]).encode()
    json_type = {"Content-Type": "application/json"}
    status, reply = post(log, body, {**json_type, TIMESTAMP_HEADER: str(NOW), SIGNATURE_HEADER: "sha256=" + "0" * 64})
    assert status == 401 and SECRET not in json.dumps(reply)
    assert post(log, body, json_type)[0] == 401
    assert post(log, body, signed_headers(body, "another-secret-another-secret-xx", NOW))[0] == 401
    unstamped = {**json_type, SIGNATURE_HEADER: sign(body, SECRET, NOW)}  # signed, but the time is not sent
    assert post(log, body, unstamped)[0] == 401
    restamped = {**signed(body), TIMESTAMP_HEADER: str(NOW + 1)}  # the time changed after signing
    assert post(log, body, restamped)[0] == 401
    body_only = "sha256=" + hmac.new(SECRET.encode(), body, "sha256").hexdigest()
    assert post(log, body, {**signed(body), SIGNATURE_HEADER: body_only})[0] == 401  # the old scheme (body alone)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {k: v for k, v in signed(body).items() if k != "Content-Type"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        status, reply = post(log, body, headers)
        assert status == 415 and "application/json" in reply["error"]

    not_json = b"{nope"
    status, reply = post(log, not_json, signed(not_json))
    assert status == 400 and "not JSON" in reply["error"]
    invalid = json.dumps(
        [outcome(1).model_dump(mode="json"), {**outcome(2).model_dump(mode="json"), "step": -1}]
    ).encode()
    status, reply = post(log, invalid, signed(invalid))
    assert status == 400 and reply["details"] == ["item 1: field step: Input should be greater than or equal to 0"]
    scalar = b"42"
    assert post(log, scalar, signed(scalar))[0] == 400
    for hostile in (
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"1" * 5000,
        b"\xff\xfe{}",
        b"[{}, 1, null]",
    ):
        status, reply = post(log, hostile, signed(hostile))
        assert status == 400, (hostile[:20], status, reply)

    big = json.dumps([outcome(n).model_dump(mode="json") for n in range(100)]).encode()
    status, reply = post(log, big, signed(big), max_body_bytes=2_000)
    assert status == 413 and "2000" in reply["error"]
    assert not log_path.exists()  # nothing was written by any of these
    assert not any(SECRET in message for message in captured_logs)


def test_a_replay_outside_the_window_is_refused(log_path: Path) -> None:
    log = EventLog(log_path)
    body = json.dumps([outcome(1).model_dump(mode="json")]).encode()
    captured = signed(body, at=NOW - 301)  # captured 301 s ago (the window is 300 s)
    status, reply = post(log, body, captured)
    assert status == 401 and "300 s" in reply["error"] and not log_path.exists()
    assert post(log, body, signed(body, at=NOW + 400))[0] == 401  # a clock far ahead
    assert post(log, body, signed(body, at=NOW - 299)) == (200, {"accepted": 1, "duplicates": 0})
    assert post(log, body, signed(body, at=NOW - 299)) == (
        200,
        {"accepted": 0, "duplicates": 1},
    )  # in the window: counted once


def test_the_webhook_needs_a_secret_of_32_bytes(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="secret"):
        build_webhook_app(EventLog(log_path), "")
    with pytest.raises(ValueError, match="secret"):
        asyncio.run(serve_events(EventLog(log_path), None))
    assert cmd_serve_events(log_path, None, "127.0.0.1", 8787) == 2
    short = "x" * 31
    with pytest.raises(ValueError, match="at least 32"):
        build_webhook_app(EventLog(log_path), short)
    assert cmd_serve_events(log_path, short, "127.0.0.1", 8787) == 2
    err = capsys.readouterr().err
    assert "at least 32" in err and short not in err and len(err.strip().splitlines()) == 2
    assert not log_path.exists()


def test_serve_events_on_a_real_loopback_port(log_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    body = outcome(7, "z", opened=True).model_dump_json().encode()

    async def scenario() -> int:
        server = asyncio.create_task(serve_events(EventLog(log_path), SECRET, "127.0.0.1", port))
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    try:
                        headers = signed_headers(body, SECRET)  # the time now: a real server, a real clock
                        async with session.post(
                            f"http://127.0.0.1:{port}/events", data=body, headers=headers
                        ) as response:
                            return response.status
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.05)
            raise AssertionError("the server never started")
        finally:
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server

    assert asyncio.run(scenario()) == 200
    summary = EventLog.open(log_path).summary("z")
    assert summary is not None and summary.opened
    assert summary.first_timestamp.utcoffset() == timedelta(0)

"""The durable event log of online outcomes: one JSON `OnlineOutcome` per line, append-only.

Writing. `append` is one `os.write` of whole lines on a file opened with O_APPEND, under an
exclusive `flock`, then fsync'd: writers in any number of processes never interleave, and
an append that returned is on disk. A crash mid-write can leave a torn last line; the next
append first ends it with a "\\n", so the fragment stays one malformed line (counted, never
rewritten) and new events always start on a line of their own.

Reading is incremental. `refresh` reads only the bytes after the last offset it consumed, and
only up to the last "\\n" (a line still being written waits for the next refresh). Blank and
malformed lines are skipped and counted by reason; an `event_id` seen before counts once. The
result is kept in memory as per-trajectory aggregates (flag mask, count, first/last time), so a
summary is a dict look-up. `save_index` persists offset, seen ids and aggregates next to the
log, so `EventLog.open` in a new process only reads what was appended since.

Speed. Lines written by `append` have one exact shape (pydantic's JSON of the model, field
order fixed). A line matching that shape *exactly* (regex `CANONICAL_LINE`, printable ASCII
strings without escapes) is parsed column-wise with polars; the regex admits only lines that
pydantic would accept with the same values. Every other line (hand-written JSON, escapes,
non-ASCII, garbage) goes through `OnlineOutcome.model_validate_json`, so the fast path changes
speed, never results. polars, pyarrow and numpy come with openpipe-art.

Not thread-safe: use one `EventLog` per thread or task (processes are safe).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from codreamer.events.models import FLAG_NAMES, OnlineOutcome, OutcomeSummary, to_epoch_us

READ_CHUNK_BYTES = 32 << 20
"""Bytes parsed at a time: bounds memory on a big log, large enough that per-chunk costs vanish."""
MAX_SAMPLES = 5
"""Malformed lines remembered (position + reason) for messages; all are counted."""
ANCHOR_BYTES = 4096
"""Bytes hashed at the head of the log and just before the consumed offset to notice a replaced log."""
INDEX_VERSION = 1

# --- the canonical line --------------------------------------------------------------------

_PLAIN = r'[ !#-\[\]-~]'  # printable ASCII except `"` and `\`: such a JSON string is its own value
_TIMESTAMP = (
    r"[12][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_VALUE_PATTERNS = {
    "event_id": f'"{_PLAIN}+"',
    "trajectory_id": f'"{_PLAIN}*"',
    "prospect_id": f'"{_PLAIN}*"',
    "step": "(?:0|[1-9][0-9]{0,17})",
    "timestamp": f'"{_TIMESTAMP}"',
    **{name: "(?:true|false)" for name in FLAG_NAMES},
    "source": f'"{_PLAIN}*"',
}
if list(_VALUE_PATTERNS) != list(OnlineOutcome.model_fields):  # pragma: no cover - caught by the tests at once
    raise RuntimeError("CANONICAL_LINE is out of date with OnlineOutcome's fields")
CANONICAL_LINE = "^\\{" + ",".join(f'"{key}":{value}' for key, value in _VALUE_PATTERNS.items()) + "\\}\\n$"
"""The exact shape `append` writes, with its "\\n". Calendar validity of the date is checked apart."""


# --- results ---------------------------------------------------------------------------------

Reason = Literal["invalid_json", "invalid_event"]
"""Why a line was skipped: not JSON at all, or JSON that is not a valid OnlineOutcome."""


class MalformedLine(BaseModel):
    """Where a skipped line is and why, for messages (`log:line (byte offset): reason: detail`)."""

    model_config = ConfigDict(frozen=True)

    line: int
    offset: int
    reason: Reason
    detail: str

    def describe(self, path: Path) -> str:
        return f"{path}:{self.line} (byte {self.offset}): {self.reason}: {self.detail}"


class RefreshStats(BaseModel):
    """What one `refresh` read, or (as `EventLog.totals`) everything read since offset 0."""

    bytes_read: int = 0
    lines: int = 0
    events: int = 0
    duplicates: int = 0
    blank: int = 0
    malformed: dict[str, int] = Field(default_factory=dict)
    samples: list[MalformedLine] = Field(default_factory=list)
    restarted: bool = False
    seconds: float = 0.0

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def add(self, other: RefreshStats) -> None:
        """Accumulate `other` into these totals (samples: the first few overall)."""
        self.bytes_read += other.bytes_read
        self.lines += other.lines
        self.events += other.events
        self.duplicates += other.duplicates
        self.blank += other.blank
        self.malformed = dict(Counter(self.malformed) + Counter(other.malformed))
        self.samples = (self.samples + other.samples)[:MAX_SAMPLES]
        self.seconds += other.seconds


class AppendResult(BaseModel):
    """What `append_new` did: events written, and events skipped as already in the log."""

    model_config = ConfigDict(frozen=True)

    accepted: int
    duplicates: int


# --- parsing one chunk of whole lines ----------------------------------------------------------


@dataclass
class _ParsedChunk:
    """Events of a chunk in line order (`row` = line index in the chunk) and what was skipped."""

    events: pl.DataFrame
    lines: int
    blank: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    samples: list[MalformedLine] = field(default_factory=list)


_EVENT_SCHEMA = {"row": pl.Int64, "event_id": pl.String, "trajectory_id": pl.String, "flags": pl.Int64, "ts": pl.Int64}


def _line_starts(data: bytes, end: int, block: int = 1 << 22) -> np.ndarray:
    """Offsets of each line's start in data[:end], plus `end`: line i is data[starts[i]:starts[i + 1]].
    Scanned in blocks that fit the CPU cache (twice as fast as one pass over a big chunk)."""
    view = np.frombuffer(data, dtype=np.uint8, count=end)
    newlines = [np.flatnonzero(view[at : at + block] == ord("\n")) + at for at in range(0, len(view), block)]
    starts = np.empty(sum(len(part) for part in newlines) + 1, dtype=np.int64)
    starts[0] = 0
    np.concatenate(newlines or [np.empty(0, dtype=np.int64)], out=starts[1:])
    starts[1:] += 1
    return starts


def _mask_invalid_utf8(data: bytes, starts: np.ndarray) -> bytes:
    """Overwrite lines that are not UTF-8 with "?" (same length), so the chunk can be viewed as
    strings; those lines then fail the canonical regex and are judged from the original bytes."""
    masked = bytearray(data[: starts[-1]])
    for begin, end in zip(starts[:-1].tolist(), (starts[1:] - 1).tolist(), strict=True):
        try:
            data[begin:end].decode("utf-8")
        except UnicodeDecodeError:
            masked[begin:end] = b"?" * (end - begin)
    return bytes(masked)


def _lines_series(data: bytes, starts: np.ndarray) -> pl.Series:
    """Every line (with its "\\n") as a string column, viewing the chunk's bytes without copying."""
    if not data.isascii():
        try:
            str(memoryview(data)[: starts[-1]], "utf-8")
        except UnicodeDecodeError:
            data = _mask_invalid_utf8(data, starts)
    array = pa.LargeStringArray.from_buffers(len(starts) - 1, pa.py_buffer(starts), pa.py_buffer(data))
    return pl.Series("line", array)


def _epoch_us(timestamps: pl.Series) -> pl.Series:
    """ISO timestamps (shape checked by the regex) to epoch microseconds; null where the date
    does not exist (Feb 30), which sends that line to pydantic for its error message."""
    try:
        utc = pc.cast(timestamps.to_arrow(), pa.timestamp("us", "UTC"))
        return pl.Series("ts", utc.cast(pa.int64()))
    except pa.ArrowInvalid:
        return pl.Series("ts", [_iso_epoch_us(text) for text in timestamps.to_list()], dtype=pl.Int64)


def _iso_epoch_us(text: str) -> int | None:
    try:
        return to_epoch_us(datetime.fromisoformat(text))
    except ValueError:
        return None


def _canonical_columns(lines: pl.Series) -> pl.DataFrame:
    """Which lines are canonical, and their summary columns, cut at the literal keys.

    The cuts are only meaningful on canonical lines (the regex guarantees every key appears
    once, in order, and that no value contains a quote); other rows are dropped by the caller.
    One `select`, so polars spreads the regex and the cuts over its threads.
    """
    line = pl.col("line")

    def find(marker: str) -> pl.Expr:
        return line.str.find(marker, literal=True).cast(pl.Int64)

    def cut(start: pl.Expr | int, end: pl.Expr) -> pl.Expr:
        return line.str.slice(start, (end - start).clip(lower_bound=0))  # garbage lines: no negative lengths

    eid_end = find('","trajectory_id":"')
    ts_start = find(',"timestamp":"') + len(',"timestamp":"')
    flags = pl.sum_horizontal(
        line.str.contains(f'"{name}":true', literal=True).cast(pl.Int64) * (1 << bit) for bit, name in enumerate(FLAG_NAMES)
    )
    return pl.DataFrame({"line": lines}).select(
        line.str.contains(CANONICAL_LINE).alias("canonical"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
        cut(len('{"event_id":"'), eid_end).alias("event_id"),
        cut(eid_end + len('","trajectory_id":"'), find('","prospect_id":"')).alias("trajectory_id"),
        flags.alias("flags"),
        cut(ts_start, find('","opened":')).alias("timestamp"),
    )


def _describe(exc: ValidationError) -> tuple[Reason, str]:
    """A reason class and `field a.b: message; ...` (JSON errors keep pydantic's position text)."""
    errors = exc.errors(include_url=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return "invalid_json", errors[0]["msg"]
    parts = []
    for error in errors:
        loc = ".".join(str(part) for part in error["loc"])
        parts.append(f"field {loc}: {error['msg']}" if loc else error["msg"])
    return "invalid_event", "; ".join(parts)


@dataclass(frozen=True)
class _Chunk:
    """Whole lines of the log: data[:starts[-1]], starting at line `first_line`, byte `base`."""

    data: bytes
    starts: np.ndarray
    first_line: int
    base: int

    def line(self, row: int) -> bytes:
        return self.data[self.starts[row] : self.starts[row + 1] - 1]

    def malformed(self, row: int, reason: Reason, detail: str) -> MalformedLine:
        offset = self.base + int(self.starts[row])
        return MalformedLine(line=self.first_line + row, offset=offset, reason=reason, detail=detail)


def _parse_one_by_one(chunk: _Chunk, rows: list[int], parsed: _ParsedChunk) -> pl.DataFrame:
    """The general path: pydantic judges each line; blank and malformed lines are counted."""
    events = []
    for row in rows:
        raw = chunk.line(row)
        if not raw.strip():
            parsed.blank += 1
            continue
        try:
            outcome = OnlineOutcome.model_validate_json(raw)
        except ValidationError as exc:
            reason, detail = _describe(exc)
            parsed.malformed[reason] += 1
            if len(parsed.samples) < MAX_SAMPLES:
                parsed.samples.append(chunk.malformed(row, reason, detail))
            continue
        events.append((row, outcome.event_id, outcome.trajectory_id, outcome.flag_mask, to_epoch_us(outcome.timestamp)))
    return pl.DataFrame(events, schema=_EVENT_SCHEMA, orient="row")


def _parse_chunk(data: bytes, end: int, first_line: int, base: int) -> _ParsedChunk:
    """Parse the whole lines of data[:end] (`end` is just after a "\\n"; the rest is ignored, not
    copied off); `first_line`/`base`: the line number and file offset of data[0]."""
    starts = _line_starts(data, end)
    columns = _canonical_columns(_lines_series(data, starts))
    fast = columns.filter("canonical").drop("canonical")
    fast = fast.with_columns(_epoch_us(fast["timestamp"])).drop("timestamp")
    others = columns.filter(~pl.col("canonical"))["row"].to_list() + fast.filter(pl.col("ts").is_null())["row"].to_list()
    parsed = _ParsedChunk(events=fast.drop_nulls("ts"), lines=len(starts) - 1)
    if others:  # not canonical, or a date that does not exist: pydantic decides
        slow = _parse_one_by_one(_Chunk(data, starts, first_line, base), sorted(others), parsed)
        parsed.events = pl.concat([parsed.events, slow]).sort("row")
    return parsed


# --- the file ------------------------------------------------------------------------------


class _Identity(BaseModel):
    """Which bytes an offset refers to: the file (device, inode) and hashes of its head and of
    the bytes just before the offset. A replaced, truncated or rewritten log no longer matches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: int
    inode: int
    offset: int
    head_sha256: str
    tail_sha256: str


def _digest(fd: int, start: int, end: int) -> str:
    return hashlib.sha256(os.pread(fd, end - start, start)).hexdigest()


def _identity(fd: int, offset: int) -> _Identity:
    stat = os.fstat(fd)
    return _Identity(
        device=stat.st_dev,
        inode=stat.st_ino,
        offset=offset,
        head_sha256=_digest(fd, 0, min(offset, ANCHOR_BYTES)),
        tail_sha256=_digest(fd, max(0, offset - ANCHOR_BYTES), offset),
    )


def _still_valid(fd: int, known: _Identity) -> bool:
    """Is the file behind `fd` the one `known` was taken from, grown by appends only?"""
    if os.fstat(fd).st_size < known.offset:
        return False
    return _identity(fd, known.offset) == known


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry (a created log, a replaced index) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def _append_lock(path: Path) -> Iterator[int]:
    """The log opened for appending, under an exclusive flock (released on close)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if created:
            _fsync_dir(path.parent)
        yield fd
    finally:
        os.close(fd)


def _encode(outcomes: Sequence[OnlineOutcome]) -> bytes:
    for position, outcome in enumerate(outcomes):
        if not isinstance(outcome, OnlineOutcome):
            raise TypeError(f"outcomes[{position}] is a {type(outcome).__name__}, not an OnlineOutcome")
    return b"".join(outcome.model_dump_json().encode() + b"\n" for outcome in outcomes)


def _write_lines(fd: int, path: Path, payload: bytes) -> None:
    """One write of whole lines (after a "\\n" if a crash left a torn last line), then fsync."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        logger.warning("{}: the last line is torn (a writer crashed mid-append?); it stays as one malformed line", path)
        payload = b"\n" + payload
    written = os.write(fd, payload)
    while written < len(payload):  # a short write (signal, disk full): the lock keeps the rest contiguous
        written += os.write(fd, memoryview(payload)[written:])
    os.fsync(fd)


class _IndexFile(BaseModel):
    """The sidecar `<log>.index.json`: state after reading the log up to `identity.offset`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    identity: _Identity
    lines: int = Field(ge=0)
    totals: RefreshStats
    event_ids: list[str]
    trajectory_ids: list[str]
    flags: list[int]
    counts: list[int]
    first_us: list[int]
    last_us: list[int]

    @model_validator(mode="after")
    def _columns_align(self) -> _IndexFile:
        columns = (self.trajectory_ids, self.flags, self.counts, self.first_us, self.last_us)
        if len({len(column) for column in columns}) != 1:
            raise ValueError("trajectory columns have different lengths")
        return self


class EventLog:
    """An append-only JSONL log of `OnlineOutcome`s with incremental per-trajectory summaries."""

    def __init__(self, path: Path) -> None:
        """No I/O: `EventLog.open` also loads the index and reads the log; or call `refresh`."""
        self.path = Path(path)
        self._reset()

    @classmethod
    def open(cls, path: Path) -> EventLog:
        """The log at `path`, from its saved index when that is still valid, refreshed."""
        log = cls(path)
        log.load_index()
        log.refresh()
        return log

    @property
    def index_path(self) -> Path:
        return self.path.with_name(self.path.name + ".index.json")

    @property
    def offset(self) -> int:
        """Bytes consumed so far (always just after a "\\n")."""
        return self._offset

    def __len__(self) -> int:
        """Distinct events read so far."""
        return len(self._seen)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._seen

    def _reset(self) -> None:
        self._offset = 0
        self._lines = 0
        self._identity: _Identity | None = None
        self._seen: set[str] = set()
        self._aggregates: dict[str, tuple[int, int, int, int]] = {}  # flags, count, first_us, last_us
        self.totals = RefreshStats()

    # --- writing ---------------------------------------------------------------------------

    def append(self, outcomes: Sequence[OnlineOutcome]) -> int:
        """Durably append `outcomes` and return how many; safe across processes. Duplicates are
        written too (readers count them once); this log's summaries see them at the next refresh."""
        if not outcomes:
            return 0
        payload = _encode(outcomes)
        with _append_lock(self.path) as fd:
            _write_lines(fd, self.path, payload)
        return len(outcomes)

    def append_new(self, outcomes: Sequence[OnlineOutcome]) -> AppendResult:
        """Append only events whose id is not in the log yet (nor earlier in `outcomes`), and
        read them back. Exact across processes: the check runs under the append lock."""
        if not outcomes:
            return AppendResult(accepted=0, duplicates=0)
        with _append_lock(self.path) as fd:
            self._consume(fd, os.fstat(fd).st_size)
            fresh, duplicates = self._unseen(outcomes)
            if fresh:
                _write_lines(fd, self.path, _encode(fresh))
                self._consume(fd, os.fstat(fd).st_size)
        return AppendResult(accepted=len(fresh), duplicates=duplicates)

    def _unseen(self, outcomes: Sequence[OnlineOutcome]) -> tuple[list[OnlineOutcome], int]:
        fresh: list[OnlineOutcome] = []
        batch: set[str] = set()
        for outcome in outcomes:
            if outcome.event_id not in self._seen and outcome.event_id not in batch:
                batch.add(outcome.event_id)
                fresh.append(outcome)
        return fresh, len(outcomes) - len(fresh)

    # --- reading ---------------------------------------------------------------------------

    def refresh(self) -> RefreshStats:
        """Read what was appended since the last refresh; returns what this refresh read."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if self._offset:
                logger.warning("{}: the event log disappeared; forgetting what was read from it", self.path)
                self._reset()
            return RefreshStats()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # a size between two appends: no half-written batch
            size = os.fstat(fd).st_size
            fcntl.flock(fd, fcntl.LOCK_UN)
            return self._consume(fd, size)
        finally:
            os.close(fd)

    def _consume(self, fd: int, size: int) -> RefreshStats:
        """Read [offset, size) up to its last "\\n", chunk by chunk, and fold it into the state."""
        started = time.perf_counter()
        restarted = self._identity is not None and not _still_valid(fd, self._identity)
        if restarted:
            logger.warning("{}: replaced or truncated since byte {}; re-reading it from the start", self.path, self._offset)
            self._reset()
        stats = RefreshStats(restarted=restarted)
        accepted: list[pl.DataFrame] = []
        try:
            self._read_chunks(fd, size, stats, accepted)
        finally:  # should a chunk fail, the chunks before it are fully counted: the state stays consistent
            if accepted:
                self._aggregate(pl.concat(accepted))
            self._identity = _identity(fd, self._offset)
            stats.seconds = time.perf_counter() - started
            self.totals.add(stats)
        self._report(stats)
        return stats

    def _read_chunks(self, fd: int, size: int, stats: RefreshStats, accepted: list[pl.DataFrame]) -> None:
        """Parse [offset, size) chunk by chunk (each cut after its last "\\n"), advancing the offset."""
        chunk_bytes = READ_CHUNK_BYTES
        while self._offset < size:
            data = os.pread(fd, min(chunk_bytes, size - self._offset), self._offset)
            end = data.rfind(b"\n") + 1
            if not end:
                if len(data) < chunk_bytes:
                    return  # only an unfinished line is left: the next refresh takes it
                chunk_bytes *= 2  # one line longer than a chunk: read more at once
                continue
            accepted.append(self._absorb(_parse_chunk(data, end, self._lines + 1, self._offset), stats))
            self._offset += end  # the unfinished tail of `data` is read again with the next chunk
            stats.bytes_read += end

    def _absorb(self, parsed: _ParsedChunk, stats: RefreshStats) -> pl.DataFrame:
        """Count the chunk into `stats` and keep its events whose id is new."""
        self._lines += parsed.lines
        stats.lines += parsed.lines
        stats.blank += parsed.blank
        for reason, count in parsed.malformed.items():
            stats.malformed[reason] = stats.malformed.get(reason, 0) + count
        stats.samples = (stats.samples + parsed.samples)[:MAX_SAMPLES]
        events, duplicates = self._drop_seen(parsed.events)
        stats.events += events.height
        stats.duplicates += duplicates
        return events

    def _drop_seen(self, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """Keep the first occurrence of each id (in file order) that is not already known."""
        ids = events["event_id"].to_list()
        if self._seen.isdisjoint(ids):  # the usual case, at C speed
            before = len(self._seen)
            self._seen.update(ids)
            if len(self._seen) - before == len(ids):
                return events, 0
            kept = events.filter(pl.col("event_id").is_first_distinct())  # repeats within the chunk
            return kept, events.height - kept.height
        keep = []
        for event_id in ids:
            keep.append(event_id not in self._seen)
            self._seen.add(event_id)
        kept = events.filter(pl.Series(keep, dtype=pl.Boolean))
        return kept, len(ids) - kept.height

    def _aggregate(self, events: pl.DataFrame) -> None:
        """Fold events into the per-trajectory (flags, count, first_us, last_us) aggregates."""
        grouped = events.group_by("trajectory_id").agg(
            pl.col("flags").bitwise_or(),
            pl.len().alias("count"),
            pl.col("ts").min().alias("first"),
            pl.col("ts").max().alias("last"),
        )
        tids = grouped["trajectory_id"].to_list()
        totals = zip(*(grouped[name].to_list() for name in ("flags", "count", "first", "last")), strict=True)
        if not self._aggregates:
            self._aggregates = dict(zip(tids, totals, strict=True))
            return
        for tid, (flags, count, first, last) in zip(tids, totals, strict=True):
            old = self._aggregates.get(tid)
            if old is not None:
                flags, count, first, last = old[0] | flags, old[1] + count, min(old[2], first), max(old[3], last)
            self._aggregates[tid] = (flags, count, first, last)

    def _report(self, stats: RefreshStats) -> None:
        if stats.malformed:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats.malformed.items()))
            logger.warning(
                "{}: skipped {} malformed line(s) ({}); first: {}",
                self.path, stats.malformed_total, reasons, stats.samples[0].describe(self.path),
            )
        if stats.events or stats.duplicates:
            logger.debug(
                "{}: +{} event(s), {} duplicate(s) in {:.3f}s", self.path, stats.events, stats.duplicates, stats.seconds
            )

    # --- summaries -------------------------------------------------------------------------

    def summary(self, trajectory_id: str) -> OutcomeSummary | None:
        """What is known about a trajectory's email as of the last refresh; None if nothing."""
        totals = self._aggregates.get(trajectory_id)
        return None if totals is None else OutcomeSummary.from_totals(trajectory_id, *totals)

    def summaries(self, trajectory_ids: Iterable[str]) -> dict[str, OutcomeSummary]:
        """Summaries of those trajectories that have events (others are absent)."""
        return {tid: summary for tid in trajectory_ids if (summary := self.summary(tid)) is not None}

    def trajectory_ids(self) -> list[str]:
        return list(self._aggregates)

    # --- index -----------------------------------------------------------------------------

    def save_index(self) -> Path | None:
        """Write the state as of the last refresh to `<log>.index.json`, atomically (temporary
        file, fsync, rename). Returns None, writing nothing, if no log has been read yet."""
        if self._identity is None:
            logger.debug("{}: no index saved, nothing was read (no log yet?)", self.path)
            return None
        tids = list(self._aggregates)
        columns = list(zip(*self._aggregates.values(), strict=True)) or [(), (), (), ()]
        index = _IndexFile.model_construct(
            version=INDEX_VERSION,
            identity=self._identity,
            lines=self._lines,
            totals=self.totals,
            event_ids=list(self._seen),
            trajectory_ids=tids,
            flags=list(columns[0]),
            counts=list(columns[1]),
            first_us=list(columns[2]),
            last_us=list(columns[3]),
        )
        temporary = self.index_path.with_name(f".{self.index_path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(index.model_dump_json().encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.index_path)
        finally:  # interrupted (Ctrl-C) before the rename: no temporary file left behind
            temporary.unlink(missing_ok=True)
        _fsync_dir(self.index_path.parent)
        return self.index_path

    def _remove_stale_temporaries(self) -> None:
        """Temporary index files of processes that died mid-write (e.g. two quick Ctrl-Cs)."""
        for path in self.index_path.parent.glob(f".{self.index_path.name}.*.tmp"):
            pid = path.name.removeprefix(f".{self.index_path.name}.").split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                path.unlink(missing_ok=True)
                logger.debug("{}: removed {} left by a writer that died", self.path, path.name)

    def load_index(self) -> bool:
        """Replace the in-memory state by the saved index if it is readable and still describes
        this log; else keep it (a stale or broken index only costs a full read: just logged)."""
        self._remove_stale_temporaries()
        index = self._read_index()
        if index is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            logger.warning("{}: ignoring the index, the log itself is missing", self.index_path)
            return False
        try:
            if not _still_valid(fd, index.identity):
                logger.warning("{}: ignoring the stale index (log replaced, truncated or rewritten)", self.index_path)
                return False
        finally:
            os.close(fd)
        self._offset, self._lines, self._identity = index.identity.offset, index.lines, index.identity
        self._seen = set(index.event_ids)
        totals = zip(index.flags, index.counts, index.first_us, index.last_us, strict=True)
        self._aggregates = dict(zip(index.trajectory_ids, totals, strict=True))
        self.totals = index.totals
        logger.debug("{}: index loaded at byte {} ({} events)", self.path, self._offset, len(self._seen))
        return True

    def _read_index(self) -> _IndexFile | None:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("{}: ignoring the unreadable index ({})", self.index_path, exc)
            return None
        try:
            return _IndexFile.model_validate_json(raw)
        except ValidationError as exc:
            logger.warning("{}: ignoring the invalid index ({})", self.index_path, _describe(exc)[1][:200])
            return None

"""The durable event log of online outcomes: one JSON `OnlineOutcome` per line, append-only.

Writing. `append` is one locked write of whole lines, fsync'd (`codreamer.storage`): writers
in any number of processes never interleave, and an append that returned is on disk. A crash
mid-write can leave a torn last line; the next append first ends it with a "\\n", so the
fragment stays one malformed line (counted, never rewritten) and new events always start on
a line of their own.

Reading is incremental. `refresh` reads only the bytes after the last offset it consumed, and
only up to the last "\\n" (a line still being written waits for the next refresh). Lines are
parsed by `codreamer.events.parse` (a column-wise fast path for the exact lines `append`
writes; pydantic for every other line). Blank and malformed lines are skipped and counted by
reason; an `event_id` seen before counts once. The result is kept in memory as
per-trajectory aggregates (flag mask, count, first/last time), so a summary is a dict look-up.
`save_index` persists offset, seen ids and aggregates next to the log
(`codreamer.events.index`), so `EventLog.open` in a new process only reads what was appended
since.

Not thread-safe: use one `EventLog` per thread or task (processes are safe).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl
from loguru import logger
from pydantic import BaseModel, ConfigDict

from codreamer.events import parse
from codreamer.events.index import INDEX_VERSION, Identity, IndexFile, identity, read_index, still_valid, write_index
from codreamer.events.models import OnlineOutcome, OutcomeSummary
from codreamer.events.parse import CANONICAL_LINE, MAX_SAMPLES, MalformedLine, RefreshStats
from codreamer.storage import locked_append, remove_stale_temporaries, settled_size, write_lines

__all__ = ["CANONICAL_LINE", "AppendResult", "EventLog", "MalformedLine", "RefreshStats"]

READ_CHUNK_BYTES = 32 << 20
"""Bytes parsed at a time: bounds memory on a big log, large enough that per-chunk costs vanish."""


class AppendResult(BaseModel):
    """What `append_new` did: events written, and events skipped as already in the log."""

    model_config = ConfigDict(frozen=True)

    accepted: int
    duplicates: int


def _encode(outcomes: Sequence[OnlineOutcome]) -> bytes:
    for position, outcome in enumerate(outcomes):
        if not isinstance(outcome, OnlineOutcome):
            raise TypeError(f"outcomes[{position}] is a {type(outcome).__name__}, not an OnlineOutcome")
    return b"".join(outcome.model_dump_json().encode() + b"\n" for outcome in outcomes)


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
        self._identity: Identity | None = None
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
        with locked_append(self.path) as fd:
            write_lines(fd, payload, path=self.path)
        return len(outcomes)

    def append_new(self, outcomes: Sequence[OnlineOutcome]) -> AppendResult:
        """Append only events whose id is not in the log yet (nor earlier in `outcomes`), and
        read them back. Exact across processes: the check runs under the append lock."""
        if not outcomes:
            return AppendResult(accepted=0, duplicates=0)
        with locked_append(self.path) as fd:
            self._consume(fd, os.fstat(fd).st_size)
            fresh, duplicates = self._unseen(outcomes)
            if fresh:
                write_lines(fd, _encode(fresh), path=self.path)
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
            return self._consume(fd, settled_size(fd))  # between two appends: no half-written batch
        finally:
            os.close(fd)

    def _consume(self, fd: int, size: int) -> RefreshStats:
        """Read [offset, size) up to its last "\\n", chunk by chunk, and fold it into the state."""
        started = time.perf_counter()
        restarted = self._identity is not None and not still_valid(fd, self._identity)
        if restarted:
            logger.warning(
                "{}: replaced or truncated since byte {}; re-reading it from the start", self.path, self._offset
            )
            self._reset()
        stats = RefreshStats(restarted=restarted)
        accepted: list[pl.DataFrame] = []
        try:
            self._read_chunks(fd, size, stats, accepted)
        finally:  # should a chunk fail, the chunks before it are fully counted: the state stays consistent
            if accepted:
                self._aggregate(pl.concat(accepted))
            self._identity = identity(fd, self._offset)
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
            accepted.append(self._absorb(parse.parse_chunk(data, end, self._lines + 1, self._offset), stats))
            self._offset += end  # the unfinished tail of `data` is read again with the next chunk
            stats.bytes_read += end

    def _absorb(self, parsed: parse.ParsedChunk, stats: RefreshStats) -> pl.DataFrame:
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
                self.path,
                stats.malformed_total,
                reasons,
                stats.samples[0].describe(self.path),
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
        index = IndexFile.model_construct(
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
        write_index(self.index_path, index)
        return self.index_path

    def _remove_stale_temporaries(self) -> None:
        """Temporary index files of processes that died mid-write (e.g. two quick Ctrl-Cs)."""
        for path in remove_stale_temporaries(self.index_path):
            logger.debug("{}: removed {} left by a writer that died", self.path, path.name)

    def load_index(self) -> bool:
        """Replace the in-memory state by the saved index if it is readable and still describes
        this log; else keep it (a stale or broken index only costs a full read: just logged)."""
        self._remove_stale_temporaries()
        index = read_index(self.index_path)
        if index is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            logger.warning("{}: ignoring the index, the log itself is missing", self.index_path)
            return False
        try:
            if not still_valid(fd, index.identity):
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

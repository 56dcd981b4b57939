"""The outbox: every email of a training rollout that counts as sent, once, with what a sender needs.

A run's outbox is `<run dir>/outbox.jsonl`, one `OutboxEntry` per line: the trajectory id a
sender must echo back with each outcome (`codreamer ingest`, the webhook), the prospect, the
policy step and iteration that wrote the email, its subject and body, and when it was recorded.
`Outbox.record` appends under the file's lock after reading the ids already there, so an email
is recorded exactly once whatever the writers and however often a resumed iteration records it
again (a kill between the append and the stage's state write re-records the same ids: no-op).
`codreamer outbox RUN_ID [--since ...] [--format jsonl|csv]` exports it (`export_outbox`).

`KnownTrajectories` answers "was this trajectory id ever sent?" over every outbox of a project
(`<project>/models/*/outbox.jsonl`), re-reading only the outboxes that changed: the webhook and
`codreamer ingest` report outcomes for unknown ids (they are kept in the event log all the same).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from codreamer.storage import json_line, locked_append, read_jsonl, write_lines

OUTBOX_FILE = "outbox.jsonl"
EXPORT_FIELDS = (
    "trajectory_id",
    "prospect_id",
    "scenario_id",
    "run_id",
    "iteration",
    "step",
    "sent_at",
    "subject",
    "body",
)


class OutboxEntry(BaseModel):
    """One sent email."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    trajectory_id: str = Field(min_length=1, description="Echo it back with every outcome of this email.")
    prospect_id: str
    scenario_id: str | None = None
    run_id: str = ""
    iteration: int = Field(ge=0)
    step: int = Field(ge=0, description="Training step of the policy that wrote the email.")
    subject: str
    body: str
    sent_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("sent_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _read_entries(path: Path) -> list[OutboxEntry]:
    values, _ = read_jsonl(path)  # a torn last line (a kill mid-append) is skipped
    entries = []
    for value in values:
        try:
            entries.append(OutboxEntry.model_validate(value))
        except ValidationError:
            continue
    return entries


class Outbox:
    """A run's `outbox.jsonl`: append-once by trajectory id, read back in order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_run(cls, run_dir: Path) -> Outbox:
        return cls(Path(run_dir) / OUTBOX_FILE)

    def record(self, entries: Sequence[OutboxEntry]) -> int:
        """Append the entries whose trajectory id is not in the outbox yet; returns how many.

        The check and the append run under one lock, so the result is exact across processes.
        """
        if not entries:
            return 0
        with locked_append(self.path) as fd:
            known = {entry.trajectory_id for entry in _read_entries(self.path)}
            fresh = []
            for entry in entries:
                if entry.trajectory_id not in known:
                    known.add(entry.trajectory_id)
                    fresh.append(entry)
            if fresh:
                payload = b"".join(json_line(entry.model_dump(mode="json")) for entry in fresh)
                write_lines(fd, payload, path=self.path)
        return len(fresh)

    def entries(self, since: datetime | None = None) -> list[OutboxEntry]:
        """Every entry in the order recorded (only those sent at or after `since`)."""
        entries = _read_entries(self.path)
        if since is not None:
            since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
            entries = [e for e in entries if e.sent_at >= since]
        return entries

    def trajectory_ids(self) -> set[str]:
        return {entry.trajectory_id for entry in _read_entries(self.path)}


def export_outbox(entries: Iterable[OutboxEntry], fmt: Literal["jsonl", "csv"]) -> str:
    """The entries as JSONL (one object a line) or CSV (a header row, then `EXPORT_FIELDS`)."""
    rows = [entry.model_dump(mode="json") for entry in entries]
    if fmt == "jsonl":
        return "".join(json_line({name: row[name] for name in EXPORT_FIELDS}).decode() for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(EXPORT_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class KnownTrajectories:
    """The trajectory ids of every outbox under `models_root` (`<project>/models`), kept fresh."""

    def __init__(self, models_root: Path) -> None:
        self.models_root = Path(models_root)
        self._files: dict[Path, tuple[int, int, frozenset[str]]] = {}

    def _ids(self) -> set[str]:
        ids: set[str] = set()
        paths = sorted(self.models_root.glob(f"*/{OUTBOX_FILE}")) if self.models_root.is_dir() else []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError:
                continue
            cached = self._files.get(path)
            if cached is None or cached[:2] != (stat.st_mtime_ns, stat.st_size):
                cached = (stat.st_mtime_ns, stat.st_size, frozenset(Outbox(path).trajectory_ids()))
                self._files[path] = cached
            ids |= cached[2]
        return ids

    def unknown(self, trajectory_ids: Iterable[str]) -> list[str]:
        """The ids (distinct, in first-seen order) that no outbox of the project holds."""
        known = self._ids()
        return list(dict.fromkeys(tid for tid in trajectory_ids if tid not in known))


def models_root_of(events_path: Path) -> Path:
    """Where the runs sharing the event log at `events_path` keep their outboxes: `<project>/models`."""
    return Path(events_path).parent / "models"

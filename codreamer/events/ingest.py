"""Bring outcomes exported from an email tool into the event log: a JSONL or a CSV file.

Every row is validated as an `OnlineOutcome`, the model the webhook validates too, and the good
rows are appended in batches through `EventLog.append_new`, so a file ingested twice, or one
that overlaps what the webhook received, counts each event once. A bad row does not stop the
file: it is reported as `file:line: field: reason` and counted.

JSONL: one OnlineOutcome-like object per line (`source` defaults to the ingest's).
CSV: a header row, then columns `trajectory_id`, `prospect_id`, `step`, `timestamp`, optional
`event_id` and `source`, and the outcome either as boolean columns (`opened`, `replied`, ...:
true/1/yes or false/0/no/empty) or as an `event` column naming one kind per row (`open`,
`reply`, `click`...), the way email tools export. Other columns are ignored.

A row without an `event_id` gets one derived from its content (sha256 of the validated
fields), so ingesting the same export again adds nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from pydantic import BaseModel, Field, ValidationError

from codreamer.events.log import EventLog
from codreamer.events.models import FLAG_NAMES, OnlineOutcome

BATCH_SIZE = 1000
MAX_ERRORS = 50
"""Bad rows described in the report (all are counted)."""
CSV_REQUIRED = ("trajectory_id", "prospect_id", "step", "timestamp")
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f", ""})
EVENT_KINDS: dict[str, str | None] = {
    "open": "opened",
    "opened": "opened",
    "click": "opened",  # a click implies an open
    "clicked": "opened",
    "reply": "replied",
    "replied": "replied",
    "bounce": "bounced",
    "bounced": "bounced",
    "unsubscribe": "unsubscribed",
    "unsubscribed": "unsubscribed",
    "meeting": "meeting_booked",
    "meeting_booked": "meeting_booked",
    "sent": None,  # delivered but nothing else (yet): still an outcome, an unopened email
    "delivered": None,
}
_PENDING_ID = "pending"


class IngestError(ValueError):
    """The file cannot be ingested at all (unreadable, not UTF-8, unusable CSV header)."""


class IngestReport(BaseModel):
    """What an ingest read and did; `errors` describes the first bad rows (`file:line: ...`)."""

    path: Path
    format: Literal["jsonl", "csv"]
    rows: int = 0
    valid: int = 0
    appended: int = 0
    duplicates: int = 0
    invalid: int = 0
    errors: list[str] = Field(default_factory=list)


class _RowError(ValueError):
    """One bad row; the message names the field."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"])
        parts.append(f"field {loc}: {error['msg']}" if loc else error["msg"])
    return "; ".join(parts)


def _derived_event_id(outcome: OnlineOutcome) -> str:
    """A stable id from what the event says (not where it came from), for rows without one."""
    content = outcome.model_dump_json(exclude={"event_id", "source"})
    return "row-" + hashlib.sha256(content.encode()).hexdigest()[:32]


def _outcome(record: dict[str, Any]) -> OnlineOutcome:
    """Validate one record; an absent or empty event_id is derived from the content."""
    derive = not record.get("event_id")
    try:
        outcome = OnlineOutcome.model_validate({**record, "event_id": _PENDING_ID} if derive else record)
    except ValidationError as exc:
        raise _RowError(_describe(exc)) from None
    return outcome.model_copy(update={"event_id": _derived_event_id(outcome)}) if derive else outcome


# --- JSONL -----------------------------------------------------------------------------------


def _jsonl_records(text: str, default_source: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, _RowError(f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(record, dict):
            yield number, _RowError(f"expected a JSON object, got {type(record).__name__}")
            continue
        record.setdefault("source", default_source)
        yield number, record


# --- CSV -------------------------------------------------------------------------------------


def _csv_bool(value: str, column: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _RowError(f"field {column}: not a boolean: {value!r} (use true/false, 1/0 or yes/no)")


def _csv_event_flag(value: str) -> str | None:
    kind = value.strip().lower().replace("-", "_").replace(" ", "_")
    if kind not in EVENT_KINDS:
        raise _RowError(f"field event: unknown event kind {value!r} (known: {', '.join(sorted(EVENT_KINDS))})")
    return EVENT_KINDS[kind]


def _check_header(path: Path, header: list[str]) -> None:
    missing = [name for name in CSV_REQUIRED if name not in header]
    if missing:
        raise IngestError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")
    if "event" not in header and not any(name in header for name in FLAG_NAMES):
        raise IngestError(f"{path}:1: CSV header has no outcome: add an `event` column or one of {', '.join(FLAG_NAMES)}")
    ignored = [name for name in header if name not in {*CSV_REQUIRED, *FLAG_NAMES, "event", "event_id", "source"}]
    if ignored:
        logger.info("{}: ignoring CSV column(s) {}", path, ", ".join(ignored))


def _csv_record(row: dict[str | None, Any], header: list[str], default_source: str) -> dict[str, Any]:
    """One CSV row as an OnlineOutcome-like dict (booleans and the event kind decoded)."""
    if row.get(None):
        raise _RowError(f"{len(row[None])} cell(s) more than the header has")
    cells = {name: (row.get(name) or "").strip() for name in header}
    record: dict[str, Any] = {name: cells[name] for name in CSV_REQUIRED}
    record["event_id"] = cells.get("event_id", "")
    record["source"] = cells.get("source") or default_source
    for name in FLAG_NAMES:
        if name in cells:
            record[name] = _csv_bool(cells[name], name)
    if "event" in cells and (flag := _csv_event_flag(cells["event"])) is not None:
        record[flag] = True
    return record


def _csv_records(path: Path, text: str, default_source: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise IngestError(f"{path}: empty CSV file (no header row)")
    reader.fieldnames = header = [name.strip().lower() for name in reader.fieldnames]
    _check_header(path, header)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, _RowError(f"unreadable CSV: {exc}")
            continue
        if not any((value or "").strip() for key, value in row.items() if key is not None):
            continue  # a blank row
        try:
            yield reader.line_num, _csv_record(row, header, default_source)
        except _RowError as exc:
            yield reader.line_num, exc


# --- the ingest ------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except FileNotFoundError:
        raise IngestError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise IngestError(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc.strerror or exc}") from None


def detect_format(path: Path, text: str) -> Literal["jsonl", "csv"]:
    """By extension (.csv, .jsonl/.ndjson/.json), else by content: JSON lines start with "{"."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def ingest_file(path: Path, log: EventLog, *, default_source: str = "ingest", batch_size: int = BATCH_SIZE) -> IngestReport:
    """Validate every row of `path` and append the valid ones to `log`; see the module docstring.
    Raises IngestError when the file cannot be read or its CSV header is unusable."""
    text = _read_text(path)
    report = IngestReport(path=path, format=detect_format(path, text))
    records = _csv_records(path, text, default_source) if report.format == "csv" else _jsonl_records(text, default_source)
    batch: list[OnlineOutcome] = []
    for number, record in records:
        report.rows += 1
        try:
            if isinstance(record, _RowError):
                raise record
            batch.append(_outcome(record))
        except _RowError as exc:
            report.invalid += 1
            if len(report.errors) < MAX_ERRORS:
                report.errors.append(f"{path}:{number}: {exc}")
            continue
        report.valid += 1
        if len(batch) >= batch_size:
            _flush(log, batch, report)
    _flush(log, batch, report)
    logger.info(
        "{}: {} row(s): {} valid ({} new, {} already in the log), {} invalid",
        path, report.rows, report.valid, report.appended, report.duplicates, report.invalid,
    )
    return report


def _flush(log: EventLog, batch: list[OnlineOutcome], report: IngestReport) -> None:
    if batch:
        result = log.append_new(batch)
        report.appended += result.accepted
        report.duplicates += result.duplicates
        batch.clear()

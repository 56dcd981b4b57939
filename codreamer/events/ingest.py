"""Bring outcomes exported from an email tool into the event log: a JSONL or a CSV file.

Every row is validated as an `OnlineOutcome`, the model the webhook validates too, and the good
rows are appended in batches through `EventLog.append_new`, so a file ingested twice, or one
that overlaps what the webhook received, counts each event once. A bad row does not stop the
file: it is reported as `file:line: field: reason` (every one, through `on_error`) and counted.

The file is streamed line by line (memory stays bounded whatever its size: a batch of rows,
the first `MAX_ERRORS` messages, and lines of at most `MAX_LINE_BYTES`), and the rows read
before any failure are appended: an interrupted ingest loses no valid row it had read, and
running it again adds only what is missing. Pathological lines are bad rows like any other:
a line that is not UTF-8, a line over `MAX_LINE_BYTES`, JSON nested deeper than Python can
parse, a number too long to convert.

JSONL: one OnlineOutcome-like object per line (`source` defaults to the ingest's).
CSV: a header row, then one record per line: columns `trajectory_id`, `prospect_id`, `step`,
`timestamp`, optional `event_id` and `source`, and the outcome either as boolean columns
(`opened`, `replied`, ...: true/1/yes or false/0/no/empty) or as an `event` column naming one
kind per row (`open`, `reply`, `click`...), the way email tools export. Other columns are
ignored. Cells may be quoted (commas, doubled quotes inside) but never span lines, so a stray
`"` spoils only its own line, which is reported, never the rows after it.

A row without an `event_id` gets one derived from its content (sha256 of the validated
fields), so ingesting the same export again adds nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from loguru import logger
from pydantic import BaseModel, Field, ValidationError

from codreamer.errors import UserError
from codreamer.events.log import EventLog
from codreamer.events.models import FLAG_NAMES, OnlineOutcome

BATCH_SIZE = 1000
MAX_ERRORS = 50
"""Bad rows described in the report (all are counted, and all are passed to `on_error`)."""
MAX_LINE_BYTES = 1 << 20
"""A longer line is reported as bad (and skipped without being held in memory)."""
HEAD_BYTES = 64 << 10
"""Bytes looked at to tell JSONL from CSV when the extension does not say."""
BOM = b"\xef\xbb\xbf"
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


class IngestError(UserError, ValueError):
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
    trajectory_ids: list[str] = Field(
        default_factory=list, description="Distinct ids of the valid rows (first seen order)."
    )


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


# --- lines ----------------------------------------------------------------------------------

Line = tuple[int, str | _RowError]
"""(line number, the line's text without its line break, or why it cannot be read)."""


def _physical_lines(handle: IO[bytes], path: Path) -> Iterator[Line]:
    """Every line of the file, decoded; a line that is not UTF-8 or too long is a _RowError.

    Only the first line's failure to decode makes the whole file unusable (it is not a text
    export at all): IngestError.
    """
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):  # MAX_LINE_BYTES + 1 bytes and no end yet
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a block at a time
                raw = handle.readline(MAX_LINE_BYTES)
            yield number, _RowError(f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(BOM)  # spreadsheet exports start with a byte-order mark
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if number == 1:
                raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            yield number, _RowError(f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)")


# --- JSONL -----------------------------------------------------------------------------------


def _jsonl_records(lines: Iterable[Line], default_source: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    for number, line in lines:
        if isinstance(line, _RowError):
            yield number, line
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, _RowError(f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:  # e.g. 5,000 nested brackets: a bad line, not a crash
            yield number, _RowError("invalid JSON: nested too deeply")
            continue
        except ValueError as exc:  # an integer of more than 4,300 digits...
            yield number, _RowError(f"invalid JSON: {exc}")
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
        raise IngestError(
            f"{path}:1: CSV header has no outcome: add an `event` column or one of {', '.join(FLAG_NAMES)}"
        )
    ignored = [name for name in header if name not in {*CSV_REQUIRED, *FLAG_NAMES, "event", "event_id", "source"}]
    if ignored:
        logger.info("{}: ignoring CSV column(s) {}", path, ", ".join(ignored))


def _csv_cells(line: str) -> list[str]:
    """The cells of one CSV line; _RowError for a quote that does not close on the line."""
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise _RowError('unreadable CSV: a quoted cell does not close on this line (a stray `"`?)') from None
        raise _RowError(f"unreadable CSV: {exc}") from None
    return rows[0] if rows else []


def _csv_record(cells: list[str], header: list[str], default_source: str) -> dict[str, Any]:
    """One CSV row as an OnlineOutcome-like dict (booleans and the event kind decoded)."""
    if len(cells) > len(header):
        raise _RowError(f"{len(cells) - len(header)} cell(s) more than the header has")
    row = dict(zip(header, (cell.strip() for cell in cells), strict=False))
    cells_by_name = {name: row.get(name, "") for name in header}
    record: dict[str, Any] = {name: cells_by_name[name] for name in CSV_REQUIRED}
    record["event_id"] = cells_by_name.get("event_id", "")
    record["source"] = cells_by_name.get("source") or default_source
    for name in FLAG_NAMES:
        if name in cells_by_name:
            record[name] = _csv_bool(cells_by_name[name], name)
    if "event" in cells_by_name and (flag := _csv_event_flag(cells_by_name["event"])) is not None:
        record[flag] = True
    return record


def _csv_records(
    path: Path, lines: Iterator[Line], default_source: str
) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    first = next(lines, None)
    if first is None:
        raise IngestError(f"{path}: empty CSV file (no header row)")
    if isinstance(first[1], _RowError):
        raise IngestError(f"{path}:1: unusable CSV header: {first[1]}")
    try:
        header = [name.strip().lower() for name in _csv_cells(first[1])]
    except _RowError as exc:
        raise IngestError(f"{path}:1: unusable CSV header: {exc}") from None
    _check_header(path, header)
    for number, line in lines:
        if isinstance(line, _RowError):
            yield number, line
            continue
        if not line.strip():
            continue  # a blank row
        try:
            cells = _csv_cells(line)
            if not any(cell.strip() for cell in cells):
                continue  # a row of empty cells
            yield number, _csv_record(cells, header, default_source)
        except _RowError as exc:
            yield number, exc


# --- the ingest ------------------------------------------------------------------------------


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise IngestError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise IngestError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc.strerror or exc}") from None


def detect_format(path: Path, head: str) -> Literal["jsonl", "csv"]:
    """By extension (.csv, .jsonl/.ndjson/.json), else by content: JSON lines start with "{"."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    return "jsonl" if head.lstrip().startswith("{") else "csv"


def ingest_file(
    path: Path,
    log: EventLog,
    *,
    default_source: str = "ingest",
    batch_size: int = BATCH_SIZE,
    on_error: Callable[[str], None] | None = None,
) -> IngestReport:
    """Validate every row of `path` and append the valid ones to `log`; see the module docstring.

    `on_error` is called with `file:line: reason` for every bad row, as it is found (the report
    keeps the first `MAX_ERRORS`). Raises IngestError when the file cannot be read or its CSV
    header is unusable; rows read before any error are appended first.
    """
    with _open(path) as handle:
        try:
            head = handle.read(HEAD_BYTES).removeprefix(BOM).decode("utf-8", errors="replace")
            handle.seek(0)
        except OSError as exc:
            raise IngestError(f"{path}: cannot read: {exc.strerror or exc}") from None
        report = IngestReport(path=path, format=detect_format(path, head))
        lines = _physical_lines(handle, path)
        records = (
            _csv_records(path, lines, default_source)
            if report.format == "csv"
            else _jsonl_records(lines, default_source)
        )
        batch: list[OnlineOutcome] = []
        try:
            for number, record in records:
                report.rows += 1
                try:
                    if isinstance(record, _RowError):
                        raise record
                    batch.append(_outcome(record))
                except _RowError as exc:
                    report.invalid += 1
                    message = f"{path}:{number}: {exc}"
                    if len(report.errors) < MAX_ERRORS:
                        report.errors.append(message)
                    if on_error is not None:
                        on_error(message)
                    continue
                report.valid += 1
                if len(batch) >= batch_size:
                    _flush(log, batch, report)
        except OSError as exc:
            raise IngestError(f"{path}: cannot read: {exc.strerror or exc}") from None
        finally:  # the valid rows read so far are never lost, whatever stopped the file
            _flush(log, batch, report)
    logger.info(
        "{}: {} row(s): {} valid ({} new, {} already in the log), {} invalid",
        path,
        report.rows,
        report.valid,
        report.appended,
        report.duplicates,
        report.invalid,
    )
    return report


MAX_IDS_KEPT = 100_000
"""Distinct trajectory ids an ingest report keeps (to check them against the outboxes)."""


def _flush(log: EventLog, batch: list[OnlineOutcome], report: IngestReport) -> None:
    if batch:
        seen = set(report.trajectory_ids)
        for outcome in batch:
            if outcome.trajectory_id not in seen and len(seen) < MAX_IDS_KEPT:
                seen.add(outcome.trajectory_id)
                report.trajectory_ids.append(outcome.trajectory_id)
        result = log.append_new(batch)
        report.appended += result.accepted
        report.duplicates += result.duplicates
        batch.clear()

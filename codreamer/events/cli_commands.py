"""The event-log verbs of the `codreamer` CLI: `ingest` a file, `serve-events` (the webhook), `outbox`.

They print for a person at a terminal and return the process exit status; the work itself is
in `codreamer.events.ingest` and `codreamer.events.webhook`.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path
from typing import Literal

from codreamer.events.ingest import IngestError, ingest_file
from codreamer.events.log import EventLog
from codreamer.events.outbox import KnownTrajectories, Outbox, export_outbox, models_root_of
from codreamer.events.webhook import DEFAULT_TOLERANCE_S, check_secret, serve_events
from codreamer.storage import write_bytes_atomic


def cmd_ingest(log_path: Path, file: Path) -> int:
    """Ingest `file` into the log at `log_path`. Every bad row is reported on stderr as it is
    read (`file:line: field: reason`), then a summary on stdout. Exit 0 if any row was valid,
    1 if none was, 2 if the file cannot be read (or its CSV header is unusable)."""
    log = EventLog.open(log_path)
    try:
        report = ingest_file(file, log, on_error=lambda message: print(f"ingest: {message}", file=sys.stderr))
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    finally:
        log.save_index()
    print(
        f"{file} ({report.format}): {report.rows} row(s), {report.valid} valid "
        f"({report.appended} new, {report.duplicates} already in {log_path}), {report.invalid} invalid"
    )
    if report.trajectory_ids:
        unknown = KnownTrajectories(models_root_of(log_path)).unknown(report.trajectory_ids)
        if unknown:
            print(
                f"ingest: {len(unknown)} trajectory id(s) are in no run's outbox (kept in the log all the same): "
                + ", ".join(unknown[:10])
                + (" ..." if len(unknown) > 10 else "")
            )
    return 0 if report.valid else 1


def cmd_serve_events(
    log_path: Path, secret: str | None, host: str, port: int, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> int:
    """Serve the events webhook into `log_path` until Ctrl-C. Exit 2 without a secret of at
    least 32 bytes (CODREAMER_EVENTS_SECRET)."""
    try:
        check_secret(secret)
    except ValueError as exc:
        print(f"serve-events: {exc}", file=sys.stderr)
        return 2
    log = EventLog.open(log_path)
    try:
        known = KnownTrajectories(models_root_of(log_path))
        asyncio.run(serve_events(log, secret, host, port, tolerance_s=tolerance_s, known=known))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not ours...
        print(f"serve-events: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        log.save_index()
    return 0


def cmd_outbox(run_dir: Path, since: str | None, fmt: Literal["jsonl", "csv"], output: Path | None) -> int:
    """Export the run's outbox (emails sent, with the trajectory id to echo back) to stdout or
    `output`. `since`: an ISO time (naive = UTC); only emails sent at or after it. Exit 2 on a bad time."""
    moment = None
    if since is not None:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            print(f"outbox: --since {since!r} is not an ISO time (e.g. 2025-01-31T12:00:00Z)", file=sys.stderr)
            return 2
    entries = Outbox.of_run(run_dir).entries(since=moment)
    text = export_outbox(entries, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        write_bytes_atomic(output, text.encode())
        print(f"outbox: {len(entries)} email(s) written to {output}", file=sys.stderr)
    return 0

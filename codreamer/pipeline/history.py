"""The local history of a run: one JSON line per iteration, appended and never rewritten.

The history (`iterations.jsonl`) is the commit point of an iteration, so every append is
durable: one locked write of one whole line, fsync'd (`codreamer.storage.append_jsonl`).
Concurrent writers cannot interleave, and a crash leaves at worst a torn last line, which
`read_history` skips and counts. NaN and infinities are written as null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codreamer.storage import append_jsonl, read_jsonl

__all__ = ["append_record", "read_history"]


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one durable line (parents are created)."""
    append_jsonl(path, [record], fsync=True)


def read_history(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Return (records, number of unreadable lines skipped); no file: ([], 0)."""
    return read_jsonl(path)

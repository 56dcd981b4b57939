"""The local history of a run: one JSON line per iteration, appended and never rewritten.

Each append is a single `write` of one whole line on a file opened with O_APPEND under an
exclusive `flock`, then fsync'd, so concurrent writers cannot interleave and a crash leaves
at worst a torn last line, which `read_history` skips and counts.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON; they become null so every line stays readable by any tool."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _ends_torn(fd: int) -> bool:
    """True when the file is non-empty and its last byte is not a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def append_record(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(_finite(record), default=str, allow_nan=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _ends_torn(fd):
            line = b"\n" + line  # end the fragment a crash left, so this record stays whole
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def read_history(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Return (records, number of unreadable lines skipped)."""
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            skipped += 1
    return records, skipped

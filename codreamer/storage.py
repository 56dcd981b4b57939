"""The one place that writes and reads the run's files: locked JSONL appends, JSONL reads, atomic files.

Appending (`append_jsonl`, or `locked_append` + `write_lines` for a caller that must read
under the same lock). The file is opened with O_APPEND under an exclusive `flock`, and every
batch of lines goes out in one `write` (a short write is continued under the lock), so writers
in any number of processes never interleave. A crash mid-write can leave a torn last line;
the next append first ends it with "\\n", so the fragment stays one malformed line (skipped
and counted by readers, never rewritten) and new lines always start on a line of their own.
`fsync=True` makes an append that returned survive a power cut (the data, and the directory
entry of a file the append created); `fsync=False` leaves the data in the page cache, where it
still survives a crash of the process (the trace, whose commit point is the history record).

Reading (`read_jsonl`, `iter_jsonl`). Lines are split on "\\n" only (`str.splitlines` would
also split at U+2028 inside a JSON string) and blank lines are no records. A line that is not
JSON, such as the torn last line a crash leaves, is either skipped and counted
(`strict=False`: logs, where one bad line must not hide the rest) or raised as
`JsonlLineError` naming `file:line` (`strict=True`: input files a person wrote, where a bad
line is a mistake to fix).

Atomic writes (`write_atomic`, `write_bytes_atomic`, `write_json_atomic`). The content goes to a
temporary file in the target's folder, is fsync'd, then renamed over the target, and the
folder is fsync'd: a reader sees the old file or the new one, never a mix, and a failure at
any point (serialisation, a full disk, Ctrl-C) leaves the old file as it was and no temporary
file behind. Temporary names carry the writer's pid, so `remove_stale_temporaries` can clear
those of writers that died between the write and their own clean-up.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loguru import logger

__all__ = [
    "JsonlLineError",
    "append_jsonl",
    "finite",
    "fsync_directory",
    "iter_jsonl",
    "json_line",
    "locked_append",
    "read_jsonl",
    "remove_stale_temporaries",
    "settled_size",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_lines",
]

FILE_MODE = 0o644
"""Mode of a created JSONL file (before the umask)."""
TEMPORARY_MODE = 0o600
"""Mode of a temporary file, kept by the file it becomes (as with `tempfile.mkstemp`)."""


# --------------------------------------------------------------------------- appending


def finite(value: Any) -> Any:
    """NaN/inf are not JSON; they become null so every line stays readable by any tool."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_line(record: Any) -> bytes:
    """One record as one strict JSON line (non-finite floats as null, unknown types as `str`)."""
    return (json.dumps(finite(record), default=str, allow_nan=False) + "\n").encode()


def fsync_directory(path: Path) -> None:
    """Make a new directory entry (a created file, a renamed one) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked_append(path: Path, *, fsync: bool = True) -> Iterator[int]:
    """`path` opened for appending (parents made) under an exclusive flock, released on close.

    With `fsync`, a file this call created has its directory entry fsync'd too.
    """
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    created = fsync and not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if created:
            fsync_directory(path.parent)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def _ends_torn(fd: int) -> bool:
    """True when the file is non-empty and its last byte is not a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def write_lines(fd: int, payload: bytes, *, path: Path, fsync: bool = True) -> None:
    """Write whole lines at the end of a `locked_append` file: one write (after a "\\n" if a
    crash left a torn last line), continued on a short write, then fsync'd if asked."""
    if _ends_torn(fd):
        logger.warning("{}: the last line is torn (a writer crashed mid-append?); it stays as one malformed line", path)
        payload = b"\n" + payload
    written = os.write(fd, payload)
    while written < len(payload):  # a short write (signal, disk full): the lock keeps the rest contiguous
        written += os.write(fd, memoryview(payload)[written:])
    if fsync:
        os.fsync(fd)


def append_jsonl(path: Path, records: Iterable[Any], *, fsync: bool = True) -> None:
    """Append `records` (each one JSON line, see `json_line`) in one locked write."""
    payload = b"".join(json_line(record) for record in records)
    if not payload:
        return
    with locked_append(path, fsync=fsync) as fd:
        write_lines(fd, payload, path=Path(path), fsync=fsync)


def settled_size(fd: int) -> int:
    """The file's size between two appends (taken under a shared lock): no half-written batch."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        return os.fstat(fd).st_size
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- reading


class JsonlLineError(ValueError):
    """A line of a JSONL file read strictly that is not JSON; the message is `file:line: ...`."""

    def __init__(self, path: Path, line: int, reason: str, column: int | None = None) -> None:
        self.path, self.line, self.reason, self.column = Path(path), line, reason, column
        where = "" if column is None else f" (column {column})"
        super().__init__(f"{path}:{line}: invalid JSON: {reason}{where}")


def iter_jsonl(
    text: str, path: Path, *, strict: bool = False, bad_lines: list[int] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of `text`, the contents of `path`, lazily.

    A line that is not JSON raises `JsonlLineError` when `strict` (so the first bad line, in
    file order, is the one reported); otherwise it is skipped and its number added to `bad_lines`.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise JsonlLineError(path, number, exc.msg, exc.colno) from None
            if bad_lines is not None:
                bad_lines.append(number)
            continue
        except RecursionError:  # nested deeper than Python parses
            if strict:
                raise JsonlLineError(path, number, "nested too deeply") from None
            if bad_lines is not None:
                bad_lines.append(number)
            continue
        yield number, value


def read_jsonl(path: Path, *, strict: bool = False, encoding_errors: str = "strict") -> tuple[list[Any], int]:
    """(values in file order, number of lines skipped as not JSON); no file (or not a file): ([], 0).

    `strict=True` raises `JsonlLineError` at the first bad line instead (see `iter_jsonl`).
    `encoding_errors="replace"` reads bytes that are not UTF-8 as U+FFFD (the line is then
    judged as JSON like any other) instead of raising UnicodeDecodeError.
    """
    path = Path(path)
    if not path.is_file():
        return [], 0
    bad: list[int] = []
    text = path.read_text(encoding="utf-8", errors=encoding_errors)
    values = [value for _, value in iter_jsonl(text, path, strict=strict, bad_lines=bad)]
    return values, len(bad)


# --------------------------------------------------------------------------- atomic writes


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporary files of `path` left by writers that died mid-write; returns them.

    A temporary file of this process, or of one still alive, may still be written: kept.
    """
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        pid = candidate.name.removeprefix(f".{path.name}.").split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Replace `path` by what `write(temporary_path)` writes (see the module docstring); returns `path`.

    `write` receives the path of an empty temporary file in the target's folder (mode 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TEMPORARY_MODE))
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    finally:  # failed or interrupted (Ctrl-C) before the rename: no temporary file left behind
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Replace `path` by `data`, atomically and durably."""
    return write_atomic(path, lambda temporary: temporary.write_bytes(data))


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Replace `path` by `payload` as indented JSON (unknown types as `str`), atomically and durably.

    The JSON is built before any file is touched, so a payload that cannot be serialised
    raises with the old file intact.
    """
    data = json.dumps(payload, indent=2, default=str).encode()
    return write_bytes_atomic(path, data)

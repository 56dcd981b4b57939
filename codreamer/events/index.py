"""The event log's sidecar index: where reading stopped, and proof the log is still the same file.

`<log>.index.json` persists an `EventLog`'s state after reading the log up to an offset (the
ids seen, the per-trajectory aggregates, the totals), so `EventLog.open` in a new process only
reads what was appended since. `Identity` ties that offset to the bytes it refers to: the file
(device, inode) and hashes of its head and of the bytes just before the offset. A replaced,
truncated or rewritten log no longer matches, and its index is ignored (a full read).
The index is written atomically (`codreamer.storage`); a stale or broken one only costs a
full read, and is logged, never raised.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from codreamer.events.parse import RefreshStats, describe_error
from codreamer.storage import write_bytes_atomic

__all__ = [
    "ANCHOR_BYTES",
    "INDEX_VERSION",
    "Identity",
    "IndexFile",
    "identity",
    "read_index",
    "still_valid",
    "write_index",
]

ANCHOR_BYTES = 4096
"""Bytes hashed at the head of the log and just before the consumed offset to notice a replaced log."""
INDEX_VERSION: Literal[1] = 1


class Identity(BaseModel):
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


def identity(fd: int, offset: int) -> Identity:
    stat = os.fstat(fd)
    return Identity(
        device=stat.st_dev,
        inode=stat.st_ino,
        offset=offset,
        head_sha256=_digest(fd, 0, min(offset, ANCHOR_BYTES)),
        tail_sha256=_digest(fd, max(0, offset - ANCHOR_BYTES), offset),
    )


def still_valid(fd: int, known: Identity) -> bool:
    """Is the file behind `fd` the one `known` was taken from, grown by appends only?"""
    if os.fstat(fd).st_size < known.offset:
        return False
    return identity(fd, known.offset) == known


class IndexFile(BaseModel):
    """The sidecar `<log>.index.json`: state after reading the log up to `identity.offset`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    identity: Identity
    lines: int = Field(ge=0)
    totals: RefreshStats
    event_ids: list[str]
    trajectory_ids: list[str]
    flags: list[int]
    counts: list[int]
    first_us: list[int]
    last_us: list[int]

    @model_validator(mode="after")
    def _columns_align(self) -> IndexFile:
        columns = (self.trajectory_ids, self.flags, self.counts, self.first_us, self.last_us)
        if len({len(column) for column in columns}) != 1:
            raise ValueError("trajectory columns have different lengths")
        return self


def read_index(path: Path) -> IndexFile | None:
    """The index at `path`; None when there is none, or it is unreadable or invalid (logged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("{}: ignoring the unreadable index ({})", path, exc)
        return None
    try:
        return IndexFile.model_validate_json(raw)
    except ValidationError as exc:
        logger.warning("{}: ignoring the invalid index ({})", path, describe_error(exc)[1][:200])
        return None


def write_index(path: Path, index: IndexFile) -> Path:
    """Replace the index at `path`, atomically and durably."""
    return write_bytes_atomic(path, index.model_dump_json().encode())

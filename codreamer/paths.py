"""Names that become folders (run ids, project names) and paths that must stay in the runs folder.

A run id or project name is one folder name: `SAFE_NAME_PATTERN`, i.e. 1-100 characters of
letters, digits, `.`, `_` and `-`, starting with a letter or digit (so never `.`, `..`, a
hidden name, an absolute path or anything with a separator). Anything else is refused before
a file is written. Where a run directory is opened, listed, reported on or pruned, its
resolved path (symlinks followed) must also stay under the folder it belongs to.
"""

from __future__ import annotations

import re
from pathlib import Path

from codreamer.config import SAFE_NAME_PATTERN
from codreamer.errors import UsageError

_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)


class UnsafePathError(UsageError, ValueError):
    """A name that is not one plain folder name, or a path that resolves outside its root."""


def is_safe_name(value: str) -> bool:
    return isinstance(value, str) and _SAFE_NAME.fullmatch(value) is not None


def check_name(value: str, what: str = "run id") -> str:
    """`value` if it is a safe folder name (see the module docstring), else UnsafePathError."""
    if not is_safe_name(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise UnsafePathError(
            f"{what} {shown!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..', no absolute path)"
        )
    return value


def resolve_inside(path: Path, root: Path, what: str = "path") -> Path:
    """`path` resolved (symlinks followed), if it is `root` itself or below it; else UnsafePathError."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise UnsafePathError(f"{what} {path} resolves to {resolved}, outside {base}; refusing to use it")
    return resolved


def is_inside(path: Path, root: Path) -> bool:
    try:
        resolve_inside(path, root)
    except (UnsafePathError, OSError, RuntimeError):  # RuntimeError: a symlink loop on old Pythons
        return False
    return True

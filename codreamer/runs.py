"""Run directories: where a run lives, how to find it again by its id, what it contains.

A run lives in ART's model directory, `<runs_dir>/<project>/models/<run_id>/`, so ART's own
files (`history.jsonl` from `model.log`, ART's `state.json`) sit beside ours:
`run.json` (the settings it ran with), `iterations.jsonl` (one record per iteration),
`codreamer_state.json` (the resume state), `failures.jsonl` and `failures/` (what failed),
`checkpoints/<step>/` and `run.log`. `find_runs` lists runs in one documented order and
`find_run_in` finds one; every listing (`codreamer runs`, the failure analysis) uses them.

Run ids and project names are plain folder names (`codreamer.paths.SAFE_NAME_PATTERN`), and
every run directory handed out here resolves to a folder under `<runs_dir>/<project>/models`:
a hostile id (`../../x`, `/abs/dir`) or a symlink out of the runs folder is refused, never used.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codreamer.config import Settings
from codreamer.errors import UsageError, UserError
from codreamer.paths import check_name, is_inside, is_safe_name, resolve_inside
from codreamer.storage import write_json_atomic

__all__ = [
    "FAILURES_FILE",
    "ITERATIONS_FILE",
    "LOG_FILE",
    "RUN_FILE",
    "RunBusyError",
    "RunFileError",
    "find_run",
    "find_run_in",
    "find_runs",
    "is_run_directory",
    "list_runs",
    "models_root",
    "new_run_id",
    "read_json_file",
    "read_run_file",
    "run_dir",
    "run_lock",
    "write_json_atomic",  # re-exported for callers not yet importing it from codreamer.storage
]

RUN_FILE = "run.json"
ITERATIONS_FILE = "iterations.jsonl"
LOG_FILE = "run.log"
FAILURES_FILE = "failures.jsonl"
"""The run's failures table (`codreamer.analysis.failures`)."""
RUN_MARKERS = (RUN_FILE, FAILURES_FILE)
"""A folder holding one of these is a run (a failures table alone: a run whose run.json is gone)."""


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def models_root(settings: Settings) -> Path:
    return settings.runs_dir / check_name(settings.project, "project name") / "models"


def run_dir(settings: Settings, run_id: str) -> Path:
    """`<runs_dir>/<project>/models/<run_id>`, after checking the id and where it resolves."""
    root = models_root(settings)
    path = root / check_name(run_id, "run id")
    resolve_inside(path, root, f"run directory of {run_id!r}")
    return path


class RunFileError(UserError, ValueError):
    """A run file (run.json, the resume state) that cannot be read; the message names it."""


def read_json_file(path: Path, what: str, remedy: str) -> Any:
    """The JSON in `path`, or RunFileError naming the file, what is wrong and `remedy`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    raise RunFileError(f"{path}: {what} is {problem}; {remedy}")


def read_run_file(directory: Path) -> dict[str, Any]:
    """The run's `run.json` (empty when there is none); RunFileError when it is corrupt."""
    path = directory / RUN_FILE
    if not path.is_file():
        return {}
    data = read_json_file(path, "the run's settings file", "restore it, or start a new run with another --run-id")
    if not isinstance(data, dict):
        raise RunFileError(
            f"{path}: the run's settings file holds {type(data).__name__}, not an object; "
            "restore it, or start a new run with another --run-id"
        )
    return data


def _created_at(directory: Path) -> str:
    """run.json's `created_at` (ISO 8601 UTC, so text order is time order); "" if unknown."""
    try:
        data = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("created_at") or "") if isinstance(data, dict) else ""


def is_run_directory(path: Path, root: Path) -> bool:
    """A folder with a safe name, resolving under `root`, that holds run.json or failures.jsonl."""
    return (
        is_safe_name(path.name)  # not `_cross_run`, hidden folders or odd names
        and is_inside(path, root)  # no symlink out of the runs folder
        and path.is_dir()
        and any((path / name).is_file() for name in RUN_MARKERS)
    )


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root` (a `<runs_dir>/<project>/models` folder), oldest first.

    The one order every listing uses: run.json's `created_at`, then the folder's modification
    time (runs without a `created_at`), then the name. A resumed run keeps its place.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if is_run_directory(p, root)]
    return sorted(runs, key=lambda p: (_created_at(p), p.stat().st_mtime, p.name))


def find_run_in(root: Path, run_id: str) -> Path:
    """The run `run_id` under `root`: UnsafePathError for a hostile id or a link out of `root`,
    FileNotFoundError (naming the most recent runs) when there is no such run."""
    root = Path(root)
    path = root / check_name(run_id, "run id")
    resolve_inside(path, root, f"run directory of {run_id!r}")
    if not is_run_directory(path, root):
        known = ", ".join(p.name for p in find_runs(root)[-5:]) or "none"
        raise FileNotFoundError(f"no run '{run_id}' under {root} (recent runs: {known})")
    return path


def list_runs(settings: Settings) -> list[Path]:
    """The settings' project's runs, oldest first (see `find_runs`)."""
    return find_runs(models_root(settings))


def find_run(settings: Settings, run_id: str) -> Path:
    """The settings' project's run `run_id` (see `find_run_in`)."""
    return find_run_in(models_root(settings), run_id)


LOCK_FILE = "run.lock"


class RunBusyError(UsageError):
    """Another process has this run open: two writers would duplicate its iterations."""


@contextmanager
def run_lock(directory: Path, run_id: str) -> Iterator[None]:
    """Hold `<run dir>/run.lock` (an exclusive flock) while the run is open.

    The kernel drops the lock when the process dies, so a kill -9 never leaves a stale lock;
    a second `learn-loop --run-id X` while X runs is refused instead of interleaving records.
    """
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise RunBusyError(
                f"run {run_id!r} is open in another process (pid {holder}); wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)

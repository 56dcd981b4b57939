"""Run directories: where a run lives, how to find it again by its id, what it contains.

A run lives in ART's model directory, `<runs_dir>/<project>/models/<run_id>/`, so ART's own
files (`history.jsonl` from `model.log`, ART's `state.json`) sit beside ours:
`run.json` (the settings it ran with), `iterations.jsonl` (one record per iteration),
`codreamer_state.json` (the resume state), `checkpoints/<step>/` and `run.log`.

Run ids and project names are plain folder names (`codreamer.paths.SAFE_NAME_PATTERN`), and
every run directory handed out here resolves to a folder under `<runs_dir>/<project>/models`:
a hostile id (`../../x`, `/abs/dir`) or a symlink out of the runs folder is refused, never used.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codreamer.config import Settings
from codreamer.errors import UserError
from codreamer.paths import check_name, is_inside, is_safe_name, resolve_inside

RUN_FILE = "run.json"
ITERATIONS_FILE = "iterations.jsonl"
LOG_FILE = "run.log"


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
        raise RunFileError(f"{path}: the run's settings file holds {type(data).__name__}, not an object; restore it, or start a new run with another --run-id")
    return data


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_runs(settings: Settings) -> list[Path]:
    root = models_root(settings)
    if not root.is_dir():
        return []
    runs = (p for p in root.iterdir() if is_safe_name(p.name) and is_inside(p, root) and (p / RUN_FILE).is_file())
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def find_run(settings: Settings, run_id: str) -> Path:
    path = run_dir(settings, run_id)
    if not (path / RUN_FILE).is_file():
        known = ", ".join(p.name for p in list_runs(settings)[-5:]) or "none"
        raise FileNotFoundError(f"no run '{run_id}' under {models_root(settings)} (recent runs: {known})")
    return path

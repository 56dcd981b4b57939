"""Run directories: where a run lives, how to find it again by its id, what it contains.

A run lives in ART's model directory, `<runs_dir>/<project>/models/<run_id>/`, so ART's own
files (`history.jsonl` from `model.log`, `state.json`) sit beside ours:
`run.json` (the settings it ran with), `iterations.jsonl` (one record per iteration),
`checkpoints/<step>/` and `run.log`.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codreamer.config import Settings

RUN_FILE = "run.json"
ITERATIONS_FILE = "iterations.jsonl"
LOG_FILE = "run.log"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def models_root(settings: Settings) -> Path:
    return settings.runs_dir / settings.project / "models"


def run_dir(settings: Settings, run_id: str) -> Path:
    return models_root(settings) / run_id


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
    return sorted((p for p in root.iterdir() if (p / RUN_FILE).is_file()), key=lambda p: p.stat().st_mtime)


def find_run(settings: Settings, run_id: str) -> Path:
    path = run_dir(settings, run_id)
    if not (path / RUN_FILE).is_file():
        known = ", ".join(p.name for p in list_runs(settings)[-5:]) or "none"
        raise FileNotFoundError(f"no run '{run_id}' under {models_root(settings)} (recent runs: {known})")
    return path

"""The SkyPilot task (`scripts/sky/gpu.yaml`) is valid YAML whose shell parts parse, installs the
locked GPU set and runs the learning loop on ART's LocalBackend."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

TASK = Path(__file__).resolve().parent.parent / "scripts" / "sky" / "gpu.yaml"


def test_the_task_installs_the_gpu_set_and_runs_the_local_backend() -> None:
    task = yaml.safe_load(TASK.read_text())
    assert task["workdir"] == "."
    assert task["resources"]["accelerators"] and task["resources"]["disk_size"] >= 64
    assert all(isinstance(v, str) for v in task["envs"].values())  # SkyPilot env values are strings
    assert "uv sync --locked --project scripts/gpu" in task["setup"]
    assert "learn-loop --backend local" in task["run"] and '--base-model "$BASE_MODEL"' in task["run"]
    for part in ("setup", "run"):
        assert subprocess.run(["bash", "-n"], input=task[part], text=True).returncode == 0, part

"""`scripts/gpu_smoke.sh` without a GPU: it refuses clearly before installing anything, and its
summary reads a run's iterations.jsonl (the part that runs after learn-loop, checked on records
with the keys the loop writes). `nvidia-smi` is a stub on PATH, so no machine's GPU is used."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"

pytestmark = pytest.mark.timeout(60)


def _stubs(folder: Path, nvidia_smi: str) -> dict[str, str]:
    """PATH with a stub `nvidia-smi`, and a `uv` and `python3` that only record that they were
    called: whatever the script does, it installs and runs nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in (
        ("nvidia-smi", nvidia_smi),
        ("uv", f"echo uv >> {folder}/called; exit 97"),
        ("python3", f"echo python3 >> {folder}/called; exit 97"),
    ):
        stub = folder / name
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("exit 9", "no working nvidia-smi"),
        ('echo "| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 |"', "supports CUDA 12"),
    ],
)
def test_no_usable_gpu_is_one_clear_refusal_before_any_install(tmp_path: Path, body: str, says: str) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=_stubs(tmp_path / "bin", body), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (tmp_path / "bin" / "called").exists()  # refused before uv or pip was called


def test_the_summary_reads_the_runs_iterations(tmp_path: Path) -> None:
    summary = re.search(r"<<'PY'.*?\n(.*?)\nPY\n", SCRIPT.read_text(), re.S)
    assert summary is not None
    run = tmp_path / "runs" / "codreamer" / "models" / "smoke-1"
    run.mkdir(parents=True)
    records = [
        {"iteration": 1, "step": 1, "train/reward_mean": 0.41, "train/reward_std": 0.05, "train/reward_count": 8,
         "time/generate_s": 12.5, "time/score_s": 0.01, "time/train_s": 20.0, "time/log_s": 0.3},
        {"iteration": 2, "step": 2, "train/reward_mean": 0.47, "train/reward_std": 0.04, "train/reward_count": 8,
         "eval/reward_mean": 0.52, "eval/reward_ci_low": 0.48, "eval/reward_ci_high": 0.56, "eval/delta_base": 0.06,
         "time/generate_s": 11.0, "time/score_s": 0.01, "time/train_s": 18.2, "time/evaluate_s": 9.9, "time/log_s": 0.1},
    ]  # fmt: skip
    (run / "iterations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{torn\n")
    done = subprocess.run(
        [sys.executable, "-", str(tmp_path / "runs"), "smoke-1", "Qwen/Qwen2.5-0.5B-Instruct"],
        input=summary.group(1), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert (
        "iteration 2  step 2: train reward 0.470 +- 0.040 (n=8), held-out 0.520 [0.480, 0.560] (vs base +0.060)" in out
    )
    assert "generate 12.5 s  score 0.0 s  train 20.0 s  log 0.3 s" in out
    assert "step reached 2 after 2 iteration(s)" in out
    missing = subprocess.run(
        [sys.executable, "-", str(tmp_path / "runs"), "nope", "m"],
        input=summary.group(1),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 0 and "no iteration completed" in missing.stdout

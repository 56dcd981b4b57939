"""`kill -9` in the middle of an iteration, then the same command again (real model, slow).

The loop runs in a child process; the test watches the resume state file and kills the child with
SIGKILL as soon as the iteration's training step is saved (before its history record),
then starts the same command again. The resumed run must finish the iteration without
training it a second time (its log says so and the step stays 1), and the history must hold
the iteration exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codreamer.pipeline.history import read_history
from codreamer.pipeline.state import STATE_FILE

pytestmark = pytest.mark.slow

FLAGS = [
    "--group-size", "2", "--scenarios-per-step", "1", "--max-turns", "1", "--max-tokens", "8",
    "--eval-scenarios", "1", "--eval-samples", "1", "--no-wandb", "--iterations", "1", "--run-id", "kill-test",
    "--warm-start", "off", "--no-eval-before-train",
]  # fmt: skip
ENTRY = "from codreamer.cli import learn_loop_main; raise SystemExit(learn_loop_main())"


def _start(runs: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, *FLAGS, "--runs-dir", str(runs)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def _stage(state_file: Path) -> str | None:
    try:
        return json.loads(state_file.read_text())["stage"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_after_training_resumes_without_training_twice(tmp_path: Path) -> None:
    directory = tmp_path / "codreamer" / "models" / "kill-test"
    child = _start(tmp_path)
    deadline = time.monotonic() + 600
    try:
        while _stage(directory / STATE_FILE) not in ("trained", "evaluated") and child.poll() is None:
            assert time.monotonic() < deadline, "the loop never reached the trained stage"
            time.sleep(0.05)
        assert child.poll() is None, "the loop finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    records, _ = read_history(directory / "iterations.jsonl")
    assert records == []  # killed before the iteration was committed
    assert (directory / "checkpoints" / "0001").is_dir()

    again = _start(tmp_path)
    assert again.wait(600) == 0
    records, skipped = read_history(directory / "iterations.jsonl")
    assert skipped == 0 and [(r["iteration"], r["step"]) for r in records] == [(1, 1)]
    log = (directory / "run.log").read_text()
    assert "was trained before the interruption" in log
    assert not (directory / "checkpoints" / "0002").exists()
    assert json.loads((directory / "run.json").read_text())["status"] == "finished"

"""Kill the learning loop with SIGKILL at random points, restart it, compare with an uninterrupted run.

    uv run python scripts/kill_resume_check.py --iterations 2 --kills 3 --seed 0

Runs `learn-loop` twice with the same seed and settings under a fresh runs directory:
once straight through (the reference), once killed with SIGKILL after a random delay and
restarted with the same command until it finishes. Then it compares, iteration by
iteration, what both histories recorded (iteration, step, scenarios, train and held-out
reward) and the final model step, and prints every difference. Exit status 0 when the
histories agree, 1 otherwise.

Extra flags after `--` go to both learn-loop commands (default: a small, fast configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "codreamer_state.json"  # codreamer.pipeline.state.STATE_FILE (not imported: it imports ART)

SMALL = [
    "--group-size", "2", "--scenarios-per-step", "1", "--max-turns", "2", "--max-tokens", "16",
    "--eval-scenarios", "1", "--eval-samples", "1", "--no-wandb", "--warm-start", "off", "--no-eval-before-train",
]  # fmt: skip
ENTRY = "from codreamer.cli import learn_loop_main; raise SystemExit(learn_loop_main())"
COMPARED = ("iteration", "step", "scenarios", "train/reward_mean", "train/reward_std", "eval/reward_mean")


def _command(runs: Path, run_id: str, iterations: int, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", ENTRY, *extra, "--runs-dir", str(runs), "--run-id", run_id,
            "--iterations", str(iterations), "--seed", str(seed)]  # fmt: skip


def _run(command: list[str], log: Path, kill_after_s: float | None = None) -> tuple[int, float]:
    started = time.monotonic()
    with log.open("ab") as out:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**os.environ, "WANDB_MODE": "disabled"}
        )
        try:
            rc = child.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            rc = child.wait()
    return rc, time.monotonic() - started


def _history(runs: Path, run_id: str) -> list[dict[str, Any]]:
    path = runs / "codreamer" / "models" / run_id / "iterations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _stage(runs: Path, run_id: str) -> str:
    path = runs / "codreamer" / "models" / run_id / STATE_FILE
    try:
        state = json.loads(path.read_text())
        return f"iteration {state['iteration'] + 1} after '{state['stage']}'"
    except (OSError, ValueError, KeyError):
        return "no state yet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs before letting the run finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-seed", type=int, default=1, help="seed of the kill times")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("extra", nargs="*", help="flags for learn-loop (after --); default: a small configuration")
    args = parser.parse_args()
    extra = args.extra or SMALL
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="codreamer-kill-"))
    rng = random.Random(args.random_seed)
    log = runs / "kill_resume_check.log"
    runs.mkdir(parents=True, exist_ok=True)

    rc, reference_s = _run(_command(runs, "reference", args.iterations, args.seed, extra), log)
    if rc != 0:
        print(f"reference run failed (exit {rc}); see {log}")
        return 1
    print(f"reference run: {reference_s:.0f} s")

    command = _command(runs, "killed", args.iterations, args.seed, extra)
    for kill in range(1, args.kills + 1):
        delay = rng.uniform(0.15, 0.95) * reference_s
        rc, took = _run(command, log, kill_after_s=delay)
        print(f"kill {kill}: SIGKILL after {took:.0f} s (exit {rc}) at {_stage(runs, 'killed')}")
    rc, took = _run(command, log)
    print(f"final restart: exit {rc} after {took:.0f} s")

    reference, resumed = _history(runs, "reference"), _history(runs, "killed")
    differences = []
    if len(reference) != len(resumed):
        differences.append(f"iterations recorded: reference {len(reference)}, killed+resumed {len(resumed)}")
    for ref, res in zip(reference, resumed, strict=False):
        for key in COMPARED:
            a, b = ref.get(key), res.get(key)
            same = abs(a - b) <= 1e-9 if isinstance(a, float) and isinstance(b, float) else a == b
            if not same:
                differences.append(f"iteration {ref.get('iteration')}: {key} reference {a!r}, killed+resumed {b!r}")
    print(f"runs in {runs}")
    if differences:
        print("DIFFERENT:\n  " + "\n  ".join(differences))
        return 1
    print(f"SAME: {len(reference)} iterations, step {reference[-1]['step'] if reference else 0}, rewards identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the default loop make the agent better? The default `learn-loop` with several seeds.

    uv run python scripts/bench_learning.py                 # seeds 0 1 2, defaults
    uv run python scripts/bench_learning.py --seeds 0 -- --iterations 4   # extra flags after --

Runs `learn-loop` with its defaults (plus any flags after `--`) once per seed, each in a
fresh runs folder, as a subprocess so each run has the machine to itself, and prints per
seed: the held-out reward of the base model (step 0), of the warm start and of the final
policy, the paired difference final - base with its bootstrap 95% CI (same held-out
prospects and sampling seeds in both evaluations), the same for the warm start alone and
for RL on top of it (final - warm start), the rates of looking facts up and of
self-finalised / auto-finalised emails at the end, and the wall time. Time it on a quiet
machine: another CPU-bound job beside it slows the embedded model several-fold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENTRY = "from codreamer.cli import learn_loop_main; raise SystemExit(learn_loop_main())"


def _evals(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {
        int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in sorted((run_dir / "evals").glob("step_*.json"))
    }


def _paired(
    current: dict[str, Any], other: dict[str, Any], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean paired difference (same prospect and seed) and its percentile-bootstrap 95% CI."""
    import numpy as np

    diffs = []
    for pid, result in current["prospects"].items():
        before = other["prospects"].get(pid)
        if before is None:
            continue
        earlier = dict(zip(before["seeds"], before["rewards"], strict=True))
        diffs += [r - earlier[s] for s, r in zip(result["seeds"], result["rewards"], strict=True) if s in earlier]
    if len(diffs) < 2:
        return float("nan"), float("nan"), float("nan"), len(diffs)
    data = np.asarray(diffs)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(data.mean()), float(low), float(high), len(diffs)


def _row(label: str, diff: tuple[float, float, float, int]) -> str:
    mean, low, high, n = diff
    verdict = "excludes 0" if low > 0 or high < 0 else "includes 0"
    return f"    {label:<22} {mean:+.3f}  95% CI [{low:+.3f}, {high:+.3f}]  n={n}  ({verdict})"


def run_seed(seed: int, extra: list[str]) -> None:
    runs = Path(tempfile.mkdtemp(prefix=f"bench-learning-{seed}-"))
    command = [
        sys.executable,
        "-c",
        ENTRY,
        "--runs-dir",
        str(runs),
        "--run-id",
        f"seed{seed}",
        "--seed",
        str(seed),
        "--no-wandb",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    run_dir = runs / "codreamer" / "models" / f"seed{seed}"
    if done.returncode != 0:
        print(f"seed {seed}: learn-loop failed (exit {done.returncode}) after {wall:.0f}s; last lines:")
        print("\n".join(done.stderr.strip().splitlines()[-8:]))
        return
    evals = _evals(run_dir)
    warm = json.loads((run_dir / "warm_start.json").read_text()) if (run_dir / "warm_start.json").is_file() else None
    base, final = evals.get(0), evals[max(evals)]
    print(f"seed {seed}: wall {wall / 60:.1f} min, final step {final['step']}, run dir {run_dir}")
    for step, summary in sorted(evals.items()):
        total = summary["parts"].get("reward", {})
        rates = summary.get("behaviour", {})
        label = "base" if step == 0 else ("warm start" if warm and step == warm["step"] else "RL")
        print(
            f"    step {step:>2} {label:<10} reward {total.get('mean', float('nan')):.3f} "
            f"[{total.get('ci_low') or float('nan'):.3f}, {total.get('ci_high') or float('nan'):.3f}]  "
            f"looked up {rates.get('looked_up', float('nan')):.0%}  "
            f"self-finalised {rates.get('self_finalized', float('nan')):.0%}  "
            f"auto-finalised {rates.get('auto_finalized', float('nan')):.0%}"
        )
    if base is not None:
        print(_row("final - base", _paired(final, base)))
        if warm and warm["step"] in evals:
            print(_row("warm start - base", _paired(evals[warm["step"]], base)))
            if final["step"] != warm["step"]:
                print(_row("final - warm start (RL)", _paired(final, evals[warm["step"]])))
    if warm:
        print(
            f"    warm start: {warm['demos']} demos, {warm['seconds']:.0f}s, loss {warm['losses'][:1]} -> {warm['losses'][-1:]}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(ours)
    for seed in args.seeds:
        run_seed(seed, extra)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# GPU smoke test: CoDreamer's learning loop on ART's LocalBackend (unsloth training + vLLM
# inference) on this machine's CUDA GPU, a small Qwen model, two iterations; then the step
# reached, the rewards and the stage timings, read from the run's iterations.jsonl.
#
#   scripts/gpu_smoke.sh                                  # Qwen/Qwen2.5-0.5B-Instruct, 2 iterations
#   BASE_MODEL=Qwen/Qwen2.5-1.5B-Instruct ITERATIONS=3 scripts/gpu_smoke.sh --warm-start off
#
# Needs: Linux x86_64, an NVIDIA GPU whose driver runs CUDA 13 (>= 580; the GPU set's torch is
# PyPI's CUDA 13.0 build), network access to PyPI, Hugging Face (the model) and, on the first
# start, GitHub + download.pytorch.org (ART installs its pinned vLLM runtime into a cache with
# uv: several GB, minutes). Extra arguments go to learn-loop. Settings come from .env as usual.
# Exit status: learn-loop's (2 before anything runs when the machine cannot run it).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_MODEL="${BASE_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
ITERATIONS="${ITERATIONS:-2}"
RUN_ID="${RUN_ID:-gpu-smoke-$(date -u +%Y%m%d-%H%M%S)}"
RUNS_DIR="${RUNS_DIR:-runs}"

say() { printf 'gpu_smoke: %s\n' "$*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    say "no working nvidia-smi: this needs a machine with an NVIDIA GPU and its driver"
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_smoke: GPU: /' >&2
cuda_major="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
if [ "${cuda_major:-0}" -lt 13 ]; then
    say "the driver supports CUDA ${cuda_major:-?}; the GPU set's torch 2.11.0 (PyPI) is a CUDA 13.0 build: update the driver to >= 580"
    exit 2
fi

if ! uv --version >/dev/null 2>&1; then  # `uv --version`, not `command -v uv`: a pyenv shim can exist and fail
    say "installing uv"
    python3 -m pip install --quiet --user uv
    export PATH="$HOME/.local/bin:$PATH"
fi

started=$(date +%s)
uv sync --locked --project scripts/gpu
installed=$(date +%s)
say "GPU set installed in $((installed - started)) s; running learn-loop (run $RUN_ID, $BASE_MODEL, $ITERATIONS iterations)"

status=0
uv run --no-sync --project scripts/gpu learn-loop \
    --backend local --base-model "$BASE_MODEL" --iterations "$ITERATIONS" \
    --run-id "$RUN_ID" --runs-dir "$RUNS_DIR" --no-wandb "$@" || status=$?
finished=$(date +%s)

uv run --no-sync --project scripts/gpu python - "$RUNS_DIR" "$RUN_ID" "$BASE_MODEL" <<'PY' || true
"""Print the run's step, rewards and stage timings from its iterations.jsonl (stdlib only)."""
import json
import math
import sys
from pathlib import Path

runs_dir, run_id, base_model = sys.argv[1:4]
found = sorted(Path(runs_dir).glob(f"*/models/{run_id}/iterations.jsonl"))
if not found:
    print(f"gpu_smoke: no iterations.jsonl for run {run_id} under {runs_dir}/ (no iteration completed)")
    sys.exit(0)
records = []
for line in found[0].read_text().splitlines():
    try:
        records.append(json.loads(line))
    except ValueError:
        pass


def num(value, fmt="{:.3f}"):
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


print(f"gpu_smoke: run {run_id} ({base_model}), {found[0]}")
for r in records:
    train = f"train reward {num(r.get('train/reward_mean'))} +- {num(r.get('train/reward_std'))} (n={num(r.get('train/reward_count'), '{:.0f}')})"
    held = ""
    if "eval/reward_mean" in r:
        held = f", held-out {num(r.get('eval/reward_mean'))} [{num(r.get('eval/reward_ci_low'))}, {num(r.get('eval/reward_ci_high'))}]"
        if "eval/delta_base" in r:
            held += f" (vs base {num(r.get('eval/delta_base'), '{:+.3f}')})"
    times = "  ".join(f"{k[5:-2]} {num(v, '{:.1f}')} s" for k, v in r.items() if k.startswith("time/") and k.endswith("_s"))
    print(f"  iteration {r.get('iteration')}  step {r.get('step')}: {train}{held}")
    print(f"    {times}")
last = records[-1] if records else {}
print(f"gpu_smoke: step reached {last.get('step', '-')} after {len(records)} iteration(s)")
PY
say "install $((installed - started)) s, learn-loop $((finished - installed)) s (model download, vLLM start, warm start and evaluations included)"
exit "$status"

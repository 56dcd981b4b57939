"""A rollout's second turn on the embedded sampler, with and without the prefix store.

Usage: `uv run python scripts/bench_prefix_store.py [--rows 8] [--repeats 3] [--new-tokens 48]`

Loads SmolLM2-135M-Instruct (the embedded default), samples a first turn for `--rows`
prompts that share a 300-token "system prompt" (as every rollout does), then samples the
second turn: each prompt + its completion + 60 new "tool result" tokens. Each repeat runs
both modes on the same weights and prompts, alternating which goes first:

* `store`: the first turn's keys/values are kept (`PrefixStore`), so the second turn
  prefills only the new tokens;
* `no store`: the second turn prefills its common prefix once and each row's rest.

Prints the second turn's wall time split into prefill and decoding (forward passes timed
by their input width), medians, and the ratio store / no store.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

SYSTEM_TOKENS, TOOL_RESULT_TOKENS = 300, 60


def run(args: argparse.Namespace) -> None:
    import torch

    from codreamer.backends.embedded.policy import GRPOConfig, Policy
    from codreamer.backends.embedded.weights import load_embedded_model
    from codreamer.config import Settings

    torch.set_num_threads(args.threads)
    base, tokenizer = load_embedded_model(Settings(wandb=False).model_cache_dir)
    policy = Policy(base, tokenizer, GRPOConfig())
    spent = {"prefill": 0.0, "decode": 0.0}
    forward = policy.model.forward

    def timed_forward(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = forward(*a, **kw)
        spent["prefill" if kw["input_ids"].shape[1] > 1 else "decode"] += time.perf_counter() - started
        return out

    policy.model.forward = timed_forward  # type: ignore[method-assign]
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40_000) for _ in range(n)]

    system = tokens(SYSTEM_TOKENS)
    first_turns = [system + tokens(rng.randrange(60, 140)) for _ in range(args.rows)]
    results: dict[str, list[tuple[float, float, float, float]]] = {"store": [], "no store": []}
    for repeat in range(args.repeats):
        for mode in ("store", "no store") if repeat % 2 == 0 else ("no store", "store"):
            policy.prefix_store.max_bytes = args.store_mb * 2**20 if mode == "store" else 0
            policy.prefix_store.clear()
            first = policy.sample(first_turns, args.new_tokens, 1.0, seed=1)
            second_turns = [
                p + s.token_ids + tokens(TOOL_RESULT_TOKENS) for p, s in zip(first_turns, first, strict=True)
            ]
            spent.update(prefill=0.0, decode=0.0)
            started = time.perf_counter()
            policy.sample(second_turns, args.new_tokens, 1.0, seed=2)
            wall = time.perf_counter() - started
            results[mode].append((wall, spent["prefill"], spent["decode"], wall - spent["prefill"] - spent["decode"]))

    prompt = statistics.fmean(len(p) for p in second_turns)
    print(
        f"\nSecond turn of {args.rows} rollouts (prompts ~{prompt:.0f} tokens, {args.new_tokens} new), medians of {args.repeats}:"
    )
    for mode, rows in results.items():
        wall, prefill, decode, other = (statistics.median(column) for column in zip(*rows, strict=True))
        print(
            f"  {mode:>8}: {wall:.2f} s; prefill {prefill:.2f} s, decoding {decode:.2f} s, other {other:.2f} s (medians each)"
        )
    ratio = statistics.median(r[0] for r in results["store"]) / statistics.median(r[0] for r in results["no store"])
    print(f"  store / no store (wall): {ratio:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="Rollouts in the batch (default: 8 = rollout_concurrency).")
    parser.add_argument("--new-tokens", type=int, default=48, help="New tokens per turn (default: max_tokens).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store-mb", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Profile one learning-loop iteration on the embedded backend (pyinstrument).

Usage: `uv run --group bench python scripts/profile_iteration.py [--out profile-iteration] [--group-size 4 ...]`

Opens a fresh run in a temporary runs directory with the default settings (flags override
the few that size an iteration), loads the model (not profiled), then profiles exactly one
`run_iteration`: generate -> score -> GRPO update -> evaluate -> log. Writes to `--out`:
`profile.html` and `profile.txt` (pyinstrument, the event-loop thread) and `summary.json`.

pyinstrument samples the thread it starts on, and the model runs in worker threads
(sampling batches and the training step are `anyio.to_thread` calls), so the script also
times every `Policy.sample` and `Policy.train_step` call (rows, tokens, seconds): together
they say where the iteration's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger


@dataclass
class PolicyCalls:
    """Wall time and sizes of the policy's calls during the profiled iteration."""

    sample_s: list[float] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_prompt_tokens: list[int] = field(default_factory=list)
    sample_new_tokens: list[int] = field(default_factory=list)
    sample_prefilled: list[int] = field(default_factory=list)  # positions the prefills computed
    train_s: list[float] = field(default_factory=list)
    train_sequences: list[int] = field(default_factory=list)
    train_tokens: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "sample_calls": len(self.sample_s),
            "sample_s_total": sum(self.sample_s),
            "sample_rows_mean": statistics.fmean(self.sample_rows) if self.sample_rows else 0.0,
            "sample_prompt_tokens_total": sum(self.sample_prompt_tokens),
            "sample_new_tokens_total": sum(self.sample_new_tokens),
            "sample_prefilled_positions_total": sum(self.sample_prefilled),
            "train_calls": len(self.train_s),
            "train_s_total": sum(self.train_s),
            "train_sequences": sum(self.train_sequences),
            "train_tokens_total": sum(self.train_tokens),
        }


def instrument_policy(calls: PolicyCalls) -> Callable[[], None]:
    """Wrap `Policy.sample` / `Policy.train_step` to record each call; returns the undo."""
    from codreamer.backends.embedded.policy import Policy

    original_sample, original_train = Policy.sample, Policy.train_step

    def sample(self: Policy, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        started, prefilled = time.perf_counter(), self.prefilled_positions
        samples = original_sample(self, prompts, *args, **kwargs)
        with calls.lock:
            calls.sample_prefilled.append(self.prefilled_positions - prefilled)
            calls.sample_s.append(time.perf_counter() - started)
            calls.sample_rows.append(len(prompts))
            calls.sample_prompt_tokens.append(sum(len(p) for p in prompts))
            calls.sample_new_tokens.append(sum(len(s.token_ids) for s in samples))
        return samples

    def train_step(self: Policy, sequences: list[Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        metrics = original_train(self, sequences, *args, **kwargs)
        with calls.lock:
            calls.train_s.append(time.perf_counter() - started)
            calls.train_sequences.append(len(sequences))
            calls.train_tokens.append(sum(s.length for s in sequences))
        return metrics

    Policy.sample, Policy.train_step = sample, train_step  # type: ignore[method-assign]

    def undo() -> None:
        Policy.sample, Policy.train_step = original_sample, original_train  # type: ignore[method-assign]

    return undo


def top_self_time(session: Any, limit: int = 15) -> list[dict[str, Any]]:
    """Functions of the event-loop thread by self time (pyinstrument frames, idle excluded)."""
    totals: dict[tuple[str, str], float] = defaultdict(float)

    def walk(frame: Any) -> None:
        if frame is None:
            return
        name = frame.function or frame.identifier
        if name not in ("[await]", "[self]", "[out-of-context]") or frame.children:
            totals[(name, f"{frame.file_path_short}:{frame.line_no}")] += frame.total_self_time
        for child in frame.children:
            walk(child)

    walk(session.root_frame())
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return [{"function": name, "where": where, "self_s": round(seconds, 3)} for (name, where), seconds in ranked]


async def profile_one_iteration(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from pyinstrument import Profiler

    from codreamer.config import Settings
    from codreamer.pipeline.iteration import run_iteration
    from codreamer.pipeline.run import open_run

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(runs_dir=Path(tempfile.mkdtemp(prefix="profile-iteration-")), wandb=False, **overrides)
    calls = PolicyCalls()
    undo = instrument_policy(calls)
    try:
        started = time.perf_counter()
        async with open_run(settings, "learn-loop") as run:
            await run.model.get_step()  # the backend (and the model) are loaded by now
            setup_s = time.perf_counter() - started
            profiler = Profiler(interval=0.005, async_mode="enabled")
            profiler.start()
            wall = time.perf_counter()
            record = await run_iteration(run, 1, evaluate_after=True)  # iterations are numbered from 1
            wall = time.perf_counter() - wall
            profiler.stop()
    finally:
        undo()
    session = profiler.last_session
    (out / "profile.html").write_text(profiler.output_html())
    (out / "profile.txt").write_text(profiler.output_text(unicode=False, color=False))
    summary = {
        "settings": {
            k: getattr(settings, k)
            for k in (
                "scenarios_per_step",
                "group_size",
                "eval_scenarios",
                "max_turns",
                "max_tokens",
                "rollout_concurrency",
                "prefix_store_mb",
            )
        },
        "setup_s": setup_s,
        "iteration_s": wall,
        "stages_s": {k.removeprefix("time/"): v for k, v in record.items() if k.startswith("time/")},
        "peak_rss_mb": record.get("peak_rss_mb"),
        "policy": calls.summary(),
        "event_loop_top_self_time": top_self_time(session),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    policy = summary["policy"]
    print(
        f"\nOne learning-loop iteration (embedded backend): {summary['iteration_s']:.1f} s "
        f"(setup before it, not profiled: {summary['setup_s']:.1f} s), peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    print("  settings: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()))
    print("  stages: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in summary["stages_s"].items()))
    print(
        f"  policy sampling: {policy['sample_calls']} batches, {policy['sample_rows_mean']:.1f} rows on average, "
        f"{policy['sample_prompt_tokens_total']} prompt + {policy['sample_new_tokens_total']} new tokens, "
        f"{policy['sample_s_total']:.1f} s (worker thread); the prefills computed "
        f"{policy['sample_prefilled_positions_total']} positions for those prompt tokens"
    )
    print(
        f"  GRPO step: {policy['train_calls']} call(s), {policy['train_sequences']} sequences, "
        f"{policy['train_tokens_total']} tokens, {policy['train_s_total']:.1f} s (worker thread)"
    )
    print("  event-loop thread, top self time:")
    for row in summary["event_loop_top_self_time"][:10]:
        print(f"    {row['self_s']:>7.3f} s  {row['function']}  ({row['where']})")
    print(f"profile: {out / 'profile.html'} and {out / 'profile.txt'}; numbers: {out / 'summary.json'}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/profile-iteration"), help="Folder for the profile files."
    )
    for name in (
        "scenarios_per_step", "group_size", "eval_scenarios", "max_turns", "max_tokens", "rollout_concurrency",
        "prefix_store_mb",
    ):  # fmt: skip
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None, help="Settings override.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from codreamer.log import configure_logging

    configure_logging()  # our sinks: no loguru variable dumps (diagnose off)
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    del args.out
    summary = asyncio.run(profile_one_iteration(args, out))
    print_summary(summary, out)
    logger.info("profile written to {}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One GRPO step on CPU: CoDreamer's embedded backend against TRL's `GRPOTrainer`.

Usage: `uv run --group bench python scripts/bench_grpo.py [--group-sizes 4 8] [--repeats 3] [--steps 1]`

Both sides start from the same SmolLM2-135M-Instruct weights (the embedded backend's cached
safetensors, loaded by the same function), fp32, LoRA r=16 / alpha=32 on the same seven
projections, the same prompts (the outreach agent's first prompt for the first scenarios of
the shipped task, with the tool descriptions, rendered by the embedded server's chat
format), `group size` completions of at most 64 new tokens at temperature 1, the same
deterministic reward function, AdamW at the same learning rate, gradient clipping at 1.0.

A "step" is what one learning-loop iteration asks of the backend for one group:
generation plus the GRPO update (ours: `Policy.sample` + reward + advantages +
`Policy.train_step`; TRL: one `Trainer` step, which generates with `model.generate`, scores,
and updates). TRL is configured to match ours: `beta=0` (no reference model, no KL term:
our loss has none), `loss_type="dapo"` (token-mean, as ours), one update per generation
(`num_iterations=1`, so the PPO ratio is 1 as ours), `per_device_train_batch_size = G` with
`num_generations = G` (one group per step), `use_cpu`, fp32 (`bf16=False`: bf16 is several
times slower on CPUs without AMX), no vLLM, and `gradient_checkpointing=False` (ours does
not recompute activations; `--trl-gradient-checkpointing` turns TRL's default back on).

Each measured configuration runs in a child process of its own, so its peak RSS (the
child's `ru_maxrss`) belongs to one implementation. A child loads the model (not timed),
runs one warm-up step (not timed), then `--steps` measured steps on different prompts.
Children alternate ours/TRL and swap the order on every repeat; the report gives medians
over all measured steps, the ratio ours/TRL of the medians (the number the goal is checked
on), the ratio within each back-to-back pair, and the largest peak RSS of each side. The
defaults (3 repeats of 1 step) take ~9 minutes on 2 idle cores; more repeats, rather than
more steps per child, are what keep one slow spell of a shared machine out of the median.
Timings on a shared machine are noisy: the CPU time of each step is reported beside the
wall time, and a quiet machine gives the numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

IMPLEMENTATIONS = ("ours", "trl")
LEARNING_RATE = 5e-5
GOAL_RATIO = 0.6


@dataclass
class ChildResult:
    """What one child process measured."""

    impl: str
    group_size: int
    repeat: int = 0
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)  # mean per completion, per step
    peak_rss_mb: float = 0.0
    load_s: float = 0.0
    threads: int = 0


# ------------------------------------------------------------------------ shared inputs
def distinct_word_reward(text: str) -> float:
    """The benchmark's reward: distinct words / (words + 1). Deterministic, cheap, and it
    varies across a group, so every step has non-zero advantages on both sides."""
    words = text.split()
    return len(set(words)) / (len(words) + 1)


def bench_prompts(count: int, tokenizer: Any) -> list[str]:
    """The agent's first prompt for the first `count` training scenarios (cycled), as text
    with the chat template applied, exactly as the embedded server renders it."""
    from codreamer.agent.prompts import initial_messages
    from codreamer.agent.tools import TOOLS
    from codreamer.backends.embedded.chat_format import to_chatml_messages
    from codreamer.config import REPO_DATA_DIR
    from codreamer.data import load_task_data

    task = load_task_data(REPO_DATA_DIR)
    scenarios = [task.train[i % len(task.train)] for i in range(count)]
    return [
        tokenizer.apply_chat_template(
            to_chatml_messages(initial_messages(s.prospect, task.product), TOOLS),
            add_generation_prompt=True,
            tokenize=False,
        )
        for s in scenarios
    ]


def load_model(cache_dir: Path) -> tuple[Any, Any, float]:
    from codreamer.backends.embedded.weights import load_embedded_model

    started = time.perf_counter()
    model, tokenizer = load_embedded_model(cache_dir)
    return model, tokenizer, time.perf_counter() - started


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- our side
def run_ours(args: argparse.Namespace) -> ChildResult:
    """Warm-up + `args.steps` steps of CoDreamer's embedded policy (sample, score, train)."""
    from codreamer.backends.embedded.grpo import group_advantages
    from codreamer.backends.embedded.policy import GRPOConfig, Policy, TrainSequence

    base, tokenizer, load_s = load_model(args.cache_dir)
    config = GRPOConfig(
        learning_rate=LEARNING_RATE, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, seed=args.seed
    )
    policy = Policy(base, tokenizer, config)
    prompts = [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in bench_prompts(args.steps + 1, tokenizer)
    ]
    result = ChildResult("ours", args.group_size, load_s=load_s)

    def step(index: int) -> float:
        prompt = prompts[index]
        seeds = [args.seed * 1000 + index * args.group_size + row for row in range(args.group_size)]
        samples = policy.sample([prompt] * args.group_size, args.max_new_tokens, 1.0, seeds)
        rewards = [distinct_word_reward(tokenizer.decode(s.token_ids, skip_special_tokens=True)) for s in samples]
        sequences = [
            TrainSequence(prompt, s.token_ids, a) for s, a in zip(samples, group_advantages(rewards), strict=True)
        ]
        policy.train_step([s for s in sequences if s.completion_ids], LEARNING_RATE)
        return statistics.fmean(len(s.token_ids) for s in samples)

    for index in range(args.steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = step(index)
        if index == 0:
            continue  # warm-up
        result.step_s.append(time.perf_counter() - wall)
        result.step_cpu_s.append(time.process_time() - cpu)
        result.completion_tokens.append(tokens)
    result.peak_rss_mb = peak_rss_mb()
    return result


# ---------------------------------------------------------------------------- TRL side
def run_trl(args: argparse.Namespace) -> ChildResult:
    """Warm-up + `args.steps` steps of TRL's GRPOTrainer, configured like ours (module docstring)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from codreamer.backends.embedded.policy import LORA_TARGETS

    model, tokenizer, load_s = load_model(args.cache_dir)
    result = ChildResult("trl", args.group_size, load_s=load_s)
    dataset = Dataset.from_list([{"prompt": text} for text in bench_prompts(args.steps + 1, tokenizer)])

    class StepClock(TrainerCallback):
        """Wall and CPU time between consecutive step ends; the first step is the warm-up."""

        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None
            self.step = 0

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.last = (time.perf_counter(), time.process_time())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            now = (time.perf_counter(), time.process_time())
            if self.step > 0 and self.last is not None:
                result.step_s.append(now[0] - self.last[0])
                result.step_cpu_s.append(now[1] - self.last[1])
            self.last, self.step = now, self.step + 1

        def on_log(
            self, _args: Any, state: Any, _control: Any, logs: dict[str, float] | None = None, **__: Any
        ) -> None:
            if logs and "completions/mean_length" in logs and state.global_step > 1:
                result.completion_tokens.append(float(logs["completions/mean_length"]))

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [distinct_word_reward(text) for text in completions]

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            max_steps=args.steps + 1,
            per_device_train_batch_size=args.group_size,
            num_generations=args.group_size,
            gradient_accumulation_steps=1,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=args.trl_gradient_checkpointing,
            shuffle_dataset=False,
            seed=args.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StepClock()],
        )
        trainer.train()
    result.peak_rss_mb = peak_rss_mb()
    return result


# ------------------------------------------------------------------------------ parent
def run_child(impl: str, group_size: int, repeat: int, args: argparse.Namespace) -> ChildResult:
    """Run one configuration in a fresh interpreter and read its JSON line."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        "--group-size",
        str(group_size),
        "--steps",
        str(args.steps),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--lora-rank",
        str(args.lora_rank),
        "--seed",
        str(args.seed),
        "--cache-dir",
        str(args.cache_dir),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.trl_gradient_checkpointing:
        command.append("--trl-gradient-checkpointing")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.child_timeout_s, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} G={group_size} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return ChildResult(**{**json.loads(lines[-1]), "repeat": repeat})


def schedule(group_sizes: Sequence[int], repeats: int) -> list[tuple[int, str, int]]:
    """(repeat, impl, G): ours and TRL back to back for each G, swapping who goes first on
    every repeat, so a slow spell of a shared machine tends to hit both of a pair."""
    plan = []
    for repeat in range(repeats):
        order = IMPLEMENTATIONS if repeat % 2 == 0 else IMPLEMENTATIONS[::-1]
        plan += [(repeat, impl, g) for g in group_sizes for impl in order]
    return plan


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: list[ChildResult], group_sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for g in group_sizes:
        row: dict[str, Any] = {"group_size": g}
        for impl in IMPLEMENTATIONS:
            mine = [r for r in results if r.impl == impl and r.group_size == g]
            row[impl] = {
                "step_s_median": median([t for r in mine for t in r.step_s]),
                "step_cpu_s_median": median([t for r in mine for t in r.step_cpu_s]),
                "steps": sum(len(r.step_s) for r in mine),
                "completion_tokens_mean": statistics.fmean(
                    [t for r in mine for t in r.completion_tokens] or [float("nan")]
                ),
                "peak_rss_mb_max": max((r.peak_rss_mb for r in mine), default=float("nan")),
                "step_s_all": [round(t, 3) for r in mine for t in r.step_s],
            }
        row["ratio_wall"] = row["ours"]["step_s_median"] / row["trl"]["step_s_median"]
        row["ratio_cpu"] = row["ours"]["step_cpu_s_median"] / row["trl"]["step_cpu_s_median"]
        row["pair_ratios"] = pair_ratios([r for r in results if r.group_size == g])
        rows.append(row)
    return rows


def pair_ratios(results: list[ChildResult]) -> list[float]:
    """ours/TRL within each repeat (the two runs were back to back), one ratio per repeat."""
    by_repeat: dict[int, dict[str, ChildResult]] = {}
    for result in results:
        by_repeat.setdefault(result.repeat, {})[result.impl] = result
    return [
        round(median(pair["ours"].step_s) / median(pair["trl"].step_s), 3)
        for _, pair in sorted(by_repeat.items())
        if len(pair) == 2
    ]


def print_table(rows: list[dict[str, Any]], threads: int) -> None:
    print(f"\nGRPO step on CPU ({threads} torch threads): generation + update, medians over measured steps")
    print(
        f"{'G':>3} | {'ours s':>7} {'TRL s':>7} {'ours/TRL':>8} | {'ours cpu':>8} {'TRL cpu':>8} {'ratio':>6} | "
        f"{'ours RSS':>9} {'TRL RSS':>9} | tokens ours/TRL"
    )
    for row in rows:
        ours, trl = row["ours"], row["trl"]
        print(
            f"{row['group_size']:>3} | {ours['step_s_median']:>7.2f} {trl['step_s_median']:>7.2f} {row['ratio_wall']:>8.2f} | "
            f"{ours['step_cpu_s_median']:>8.2f} {trl['step_cpu_s_median']:>8.2f} {row['ratio_cpu']:>6.2f} | "
            f"{ours['peak_rss_mb_max']:>6.0f} MB {trl['peak_rss_mb_max']:>6.0f} MB | "
            f"{ours['completion_tokens_mean']:.1f}/{trl['completion_tokens_mean']:.1f}"
        )
    for row in rows:
        print(
            f"G={row['group_size']} step times (s): ours {row['ours']['step_s_all']}  TRL {row['trl']['step_s_all']}; "
            f"ours/TRL per back-to-back pair {row['pair_ratios']}"
        )


def check_goal(rows: list[dict[str, Any]]) -> bool:
    """The issue's goal: ours/TRL <= 0.6 at the largest group size, with peak RSS no higher."""
    row = max(rows, key=lambda r: r["group_size"])
    ok = row["ratio_wall"] <= GOAL_RATIO and row["ours"]["peak_rss_mb_max"] <= row["trl"]["peak_rss_mb_max"]
    print(
        f"goal at G={row['group_size']}: ours/TRL {row['ratio_wall']:.2f} (<= {GOAL_RATIO}), peak RSS "
        f"{row['ours']['peak_rss_mb_max']:.0f} vs {row['trl']['peak_rss_mb_max']:.0f} MB: {'met' if ok else 'NOT met'}"
    )
    return ok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from codreamer.config import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="Child runs per implementation and group size.")
    parser.add_argument("--steps", type=int, default=1, help="Measured steps per child (after one warm-up step).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default).")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off to match ours.")
    parser.add_argument("--cache-dir", type=Path, default=Settings.model_fields["model_cache_dir"].default)
    parser.add_argument("--child-timeout-s", type=float, default=900.0)
    parser.add_argument("--json-out", type=Path, default=None, help="Also write the raw results and summary here.")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--group-size", type=int, default=8, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_main(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    runner: Callable[[argparse.Namespace], ChildResult] = run_ours if args.child == "ours" else run_trl
    result = runner(args)
    result.threads = torch.get_num_threads()
    print(json.dumps(asdict(result)), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from codreamer.log import configure_logging

    configure_logging()  # our sinks: no loguru variable dumps (diagnose off)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    results = []
    for repeat, impl, group_size in schedule(args.group_sizes, args.repeats):
        started = time.perf_counter()
        result = run_child(impl, group_size, repeat, args)
        logger.info(
            "{} G={}: steps {} s, peak RSS {:.0f} MB ({:.0f} s in all)",
            impl,
            group_size,
            [round(t, 2) for t in result.step_s],
            result.peak_rss_mb,
            time.perf_counter() - started,
        )
        results.append(result)
    rows = summarise(results, args.group_sizes)
    print_table(rows, results[0].threads)
    ok = check_goal(rows)
    if args.json_out:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": [asdict(r) for r in results],
            "summary": rows,
        }
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

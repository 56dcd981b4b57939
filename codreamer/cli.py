"""Entry points: `learn-loop`, `train` and `codreamer <verb>`.

`learn-loop` and `train` take every setting as a flag (`--help` lists them with their
defaults); the same names work as `CODREAMER_*` environment variables or in `.env`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

import anyio
from loguru import logger
from pydantic import ValidationError
from pydantic_settings import SettingsError

from codreamer.config import Settings
from codreamer.log import configure_logging


def _parse_settings(prog: str, description: str, argv: Sequence[str] | None) -> Settings:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return Settings(_cli_parse_args=args, _cli_prog_name=prog, _cli_settings_source=None)  # type: ignore[call-arg]
    except (ValidationError, SettingsError) as exc:
        raise SystemExit(f"{prog}: invalid settings:\n{exc}") from None


def _quiet_library_noise() -> None:
    """peft calls a transformers API that warns on every model wrap; it is not ours to fix."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _run(main: object, settings: Settings) -> int:
    configure_logging()
    _quiet_library_noise()
    from codreamer.tracking import init_tracking

    init_tracking(settings)  # before the first op runs, so an untraced run stays quiet
    try:
        anyio.run(main)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        logger.warning("interrupted; the last completed iteration and its checkpoint are kept")
        return 130
    except Exception as exc:  # a clear last line instead of only a traceback
        logger.opt(exception=exc).error("{}: {}", type(exc).__name__, exc)
        return 1
    return 0


def learn_loop_main(argv: Sequence[str] | None = None) -> int:
    """Run the learning loop: iterations of generate, score, GRPO update, evaluate, log."""
    settings = _parse_settings("learn-loop", learn_loop_main.__doc__ or "", argv)
    from codreamer.pipeline.loop import run_learning_loop

    return _run(lambda: run_learning_loop(settings.iterations, settings.run_id, settings), settings)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Plain training: epochs over the training scenarios, then a held-out evaluation."""
    settings = _parse_settings("train", train_main.__doc__ or "", argv)
    from codreamer.pipeline.loop import run_training

    return _run(lambda: run_training(settings), settings)


def _cmd_runs(settings: Settings, _args: argparse.Namespace) -> int:
    from codreamer.pipeline.history import read_history
    from codreamer.runs import ITERATIONS_FILE, RUN_FILE, list_runs

    runs = list_runs(settings)
    if not runs:
        print(f"no runs under {settings.runs_dir}")
        return 0
    print(f"{'run id':<28} {'kind':<10} {'status':<11} {'iters':>5} {'last reward':>11} {'eval':>6}")
    for path in runs:
        meta = json.loads((path / RUN_FILE).read_text())
        records, _ = read_history(path / ITERATIONS_FILE)
        last = records[-1] if records else {}
        reward = last.get("train/reward_mean")
        evaluation = last.get("eval/reward_mean")
        print(
            f"{meta['run_id']:<28} {meta['kind']:<10} {meta['status']:<11} {len(records):>5} "
            f"{'-' if reward is None else f'{reward:.3f}':>11} {'-' if evaluation is None else f'{evaluation:.3f}':>6}"
        )
    return 0


def _cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.pipeline.history import read_history
    from codreamer.runs import ITERATIONS_FILE, RUN_FILE, find_run

    try:
        path = find_run(settings, args.run_id)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    meta = json.loads((path / RUN_FILE).read_text())
    records, skipped = read_history(path / ITERATIONS_FILE)
    print(f"run {meta['run_id']} ({meta['kind']}, {meta['status']}) in {path}")
    for record in records:
        evaluation = record.get("eval/reward_mean")
        print(
            f"  iter {record['iteration']:>3} step {record['step']:>3} reward {record['train/reward_mean']:.3f}"
            f" ±{record['train/reward_std']:.3f}" + ("" if evaluation is None else f" eval {evaluation:.3f}")
        )
    if skipped:
        print(f"  ({skipped} unreadable history lines skipped)")
    return 0


def _cmd_trace(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.local_trace import format_tree, read_trace
    from codreamer.runs import find_run

    try:
        path = find_run(settings, args.run_id)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    spans = read_trace(path)
    if not spans:
        print(f"no trace recorded in {path}")
        return 0

    def wanted(root: dict) -> bool:  # run_iteration records its 0-based index; users count from 1
        return args.iteration is None or root["inputs"].get("iteration") == args.iteration - 1

    print(format_tree(spans, wanted) or f"no iteration {args.iteration} in the trace")
    return 0


def codreamer_main(argv: Sequence[str] | None = None) -> int:
    """Other verbs: list runs, show one run's history."""
    parser = argparse.ArgumentParser(prog="codreamer", description=codreamer_main.__doc__)
    parser.add_argument("--runs-dir", help="where runs are (default: settings / CODREAMER_RUNS_DIR)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("runs", help="list runs with status, iterations and last rewards")
    show = verbs.add_parser("show", help="print one run's per-iteration history")
    show.add_argument("run_id")
    trace = verbs.add_parser("trace", help="print the call tree of a run's iterations with timings")
    trace.add_argument("run_id")
    trace.add_argument("--iteration", type=int, help="only this iteration (1-based)")
    args = parser.parse_args(argv)
    settings = Settings() if args.runs_dir is None else Settings(runs_dir=args.runs_dir)
    handlers = {"runs": _cmd_runs, "show": _cmd_show, "trace": _cmd_trace}
    return handlers[args.verb](settings, args)

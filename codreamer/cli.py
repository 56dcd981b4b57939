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
from pathlib import Path

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


def _with_run_id(settings: Settings) -> Settings:
    """Fix the run id up front, so tracking and the loop name the same run."""
    from codreamer.runs import new_run_id

    return settings if settings.run_id else settings.model_copy(update={"run_id": new_run_id()})


def _quiet_library_noise() -> None:
    """peft calls a transformers API that warns on every model wrap; it is not ours to fix."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _run(main: object, settings: Settings) -> int:
    configure_logging()
    _quiet_library_noise()
    from codreamer.runs import RUN_FILE, run_dir
    from codreamer.tracking import init_tracking

    # Before the first op runs, so that the Weave tree starts at the loop itself; the loop's
    # own init_tracking call for this run id gets the same session back.
    directory = run_dir(settings, settings.run_id)  # type: ignore[arg-type]
    init_tracking(settings, directory, settings.run_id, (directory / RUN_FILE).is_file())
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
    settings = _with_run_id(_parse_settings("learn-loop", learn_loop_main.__doc__ or "", argv))
    from codreamer.pipeline.loop import run_learning_loop

    return _run(lambda: run_learning_loop(settings.iterations, settings.run_id, settings), settings)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Plain training: epochs over the training scenarios, then a held-out evaluation."""
    settings = _with_run_id(_parse_settings("train", train_main.__doc__ or "", argv))
    from codreamer.pipeline.loop import run_training

    return _run(lambda: run_training(settings), settings)


def _find_run(settings: Settings, run_id: str) -> Path | None:
    """The run's directory, or None after printing "no run ... (recent runs: ...)" to stderr."""
    from codreamer.runs import find_run

    try:
        return find_run(settings, run_id)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return None


def _cmd_runs(settings: Settings, _args: argparse.Namespace) -> int:
    from codreamer.reports import run_summary
    from codreamer.runs import list_runs

    runs = list_runs(settings)
    if not runs:
        print(f"no runs under {settings.runs_dir}")
        return 0

    def num(value: object, fmt: str = ".3f") -> str:
        return "-" if not isinstance(value, int | float) else format(value, fmt)

    print(f"{'run id':<28} {'kind':<10} {'status':<11} {'iters':>5} {'step':>4} {'train':>6} {'eval':>6} {'best (step)':>12}")
    for path in runs:
        summary = run_summary(path)
        best = "-" if summary.get("best_score") is None else f"{summary['best_score']:.3f} ({summary['best_step']})"
        print(
            f"{summary['run_id']:<28} {summary.get('kind') or '-':<10} {summary.get('status') or '-':<11} "
            f"{summary['iterations']:>5} {num(summary.get('step'), 'd'):>4} {num(summary.get('last_train_reward')):>6} "
            f"{num(summary.get('last_eval_reward')):>6} {best:>12}"
        )
    return 0


def _cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.reports import write_run_report
    path = _find_run(settings, args.run_id)
    if path is None:
        return 2
    report, chart = write_run_report(path)
    print(f"report: {report}")
    print(f"chart:  {chart}")
    return 0


def _cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.pipeline.history import read_history
    from codreamer.runs import ITERATIONS_FILE, RUN_FILE

    path = _find_run(settings, args.run_id)
    if path is None:
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
    path = _find_run(settings, args.run_id)
    if path is None:
        return 2
    spans = read_trace(path)
    if not spans:
        print(f"no trace recorded in {path}")
        return 0

    def wanted(root: dict) -> bool:  # run_iteration records its 0-based index; users count from 1
        return args.iteration is None or root["inputs"].get("iteration") == args.iteration - 1

    print(format_tree(spans, wanted) or f"no iteration {args.iteration} in the trace")
    return 0


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.events.cli_commands import cmd_ingest

    return cmd_ingest(settings.resolved_events_path(), Path(args.file))


def _cmd_serve_events(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.events.cli_commands import cmd_serve_events

    secret = settings.events_secret.get_secret_value() if settings.events_secret is not None else None
    return cmd_serve_events(settings.resolved_events_path(), secret, args.host, args.port)


def _cmd_analyze(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.analysis.commands import cmd_analyze
    from codreamer.runs import models_root

    return cmd_analyze(models_root(settings), args.run_id, args.last, settings.analyzer_judge_config())


def codreamer_main(argv: Sequence[str] | None = None) -> int:
    """Other verbs: list runs, show a run's history or trace, ingest outcomes, analyse failures."""
    parser = argparse.ArgumentParser(prog="codreamer", description=codreamer_main.__doc__)
    parser.add_argument("--runs-dir", help="where runs are (default: settings / CODREAMER_RUNS_DIR)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("runs", help="list runs with status, step, last rewards and best held-out score")
    show = verbs.add_parser("show", help="print one run's per-iteration history")
    show.add_argument("run_id")
    report = verbs.add_parser("report", help="write a run's Markdown summary and reward-curve PNG into its directory")
    report.add_argument("run_id")
    trace = verbs.add_parser("trace", help="print the call tree of a run's iterations with timings")
    trace.add_argument("run_id")
    trace.add_argument("--iteration", type=int, help="only this iteration (1-based)")
    ingest = verbs.add_parser(
        "ingest", help="append online outcomes (opened/replied/...) from a JSONL or CSV export to the event log"
    )
    ingest.add_argument("file", help="a .jsonl or .csv file of outcome events")
    serve = verbs.add_parser(
        "serve-events", help="receive outcome events over HTTP (HMAC-signed with CODREAMER_EVENTS_SECRET)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8787, help="port (default: 8787)")
    analyze = verbs.add_parser(
        "analyze", help="write a failure report and category chart for a run (default: the latest) or the last N runs"
    )
    analyze.add_argument("run_id", nargs="?", help="the run to analyse (default: the most recent)")
    analyze.add_argument("--last", type=int, help="analyse patterns across the last N runs instead")
    args = parser.parse_args(argv)
    settings = Settings() if args.runs_dir is None else Settings(runs_dir=args.runs_dir)
    handlers = {
        "runs": _cmd_runs,
        "show": _cmd_show,
        "trace": _cmd_trace,
        "report": _cmd_report,
        "ingest": _cmd_ingest,
        "serve-events": _cmd_serve_events,
        "analyze": _cmd_analyze,
    }
    return handlers[args.verb](settings, args)

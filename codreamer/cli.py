"""Entry points: `learn-loop`, `train` and `codreamer <verb>`.

`learn-loop` and `train` take every setting as a flag (`--help` lists them with their
defaults); the same names work as `CODREAMER_*` environment variables or in `.env`.
Secrets (`WANDB_API_KEY`, `CODREAMER_JUDGE_API_KEY`, `CODREAMER_EVENTS_SECRET`) are read from
the environment or `.env` only: as flags they would show in `ps`, in shell history and in W&B's
run metadata, so they are refused.

A user error (a bad setting or file, a backend this machine cannot run, a corrupt run file:
`codreamer.errors.UserError`) ends with one line on stderr and exit status 2 (usage) or 1;
its traceback goes to the run's `run.log` only, when the run has a directory.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
from loguru import logger
from pydantic import ValidationError
from pydantic_settings import SettingsError

from codreamer.config import Settings
from codreamer.errors import UsageError, UserError, cli_flag, describe_settings_error, env_name, is_secret_field, one_line
from codreamer.log import configure_logging, current_log_file


def secret_flags() -> dict[str, str]:
    """`{--flag: ENV_NAME}` of every secret setting (the flags that are refused)."""
    return {cli_flag(name): env_name(name) for name in Settings.model_fields if is_secret_field(name)}


def refuse_secret_flags(args: Sequence[str]) -> None:
    """UsageError for a secret given as a flag (`--wandb-api-key`, `--judge_api_key=...`, any case)."""
    flags = secret_flags()
    for arg in args:
        if arg == "--":
            break
        name = arg.split("=", 1)[0].lower().replace("_", "-")
        if arg.startswith("--") and name in flags:
            env = flags[name]
            raise UsageError(
                f"{name} is not accepted on the command line (it would show in `ps`, shell history and W&B's "
                f"run metadata); set {env} in the environment, or put a line {env}=... in .env"
            )


def settings_from(**values: object) -> Settings:
    """Settings from the environment and .env (plus `values`); a bad one is a one-line UsageError."""
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {describe_settings_error(exc)}; fix the environment variable or the line in .env") from None
    except SettingsError as exc:
        raise UsageError(f"invalid settings: {one_line(exc)}") from None


def _parse_settings(prog: str, description: str, argv: Sequence[str] | None) -> Settings:
    args = list(sys.argv[1:] if argv is None else argv)
    refuse_secret_flags(args)
    try:
        return Settings(_cli_parse_args=args, _cli_prog_name=prog, _cli_settings_source=None, _cli_exit_on_error=False)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise UsageError(
            f"invalid settings: {describe_settings_error(exc)}; fix the flag, the environment variable or the line in .env"
        ) from None
    except SettingsError as exc:  # an unknown flag, a flag without its value...
        raise UsageError(f"{one_line(exc).removeprefix('error parsing CLI: ')} (see {prog} --help)") from None


def _fail(prog: str, exc: BaseException, log_file: Path | None = None) -> int:
    """Print ONE line for `exc` on stderr; its traceback goes to `log_file` (run.log) only.

    A user error needs no traceback. Anything else is a bug: with a run.log the traceback is
    there (the line says so), without one it is printed, so that it is not lost.
    """
    from loguru import logger

    user = isinstance(exc, UserError)
    message = str(exc) if user else f"{type(exc).__name__}: {exc}"
    has_log = log_file is not None and current_log_file() == log_file
    if has_log:
        logger.opt(exception=exc).debug("{} failed: {}", prog, one_line(message))  # DEBUG: run.log only
    elif not user:
        traceback.print_exception(exc)
    where = f" (details in {log_file})" if has_log and not user else ""
    print(f"{prog}: error: {one_line(message)}{where}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, UserError) else 1


def _guarded(prog: str, body: Callable[[], int]) -> int:
    """Run an entry point's body with logging set up; user errors become one line + exit status."""
    configure_logging()
    try:
        return body()
    except UserError as exc:
        return _fail(prog, exc)
    except KeyboardInterrupt:  # Ctrl-C outside the loop (imports, ingest, a report): one line too
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _with_run_id(settings: Settings) -> Settings:
    """Fix the run id up front, so tracking and the loop name the same run."""
    from codreamer.runs import new_run_id

    return settings if settings.run_id else settings.model_copy(update={"run_id": new_run_id()})


def _quiet_library_noise() -> None:
    """peft calls a transformers API that warns on every model wrap; it is not ours to fix."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _run(prog: str, main: object, settings: Settings) -> int:
    _quiet_library_noise()
    from codreamer.backends.factory import check_backend_available
    from codreamer.runs import LOG_FILE, RUN_FILE, run_dir
    from codreamer.tracking import init_tracking

    directory = run_dir(settings, settings.run_id)  # type: ignore[arg-type]  # refuses ids that escape
    check_backend_available(settings)  # `--backend local` on a CPU machine: one line, nothing written
    # Before the first op runs, so that the Weave tree starts at the loop itself; the loop's
    # own init_tracking call for this run id gets the same session back.
    init_tracking(settings, directory, settings.run_id, (directory / RUN_FILE).is_file())
    try:
        anyio.run(main)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        logger.warning("interrupted; the last completed iteration and its checkpoint are kept")
        return 130
    except Exception as exc:  # one clear last line; the traceback is in run.log
        return _fail(prog, exc, directory / LOG_FILE)
    return 0


def learn_loop_main(argv: Sequence[str] | None = None) -> int:
    """Run the learning loop: iterations of generate, score, GRPO update, evaluate, log."""

    def body() -> int:
        settings = _with_run_id(_parse_settings("learn-loop", learn_loop_main.__doc__ or "", argv))
        from codreamer.pipeline.loop import run_learning_loop

        return _run("learn-loop", lambda: run_learning_loop(settings.iterations, settings.run_id, settings), settings)

    return _guarded("learn-loop", body)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Plain training: epochs over the training scenarios, then a held-out evaluation."""

    def body() -> int:
        settings = _with_run_id(_parse_settings("train", train_main.__doc__ or "", argv))
        from codreamer.pipeline.loop import run_training

        return _run("train", lambda: run_training(settings), settings)

    return _guarded("train", body)


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
    from codreamer.runs import ITERATIONS_FILE, read_run_file

    path = _find_run(settings, args.run_id)
    if path is None:
        return 2
    meta = read_run_file(path)  # RunFileError: one line naming the file
    records, skipped = read_history(path / ITERATIONS_FILE)
    print(f"run {meta.get('run_id', path.name)} ({meta.get('kind', '?')}, {meta.get('status', '?')}) in {path}")
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
    return cmd_serve_events(settings.resolved_events_path(), secret, args.host, args.port, settings.events_tolerance_s)


def _cmd_analyze(settings: Settings, args: argparse.Namespace) -> int:
    from codreamer.analysis.analyzer import AnalyzerJudgeConfig
    from codreamer.analysis.commands import cmd_analyze
    from codreamer.runs import models_root

    return cmd_analyze(models_root(settings), args.run_id, args.last, AnalyzerJudgeConfig.from_settings(settings))


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
        "serve-events",
        help="receive outcome events over HTTP (timestamp + body HMAC-signed with CODREAMER_EVENTS_SECRET, 32+ bytes)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8787, help="port (default: 8787)")
    analyze = verbs.add_parser(
        "analyze", help="write a failure report and category chart for a run (default: the latest) or the last N runs"
    )
    analyze.add_argument("run_id", nargs="?", help="the run to analyse (default: the most recent)")
    analyze.add_argument("--last", type=int, help="analyse patterns across the last N runs instead")
    args = parser.parse_args(argv)
    handlers = {
        "runs": _cmd_runs,
        "show": _cmd_show,
        "trace": _cmd_trace,
        "report": _cmd_report,
        "ingest": _cmd_ingest,
        "serve-events": _cmd_serve_events,
        "analyze": _cmd_analyze,
    }

    def body() -> int:
        settings = settings_from() if args.runs_dir is None else settings_from(runs_dir=args.runs_dir)
        return handlers[args.verb](settings, args)

    return _guarded("codreamer", body)

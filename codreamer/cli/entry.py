"""The console scripts: `learn-loop`, `train` and `codreamer <command>`, and how they fail.

`learn-loop` and `train` are `codreamer learn-loop` and `codreamer train` under a name of
their own. A user error (`codreamer.errors.UserError`) ends with one line on stderr and exit
status 2 (usage) or 1; its traceback goes to the run's `run.log` only, when the run has a
directory.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import anyio
from loguru import logger
from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_settings import CliSubCommand

from codreamer.cli.parsing import (
    DESCRIPTIONS,
    kebab_flags,
    known_flags,
    parse_flags,
    parse_training_args,
    refuse_secret_flags,
    settings_from,
    training_model,
    training_settings,
)
from codreamer.cli.verbs import VERBS, Verb
from codreamer.config import COMMANDS, Command, Settings
from codreamer.errors import UsageError, UserError, one_line
from codreamer.log import configure_logging, current_log_file


def _fail(prog: str, exc: BaseException, log_file: Path | None = None) -> int:
    """Print ONE line for `exc` on stderr; its traceback goes to `log_file` (run.log) only.

    A user error needs no traceback. Anything else is a bug: with a run.log the traceback is
    there (the line says so), without one it is printed, so that it is not lost.
    """
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


def _run(prog: str, main: Callable[[], Awaitable[Any]], settings: Settings) -> int:
    """Run `main` (the loop) once the run id is safe and the backend can run here."""
    _quiet_library_noise()
    from codreamer.backends.factory import check_backend_available
    from codreamer.runs import LOG_FILE, run_dir

    directory = run_dir(settings, settings.run_id)  # type: ignore[arg-type]  # refuses ids that escape
    check_backend_available(settings)  # `--backend local` on a CPU machine: one line, nothing written
    try:
        anyio.run(main)
    except KeyboardInterrupt:
        logger.warning("interrupted; the last completed iteration and its checkpoint are kept")
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure of the run: one clear last line, the traceback in run.log
        return _fail(prog, exc, directory / LOG_FILE)
    return 0


def _train(prog: str, command: Command, flags: dict[str, Any]) -> int:
    """Build the settings of `learn-loop` / `train` and run it."""
    settings = _with_run_id(training_settings(command, flags))
    from codreamer.pipeline.loop import run_learning_loop, run_training

    if command == "learn-loop":
        return _run(prog, lambda: run_learning_loop(settings.iterations, settings.run_id, settings), settings)
    return _run(prog, lambda: run_training(settings), settings)


def learn_loop_main(argv: Sequence[str] | None = None) -> int:
    """Run the learning loop: iterations of generate, score, GRPO update, evaluate, log."""
    return _guarded("learn-loop", lambda: _train("learn-loop", "learn-loop", parse_training_args("learn-loop", argv)))


def train_main(argv: Sequence[str] | None = None) -> int:
    """Plain training: epochs over the training scenarios, then a held-out evaluation."""
    return _guarded("train", lambda: _train("train", "train", parse_training_args("train", argv)))


class _Root(BaseModel):
    """Options before the command."""

    runs_dir: Path | None = Field(
        default=None, description="where runs are; unset: the runs_dir setting (CODREAMER_RUNS_DIR, .env, or runs)"
    )


def _subcommand(model: type[BaseModel]) -> Any:
    """`CliSubCommand[model]` for a model known at run time only."""
    return CliSubCommand[model]  # type: ignore[misc, valid-type]


@cache
def codreamer_model() -> type[BaseModel]:
    """The `codreamer` command line: `--runs-dir`, then one command (`learn-loop`, `train`, the verbs)."""
    commands: dict[str, Any] = {}
    for command in COMMANDS:
        commands[command.replace("-", "_")] = (
            _subcommand(training_model(command)),
            Field(description=DESCRIPTIONS[command]),
        )
    for name, verb in VERBS.items():
        summary = (verb.__doc__ or "").strip().splitlines()[0]
        commands[name.replace("-", "_")] = (_subcommand(verb), Field(description=summary))
    return create_model(
        "Codreamer",
        __base__=_Root,
        __doc__="Train and evaluate the agent, look at runs, ingest outcomes, analyse failures.\n\n"
        "`codreamer <command> --help` lists the flags of one command.",
        **commands,
    )


def _dispatch(values: dict[str, Any]) -> int:
    """Run the command `values` (the parsed `codreamer` command line) names."""
    runs_dir = values.pop("runs_dir", None)
    chosen = {name.replace("_", "-"): flags for name, flags in values.items() if flags is not None}
    if not chosen:
        raise UsageError(f"a command is required: {', '.join([*COMMANDS, *VERBS])} (see codreamer --help)")
    name, flags = next(iter(chosen.items()))
    if name in COMMANDS:
        if runs_dir is not None:
            flags.setdefault("runs_dir", runs_dir)
        return _train("codreamer", name, flags)
    verb = _verb(VERBS[name], flags)
    settings = settings_from() if runs_dir is None else settings_from(runs_dir=runs_dir)
    return verb.run(settings)


def _verb(model: type[Verb], flags: dict[str, Any]) -> Verb:
    """The verb's arguments, validated (a bad one: one line naming its flag)."""
    try:
        return model.model_validate(flags)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else model.name
        raise UsageError(f"{model.name} {where}: {error['msg']}, got {error.get('input')!r}") from None


def codreamer_main(argv: Sequence[str] | None = None) -> int:
    """`codreamer <command>`: learn-loop, train, runs, show, report, trace, ingest, serve-events, analyze."""

    def body() -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        refuse_secret_flags(args)  # any command: a secret must not reach argparse's error line either
        model = codreamer_model()
        commands = [training_model(command) for command in COMMANDS]
        known = known_flags([model, *commands, *VERBS.values()])
        return _dispatch(parse_flags(model, kebab_flags(args, known), "codreamer"))

    return _guarded("codreamer", body)

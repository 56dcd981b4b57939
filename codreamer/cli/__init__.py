"""Entry points: `codreamer <command>`, and `learn-loop` / `train` (the same two commands).

    codreamer learn-loop [--config FILE] [flags]   the learning loop (also: learn-loop ...)
    codreamer train [--config FILE] [flags]        plain training (also: train ...)
    codreamer runs | show RUN_ID | report RUN_ID | trace RUN_ID [--iteration N]
    codreamer ingest FILE | serve-events [--host H] [--port P] | analyze [RUN_ID] [--last N]

Every command is a pydantic model (pydantic-settings builds the parser and `--help`), so each
`--help` lists that command's flags only. Settings come from, highest first: flags,
environment variables, the `--config` file (TOML or YAML), `.env`, defaults (see
`codreamer.config`). Flags take kebab-case or snake_case. Secrets (`WANDB_API_KEY`,
`CODREAMER_JUDGE_API_KEY`, `CODREAMER_EVENTS_SECRET`) are read from the environment or `.env`
only: as flags they would show in `ps`, in shell history and in W&B's run metadata, so they are
refused, and so they are in a config file.

A user error (a bad setting or file, a backend this machine cannot run, a corrupt run file:
`codreamer.errors.UserError`) ends with one line on stderr and exit status 2 (usage) or 1;
its traceback goes to the run's `run.log` only, when the run has a directory.
"""

from codreamer.cli.entry import codreamer_main, learn_loop_main, train_main
from codreamer.cli.parsing import _parse_settings, refuse_secret_flags, secret_flags, settings_from

__all__ = [
    "_parse_settings",
    "codreamer_main",
    "learn_loop_main",
    "refuse_secret_flags",
    "secret_flags",
    "settings_from",
    "train_main",
]

"""From a command line to validated values: one parser (pydantic-settings), one validation (`Settings`).

Each command is a pydantic model whose fields are its flags (`CliSettingsSource` builds the
argparse parser and `--help` from it). The flags of `learn-loop` and `train` are generated from
`Settings` (`training_model`): `Settings` stays the one place of defaults and descriptions, and
a field marked `LearnLoopOnly` / `TrainOnly` is a flag of that command only. The parser only
says which flags were given; `Settings` validates them, together with the environment, the
config file and `.env` (`codreamer.config.layered_settings`), so a bad value reads the same
wherever it came from.

Before parsing, a secret given as a flag is refused (it would show in `ps`, shell history and
W&B's run metadata) and snake_case flags are respelled kebab-case (`--learning_rate` ->
`--learning-rate`, as sweep tools write them).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_settings import CliSettingsSource, SettingsError

from codreamer.config import COMMANDS, Command, Settings, command_fields, command_of, layered_settings
from codreamer.errors import UsageError, cli_flag, describe_settings_error, env_name, is_secret_field, one_line

PRECEDENCE = """\
Settings come from, highest first: these flags, environment variables (CODREAMER_<NAME>,
WANDB_*), the --config file (TOML or YAML), a .env file, the defaults shown below.
Flags take kebab-case or snake_case (--learning-rate or --learning_rate). Secrets
(WANDB_API_KEY, CODREAMER_JUDGE_API_KEY, CODREAMER_EVENTS_SECRET) come from the
environment or .env only."""

DESCRIPTIONS: dict[Command, str] = {
    "learn-loop": "Run the learning loop: iterations of generate, score, GRPO update, evaluate, log.",
    "train": "Plain training: epochs over the training scenarios, then a held-out evaluation.",
}


class TrainingCommand(BaseModel):
    """Base of the generated `learn-loop` / `train` models (their fields: `Settings`' flags)."""

    command: ClassVar[Command]


@cache
def training_model(command: Command) -> type[TrainingCommand]:
    """The flags of `command`: `--config` and the non-secret settings it takes, with `Settings`' defaults."""
    fields: dict[str, Any] = {
        "config": (
            Path | None,
            Field(
                default=None,
                description="TOML (.toml) or YAML (.yaml, .yml) file of settings: snake_case or kebab-case keys, "
                "one value each; flags and environment variables override it, it overrides .env.",
            ),
        )
    }
    for name in command_fields(command):
        if not is_secret_field(name):  # refused as flags; CliSuppress hides them from --help too
            info = Settings.model_fields[name]
            fields[name] = (info.annotation, Field(default=info.default, description=info.description))
    model = create_model(
        command.replace("-", "_").title().replace("_", ""),
        __base__=TrainingCommand,
        __doc__=f"{DESCRIPTIONS[command]}\n\n{PRECEDENCE}",
        **fields,
    )
    model.command = command
    return model


def known_flags(models: Iterable[type[BaseModel]]) -> set[str]:
    """Every `--flag` (and `--no-flag`) of `models`, kebab-case."""
    flags = set()
    for model in models:
        for name in model.model_fields:
            flags |= {cli_flag(name), "--no-" + cli_flag(name).removeprefix("--")}
    return flags


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


def kebab_flags(args: Sequence[str], known: set[str]) -> list[str]:
    """`args` with `--snake_case` flags respelled `--snake-case` when that is a known flag."""
    respelled: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return respelled + list(args[index:])
        name, eq, value = arg.partition("=")
        kebab = name.replace("_", "-")
        respelled.append(kebab + eq + value if name.startswith("--") and kebab in known else arg)
    return respelled


def parse_flags(model: type[BaseModel], args: Sequence[str], prog: str) -> dict[str, Any]:
    """The flags given in `args` (unvalidated, by field name); UsageError for an unknown or incomplete one.

    `--help` prints the model's help and raises SystemExit(0), as argparse does.
    """
    try:
        source: CliSettingsSource[Any] = CliSettingsSource(
            model,  # type: ignore[arg-type]  # a plain model: only its fields and docstring are read
            cli_prog_name=prog,
            cli_parse_args=list(args),
            cli_kebab_case=True,
            cli_implicit_flags=True,
            cli_exit_on_error=False,
        )
        return dict(source())
    except SettingsError as exc:  # an unknown flag, a flag without its value...
        message = one_line(exc).removeprefix("error parsing CLI: ")
        command = getattr(model, "command", None) or next((arg for arg in args if arg in COMMANDS), None)
        raise UsageError(f"{message}{_other_command_hint(args, command)} (see {prog} --help)") from None


def _other_command_hint(args: Sequence[str], command: str | None) -> str:
    """'; --epochs is a flag of `train` only' when `command` was given a flag of the other one."""
    for arg in args:
        name = arg.partition("=")[0].removeprefix("--").replace("-", "_")
        owner = command_of(name) if arg.startswith("--") and name in Settings.model_fields else None
        if command is not None and owner not in (None, command):
            return f"; {cli_flag(name)} is a flag of `{owner}` only"
    return ""


def parse_training_args(command: Command, argv: Sequence[str] | None, prog: str | None = None) -> dict[str, Any]:
    """The flags of a `learn-loop` / `train` command line (secrets refused, snake_case respelled)."""
    args = list(sys.argv[1:] if argv is None else argv)
    refuse_secret_flags(args)
    model = training_model(command)
    return parse_flags(model, kebab_flags(args, known_flags([model])), prog or command)


def training_settings(command: Command, flags: Mapping[str, Any]) -> Settings:
    """`Settings` from the given flags, the environment, the `--config` file and `.env` (highest first)."""
    from codreamer.cli.config_file import read_config_file

    flags = dict(flags)
    config = flags.pop("config", None)
    file_values = read_config_file(Path(config), command) if config is not None else None
    try:
        return layered_settings(flags, file_values)
    except ValidationError as exc:
        where = f", the key in {config}" if config is not None else ""
        raise UsageError(
            f"invalid settings: {describe_settings_error(exc)}; fix the flag, the environment variable{where} or the line in .env"
        ) from None
    except SettingsError as exc:
        raise UsageError(f"invalid settings: {one_line(exc)}") from None


def _parse_settings(prog: str, description: str, argv: Sequence[str] | None) -> Settings:
    """The settings of a `learn-loop` / `train` command line (`description` is kept for old callers)."""
    command: Command = "train" if prog.endswith("train") else "learn-loop"
    return training_settings(command, parse_training_args(command, argv, prog))


def settings_from(**values: object) -> Settings:
    """Settings from the environment and .env (plus `values`); a bad one is a one-line UsageError."""
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UsageError(
            f"invalid settings: {describe_settings_error(exc)}; fix the environment variable or the line in .env"
        ) from None
    except SettingsError as exc:
        raise UsageError(f"invalid settings: {one_line(exc)}") from None

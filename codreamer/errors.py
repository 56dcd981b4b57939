"""Errors a user can fix, and how the entry points print them.

A `UserError` is a problem with what the user gave (a setting, a file, this machine), not a
bug: the command line prints its message as ONE line on stderr (no traceback; that goes to
the run's `run.log` when a run directory exists) and exits with `exit_code`: 2 for usage
errors (a setting or flag, a backend this machine cannot run), 1 for the rest (a corrupt or
unreadable file).
"""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A problem the user can fix; the message names the file or setting and what to do."""

    exit_code = 1


class UsageError(UserError):
    """A bad setting or flag (exit status 2, like argparse)."""

    exit_code = 2


def one_line(text: object) -> str:
    """`text` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(text).split())


def describe_settings_error(exc: ValidationError) -> str:
    """A settings ValidationError as one line: `field (ENV / --flag): problem, got 'value'; ...`.

    Secret fields never show their input.
    """
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        name = loc[0] if loc else ""
        where = name
        if name in _settings_fields():
            where = (
                f"{name} ({env_name(name)} / {cli_flag(name)})"
                if not is_secret_field(name)
                else f"{name} ({env_name(name)})"
            )
        message = str(error["msg"]).removeprefix("Value error, ")
        shown = ""
        if not is_secret_field(name) and "input" in error and _short_repr(error["input"]) not in message:
            shown = f", got {_short_repr(error['input'])}"
        parts.append(f"{where}: {message}{shown}" if where else f"{message}{shown}")
    return one_line("; ".join(parts))


def _settings_fields() -> set[str]:
    from codreamer.config import Settings

    return set(Settings.model_fields)


def env_name(name: str) -> str:
    """The environment variable of a setting: its upper-case alias (WANDB_API_KEY) or CODREAMER_<NAME>."""
    from codreamer.config import Settings

    field = Settings.model_fields[name]
    aliases = getattr(field.validation_alias, "choices", None) or []
    upper = [a for a in aliases if isinstance(a, str) and a.isupper()]
    return upper[0] if upper else f"CODREAMER_{name.upper()}"


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_secret_field(name: str) -> bool:
    from codreamer.config import Settings

    field = Settings.model_fields.get(name)
    return field is not None and "SecretStr" in str(field.annotation)


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

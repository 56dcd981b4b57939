"""`--config FILE`: the settings of a `learn-loop` / `train` run, read from a TOML or YAML file.

The format follows the extension (`.toml`, `.yaml`, `.yml`). The file maps setting names
(snake_case or kebab-case, as the flags) to single values; relative paths in it are relative
to the working directory, as with flags. Flags and environment variables override it, it
overrides `.env` (`codreamer.config.layered_settings`).

Every problem is one `UsageError` line naming the file: missing, a directory, unreadable, not
UTF-8, malformed (with the parser's line), not a mapping, an unknown key (with a "did you
mean"), a setting of the other command, a secret (those come from the environment or `.env`
only: a config file gets committed and shared), or a value that is not a single value.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from codreamer.config import Command, Settings, command_of
from codreamer.errors import UsageError, env_name, is_secret_field

FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
_SCALARS = (str, int, float, bool)


def read_config_file(path: Path, command: Command) -> dict[str, Any]:
    """The settings `path` gives to `command`, keyed by field name (UsageError on any problem)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(
            f"config file {path}: unknown format {path.suffix or '(no extension)'!r}; use a .toml, .yaml or .yml file"
        )
    data = _parse(path, kind, _read_text(path))
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: must map setting names to values, found a {type(data).__name__}")
    return _settings_of(path, command, data)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def _parse(path: Path, kind: str, text: str) -> object:
    """The file's data; a syntax error names the line (tomllib puts it in its message)."""
    if kind == "TOML":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path}: not valid TOML: {exc}") from None
    import yaml  # PyYAML: installed with transformers, wandb and huggingface-hub

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise UsageError(f"config file {path}: not valid YAML{where}: {problem}") from None


def _settings_of(path: Path, command: Command, data: dict[Any, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = _field_name(path, command, key)
        if name in spelled:
            raise UsageError(f"config file {path}: {spelled[name]!r} and {key!r} are the same setting; keep one")
        if not isinstance(value, _SCALARS) and value is not None:
            raise UsageError(f"config file {path}: {key!r} must be a single value, not a {type(value).__name__}")
        spelled[name] = str(key)
        values[name] = value
    return values


def _field_name(path: Path, command: Command, key: object) -> str:
    """The setting `key` names (snake_case or kebab-case), or a UsageError saying what is wrong."""
    name = key.replace("-", "_") if isinstance(key, str) else ""
    if name not in Settings.model_fields:
        raise UsageError(
            f"config file {path}: unknown setting {key!r}{_did_you_mean(key)}; `{command} --help` lists them"
        )
    if is_secret_field(name):
        env = env_name(name)
        raise UsageError(
            f"config file {path}: {key!r} is a secret and is not read from a config file (files get committed and shared); "
            f"set {env} in the environment, or put a line {env}=... in .env"
        )
    owner = command_of(name)
    if owner not in (None, command):
        raise UsageError(f"config file {path}: {key!r} is a setting of `{owner}` only, not of `{command}`")
    return name


def _did_you_mean(key: object) -> str:
    if not isinstance(key, str):
        return ""
    kebab = "-" in key
    names = [n.replace("_", "-") if kebab else n for n in Settings.model_fields if not is_secret_field(n)]
    close = difflib.get_close_matches(key.lower(), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

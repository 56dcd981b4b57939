"""What tracking changes process-wide, kept in one place: environment switches and open sessions.

W&B and Weave read their switches from the environment, and Weave can be initialised only
once per process, so some state outlives a run: the variables this package set (with their
first value, so a user's own setting is never overwritten), the Weave project initialised,
and the open session of each run (so that opening a run twice returns the same session).
All of it is in `STATE`; tests reset it by replacing `STATE` with a fresh `ProcessState()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from codreamer.tracking.modes import Mode, truthy

if TYPE_CHECKING:
    from codreamer.tracking.session import TrackingSession


@dataclass
class ProcessState:
    """The process-wide part of tracking (see the module docstring)."""

    sessions: dict[tuple[str, str], TrackingSession] = field(default_factory=dict)
    owned_env: dict[str, str | None] = field(default_factory=dict)  # variables we changed, with their first value
    weave_project: str | None = None  # the project Weave was initialised with in this process


STATE = ProcessState()


def set_env(name: str, value: str | None) -> None:
    STATE.owned_env.setdefault(name, os.environ.get(name))
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def weave_disabled_by_user() -> bool:
    return "WEAVE_DISABLED" not in STATE.owned_env and truthy(os.environ.get("WEAVE_DISABLED"))


def set_weave_disabled(disabled: bool) -> None:
    """WEAVE_DISABLED makes every op a plain call (and keeps Weave's 'not initialised' line quiet)."""
    if weave_disabled_by_user():
        return
    if disabled:
        set_env("WEAVE_DISABLED", "true")
    elif "WEAVE_DISABLED" in STATE.owned_env:
        set_env("WEAVE_DISABLED", STATE.owned_env["WEAVE_DISABLED"])


def prepare_environment(mode: Mode) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode != "online":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb's Sentry is a network call
        # wandb.init starts Weave itself whenever weave is imported (it always is here), and
        # Weave without a key asks for one on the terminal: offline, it must not start at all.
        os.environ["WANDB_DISABLE_WEAVE"] = "true"

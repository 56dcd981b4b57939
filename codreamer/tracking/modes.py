"""Which mode a run records in, decided from the settings alone (the table in `codreamer.tracking`).

Nothing here starts a library or reads the network: the decision is what the settings ask
for, and an online decision may still degrade to offline when the run is opened.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from codreamer.config import Settings

Mode = Literal["online", "offline", "disabled"]


@dataclass(frozen=True)
class ModeDecision:
    """What the settings ask for, before anything is started (online may still degrade)."""

    mode: Mode
    weave: bool
    reason: str
    degraded: bool = False


def truthy(value: str | None) -> bool:
    """An environment switch as the libraries read them: 1/true/yes/on, any case."""
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def has_key(settings: Settings) -> bool:
    return settings.wandb_api_key is not None and bool(settings.wandb_api_key.get_secret_value().strip())


def choose_mode(settings: Settings, *, weave_disabled: bool = False) -> ModeDecision:
    """The mode table of the package docstring; `weave_disabled` is the user's WEAVE_DISABLED."""
    if not settings.wandb:
        return ModeDecision("disabled", False, "--no-wandb")
    if settings.wandb_mode == "disabled":
        return ModeDecision("disabled", False, "WANDB_MODE=disabled")
    if settings.wandb_mode == "offline":
        return ModeDecision("offline", False, "WANDB_MODE=offline")
    if not has_key(settings):
        if settings.wandb_mode == "online":
            return ModeDecision("offline", False, "WANDB_MODE=online but no WANDB_API_KEY", degraded=True)
        return ModeDecision("offline", False, "no WANDB_API_KEY")
    if weave_disabled:
        return ModeDecision("online", False, "WANDB_API_KEY set; WEAVE_DISABLED is set")
    return ModeDecision("online", True, "WANDB_API_KEY set")


def wandb_run_id(project: str, run_id: str) -> str:
    """A W&B run id that is the same every time this CoDreamer run is opened (and resumed)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")[:48] or "run"
    digest = hashlib.sha256(f"{project}\0{run_id}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"

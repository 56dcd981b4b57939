"""Resumable loop state: where an interrupted run stopped, down to the stage.

After every completed stage the loop writes `codreamer_state.json` atomically (temporary
file, fsync, rename), and the outputs a later stage needs (the scored groups, the training result) as a
work file of the iteration, also atomically. A run started again with the same `--run-id`
reads both and continues with the first stage that did not complete:

    started -> generated -> scored -> trained -> evaluated -> (history record) committed

Iterations are numbered from 1, here as in the history (`iterations.jsonl`), the reports,
W&B, the logs and the trace: the state's `iteration` is the number of the iteration in
progress (after iteration N is committed, N + 1 at `started`), and its work files are
`work/iter_NNNN/`. A state written before this convention (no `version` key) counted from 0
and is converted when read (`_upgrade`), the only conversion there is; 0 is what comes
before the first iteration (the base model's evaluation, the warm start).

The file is ours alone: ART keeps its own `state.json` in the same model directory (`model.log`
-> `merge_state` re-writes it, not atomically, with its metrics-builder state), so sharing it
lost ART's cumulative metrics at our next write and put our resume state at the mercy of ART's
writes. A run whose resume state is still in the old shared `state.json` is migrated on
resume: our keys move to `codreamer_state.json`, ART's keys stay where ART reads them.

The history (`iterations.jsonl`) stays the source of truth for committed iterations: a
record there means the iteration is done whatever the state file says (a kill between the
record and the state write). `trained` is the only stage with a side effect outside the run
directory's files (the checkpoint, saved atomically by the backend before the state says
`trained`), so a resumed run never trains an iteration twice: either the checkpoint of that
step exists and the state says so, or the step is trained again from the previous one.

Changing settings that shape training on resume is refused unless forced (`--force-resume`):
`config_fingerprint` lists those settings and `changed_settings` names the differences.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import art
from loguru import logger
from openai.types.chat.chat_completion import Choice
from pydantic import BaseModel, Field, ValidationError

from codreamer.config import Settings, resume_free_fields
from codreamer.runs import RunFileError, read_json_file
from codreamer.storage import write_json_atomic

STATE_FILE = "codreamer_state.json"
LEGACY_STATE_FILE = "state.json"
"""Where the state was kept before: ART's own state file (`art.Model.merge_state`)."""
WORK_DIR = "work"
STATE_VERSION = 2
"""Version 1 (no `version` key) counted iterations from 0; read back, it is converted (`_upgrade`)."""

Stage = Literal["started", "generated", "scored", "trained", "evaluated"]
STAGE_ORDER: tuple[Stage, ...] = ("started", "generated", "scored", "trained", "evaluated")

#: Settings that may change between a run and its resume without changing what is trained:
#: the fields marked `ResumeFree` in `codreamer.config`.
RESUME_FREE_SETTINGS = resume_free_fields()


class RunStateError(RunFileError):
    """The resume state file cannot be read; the message names it and what to do."""


class RunState(BaseModel):
    """What `codreamer_state.json` holds: the last completed stage of the iteration in progress."""

    run_id: str
    iteration: int = Field(
        ge=0, description="Number (from 1) of the iteration in progress: the next one after a commit."
    )
    stage: Stage
    step: int = Field(ge=0, description="The model step after the stage.")
    seed: int
    config_hash: str
    events_offset: int | None = Field(default=None, description="Bytes of the event log read so far.")
    updated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    version: int = Field(default=STATE_VERSION, description="2: iterations numbered from 1 (1: from 0).")

    def reached(self, stage: Stage) -> bool:
        return stage_reached(self.stage, stage)


def stage_reached(current: Stage, wanted: Stage) -> bool:
    """Whether a run whose last completed stage is `current` has completed `wanted`."""
    return STAGE_ORDER.index(current) >= STAGE_ORDER.index(wanted)


def config_fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that shape what is trained (everything but `RESUME_FREE_SETTINGS`)."""
    dumped = settings.model_dump(mode="json", exclude=set(RESUME_FREE_SETTINGS))
    return {k: v for k, v in sorted(dumped.items()) if k in Settings.model_fields}


def config_hash(settings: Settings) -> str:
    payload = json.dumps(config_fingerprint(settings), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def changed_settings(recorded: dict[str, Any], settings: Settings) -> dict[str, tuple[Any, Any]]:
    """`{name: (recorded, now)}` for fingerprint settings that differ from a run's `run.json`."""
    now = config_fingerprint(settings)
    return {
        name: (recorded.get(name), value) for name, value in now.items() if name in recorded and recorded[name] != value
    }


def load_state(run_dir: Path) -> RunState | None:
    """The run's resume state (migrating one left in ART's `state.json`), or None when there is none.

    RunStateError (one line, with the path) when the file is corrupt. An ART `state.json` that
    a kill during ART's (non-atomic) write left unreadable is set aside first (`set_aside_broken_art_state`).
    """
    set_aside_broken_art_state(run_dir)
    path = run_dir / STATE_FILE
    if not path.is_file():
        return _migrate_legacy_state(run_dir)
    remedy = "delete it to restart the interrupted iteration from the history"
    try:
        return RunState.model_validate(_upgrade(read_json_file(path, "the resume state", remedy)))
    except RunFileError as exc:
        raise RunStateError(str(exc)) from None
    except ValidationError as exc:  # written atomically, so only a hand edit gets here
        problem = "; ".join(
            f"field {'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise RunStateError(f"{path}: the resume state is invalid ({problem}); {remedy}") from None


def _upgrade(data: Any) -> Any:
    """A state of version 1 (iterations from 0) as version 2 (from 1): the one conversion there is."""
    if isinstance(data, dict) and "version" not in data and isinstance(data.get("iteration"), int):
        return {**data, "iteration": data["iteration"] + 1, "version": STATE_VERSION}
    return data


def set_aside_broken_art_state(run_dir: Path) -> Path | None:
    """Rename an unreadable ART `state.json` to `state.json.broken-<time>`; return the new path.

    ART writes it with a plain `open("w")`, so a kill during `model.log` can leave it empty or
    cut; ART's next `model.log` would then fail on it and stop the resumed run. Set aside, ART
    starts its cumulative metrics afresh (a warning says so) and the run goes on.
    """
    path = run_dir / LEGACY_STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        if isinstance(json.loads(text), dict):
            return None
    except ValueError:
        pass
    target = path.with_name(f"{path.name}.broken-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    logger.warning(
        "{}: ART's state file is unreadable (a kill during ART's write?); moved to {}, ART restarts its cumulative metrics",
        path,
        target.name,
    )
    return target


def _migrate_legacy_state(run_dir: Path) -> RunState | None:
    """Move our keys out of ART's `state.json` (a run started before the files were split).

    The old file holds our RunState keys, and perhaps ART's (its metrics-builder state, merged
    in by `model.log`). Ours go to `codreamer_state.json`; the rest stays in `state.json` for
    ART (the file is removed when nothing is left). A `state.json` without our keys is ART's
    and is left alone.
    """
    legacy = run_dir / LEGACY_STATE_FILE
    if not legacy.is_file():
        return None
    try:
        data = json.loads(legacy.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # ART's file, and not ours to judge
    ours = set(RunState.model_fields)
    required = {name for name, field in RunState.model_fields.items() if field.is_required()}
    if not isinstance(data, dict) or not required <= data.keys():
        return None
    try:
        state = RunState.model_validate(_upgrade({k: v for k, v in data.items() if k in ours}))
    except ValueError:
        return None
    save_state(run_dir, state)
    rest = {k: v for k, v in data.items() if k not in ours}
    if rest:
        write_json_atomic(legacy, rest)
    else:
        os.unlink(legacy)
    logger.info("moved the resume state from {} to {} (ART keeps {})", legacy.name, STATE_FILE, legacy.name)
    return state


def save_state(run_dir: Path, state: RunState) -> None:
    write_json_atomic(run_dir / STATE_FILE, state.model_dump(mode="json"))


# --------------------------------------------------------------------------- work files


def work_dir(run_dir: Path, iteration: int) -> Path:
    """The work files of iteration number `iteration` (from 1; version 1 states named them the same)."""
    return run_dir / WORK_DIR / f"iter_{iteration:04d}"


def clear_work(run_dir: Path, keep_iteration: int | None = None) -> None:
    """Remove work files of finished iterations (all but `keep_iteration`)."""
    root = run_dir / WORK_DIR
    if not root.is_dir():
        return
    keep = work_dir(run_dir, keep_iteration).name if keep_iteration is not None else None
    for folder in root.iterdir():
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _dump_trajectory(trajectory: art.Trajectory) -> dict[str, Any]:
    """JSON of a trajectory that remembers which items are `Choice`s (pydantic would not)."""
    items = trajectory.messages_and_choices
    return {
        "trajectory": trajectory.model_dump(mode="json", exclude={"messages_and_choices", "additional_histories"}),
        "items": [item.model_dump(mode="json") if isinstance(item, Choice) else item for item in items],
        "choices": [i for i, item in enumerate(items) if isinstance(item, Choice)],
    }


def _load_trajectory(data: dict[str, Any]) -> art.Trajectory:
    choices = set(data["choices"])
    items = [Choice.model_validate(item) if i in choices else item for i, item in enumerate(data["items"])]
    return art.Trajectory(messages_and_choices=items, **data["trajectory"])


def dump_groups(groups: list[art.TrajectoryGroup]) -> list[dict[str, Any]]:
    return [
        {
            "metadata": group.metadata,
            "metrics": group.metrics,
            "logs": group.logs,
            "exceptions": [e.model_dump(mode="json") for e in group.exceptions],
            "trajectories": [_dump_trajectory(t) for t in group.trajectories],
        }
        for group in groups
    ]


def load_groups(data: list[dict[str, Any]]) -> list[art.TrajectoryGroup]:
    from art.trajectories import PydanticException

    return [
        art.TrajectoryGroup(
            [_load_trajectory(t) for t in group["trajectories"]],
            exceptions=[PydanticException.model_validate(e) for e in group["exceptions"]],
            metadata=group["metadata"],
            metrics=group["metrics"],
            logs=group["logs"],
        )
        for group in data
    ]


def save_work(run_dir: Path, iteration: int, name: str, payload: Any) -> None:
    write_json_atomic(work_dir(run_dir, iteration) / f"{name}.json", payload)


def load_work(run_dir: Path, iteration: int, name: str) -> Any | None:
    path = work_dir(run_dir, iteration) / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))

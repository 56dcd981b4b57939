"""The `Failure` record and where a run keeps it: the failures table and one file per failed version.

Storage, per run directory (`runs/<project>/models/<run_id>/`):

- ``failures.jsonl``: the table, one `Failure` per line (a durable locked append through
  `codreamer.storage`). A failure is stored exactly once per `failure_id`: `FailureStore`
  loads the ids already in the table when it opens and skips every later duplicate.
- ``failures/<scenario_id>/<iteration:04d>-<failure_id>.json``: each failed version as its own
  file, so one folder holds the lineage of every failed attempt at one scenario, in order.
  The file is written (atomically) before the table line, so a crash in between only
  leaves a file that the next, identical store rewrites in place.

  Failures without a scenario (a training step that raised) go to ``failures/_<stage>/``.
  `FailureStore.lineage(scenario_id)` reads one scenario's versions back, oldest first,
  so the last failed attempt at a scenario is the last item.

`failure_id` is stable: sha256 of run id, iteration, the failure's key and its source, so
recording the same failure twice stores nothing new.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from pydantic import BaseModel, Field, field_validator

from codreamer.analysis.categories import FailureCategory, sort_categories
from codreamer.runs import FAILURES_FILE
from codreamer.storage import append_jsonl, read_jsonl, write_json_atomic

__all__ = [
    "FAILURES_DIR",
    "FAILURES_FILE",
    "Failure",
    "FailureSource",
    "FailureStore",
    "canonical_json",
    "failure_id",
    "load_failures",
    "path_part",
    "sha256_text",
]

FAILURES_DIR = "failures"

FailureSource = Literal["exception", "output", "judge", "outcome"]
""""exception": a rollout or a training step raised; "output": the episode finished but the
email broke a rule or scored low; "judge": RULER could not score a group; "outcome": no reply
within the outcome window."""

_UNSAFE_PATH_RE = re.compile(r"[^A-Za-z0-9._-]+")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    """One text per value (sorted keys, no spaces), for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def failure_id(run_id: str, iteration: int, key: str, source: str) -> str:
    """Stable id: sha256 of run id, iteration, key (trajectory id / exception index) and source; 20 hex."""
    return sha256_text(canonical_json([run_id, int(iteration), key, source]))[:20]


def path_part(value: str | None) -> str:
    """`value` as one safe folder name (unsafe characters as `_`, at most 120 characters)."""
    cleaned = _UNSAFE_PATH_RE.sub("_", value or "").strip("._")
    return cleaned[:120] or "_unknown"


class Failure(BaseModel):
    """One failed attempt: what went in, what came out, why it failed.

    `iteration` is the loop's iteration number as written in `iterations.jsonl` (its
    "iteration" key), `step` the model's training step.
    """

    failure_id: str
    run_id: str
    iteration: int
    step: int
    split: str = "train"
    scenario_id: str | None = None
    prospect_id: str | None = None
    trajectory_id: str | None = None
    input_hash: str
    output_hash: str
    input: list[Any] = Field(default_factory=list, description="The full message list (JSON-able).")
    output: str = Field(default="", description="Full email ('Subject: ...' + body) or the error text.")
    error_message: str | None = None
    agent_state: dict[str, Any] = Field(default_factory=dict)
    reward_parts: dict[str, float] = Field(default_factory=dict)
    reward: float | None = None
    category: FailureCategory
    categories: list[FailureCategory]
    source: FailureSource
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("categories")
    @classmethod
    def _ordered(cls, value: list[FailureCategory]) -> list[FailureCategory]:
        return sort_categories(value)

    def version_path(self, run_dir: Path) -> Path:
        """Where this failed version is stored as its own file (see the module docstring)."""
        return run_dir / FAILURES_DIR / self.lineage_folder / f"{self.iteration:04d}-{self.failure_id}.json"

    @property
    def lineage_folder(self) -> str:
        """The scenario's folder, or `_<stage>` (e.g. `_train`) for a failure without one."""
        if self.scenario_id:
            return path_part(self.scenario_id)
        return "_" + path_part(str(self.agent_state.get("stage") or self.source))


def load_failures(run_dir: Path) -> tuple[list[Failure], int]:
    """The failures table of a run: (failures in file order, unreadable lines skipped)."""
    records, skipped = read_jsonl(Path(run_dir) / FAILURES_FILE)
    failures: list[Failure] = []
    for record in records:
        try:
            failures.append(Failure.model_validate(record))
        except ValueError:
            skipped += 1
    return failures, skipped


class FailureStore:
    """A run's failures on disk: the table, the version files, and the ids already stored."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        records, skipped = read_jsonl(self.table_path)
        if skipped:
            logger.warning("{}: {} unreadable line(s) skipped", self.table_path, skipped)
        self._ids: set[str] = {str(r["failure_id"]) for r in records if isinstance(r, dict) and "failure_id" in r}

    @property
    def table_path(self) -> Path:
        return self.run_dir / FAILURES_FILE

    @property
    def versions_dir(self) -> Path:
        return self.run_dir / FAILURES_DIR

    def __contains__(self, failure_id_: object) -> bool:
        return failure_id_ in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def store(self, failure: Failure) -> bool:
        """Write the version file, then the table line; False (nothing written) for a known id."""
        if failure.failure_id in self._ids:
            return False
        record = failure.model_dump(mode="json")
        write_json_atomic(failure.version_path(self.run_dir), record)
        append_jsonl(self.table_path, [record], fsync=True)
        self._ids.add(failure.failure_id)
        return True

    def lineage(self, scenario_id: str) -> list[Failure]:
        """Every failed version of one scenario, oldest first (the last is the latest attempt)."""
        folder = self.versions_dir / path_part(scenario_id)
        versions: list[Failure] = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                versions.append(Failure.model_validate_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                logger.warning("{}: unreadable failure version skipped ({})", path, type(exc).__name__)
        return sorted(versions, key=lambda f: (f.iteration, f.recorded_at, f.failure_id))

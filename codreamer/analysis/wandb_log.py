"""The failures of a run on W&B: a table of the new failures and an artifact version, per iteration.

Kept apart from the collector so recording failures never imports W&B (heavy, optional);
`FailureCollector.log_to_wandb` calls in here. The loop logs after every iteration (and once
more when the run closes), so a run left going for days shows its failures as it goes:

- `failures/table`: a `wandb.Table` of the failures recorded since the last log (with their
  input/output hashes, agent state and reward parts), at the iteration's step, so the step
  slider walks through them; `failures/count` (all so far) and `failures/logged` (this table);
- the artifact `failures-<run_id>` (type "failures"): `failures.jsonl` and every failed
  version under `failures/`, a new version whenever there is something new.

Which failures were logged is kept in `failures_wandb.json` in the run directory (written
after W&B took them), so a resumed run does not log them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codreamer.analysis.failures import FAILURES_DIR, FAILURES_FILE, Failure, load_failures, path_part
from codreamer.storage import write_json_atomic

__all__ = ["LOGGED_FILE", "TABLE_COLUMNS", "log_failures"]

LOGGED_FILE = "failures_wandb.json"
TABLE_COLUMNS = (
    "failure_id", "iteration", "step", "split", "scenario_id", "prospect_id", "trajectory_id",
    "category", "categories", "source", "reward", "reward_parts", "error_message", "output",
    "input_hash", "output_hash", "agent_state", "recorded_at",
)  # fmt: skip
_JSON_COLUMNS = ("reward_parts", "agent_state")


def _row(failure: Failure) -> list[Any]:
    """One table row, in `TABLE_COLUMNS` order (categories as plain text, dicts as JSON text)."""
    cells = {name: getattr(failure, name) for name in TABLE_COLUMNS}
    cells["category"] = str(failure.category)
    cells["categories"] = ",".join(map(str, failure.categories))
    for name in _JSON_COLUMNS:
        cells[name] = json.dumps(cells[name], sort_keys=True, default=str)
    cells["recorded_at"] = failure.recorded_at.isoformat()
    return [cells[name] for name in TABLE_COLUMNS]


def _logged_ids(run_dir: Path) -> set[str]:
    try:
        data = json.loads((run_dir / LOGGED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    ids = data.get("failure_ids") if isinstance(data, dict) else None
    return {str(i) for i in ids} if isinstance(ids, list) else set()


def log_failures(run_dir: Path, run_id: str, run: Any | None = None, step: int | None = None) -> bool:
    """Log the failures recorded since the last call: a table and an artifact version.

    `step` is the W&B step to log at (the iteration's, as its metrics); unset: W&B's current
    step. Nothing new: nothing is logged (True). `run` defaults
    to the active `wandb.run`; without one this is a no-op returning False. Works in W&B
    offline mode (the run directory keeps everything until `wandb sync`).
    """
    try:
        import wandb
    except ImportError:
        return False
    run = run if run is not None else getattr(wandb, "run", None)
    if run is None:
        return False
    run_dir = Path(run_dir)
    failures, _ = load_failures(run_dir)
    logged = _logged_ids(run_dir)
    new = [f for f in failures if f.failure_id not in logged]
    if not new:
        return True
    data: dict[str, Any] = {"failures/count": len(failures), "failures/logged": len(new)}
    data["failures/table"] = wandb.Table(columns=list(TABLE_COLUMNS), data=[_row(f) for f in new])
    run.log(data, **({} if step is None else {"step": int(step)}))
    iterations = sorted({f.iteration for f in new})
    artifact = wandb.Artifact(
        name=f"failures-{path_part(run_id)}",
        type="failures",
        metadata={"run_id": run_id, "failures": len(failures), "new": len(new), "iterations": iterations},
    )
    if (run_dir / FAILURES_FILE).is_file():
        artifact.add_file(str(run_dir / FAILURES_FILE), name=FAILURES_FILE)
    if (run_dir / FAILURES_DIR).is_dir():
        artifact.add_dir(str(run_dir / FAILURES_DIR), name=FAILURES_DIR)
    run.log_artifact(artifact, aliases=["latest", f"step-{step}"] if step is not None else None)
    write_json_atomic(run_dir / LOGGED_FILE, {"failure_ids": sorted(logged | {f.failure_id for f in new})})
    return True

"""The failures of a run on W&B: a `wandb.Table` and a versioned artifact.

Kept apart from the collector so recording failures never imports W&B (heavy, optional);
`FailureCollector.log_to_wandb` calls in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codreamer.analysis.failures import FAILURES_DIR, FAILURES_FILE, Failure, load_failures, path_part

__all__ = ["TABLE_COLUMNS", "log_failures"]

TABLE_COLUMNS = (
    "failure_id", "iteration", "step", "split", "scenario_id", "prospect_id", "trajectory_id",
    "category", "categories", "source", "reward", "error_message", "output",
)  # fmt: skip


def _row(failure: Failure) -> list[Any]:
    """One table row, in `TABLE_COLUMNS` order (categories as plain text)."""
    cells = {name: getattr(failure, name) for name in TABLE_COLUMNS}
    cells["category"] = str(failure.category)
    cells["categories"] = ",".join(map(str, failure.categories))
    return [cells[name] for name in TABLE_COLUMNS]


def log_failures(run_dir: Path, run_id: str, run: Any | None = None) -> bool:
    """Log the failures table as a `wandb.Table` and a versioned artifact; False when no run.

    The artifact (`failures-<run_id>`, type "failures") holds `failures.jsonl` and every
    failed version under `failures/`; logging it again after more failures makes a new
    version. `run` defaults to the active `wandb.run`; without a run this is a no-op.
    Works in W&B offline mode (the run directory keeps both until `wandb sync`).
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
    rows = [_row(f) for f in failures]
    table = wandb.Table(columns=list(TABLE_COLUMNS), data=rows)
    run.log({"failures/table": table, "failures/count": len(rows)})
    artifact = wandb.Artifact(
        name=f"failures-{path_part(run_id)}",
        type="failures",
        metadata={"run_id": run_id, "failures": len(rows)},
    )
    if (run_dir / FAILURES_FILE).is_file():
        artifact.add_file(str(run_dir / FAILURES_FILE), name=FAILURES_FILE)
    if (run_dir / FAILURES_DIR).is_dir():
        artifact.add_dir(str(run_dir / FAILURES_DIR), name=FAILURES_DIR)
    run.log_artifact(artifact)
    return True

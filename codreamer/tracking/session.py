"""A run's tracking session: where its metrics and traces go, and the calls the loop makes on it.

The loop holds one session per run in every mode and calls it without asking which mode it
is: a disabled session (no W&B run, `NO_WEAVE`) logs nothing and finishes at once. No call
raises for tracking trouble: a W&B failure costs a warning, the run directory keeps the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from codreamer.tracking.clients import NO_WEAVE, WeaveClient, bounded, short
from codreamer.tracking.modes import Mode
from codreamer.tracking.payloads import ART_STEP_AXIS_PREFIXES, ART_STEP_METRIC, art_metrics, metrics_for_wandb

WANDB_SUBDIR = "wandb"


@dataclass
class TrackingSession:
    """Where this run's metrics and traces go; `finish` it once (a second call does nothing)."""

    mode: Mode
    weave: bool
    wandb_run: Any | None
    reason: str
    run_id: str | None = None
    run_dir: Path | None = None
    wandb_run_id: str | None = None
    weave_project: str | None = None
    degraded: bool = False
    timeout_s: float = 10.0
    finished: bool = False
    art_axis_defined: bool = False
    last_step: int | None = None
    weave_client: WeaveClient = field(default=NO_WEAVE, repr=False)  # NO_WEAVE unless Weave started

    def log_metrics(self, record: Mapping[str, Any], step: int) -> dict[str, int | float]:
        """Log the numeric metrics of an iteration record at `step`; returns what was logged.

        Never raises: a W&B failure costs a warning, the local history already has the record.
        """
        metrics = metrics_for_wandb(record)
        if metrics:
            metrics |= art_metrics(record, step)  # ART's names too, on ART's x-axis
        if self.wandb_run is None or self.finished or not metrics:
            return metrics
        try:
            self._define_art_axis(self.wandb_run)
            self.wandb_run.log(metrics, step=int(step))
            self.last_step = int(step)
        except Exception as exc:  # noqa: BLE001 - tracking never stops the loop
            logger.warning("W&B could not log step {}: {}", step, short(exc))
        return metrics

    def _define_art_axis(self, run: Any) -> None:
        """ART's `training_step` as the x-axis of `train/*` and `val/*`, as ART's `model.log` defines it."""
        if self.art_axis_defined:
            return
        self.art_axis_defined = True
        run.define_metric(ART_STEP_METRIC)
        for prefix in ART_STEP_AXIS_PREFIXES:
            run.define_metric(f"{prefix}/*", step_metric=ART_STEP_METRIC)

    def log_failures(self, collector: Any, step: int | None = None) -> bool:
        """The failures new since the last call, as a table and an artifact version, at `step`
        (unset: the last step metrics were logged at); `collector.log_to_wandb(run, step)`.
        False without a run. The loop calls it after each iteration and when the run closes."""
        if self.wandb_run is None or self.finished:
            return False
        step = self.last_step if step is None else int(step)
        try:
            return bool(collector.log_to_wandb(self.wandb_run, step))
        except Exception as exc:  # noqa: BLE001 - the failures stay in the run directory
            logger.warning("W&B could not log the failures table: {}", short(exc))
            return False

    def finish(self, status: str = "finished") -> None:
        """Close the W&B run (exit code 0 only for 'finished') and flush Weave, each bounded in time."""
        if self.finished:
            return
        self.finished = True
        if self.wandb_run is not None:
            self._finish_wandb(self.wandb_run, status)
        self._flush_weave()  # NO_WEAVE when Weave is not running: nothing to flush

    def _finish_wandb(self, run: Any, status: str) -> None:
        try:
            run.summary["codreamer/status"] = status
            run.finish(exit_code=0 if status == "finished" else 1)
        except Exception as exc:  # noqa: BLE001 - the run's files stay on disk for `wandb sync`
            logger.warning("W&B run did not finish cleanly ({}); `wandb sync` its directory", short(exc))
        if self.mode == "offline" and self.run_dir is not None:
            logger.info(
                "W&B offline run kept; upload it with: wandb sync {}/offline-run-*", self.run_dir / WANDB_SUBDIR
            )

    def _flush_weave(self) -> None:
        done, _, error = bounded(self.weave_client.flush, self.timeout_s, "weave-flush")
        if not done or error is not None:
            logger.warning(
                "Weave traces not flushed ({}); its write-ahead log keeps them for the next online run",
                "timed out" if not done else short(error or ""),
            )

    def describe(self) -> str:
        """One line: what this run records, and what it does not."""
        local = "local history, trace and failures in the run directory"
        if self.mode == "disabled":
            return f"tracking disabled ({self.reason}): recording {local}; no W&B run, no Weave traces"
        where = self.run_dir / WANDB_SUBDIR if self.run_dir is not None else "the run directory"
        if self.mode == "offline":
            return (
                f"W&B offline ({self.reason}): recording {local} and W&B run {self.wandb_run_id} in {where} "
                f"(upload later: wandb sync {where}/offline-run-*); no Weave traces (they need the W&B server)"
            )
        url = getattr(self.wandb_run, "url", None) or self.wandb_run_id
        weave = f"Weave traces in {self.weave_project}" if self.weave else "no Weave traces"
        return f"W&B online ({self.reason}): recording {local}, W&B run {url} (copy in {where}), {weave}"


def disabled_session(reason: str = "not started") -> TrackingSession:
    """The no-op stand-in: a session that records nothing (scripts and tests that open no tracking)."""
    return TrackingSession("disabled", False, None, reason)

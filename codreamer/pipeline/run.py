"""The run lifecycle: open a run (directory, run.json, resume checks, wiring, tracking), close it.

`open_run` is the one place a run is set up and torn down, for both loops:

- open: the run directory and its log; on resume, the settings checked against run.json
  (`check_resume_settings`) and checkpoints newer than the committed history removed
  (`discard_uncommitted_checkpoints`); tracking started once (`init_tracking`, before the
  loop's first op, so the Weave tree starts at the loop); task data loaded once; backend and
  model registered; reward scorer, failure collector, retry counter and usage ledger built.
- close: run.json gets its final status (finished, failed, interrupted), the event index
  is saved, the report written, the failures sent to W&B, tracking finished, backend closed.

What happens between the two is the loop's (`codreamer.pipeline.loop`).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import art
from loguru import logger

from codreamer.analysis.collector import FailureCollector
from codreamer.backends.factory import create_backend
from codreamer.config import Settings
from codreamer.data import TaskData, load_task_data
from codreamer.errors import UsageError
from codreamer.events.log import EventLog
from codreamer.local_trace import recording_to
from codreamer.log import configure_logging
from codreamer.paths import is_inside
from codreamer.pipeline.history import read_history
from codreamer.pipeline.stages import RolloutPlan
from codreamer.pipeline.state import RunState, changed_settings, config_hash, load_state
from codreamer.pipeline.warm_start import load_warm_start
from codreamer.reports import write_run_report
from codreamer.retry import RetryCounter, counting_retries
from codreamer.rewards.blend import RewardMixConfig
from codreamer.rewards.ruler import JudgeConfig
from codreamer.rewards.scoring import RewardScorer
from codreamer.rewards.simulator import ProspectSimulator
from codreamer.runs import ITERATIONS_FILE, LOG_FILE, RUN_FILE, new_run_id, read_run_file, run_dir, run_lock
from codreamer.storage import write_json_atomic
from codreamer.tracking import TrackingSession, disabled_session, init_tracking
from codreamer.usage import LLMPrices, UsageLedger, using_ledger

LoopKind = Literal["learn-loop", "train"]


class ResumeConfigError(UsageError, RuntimeError):
    """Settings that shape training differ from those the run was started with."""


@dataclass
class Run:
    """An opened run: where it lives, what it trains, and what it records along the way."""

    run_id: str
    directory: Path
    settings: Settings
    task: TaskData
    backend: Any
    model: art.TrainableModel
    plan: RolloutPlan
    scorer: RewardScorer
    failures: FailureCollector
    retries: RetryCounter
    usage: UsageLedger
    tracking: TrackingSession = field(default_factory=disabled_session)
    resume: RunState | None = None
    config_hash: str = ""

    @property
    def history_path(self) -> Path:
        return self.directory / ITERATIONS_FILE


# --------------------------------------------------------------------------- run.json and resume checks


def _public_settings(settings: Settings) -> dict[str, Any]:
    """Settings as recorded in run.json: secrets excluded by the model itself."""
    return settings.model_dump(mode="json", exclude={"wandb_api_key"})


def _write_run_file(directory: Path, run_id: str, kind: LoopKind, settings: Settings, status: str) -> None:
    created = read_run_file(directory).get("created_at", datetime.now(UTC).isoformat())
    write_json_atomic(
        directory / RUN_FILE,
        {
            "run_id": run_id,
            "kind": kind,
            "status": status,
            "created_at": created,
            "updated_at": datetime.now(UTC).isoformat(),
            "settings": _public_settings(settings),
        },
    )


def check_resume_settings(directory: Path, settings: Settings) -> None:
    """Refuse to resume with settings that would change what is trained, unless forced."""
    recorded = read_run_file(directory).get("settings") or {}  # RunFileError (one line, with the path) when corrupt
    changed = changed_settings(recorded, settings)
    if not changed:
        return
    listing = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
    if settings.force_resume:
        logger.warning("resuming with changed settings (--force-resume): {}", listing)
        return
    raise ResumeConfigError(
        f"run {directory.name} was started with other settings ({listing}); "
        "use the same settings, a new --run-id, or --force-resume"
    )


def discard_uncommitted_checkpoints(directory: Path, state: RunState | None = None) -> int:
    """Make the history (and a `trained` state) the source of truth; return the committed step.

    An iteration is committed when its history record is written. A checkpoint newer than
    that belongs to an iteration that crashed before committing: it is kept when the state
    says training finished for it (the loop continues after training), otherwise removed,
    so that the iteration trains again once and is neither trained twice nor lost.
    """
    records, _ = read_history(directory / ITERATIONS_FILE)
    committed = max((int(r["step"]) for r in records), default=0)
    if (warm := load_warm_start(directory)) is not None:  # the warm start's step is committed by its file
        committed = max(committed, warm.step)
    keep = committed
    if state is not None and state.reached("trained") and state.step > committed:
        keep = state.step
    checkpoints = directory / "checkpoints"
    for folder in sorted(checkpoints.glob("[0-9][0-9][0-9][0-9]*")) if checkpoints.is_dir() else []:
        if folder.is_dir() and folder.name.isdigit() and int(folder.name) > keep and is_inside(folder, directory):
            logger.warning("removing checkpoint {} of an iteration that did not finish training", folder.name)
            shutil.rmtree(folder)
    return committed


def committed_iterations(run: Run) -> int:
    """The number of the last committed iteration (its history record is written); 0 for none."""
    return _last_committed(run.history_path)


def _last_committed(history: Path) -> int:
    records, _ = read_history(history)
    return max((int(r.get("iteration", 0)) for r in records), default=0)


def _resume_state(directory: Path, run_id: str) -> RunState | None:
    """The state of the iteration in progress, or None when its history record is already written."""
    state = load_state(directory)
    if state is None or state.run_id != run_id:
        return None
    if state.iteration <= _last_committed(directory / ITERATIONS_FILE):  # killed between record and state write
        return None
    return state


# --------------------------------------------------------------------------- wiring


def build_scorer(settings: Settings, task: TaskData, *, online: bool, directory: Path | None = None) -> RewardScorer:
    """The reward sources this run uses; `train` (online=False) never touches the event log.

    With the simulator and a run `directory`, late simulated outcomes wait in
    `<run dir>/replay/simulator_pending.jsonl` for their iteration."""
    events = simulator = None
    pending = None
    if online and settings.outcomes != "off":
        events = EventLog.open(settings.resolved_events_path())
        if settings.outcomes == "simulator":
            simulator = ProspectSimulator(
                settings.seed,
                late_share=settings.simulator_late_share,
                late_iterations=settings.simulator_late_iterations,
            )
            pending = directory / "replay" / "simulator_pending.jsonl" if directory is not None else None
            logger.info(
                "online outcomes come from the ProspectSimulator (seeded simulator, not real data); "
                "{:.0%} of them arrive {} iteration(s) late",
                settings.simulator_late_share if pending is not None else 0.0,
                settings.simulator_late_iterations,
            )
    if settings.judge_model is None and settings.ruler_weight > 0:
        logger.info("no judge configured (--judge-model): RULER is left out and the other parts renormalised")
    return RewardScorer(
        task.product,
        RewardMixConfig.from_settings(settings),
        judge=JudgeConfig.from_settings(settings),
        events=events,
        simulator=simulator,
        auto_finalize_factor=settings.auto_finalize_factor,
        pending_path=pending,
    )


def _art_model(settings: Settings, run_id: str) -> art.TrainableModel:
    return art.TrainableModel(
        name=run_id,
        project=settings.project,
        run_name=run_id,
        base_model=settings.base_model,
        base_path=str(settings.runs_dir),
        report_metrics=[],  # W&B is ours (codreamer.tracking): ART must not open a second run
    )


async def _wire(settings: Settings, kind: LoopKind, run_id: str, directory: Path, tracking: TrackingSession) -> Run:
    """Load the task, register the model with its backend, and build what the iterations use."""
    state = _resume_state(directory, run_id)
    discard_uncommitted_checkpoints(directory, state)
    task = load_task_data(settings.data_dir)
    backend = create_backend(settings)
    model = _art_model(settings, run_id)
    logger.info("run {} ({}) in {}; loading the {} backend", run_id, kind, directory, settings.backend)
    await model.register(backend)
    records, _ = read_history(directory / ITERATIONS_FILE)
    last = records[-1] if records else {}
    return Run(
        run_id=run_id,
        directory=directory,
        settings=settings,
        task=task,
        backend=backend,
        model=model,
        plan=RolloutPlan.from_settings(settings, task.product),
        scorer=build_scorer(settings, task, online=kind == "learn-loop", directory=directory),
        failures=FailureCollector(directory, run_id, settings.low_reward_threshold, product=task.product),
        retries=RetryCounter.from_metrics(last),
        usage=UsageLedger.from_totals(last, LLMPrices.from_settings(settings)),
        tracking=tracking,
        resume=state,
        config_hash=config_hash(settings),
    )


# --------------------------------------------------------------------------- open and close


@asynccontextmanager
async def open_run(settings: Settings, kind: LoopKind) -> AsyncIterator[Run]:
    """Create or reopen the run directory, start tracking, register the model; close the run after."""
    run_id = settings.run_id or new_run_id()
    directory = run_dir(settings, run_id)
    resuming = (directory / RUN_FILE).is_file()
    directory.mkdir(parents=True, exist_ok=True)
    with run_lock(directory, run_id):
        configure_logging(log_file=directory / LOG_FILE)
        with logger.contextualize(run_id=run_id):
            if resuming:
                check_resume_settings(directory, settings)
            tracking = init_tracking(settings, directory, run_id, resuming)
            run = await _wire(settings, kind, run_id, directory, tracking)
            _write_run_file(directory, run_id, kind, settings, "running")
            status = "failed"
            try:
                with ExitStack() as stack:
                    stack.enter_context(recording_to(directory))
                    stack.enter_context(using_ledger(run.usage))
                    stack.enter_context(counting_retries(run.retries))
                    yield run
                status = "finished"
                logger.info(
                    "done: run {} at step {}; history in {}", run_id, await run.model.get_step(), run.history_path
                )
            except (KeyboardInterrupt, asyncio.CancelledError):
                status = "interrupted"
                raise
            finally:
                await _close(run, kind, status)


async def _close(run: Run, kind: LoopKind, status: str) -> None:
    """run.json's final status first (the report reads it), then report, W&B, backend."""
    if run.scorer.events is not None:
        run.scorer.events.save_index()
    _write_run_file(run.directory, run.run_id, kind, run.settings, status)
    _write_report(run.directory)
    run.tracking.log_failures(run.failures)
    run.tracking.finish(status)
    await run.backend.close()


def _write_report(directory: Path) -> None:
    """report.md + reward_curve.png, after run.json has its final status."""
    if not (directory / ITERATIONS_FILE).is_file():
        return
    try:
        write_run_report(directory)  # logs where it wrote
    except Exception as exc:  # noqa: BLE001 - a report must never turn a finished run into a failed one
        logger.warning("could not write the run report: {}: {}", type(exc).__name__, exc)

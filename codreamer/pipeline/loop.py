"""The loops: `run_learning_loop` (iterate, evaluate, log) and `run_training` (plain epochs).

Both open a run (directory, settings, data, backend, model), then chain the stages once per
iteration and append one history record per iteration. The iteration number is the model's
training step, so running again with the same `--run-id` continues after the last
checkpoint instead of starting over.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import art
import weave
from loguru import logger

from codreamer.backends.factory import create_backend
from codreamer.config import Settings
from codreamer.data import TaskData, load_task_data
from codreamer.local_trace import recording_to, traced
from codreamer.log import configure_logging
from codreamer.pipeline.history import append_record, read_history
from codreamer.pipeline.scenarios import iterations_per_epoch, scenarios_for_iteration
from codreamer.pipeline.stages import (
    RewardStats,
    RolloutPlan,
    evaluate,
    generate_trajectories,
    grpo_update,
    log_rewards_metrics,
    score_trajectories,
)
from codreamer.events.log import EventLog
from codreamer.rewards.scoring import RewardScorer
from codreamer.rewards.simulator import ProspectSimulator
from codreamer.runs import ITERATIONS_FILE, LOG_FILE, RUN_FILE, new_run_id, run_dir, write_json_atomic
from codreamer.tracking import init_tracking

LoopKind = Literal["learn-loop", "train"]


@dataclass
class Run:
    """An opened run: where it lives and what it trains."""

    run_id: str
    directory: Path
    settings: Settings
    task: TaskData
    backend: Any
    model: art.TrainableModel
    plan: RolloutPlan
    scorer: RewardScorer

    @property
    def history_path(self) -> Path:
        return self.directory / ITERATIONS_FILE


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _public_settings(settings: Settings) -> dict[str, Any]:
    """Settings as recorded in run.json: secrets excluded by the model itself."""
    return settings.model_dump(mode="json", exclude={"wandb_api_key"})


def _write_run_file(directory: Path, run_id: str, kind: LoopKind, settings: Settings, status: str) -> None:
    path = directory / RUN_FILE
    created = datetime.now(UTC).isoformat()
    if path.is_file():
        import json

        created = json.loads(path.read_text()).get("created_at", created)
    write_json_atomic(
        path,
        {
            "run_id": run_id,
            "kind": kind,
            "status": status,
            "created_at": created,
            "updated_at": datetime.now(UTC).isoformat(),
            "settings": _public_settings(settings),
        },
    )


def discard_uncommitted_checkpoints(directory: Path) -> int:
    """Make the history the source of truth for resuming; return the committed step.

    An iteration is committed when its history record is written, which happens after its
    checkpoint is saved. A checkpoint newer than the last record belongs to an iteration
    that crashed before committing: it is removed, so that iteration runs again once and
    is neither trained twice nor lost.
    """
    records, _ = read_history(directory / ITERATIONS_FILE)
    committed = max((int(r["step"]) for r in records), default=0)
    checkpoints = directory / "checkpoints"
    for folder in sorted(checkpoints.glob("[0-9][0-9][0-9][0-9]*")) if checkpoints.is_dir() else []:
        if folder.is_dir() and folder.name.isdigit() and int(folder.name) > committed:
            logger.warning("removing checkpoint {} of an iteration that did not finish", folder.name)
            shutil.rmtree(folder)
    return committed


def build_scorer(settings: Settings, task: TaskData, *, online: bool) -> RewardScorer:
    """The reward sources this run uses; `train` (online=False) never touches the event log."""
    events = simulator = None
    if online and settings.outcomes != "off":
        events = EventLog.open(settings.resolved_events_path())
        if settings.outcomes == "simulator":
            simulator = ProspectSimulator(settings.seed)
            logger.info("online outcomes come from the ProspectSimulator (seeded simulator, not real data)")
    if settings.judge_model is None and settings.ruler_weight > 0:
        logger.info("no judge configured (--judge-model): RULER is left out and the other parts renormalised")
    return RewardScorer(
        task.product, settings.reward_mix(), judge=settings.judge_config(), events=events, simulator=simulator
    )


@asynccontextmanager
async def open_run(settings: Settings, kind: LoopKind) -> AsyncIterator[Run]:
    """Create or reopen the run directory, register the model with the backend, clean up after."""
    run_id = settings.run_id or new_run_id()
    directory = run_dir(settings, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    configure_logging(log_file=directory / LOG_FILE)
    with logger.contextualize(run_id=run_id):
        init_tracking(settings)
        discard_uncommitted_checkpoints(directory)
        task = load_task_data(settings.data_dir)
        backend = create_backend(settings)
        model = art.TrainableModel(
            name=run_id,
            project=settings.project,
            run_name=run_id,
            base_model=settings.base_model,
            base_path=str(settings.runs_dir),
        )
        logger.info("run {} ({}) in {}; loading the {} backend", run_id, kind, directory, settings.backend)
        await model.register(backend)
        plan = RolloutPlan(
            product=task.product,
            config=settings.rollout_config(),
            group_size=settings.group_size,
            concurrency=settings.rollout_concurrency,
            max_exceptions=settings.max_exceptions,
            seed=settings.seed,
        )
        scorer = build_scorer(settings, task, online=kind == "learn-loop")
        _write_run_file(directory, run_id, kind, settings, "running")
        status = "failed"
        try:
            with recording_to(directory):
                yield Run(run_id, directory, settings, task, backend, model, plan, scorer)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            _write_run_file(directory, run_id, kind, settings, status)
            await backend.close()


def _stats_record(prefix: str, stats: RewardStats) -> dict[str, Any]:
    record = {f"{prefix}/reward_{k}": getattr(stats, k) for k in ("mean", "std", "min", "max", "count")}
    record |= {f"{prefix}/{name}": value for name, value in stats.parts.items()}
    return record


def _rollout_health(groups: list[art.TrajectoryGroup]) -> dict[str, float]:
    trajectories = [t for g in groups for t in g.trajectories]
    exceptions = sum(len(g.exceptions) for g in groups)
    auto = sum(1 for t in trajectories if t.metadata.get("auto_finalized"))
    return {
        "train/trajectories": float(len(trajectories)),
        "train/exceptions": float(exceptions),
        "train/auto_finalized_rate": auto / len(trajectories) if trajectories else float("nan"),
    }


@weave.op
@traced
async def run_iteration(run: Run, iteration: int, evaluate_after: bool) -> dict[str, Any]:
    """generate -> score -> GRPO update -> evaluate -> log, timing each stage."""
    settings, timings = run.settings, {}
    scenarios = scenarios_for_iteration(run.task.train, iteration, settings.scenarios_per_step, settings.seed)
    step = await run.model.get_step()

    started = time.perf_counter()
    groups = await generate_trajectories(run.model, scenarios, run.plan, step=step)
    timings["generate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    scoring = await score_trajectories(groups, scenarios, run.scorer, step=step, emails_sent=run.scorer.events is not None)
    train_stats = RewardStats.of([t for g in groups for t in g.trajectories])
    timings["score_s"] = time.perf_counter() - started

    started = time.perf_counter()
    result = await grpo_update(
        run.backend, run.model, groups, learning_rate=settings.learning_rate, attempts=settings.train_retries
    )
    timings["train_s"] = time.perf_counter() - started

    eval_groups, eval_stats = [], RewardStats()
    if evaluate_after and settings.eval_scenarios:
        started = time.perf_counter()
        eval_groups, eval_stats = await evaluate(
            run.model, run.task.heldout[: settings.eval_scenarios], run.plan, run.scorer, step=result.step
        )
        timings["evaluate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    await log_rewards_metrics(run.model, groups, eval_groups, result.metrics, step=result.step)
    timings["log_s"] = time.perf_counter() - started

    record = {
        "run_id": run.run_id,
        "iteration": iteration + 1,
        "step": result.step,
        "recorded_at": datetime.now(UTC).isoformat(),
        "scenarios": [s.scenario_id for s in scenarios],
        **_stats_record("train", train_stats),
        **_rollout_health(groups),
        "score/judge_errors": scoring.judge_errors,
        "score/renormalized": scoring.renormalized,
        "score/outcomes_appended": scoring.outcomes_appended,
        **{f"train_metrics/{k}": v for k, v in result.metrics.items()},
        **(_stats_record("eval", eval_stats) if eval_groups else {}),
        **{f"time/{k}": v for k, v in timings.items()},
        "peak_rss_mb": _peak_rss_mb(),
    }
    append_record(run.history_path, record)
    return record


def _progress_line(record: dict[str, Any], total: int) -> str:
    times = " ".join(f"{k.split('/')[1].removesuffix('_s')} {v:.1f}s" for k, v in record.items() if k.startswith("time/"))
    line = (
        f"iter {record['iteration']}/{total} step {record['step']} "
        f"reward {record['train/reward_mean']:.3f}±{record['train/reward_std']:.3f} "
        f"[{record['train/reward_min']:.2f}, {record['train/reward_max']:.2f}]"
    )
    if "eval/reward_mean" in record:
        line += f" eval {record['eval/reward_mean']:.3f}"
    return f"{line} | {times} | peak {record['peak_rss_mb']:.0f} MB"


async def _iterate(run: Run, total: int, evaluate_every: int) -> list[dict[str, Any]]:
    start = await run.model.get_step()
    if start >= total:
        logger.info("run already has {} of {} iterations; nothing to do", start, total)
        return []
    if start:
        logger.info("continuing from step {} (of {})", start, total)
    records = []
    for iteration in range(start, total):
        with logger.contextualize(iteration=iteration + 1):
            is_last = iteration + 1 == total
            record = await run_iteration(run, iteration, evaluate_after=is_last or (iteration + 1) % evaluate_every == 0)
            logger.info(_progress_line(record, total))
            records.append(record)
    return records


@weave.op
async def run_learning_loop(num_iters: int, run_id: str | None = None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The continuous learning loop: `num_iters` iterations in total, evaluating after each."""
    settings = (settings or Settings()).model_copy(update={"iterations": num_iters, "run_id": run_id or (settings.run_id if settings else None)})
    async with open_run(settings, "learn-loop") as run:
        with logger.contextualize(run_id=run.run_id):
            records = await _iterate(run, num_iters, evaluate_every=1)
            logger.info("done: run {} at step {}; history in {}", run.run_id, await run.model.get_step(), run.history_path)
            return records


@weave.op
async def run_training(settings: Settings) -> list[dict[str, Any]]:
    """Plain training: `epochs` passes over the training scenarios, evaluating at the end."""
    steps = settings.max_steps or settings.epochs * iterations_per_epoch(len(load_task_data(settings.data_dir).train), settings.scenarios_per_step)
    async with open_run(settings, "train") as run:
        with logger.contextualize(run_id=run.run_id):
            records = await _iterate(run, steps, evaluate_every=max(steps, 1))
            logger.info("done: run {} at step {}; history in {}", run.run_id, await run.model.get_step(), run.history_path)
            return records

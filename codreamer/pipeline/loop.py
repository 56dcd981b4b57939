"""The loops: `run_learning_loop` (iterate, evaluate, log) and `run_training` (plain epochs).

Both open a run (directory, settings, data, backend, model), then chain the stages once per
iteration and append one history record per iteration. Every completed stage is recorded in
`codreamer_state.json` (see `codreamer.pipeline.state`), so running again with the same `--run-id`
continues with the first stage that did not complete: no iteration is trained twice and
none is lost, even after `kill -9`. Every stage runs under a timeout from settings; what
fails is recorded by the failure collector before the error propagates.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import art
import weave
from loguru import logger

from codreamer.agent.rollout import RolloutConfig
from codreamer.analysis.collector import FailureCollector
from codreamer.backends.factory import create_backend
from codreamer.config import Settings
from codreamer.data import TaskData, load_task_data
from codreamer.errors import UsageError
from codreamer.events.log import EventLog
from codreamer.local_trace import recording_to, traced
from codreamer.log import configure_logging
from codreamer.paths import is_inside
from codreamer.pipeline.evaluation import (
    EvalSummary,
    behaviour_rates,
    compare_evaluations,
    eval_path,
    eval_record,
    load_evaluations,
    store_evaluation,
)
from codreamer.pipeline.fanout import RolloutFailuresError
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
from codreamer.pipeline.warm_start import load_warm_start, run_warm_start, save_warm_start
from codreamer.pipeline.state import (
    RunState,
    Stage,
    changed_settings,
    clear_work,
    config_hash,
    dump_groups,
    load_groups,
    load_state,
    load_work,
    save_state,
    save_work,
    stage_reached,
)
from codreamer.retry import RetryCounter, RetryPolicy, counting_retries
from codreamer.rewards.blend import RewardMixConfig
from codreamer.rewards.ruler import JudgeConfig
from codreamer.rewards.scoring import RewardScorer, ScoringSummary
from codreamer.rewards.simulator import ProspectSimulator
from codreamer.runs import ITERATIONS_FILE, LOG_FILE, RUN_FILE, new_run_id, read_run_file, run_dir, write_json_atomic
from codreamer.tracking import TrackingSession, init_tracking
from codreamer.usage import LLMPrices, UsageLedger, using_ledger

LoopKind = Literal["learn-loop", "train"]
T = TypeVar("T")


class ResumeConfigError(UsageError, RuntimeError):
    """Settings that shape training differ from those the run was started with."""


class StageTimeoutError(TimeoutError):
    """A stage ran past its timeout from settings."""


@dataclass
class TrainOutcome:
    """What the loop keeps of a training step (also restored from the work file on resume)."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


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
    tracking: TrackingSession | None = None
    resume: RunState | None = None
    config_hash: str = ""

    @property
    def history_path(self) -> Path:
        return self.directory / ITERATIONS_FILE


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _public_settings(settings: Settings) -> dict[str, Any]:
    """Settings as recorded in run.json: secrets excluded by the model itself."""
    return settings.model_dump(mode="json", exclude={"wandb_api_key"})


def _read_run_file(directory: Path) -> dict[str, Any]:
    return read_run_file(directory)  # RunFileError (one line, with the path) when corrupt


def _write_run_file(directory: Path, run_id: str, kind: LoopKind, settings: Settings, status: str) -> None:
    created = _read_run_file(directory).get("created_at", datetime.now(UTC).isoformat())
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
    recorded = _read_run_file(directory).get("settings") or {}
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
        task.product,
        RewardMixConfig.from_settings(settings),
        judge=JudgeConfig.from_settings(settings),
        events=events,
        simulator=simulator,
        auto_finalize_factor=settings.auto_finalize_factor,
    )


def _resume_state(directory: Path, run_id: str) -> RunState | None:
    state = load_state(directory)
    if state is None or state.run_id != run_id:
        return None
    records, _ = read_history(directory / ITERATIONS_FILE)
    committed = max((int(r.get("iteration", 0)) for r in records), default=0)
    if state.iteration < committed:  # killed between the history record and the state write
        return None
    return state


@asynccontextmanager
async def open_run(settings: Settings, kind: LoopKind) -> AsyncIterator[Run]:
    """Create or reopen the run directory, register the model with the backend, clean up after."""
    run_id = settings.run_id or new_run_id()
    directory = run_dir(settings, run_id)
    resuming = (directory / RUN_FILE).is_file()
    directory.mkdir(parents=True, exist_ok=True)
    configure_logging(log_file=directory / LOG_FILE)
    with logger.contextualize(run_id=run_id):
        if resuming:
            check_resume_settings(directory, settings)
        tracking = init_tracking(settings, directory, run_id, resuming)
        state = _resume_state(directory, run_id)
        discard_uncommitted_checkpoints(directory, state)
        task = load_task_data(settings.data_dir)
        backend = create_backend(settings)
        model = art.TrainableModel(
            name=run_id,
            project=settings.project,
            run_name=run_id,
            base_model=settings.base_model,
            base_path=str(settings.runs_dir),
            report_metrics=[],  # W&B is ours (codreamer.tracking): ART must not open a second run
        )
        logger.info("run {} ({}) in {}; loading the {} backend", run_id, kind, directory, settings.backend)
        await model.register(backend)
        plan = RolloutPlan(
            product=task.product,
            config=RolloutConfig.from_settings(settings),
            group_size=settings.group_size,
            concurrency=settings.rollout_concurrency,
            max_exceptions=settings.max_exceptions,
            seed=settings.seed,
            rollout_timeout_s=settings.rollout_timeout_s,
        )
        scorer = build_scorer(settings, task, online=kind == "learn-loop")
        records, _ = read_history(directory / ITERATIONS_FILE)
        last = records[-1] if records else {}
        run = Run(
            run_id=run_id,
            directory=directory,
            settings=settings,
            task=task,
            backend=backend,
            model=model,
            plan=plan,
            scorer=scorer,
            failures=FailureCollector(directory, run_id, settings.low_reward_threshold, product=task.product),
            retries=RetryCounter.from_metrics(last),
            usage=UsageLedger.from_totals(last, LLMPrices.from_settings(settings)),
            tracking=tracking,
            resume=state,
            config_hash=config_hash(settings),
        )
        _write_run_file(directory, run_id, kind, settings, "running")
        status = "failed"
        try:
            with ExitStack() as stack:
                stack.enter_context(recording_to(directory))
                stack.enter_context(using_ledger(run.usage))
                stack.enter_context(counting_retries(run.retries))
                yield run
            status = "finished"
        except (KeyboardInterrupt, asyncio.CancelledError):
            status = "interrupted"
            raise
        finally:
            if scorer.events is not None:
                scorer.events.save_index()
            _write_run_file(directory, run_id, kind, settings, status)
            _write_report(directory)
            tracking.log_failures(run.failures)
            tracking.finish(status)
            await backend.close()


# --------------------------------------------------------------------------- one iteration


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
        **{f"train/behaviour/{name}": value for name, value in behaviour_rates(trajectories).items()},
    }


async def _stage(run: Run, name: str, timings: dict[str, float], work: Coroutine[Any, Any, T], *, iteration: int, step: int) -> T:
    """Await one stage under its timeout (`<name>_timeout_s`); record a failure before raising."""
    timeout_s = float(getattr(run.settings, f"{name}_timeout_s"))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            result = await work
    except TimeoutError as exc:
        error: BaseException = exc
        if deadline.expired():
            error = StageTimeoutError(f"stage '{name}' ran past {name}_timeout_s={timeout_s:g}s")
        run.failures.add_exception(error, iteration=iteration + 1, step=step, stage=name)
        raise error from None
    except Exception as exc:
        run.failures.add_exception(exc, iteration=iteration + 1, step=step, stage=name)
        raise
    timings[f"{name}_s"] = time.perf_counter() - started
    return result


def _collect_no_reply(run: Run, groups: list[art.TrajectoryGroup], iteration: int, step: int) -> None:
    """Sent emails whose outcome (simulated or ingested) says no reply: an "outcome" failure."""
    for group in groups:
        for trajectory in group.trajectories:
            if trajectory.metrics.get("outcome/replied") != 0.0:
                continue
            meta = trajectory.metadata
            run.failures.add_no_reply(
                str(meta["trajectory_id"]),
                str(meta.get("prospect_id")),
                iteration=iteration,
                step=step,
                scenario_id=meta.get("scenario_id"),
                output=f"Subject: {meta.get('email_subject', '')}\n\n{meta.get('email_body', '')}",
                reward=trajectory.reward,
                reward_parts={k: float(v) for k, v in trajectory.metrics.items() if k.startswith("reward/")},
            )


class _Progress:
    """Saves the resume state (and the iteration's timings) after each completed stage."""

    def __init__(self, run: Run, iteration: int, step: int, timings: dict[str, float]) -> None:
        self.run, self.iteration, self.step, self.timings = run, iteration, step, timings
        resume = run.resume if run.resume is not None and run.resume.iteration == iteration else None
        self.resumed_stage: Stage | None = resume.stage if resume is not None else None

    def done(self, stage: Stage) -> bool:
        return self.resumed_stage is not None and stage_reached(self.resumed_stage, stage)

    def load(self, name: str) -> Any | None:
        return load_work(self.run.directory, self.iteration, name)

    def save(self, stage: Stage, model_step: int, **work: Any) -> None:
        for name, payload in work.items():
            save_work(self.run.directory, self.iteration, name, payload)
        save_work(self.run.directory, self.iteration, "meta", {"step": self.step, "timings": self.timings})
        events = self.run.scorer.events
        save_state(
            self.run.directory,
            RunState(
                run_id=self.run.run_id,
                iteration=self.iteration,
                stage=stage,
                step=model_step,
                seed=self.run.settings.seed,
                config_hash=self.run.config_hash,
                events_offset=events.offset if events is not None else None,
            ),
        )


async def _generate_and_score(run: Run, progress: _Progress, scenarios: list[Any]) -> tuple[list[art.TrajectoryGroup], ScoringSummary]:
    iteration, step, timings = progress.iteration, progress.step, progress.timings
    if progress.done("scored"):
        groups = load_groups(progress.load("groups"))
        return groups, ScoringSummary(**progress.load("scoring"))
    if progress.done("generated"):
        groups = load_groups(progress.load("groups"))
    else:
        try:
            groups = await _stage(
                run, "generate", timings, generate_trajectories(run.model, scenarios, run.plan, step=step), iteration=iteration, step=step
            )
        except RolloutFailuresError as exc:
            run.failures.collect_groups(exc.groups, iteration + 1, step, scenarios=scenarios)  # every failed rollout
            raise
        progress.save("generated", step, groups=dump_groups(groups))
    scoring = await _stage(
        run,
        "score",
        timings,
        score_trajectories(groups, scenarios, run.scorer, step=step, emails_sent=run.scorer.events is not None),
        iteration=iteration,
        step=step,
    )
    progress.save("scored", step, groups=dump_groups(groups), scoring=vars(scoring))
    return groups, scoring


async def _train(run: Run, progress: _Progress, groups: list[art.TrajectoryGroup]) -> TrainOutcome:
    if progress.done("trained"):
        saved = progress.load("train")
        logger.info("iteration {} was trained before the interruption (step {}); not training it again", progress.iteration + 1, saved["step"])
        return TrainOutcome(int(saved["step"]), saved["metrics"])
    settings = run.settings
    result = await _stage(
        run,
        "train",
        progress.timings,
        grpo_update(
            run.backend, run.model, groups, learning_rate=settings.learning_rate, retry=RetryPolicy.from_settings(settings, settings.train_retries)
        ),
        iteration=progress.iteration,
        step=progress.step,
    )
    outcome = TrainOutcome(result.step, dict(result.metrics))
    progress.save("trained", outcome.step, train={"step": outcome.step, "metrics": outcome.metrics})
    return outcome


async def _evaluate(run: Run, progress: _Progress | None, step: int, timings: dict[str, float], iteration: int) -> tuple[list[art.TrajectoryGroup], EvalSummary]:
    """Evaluate at `step`, store `evals/step_NNNN.json`; on resume, reuse a stored one."""
    if progress is not None and progress.done("evaluated") and eval_path(run.directory, step).is_file():
        return [], next(s for s in load_evaluations(run.directory) if s.step == step)
    settings = run.settings
    groups, summary = await _stage(
        run,
        "evaluate",
        timings,
        evaluate(
            run.model,
            run.task.heldout[: settings.eval_scenarios],
            run.plan,
            run.scorer,
            step=step,
            samples=settings.eval_samples,
            bootstrap_samples=settings.bootstrap_samples,
        ),
        iteration=iteration,
        step=step,
    )
    store_evaluation(run.directory, summary)
    run.failures.collect_groups(groups, iteration + 1, step, split="eval", scenarios=run.task.heldout[: settings.eval_scenarios])
    if progress is not None:
        progress.save("evaluated", step)
    return groups, summary


def _eval_comparison(run: Run, summary: EvalSummary) -> dict[str, Any]:
    earlier = [s for s in load_evaluations(run.directory) if s.step < summary.step]
    base = next((s for s in earlier if s.step == 0), None)
    return compare_evaluations(summary, earlier[-1] if earlier else None, base)


def _prune_checkpoints(run: Run) -> None:
    """Keep the latest and the best checkpoint by held-out reward (`--keep-last`, `--keep-best`).

    The embedded backend's checkpoints are folders of the run directory, pruned here. ART's
    backends prune through their own deletion (`schedule_backend_pruning`: LocalBackend keeps
    the adapters of its optimizer states; serverless checkpoints are on W&B), on the event loop
    while the iteration goes on (the next training step and the end of the run wait for it); a KL reference
    step (`--kl-penalty-reference-step`) is kept.
    """
    from codreamer.checkpoints import prune_checkpoints, schedule_backend_pruning

    settings = run.settings
    scores = {s.step: s.reward.mean for s in load_evaluations(run.directory) if s.reward is not None}
    if settings.backend != "embedded":
        protect = [] if settings.kl_penalty_reference_step is None else [settings.kl_penalty_reference_step]
        schedule_backend_pruning(run.backend, run.model, scores, keep_last=settings.keep_last, keep_best=settings.keep_best, protect=protect)
        return
    deleted = prune_checkpoints(run.directory / "checkpoints", scores, keep_last=settings.keep_last, keep_best=settings.keep_best)
    if deleted:
        logger.debug("deleted checkpoints {} (keeping the latest and the best)", deleted)


@weave.op
@traced
async def run_iteration(run: Run, iteration: int, evaluate_after: bool) -> dict[str, Any]:
    """generate -> score -> GRPO update -> evaluate -> log, timing each stage, resumable per stage."""
    settings = run.settings
    scenarios = scenarios_for_iteration(run.task.train, iteration, settings.scenarios_per_step, settings.seed)
    resumed = run.resume is not None and run.resume.iteration == iteration
    meta = load_work(run.directory, iteration, "meta") if resumed else None
    step = int(meta["step"]) if meta else await run.model.get_step()
    timings: dict[str, float] = dict(meta["timings"]) if meta else {}
    progress = _Progress(run, iteration, step, timings)
    if progress.resumed_stage is not None:
        logger.info("resuming iteration {} after its '{}' stage", iteration + 1, progress.resumed_stage)

    groups, scoring = await _generate_and_score(run, progress, scenarios)
    train_stats = RewardStats.of([t for g in groups for t in g.trajectories])
    new_failures = len(run.failures.collect_groups(groups, iteration + 1, step, scenarios=scenarios))
    _collect_no_reply(run, groups, iteration + 1, step)

    result = await _train(run, progress, groups)

    eval_groups: list[art.TrajectoryGroup] = []
    eval_fields: dict[str, Any] = {}
    if evaluate_after and settings.eval_scenarios:
        eval_groups, summary = await _evaluate(run, progress, result.step, timings, iteration)
        eval_fields = eval_record(summary, _eval_comparison(run, summary))
    _prune_checkpoints(run)

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
        **eval_fields,
        **{f"time/{k}": v for k, v in timings.items()},
        "failures/new": new_failures,
        "failures/total": len(run.failures),
        **run.retries.as_metrics(),
        **run.usage.totals(),
        "peak_rss_mb": _peak_rss_mb(),
    }
    append_record(run.history_path, record)
    _commit(run, iteration, result.step)
    if run.tracking is not None:
        run.tracking.log_metrics(record, result.step)
    return record


def _commit(run: Run, iteration: int, step: int) -> None:
    """After the history record: the next iteration starts clean, the event index is saved."""
    save_state(
        run.directory,
        RunState(
            run_id=run.run_id,
            iteration=iteration + 1,
            stage="started",
            step=step,
            seed=run.settings.seed,
            config_hash=run.config_hash,
            events_offset=run.scorer.events.offset if run.scorer.events is not None else None,
        ),
    )
    run.resume = None
    clear_work(run.directory)
    if run.scorer.events is not None:
        run.scorer.events.save_index()


# --------------------------------------------------------------------------- the loops


def _progress_line(record: dict[str, Any], total: int) -> str:
    times = " ".join(f"{k.split('/')[1].removesuffix('_s')} {v:.1f}s" for k, v in record.items() if k.startswith("time/"))
    line = (
        f"iter {record['iteration']}/{total} step {record['step']} "
        f"reward {record['train/reward_mean']:.3f}±{record['train/reward_std']:.3f} "
        f"[{record['train/reward_min']:.2f}, {record['train/reward_max']:.2f}]"
    )
    if record.get("eval/reward_mean") is not None:
        low, high = record.get("eval/reward_ci_low"), record.get("eval/reward_ci_high")
        line += f" eval {record['eval/reward_mean']:.3f}"
        if low is not None and high is not None:
            line += f" [{low:.2f}, {high:.2f}]"
    return f"{line} | {times} | peak {record['peak_rss_mb']:.0f} MB"


def committed_iterations(run: Run) -> int:
    records, _ = read_history(run.history_path)
    return max((int(r.get("iteration", 0)) for r in records), default=0)


async def _evaluate_base(run: Run) -> None:
    """`--eval-before-train`: evaluate the untrained policy (step 0) once per run."""
    if not (run.settings.eval_before_train and run.settings.eval_scenarios):
        return
    if eval_path(run.directory, 0).is_file() or await run.model.get_step() != 0:
        return
    with logger.contextualize(iteration=0):
        _, summary = await _evaluate(run, None, 0, {}, -1)
        _log_evaluation("base model", summary)


async def _warm_start(run: Run) -> None:
    """`--warm-start demos`: SFT on demonstrations before the first RL step, once per run; then
    the warm-started policy is evaluated, so the report can show its effect apart from RL's."""
    settings = run.settings
    done = load_warm_start(run.directory)
    if done is None and settings.warm_start != "off" and await run.model.get_step() == 0:
        timings: dict[str, float] = {}
        with logger.contextualize(iteration=0):
            done = await _stage(
                run,
                "train",
                timings,
                run_warm_start(run.model, settings, run.task.product, run.task.train),
                iteration=-1,
                step=0,
            )
            save_warm_start(run.directory, done)
            losses = f"{done.losses[0]:.3f} -> {done.losses[-1]:.3f}" if done.losses else "n/a"
            logger.info("warm start done in {:.0f}s: step {}, loss {}", done.seconds, done.step, losses)
    if done is None or not settings.eval_scenarios or eval_path(run.directory, done.step).is_file():
        return
    if await run.model.get_step() == done.step:
        with logger.contextualize(iteration=0):
            _, summary = await _evaluate(run, None, done.step, {}, -1)
            _log_evaluation("warm start", summary, _eval_comparison(run, summary))


def _log_behaviour_line(record: dict[str, Any]) -> None:
    """After an evaluated iteration: what the agent did on held-out, and the paired delta to the base."""
    low, high = record.get("eval/delta_base_ci_low"), record.get("eval/delta_base_ci_high")
    delta = record.get("eval/delta_base")
    versus = "" if delta is None or low is None else f"; vs base {delta:+.3f} (paired 95% CI [{low:+.3f}, {high:+.3f}])"
    logger.info(
        "held-out at step {}: self-finalised {:.0%}, looked up {:.0%}{}",
        record["step"],
        record.get("eval/behaviour/self_finalized", float("nan")),
        record.get("eval/behaviour/looked_up", float("nan")),
        versus,
    )


def _log_evaluation(label: str, summary: EvalSummary, comparison: dict[str, Any] | None = None) -> None:
    """One line: held-out reward with its CI, the behaviour rates, and the paired delta to the base model."""
    total = summary.reward
    if total is None:
        logger.warning("{} (step {}): every held-out rollout failed", label, summary.step)
        return
    rates = summary.behaviour
    line = (
        f"{label} (step {summary.step}): held-out reward {total.mean:.3f} "
        f"[{total.ci_low if total.ci_low is not None else float('nan'):.2f}, "
        f"{total.ci_high if total.ci_high is not None else float('nan'):.2f}], "
        f"self-finalised {rates.get('self_finalized', float('nan')):.0%}, looked up {rates.get('looked_up', float('nan')):.0%}"
    )
    base = (comparison or {}).get("base") or {}
    if base.get("delta") is not None:
        low, high = base.get("delta_ci") or (float("nan"), float("nan"))
        line += f"; vs base {base['delta']:+.3f} (paired 95% CI [{low:+.3f}, {high:+.3f}], n={base.get('paired_n', 0)})"
    logger.info(line)


async def _iterate(run: Run, total: int, evaluate_every: int) -> list[dict[str, Any]]:
    start = committed_iterations(run)
    if start >= total:
        logger.info("run already has {} of {} iterations; nothing to do", start, total)
        return []
    if start:
        logger.info("continuing after iteration {} (of {})", start, total)
    await _evaluate_base(run)
    await _warm_start(run)
    records = []
    for iteration in range(start, total):
        with logger.contextualize(iteration=iteration + 1):
            is_last = iteration + 1 == total
            record = await run_iteration(run, iteration, evaluate_after=is_last or (iteration + 1) % evaluate_every == 0)
            logger.info(_progress_line(record, total))
            if record.get("eval/reward_mean") is not None:
                _log_behaviour_line(record)
            records.append(record)
    return records


async def _finish(run: Run) -> None:
    from codreamer.checkpoints import wait_for_pruning

    await wait_for_pruning()  # an ART backend's checkpoint pruning still running is not cut short
    logger.info("done: run {} at step {}; history in {}", run.run_id, await run.model.get_step(), run.history_path)


def _write_report(directory: Path) -> None:
    """report.md + reward_curve.png, after run.json has its final status."""
    from codreamer.reports import write_run_report

    if not (directory / ITERATIONS_FILE).is_file():
        return
    try:
        write_run_report(directory)  # logs where it wrote
    except Exception as exc:  # a report must never turn a finished run into a failed one
        logger.warning("could not write the run report: {}: {}", type(exc).__name__, exc)


@weave.op
async def run_learning_loop(num_iters: int, run_id: str | None = None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The continuous learning loop: `num_iters` iterations in total, evaluating every
    `eval_every` iterations (0: after the last only), after the base model and the warm start."""
    settings = (settings or Settings()).model_copy(update={"iterations": num_iters, "run_id": run_id or (settings.run_id if settings else None)})
    async with open_run(settings, "learn-loop") as run:
        with logger.contextualize(run_id=run.run_id):
            records = await _iterate(run, num_iters, evaluate_every=settings.eval_every or num_iters)
            await _finish(run)
            return records


@weave.op
async def run_training(settings: Settings) -> list[dict[str, Any]]:
    """Plain training: `epochs` passes over the training scenarios, evaluating at the end."""
    steps = settings.max_steps or settings.epochs * iterations_per_epoch(len(load_task_data(settings.data_dir).train), settings.scenarios_per_step)
    async with open_run(settings, "train") as run:
        with logger.contextualize(run_id=run.run_id):
            records = await _iterate(run, steps, evaluate_every=max(steps, 1))
            await _finish(run)
            return records

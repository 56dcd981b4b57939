"""One iteration: generate + score (+ delayed credit) -> GRPO update -> evaluate -> prune -> log -> commit.

With online outcomes, the emails of the training rollouts are recorded in the outbox before
scoring, and after scoring the groups of earlier iterations whose outcome arrived since the
last step are re-scored and join the step (`codreamer.pipeline.outcomes`, `.credit`); the
selection is saved with the `scored` stage and its markers committed with the history record.

`run_iteration(run, iteration, evaluate_after)` runs iteration number `iteration` (from 1,
as in the history, the reports and W&B; see `codreamer.pipeline.state`). Each stage runs
under its timeout (`timed_stage`) and is recorded as done in the resume state (`Progress`),
so an iteration interrupted after its `trained` stage continues after it without training
again. The iteration is committed by its history record; then the resume state moves to the
next iteration and the work files are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import art
import weave
from loguru import logger

from codreamer.backends.factory import train_options
from codreamer.checkpoints import prune_checkpoints, prune_through_backend
from codreamer.domain import Scenario
from codreamer.local_trace import traced
from codreamer.pipeline.credit import ReplayPlan
from codreamer.pipeline.evaluation import (
    EvalSummary,
    compare_evaluations,
    eval_path,
    eval_record,
    load_evaluations,
    store_evaluation,
)
from codreamer.pipeline.fanout import RolloutFailuresError
from codreamer.pipeline.history import append_record
from codreamer.pipeline.outcomes import credit_before_step, record_outbox
from codreamer.pipeline.progress import Progress, state_of, timed_stage
from codreamer.pipeline.records import iteration_record
from codreamer.pipeline.run import Run
from codreamer.pipeline.scenarios import scenarios_for_iteration
from codreamer.pipeline.stages import (
    RewardStats,
    evaluate,
    generate_trajectories,
    grpo_update,
    log_rewards_metrics,
    score_trajectories,
)
from codreamer.pipeline.state import clear_work, dump_groups, load_groups, load_work, save_state
from codreamer.retry import RetryPolicy
from codreamer.rewards.scoring import ScoringSummary


@dataclass
class TrainOutcome:
    """What the loop keeps of a training step (also restored from the work file on resume)."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def _collect_no_reply(run: Run, groups: list[art.TrajectoryGroup], iteration: int, step: int) -> None:
    """Sent emails whose outcome (simulated or ingested) says no reply: an "outcome" failure,
    labelled with where outcomes come from (`outcome_source`: simulator or event log). A
    replayed trajectory counts for the iteration it was sent in (recorded once)."""
    source = "simulator (seeded ProspectSimulator, not real data)" if run.scorer.simulator else "event log"
    for group in groups:
        for trajectory in group.trajectories:
            if trajectory.metrics.get("outcome/replied") != 0.0:
                continue
            meta = trajectory.metadata
            sent = trajectory.metrics.get("replay/sent_iteration")
            run.failures.add_no_reply(
                str(meta["trajectory_id"]),
                str(meta.get("prospect_id")),
                iteration=iteration if sent is None else int(sent),
                step=int(meta.get("step", step)) if sent is not None else step,
                agent_state={"outcome_source": source},
                scenario_id=meta.get("scenario_id"),
                output=f"Subject: {meta.get('email_subject', '')}\n\n{meta.get('email_body', '')}",
                reward=trajectory.reward,
                reward_parts={k: float(v) for k, v in trajectory.metrics.items() if k.startswith("reward/")},
            )


async def _generate(run: Run, progress: Progress, scenarios: list[Scenario]) -> list[art.TrajectoryGroup]:
    iteration, step = progress.iteration, progress.step
    work = generate_trajectories(run.model, scenarios, run.plan, step=step)
    try:
        groups = await timed_stage(run, "generate", progress.timings, work, iteration=iteration, step=step)
    except RolloutFailuresError as exc:
        run.failures.collect_groups(exc.groups, iteration, step, scenarios=scenarios)  # every failed rollout
        raise
    progress.save("generated", step, groups=dump_groups(groups))
    return groups


async def _generate_and_score(
    run: Run, progress: Progress, scenarios: list[Scenario]
) -> tuple[list[art.TrajectoryGroup], ScoringSummary, ReplayPlan]:
    iteration = progress.iteration
    if progress.done("scored"):
        replay = ReplayPlan.load(load_work(run.directory, iteration, "replay"))
        return load_groups(progress.load("groups")), ScoringSummary(**progress.load("scoring")), replay
    if progress.done("generated"):
        groups = load_groups(progress.load("groups"))
    else:
        groups = await _generate(run, progress, scenarios)
    step = progress.step
    online = run.scorer.events is not None
    if online:  # sent when scored: the outbox holds them first (once each, whatever a resume repeats)
        record_outbox(run, groups, iteration, step)
    work = score_trajectories(groups, scenarios, run.scorer, step=step, emails_sent=online, iteration=iteration)
    scoring = await timed_stage(run, "score", progress.timings, work, iteration=iteration, step=step)
    replay = credit_before_step(run, groups, iteration, step) if online else ReplayPlan()
    progress.save("scored", step, groups=dump_groups(groups), scoring=vars(scoring), replay=replay.dump())
    return groups, scoring, replay


async def _train(run: Run, progress: Progress, groups: list[art.TrajectoryGroup]) -> TrainOutcome:
    if progress.done("trained"):
        saved = progress.load("train")
        logger.info(
            "iteration {} was trained before the interruption (step {}); not training it again",
            progress.iteration,
            saved["step"],
        )
        return TrainOutcome(int(saved["step"]), saved["metrics"])
    settings = run.settings
    work = grpo_update(
        run.backend,
        run.model,
        groups,
        learning_rate=settings.learning_rate,
        retry=RetryPolicy.from_settings(settings, settings.train_retries),
        options=train_options(settings),
    )
    result = await timed_stage(run, "train", progress.timings, work, iteration=progress.iteration, step=progress.step)
    outcome = TrainOutcome(result.step, dict(result.metrics))
    progress.save("trained", outcome.step, train={"step": outcome.step, "metrics": outcome.metrics})
    return outcome


async def evaluate_at(
    run: Run, progress: Progress | None, step: int, timings: dict[str, float], iteration: int
) -> tuple[list[art.TrajectoryGroup], EvalSummary]:
    """Evaluate at `step`, store `evals/step_NNNN.json`; on resume, reuse a stored one.

    `iteration` 0 is an evaluation before the first iteration (the base model, the warm start).
    """
    if progress is not None and progress.done("evaluated") and eval_path(run.directory, step).is_file():
        return [], next(s for s in load_evaluations(run.directory) if s.step == step)
    settings = run.settings
    heldout = run.task.heldout[: settings.eval_scenarios]
    work = evaluate(
        run.model,
        heldout,
        run.plan,
        run.scorer,
        step=step,
        samples=settings.eval_samples,
        bootstrap_samples=settings.bootstrap_samples,
    )
    groups, summary = await timed_stage(run, "evaluate", timings, work, iteration=iteration, step=step)
    store_evaluation(run.directory, summary)
    run.failures.collect_groups(groups, iteration, step, split="eval", scenarios=heldout)
    if progress is not None:
        progress.save("evaluated", step)
    return groups, summary


def eval_comparison(run: Run, summary: EvalSummary) -> dict[str, Any]:
    """`summary` against the previous evaluation and the base model's (step 0)."""
    earlier = [s for s in load_evaluations(run.directory) if s.step < summary.step]
    base = next((s for s in earlier if s.step == 0), None)
    return compare_evaluations(summary, earlier[-1] if earlier else None, base)


async def prune_run_checkpoints(run: Run) -> None:
    """Keep the latest and the best checkpoint by held-out reward (`--keep-last`, `--keep-best`).

    The embedded backend's checkpoints are folders of the run directory, pruned here. ART's
    backends prune through their own deletion (`prune_through_backend`: LocalBackend keeps
    the adapters of its optimizer states; serverless checkpoints are on W&B), awaited here, so
    the next training step never overlaps it; a KL reference step
    (`--kl-penalty-reference-step`) is kept. A failed deletion is a warning, never an error:
    the next iteration tries again.
    """
    settings = run.settings
    scores = {s.step: s.reward.mean for s in load_evaluations(run.directory) if s.reward is not None}
    keep_last, keep_best = settings.keep_last, settings.keep_best
    if settings.backend == "embedded":
        deleted = prune_checkpoints(run.directory / "checkpoints", scores, keep_last=keep_last, keep_best=keep_best)
        if deleted:
            logger.debug("deleted checkpoints {} (keeping the latest and the best)", deleted)
        return
    protect = [] if settings.kl_penalty_reference_step is None else [settings.kl_penalty_reference_step]
    try:
        await prune_through_backend(
            run.backend, run.model, scores, keep_last=keep_last, keep_best=keep_best, protect=protect
        )
    except Exception as exc:  # noqa: BLE001 - a failed deletion must not stop the run
        logger.warning(
            "could not prune checkpoints through the {}: {}: {}", type(run.backend).__name__, type(exc).__name__, exc
        )


def _commit(run: Run, iteration: int, step: int) -> None:
    """After the history record: the next iteration starts clean, the event index is saved."""
    save_state(run.directory, state_of(run, iteration + 1, "started", step))
    run.resume = None
    clear_work(run.directory)
    if run.scorer.events is not None:
        run.scorer.events.save_index()


@weave.op
@traced
async def run_iteration(run: Run, iteration: int, evaluate_after: bool) -> dict[str, Any]:
    """generate -> score -> GRPO update -> evaluate -> log, timing each stage, resumable per stage.

    `iteration` is the iteration's number, from 1; returns its history record.
    """
    settings = run.settings
    scenarios = scenarios_for_iteration(run.task.train, iteration - 1, settings.scenarios_per_step, settings.seed)
    resumed = run.resume is not None and run.resume.iteration == iteration
    meta = load_work(run.directory, iteration, "meta") if resumed else None
    step = int(meta["step"]) if meta else await run.model.get_step()
    timings: dict[str, float] = dict(meta["timings"]) if meta else {}
    progress = Progress(run, iteration, step, timings)
    if progress.resumed_stage is not None:
        logger.info("resuming iteration {} after its '{}' stage", iteration, progress.resumed_stage)

    groups, scoring, replay = await _generate_and_score(run, progress, scenarios)
    train_stats = RewardStats.of([t for g in groups for t in g.trajectories])
    new_failures = len(run.failures.collect_groups(groups, iteration, step, scenarios=scenarios))
    _collect_no_reply(run, groups, iteration, step)
    _collect_no_reply(run, replay.groups, iteration, step)

    result = await _train(run, progress, groups + replay.groups)

    eval_groups: list[art.TrajectoryGroup] = []
    eval_fields: dict[str, Any] = {}
    if evaluate_after and settings.eval_scenarios:
        eval_groups, summary = await evaluate_at(run, progress, result.step, timings, iteration)
        eval_fields = eval_record(summary, eval_comparison(run, summary))
    await prune_run_checkpoints(run)

    started = time.perf_counter()
    await log_rewards_metrics(run.model, groups, eval_groups, result.metrics, step=result.step)
    timings["log_s"] = time.perf_counter() - started

    record = iteration_record(
        run,
        iteration,
        result.step,
        scenarios,
        groups,
        train_stats,
        scoring,
        result.metrics,
        eval_fields,
        timings,
        new_failures,
    )
    record |= replay.record_fields()  # the replay markers are committed with the record
    record["train/trajectory_ids"] = [str(t.metadata["trajectory_id"]) for g in groups for t in g.trajectories]
    append_record(run.history_path, record)
    _commit(run, iteration, result.step)
    run.tracking.log_metrics(record, result.step)
    run.tracking.log_failures(run.failures, result.step)  # this iteration's new failures, at its step
    return record

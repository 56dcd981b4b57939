"""The loops: `run_learning_loop` (iterate, evaluate, log) and `run_training` (plain epochs).

Each opens a run (`codreamer.pipeline.run.open_run`: directory, resume checks, tracking,
task, backend, model), runs what comes before the first iteration (`baselines`), then
iterations `committed + 1 .. total` (`iteration.run_iteration`), one history record each.
Every completed stage is recorded in `codreamer_state.json` (`codreamer.pipeline.state`), so
running again with the same `--run-id` continues with the first stage that did not complete:
no iteration is trained twice and none is lost, even after `kill -9`.

Iterations are numbered from 1 everywhere: in the history, reports, W&B, logs, the resume
state and the trace (`codreamer trace RUN_ID --iteration N`). Tracking is started once, by
`open_run`, before the loop's op (named after the public function) is called: so the Weave
tree starts at the loop itself and its iterations are below it.
"""

from __future__ import annotations

from typing import Any

import weave
from loguru import logger

from codreamer.config import Settings
from codreamer.pipeline.baselines import evaluate_base, warm_start
from codreamer.pipeline.iteration import run_iteration
from codreamer.pipeline.records import log_behaviour_line, progress_line
from codreamer.pipeline.run import Run, committed_iterations, open_run
from codreamer.pipeline.scenarios import iterations_per_epoch

__all__ = ["run_learning_loop", "run_training"]


async def _iterate(run: Run, total: int, evaluate_every: int) -> list[dict[str, Any]]:
    """Iterations `committed + 1 .. total`, evaluating every `evaluate_every` and after the last."""
    done = committed_iterations(run)
    if done >= total:
        logger.info("run already has {} of {} iterations; nothing to do", done, total)
        return []
    if done:
        logger.info("continuing after iteration {} (of {})", done, total)
    await evaluate_base(run)
    await warm_start(run)
    records = []
    for iteration in range(done + 1, total + 1):
        with logger.contextualize(iteration=iteration):
            evaluate_after = iteration == total or iteration % evaluate_every == 0
            record = await run_iteration(run, iteration, evaluate_after=evaluate_after)
            logger.info(progress_line(record, total))
            if record.get("eval/reward_mean") is not None:
                log_behaviour_line(record)
            records.append(record)
    return records


@weave.op(name="run_learning_loop")
async def _learning_loop(run: Run, total: int, evaluate_every: int) -> list[dict[str, Any]]:
    with logger.contextualize(run_id=run.run_id):
        return await _iterate(run, total, evaluate_every)


@weave.op(name="run_training")
async def _training(run: Run, steps: int) -> list[dict[str, Any]]:
    with logger.contextualize(run_id=run.run_id):
        return await _iterate(run, steps, evaluate_every=max(steps, 1))


async def run_learning_loop(
    num_iters: int, run_id: str | None = None, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """The continuous learning loop: `num_iters` iterations in total, evaluating every
    `eval_every` iterations (0: after the last only), after the base model and the warm start."""
    settings = (settings or Settings()).model_copy(
        update={"iterations": num_iters, "run_id": run_id or (settings.run_id if settings else None)}
    )
    async with open_run(settings, "learn-loop") as run:
        return await _learning_loop(run, num_iters, settings.eval_every or num_iters)


async def run_training(settings: Settings) -> list[dict[str, Any]]:
    """Plain training: `epochs` passes over the training scenarios (or `max_steps`), evaluating at the end."""
    async with open_run(settings, "train") as run:
        steps = settings.max_steps or settings.epochs * iterations_per_epoch(
            len(run.task.train), settings.scenarios_per_step
        )
        return await _training(run, steps)

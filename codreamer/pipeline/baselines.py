"""Before the first iteration: the base model's evaluation and the warm start, once per run.

What RL's gain is measured against. `--eval-before-train` evaluates the untrained policy
(step 0); `--warm-start demos` runs SFT on demonstrations (`codreamer.pipeline.warm_start`)
and evaluates the warm-started policy, so the report can show its effect apart from RL's.
Both count as iteration 0 (iterations are numbered from 1) and are skipped on resume when
their files exist (`evals/step_NNNN.json`, `warm_start.json`).
"""

from __future__ import annotations

from loguru import logger

from codreamer.pipeline.evaluation import eval_path
from codreamer.pipeline.iteration import eval_comparison, evaluate_at
from codreamer.pipeline.progress import timed_stage
from codreamer.pipeline.records import log_evaluation
from codreamer.pipeline.run import Run
from codreamer.pipeline.warm_start import load_warm_start, run_warm_start, save_warm_start

BEFORE_FIRST_ITERATION = 0


async def evaluate_base(run: Run) -> None:
    """`--eval-before-train`: evaluate the untrained policy (step 0) once per run."""
    if not (run.settings.eval_before_train and run.settings.eval_scenarios):
        return
    if eval_path(run.directory, 0).is_file() or await run.model.get_step() != 0:
        return
    with logger.contextualize(iteration=BEFORE_FIRST_ITERATION):
        _, summary = await evaluate_at(run, None, 0, {}, BEFORE_FIRST_ITERATION)
        log_evaluation("base model", summary)


async def warm_start(run: Run) -> None:
    """`--warm-start demos`: SFT on demonstrations before the first RL step, once per run; then
    the warm-started policy is evaluated, so the report can show its effect apart from RL's."""
    settings = run.settings
    done = load_warm_start(run.directory)
    if done is None and settings.warm_start != "off" and await run.model.get_step() == 0:
        with logger.contextualize(iteration=BEFORE_FIRST_ITERATION):
            work = run_warm_start(run.model, settings, run.task.product, run.task.train)
            done = await timed_stage(run, "train", {}, work, iteration=BEFORE_FIRST_ITERATION, step=0)
            save_warm_start(run.directory, done)
            losses = f"{done.losses[0]:.3f} -> {done.losses[-1]:.3f}" if done.losses else "n/a"
            logger.info("warm start done in {:.0f}s: step {}, loss {}", done.seconds, done.step, losses)
    if done is None or not settings.eval_scenarios or eval_path(run.directory, done.step).is_file():
        return
    if await run.model.get_step() == done.step:
        with logger.contextualize(iteration=BEFORE_FIRST_ITERATION):
            _, summary = await evaluate_at(run, None, done.step, {}, BEFORE_FIRST_ITERATION)
            log_evaluation("warm start", summary, eval_comparison(run, summary))

"""Running one stage of an iteration: under its timeout, recorded when it fails, resumable.

`timed_stage` awaits a stage under `<name>_timeout_s`, adds its duration to the iteration's
timings, and hands a failure to the failure collector before it propagates. `Progress`
writes the resume state (`codreamer.pipeline.state`) after each completed stage, with the
work files a later stage needs, and says which stages a resumed iteration has done already.
Iterations are numbered from 1, as everywhere (`codreamer.pipeline.state`); 0 is the work
before the first iteration (the base model's evaluation, the warm start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from codreamer.pipeline.state import (
    STATE_FILE,
    RunState,
    RunStateError,
    Stage,
    load_work,
    save_state,
    save_work,
    stage_reached,
    work_dir,
)

if TYPE_CHECKING:
    from codreamer.pipeline.run import Run


class StageTimeoutError(TimeoutError):
    """A stage ran past its timeout from settings."""


async def timed_stage[T](
    run: Run, name: str, timings: dict[str, float], work: Coroutine[Any, Any, T], *, iteration: int, step: int
) -> T:
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
        run.failures.add_exception(error, iteration=iteration, step=step, stage=name)
        raise error from None
    except Exception as exc:
        run.failures.add_exception(exc, iteration=iteration, step=step, stage=name)
        raise
    timings[f"{name}_s"] = time.perf_counter() - started
    return result


class Progress:
    """Saves the resume state (and the iteration's timings) after each completed stage."""

    def __init__(self, run: Run, iteration: int, step: int, timings: dict[str, float]) -> None:
        self.run, self.iteration, self.step, self.timings = run, iteration, step, timings
        resume = run.resume if run.resume is not None and run.resume.iteration == iteration else None
        self.resumed_stage: Stage | None = resume.stage if resume is not None else None

    def done(self, stage: Stage) -> bool:
        return self.resumed_stage is not None and stage_reached(self.resumed_stage, stage)

    def load(self, name: str) -> Any:
        """The work file `name` of a stage the resume state says is done."""
        data = load_work(self.run.directory, self.iteration, name)
        if data is None:
            path = work_dir(self.run.directory, self.iteration) / f"{name}.json"
            raise RunStateError(f"{path} is missing but the resume state says its stage is done; delete {STATE_FILE}")
        return data

    def save(self, stage: Stage, model_step: int, **work: Any) -> None:
        for name, payload in work.items():
            save_work(self.run.directory, self.iteration, name, payload)
        save_work(self.run.directory, self.iteration, "meta", {"step": self.step, "timings": self.timings})
        save_state(self.run.directory, state_of(self.run, self.iteration, stage, model_step))


def state_of(run: Run, iteration: int, stage: Stage, step: int) -> RunState:
    """The resume state of `run` with iteration `iteration` at `stage` (model at `step`)."""
    events = run.scorer.events
    return RunState(
        run_id=run.run_id,
        iteration=iteration,
        stage=stage,
        step=step,
        seed=run.settings.seed,
        config_hash=run.config_hash,
        events_offset=events.offset if events is not None else None,
    )

"""The run lifecycle and the iteration-numbering convention, without a model.

`FakeBackend` is a TEST DOUBLE of a training backend (registers, reports its step, closes);
`fake_iteration` stands in for `run_iteration` and appends the record the real one would
commit. What is real: `open_run` (run.json, resume checks, tracking, wiring, close), the
loop (`run_learning_loop`, `run_training`), the resume state and its files.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from weave.trace.op import Op

import codreamer.pipeline.loop as loop
import codreamer.pipeline.run as run_module
from codreamer.config import Settings
from codreamer.pipeline.history import append_record, read_history
from codreamer.pipeline.progress import state_of
from codreamer.pipeline.run import _resume_state, open_run
from codreamer.pipeline.state import STATE_FILE, RunState, load_state, save_state, work_dir
from codreamer.tracking import process


class FakeBackend:
    """TEST DOUBLE of a backend: no model, a step counter, and whether it was closed."""

    def __init__(self) -> None:
        self.step = 0
        self.closed = False

    async def register(self, model: Any) -> None:
        return None

    async def _prepare_backend_for_training(self, model: Any, config: Any) -> tuple[str, str]:
        return "http://127.0.0.1:9/v1", "unused"

    async def _get_step(self, model: Any) -> int:
        return self.step

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """What happened, in order: tracking started (run id, resumed), iterations run (number, evaluated)."""
    seen: list[tuple[Any, ...]] = []
    backend = FakeBackend()
    monkeypatch.setattr(process, "STATE", process.ProcessState())
    monkeypatch.setattr(run_module, "create_backend", lambda settings: backend)
    real_init = run_module.init_tracking

    def init_tracking(settings: Settings, directory: Path, run_id: str, resumed: bool) -> Any:
        seen.append(("tracking", run_id, resumed))
        return real_init(settings, directory, run_id, resumed)

    async def fake_iteration(run: Any, iteration: int, evaluate_after: bool) -> dict[str, Any]:
        seen.append(("iteration", iteration, evaluate_after))
        backend.step += 1
        record = {
            "iteration": iteration, "step": backend.step, "train/reward_mean": 0.5, "train/reward_std": 0.1,
            "train/reward_min": 0.4, "train/reward_max": 0.6, "peak_rss_mb": 1.0,
        }  # fmt: skip
        append_record(run.history_path, record)
        return record

    monkeypatch.setattr(run_module, "init_tracking", init_tracking)
    monkeypatch.setattr(loop, "run_iteration", fake_iteration)
    seen.append(("backend", backend))
    return seen


def _settings(tmp_path: Path, **values: Any) -> Settings:
    base = {"runs_dir": tmp_path, "wandb": False, "outcomes": "off", "warm_start": "off", "eval_before_train": False}
    return Settings(_env_file=None, **(base | values))  # type: ignore[call-arg]


def test_iterations_are_numbered_from_1_and_a_resume_continues_after_the_last(
    tmp_path: Path, events: list[Any]
) -> None:
    settings = _settings(tmp_path, eval_every=2)
    records = asyncio.run(loop.run_learning_loop(1, "numbers", settings))
    assert [r["iteration"] for r in records] == [1]
    records = asyncio.run(loop.run_learning_loop(3, "numbers", settings))
    assert [r["iteration"] for r in records] == [2, 3]
    assert [e[1:] for e in events if e[0] == "iteration"] == [(1, True), (2, True), (3, True)]  # 1: last; 2: every 2nd
    directory = tmp_path / "codreamer" / "models" / "numbers"
    history, _ = read_history(directory / "iterations.jsonl")
    assert [r["iteration"] for r in history] == [1, 2, 3]
    assert asyncio.run(loop.run_learning_loop(3, "numbers", settings)) == []  # nothing left to do


def test_tracking_is_started_once_per_run_before_the_loops_op(tmp_path: Path, events: list[Any]) -> None:
    asyncio.run(loop.run_learning_loop(2, "once", _settings(tmp_path)))
    kinds = [e[0] for e in events if e[0] != "backend"]
    assert kinds == ["tracking", "iteration", "iteration"]  # started once, before the first iteration
    assert events[1] == ("tracking", "once", False)
    # The loop's body is the op (named after the public function, so the Weave tree keeps its
    # root); the public function is plain, so it can start tracking before the first op runs.
    assert isinstance(loop._learning_loop, Op) and loop._learning_loop.name == "run_learning_loop"
    assert isinstance(loop._training, Op) and loop._training.name == "run_training"
    assert not isinstance(loop.run_learning_loop, Op) and not isinstance(loop.run_training, Op)
    directory = tmp_path / "codreamer" / "models" / "once"
    assert json.loads((directory / "run.json").read_text())["status"] == "finished"
    assert len((directory / "tracking.jsonl").read_text().splitlines()) == 1
    assert events[0][1].closed


def test_run_training_loads_the_task_once_and_runs_its_steps(
    tmp_path: Path, events: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    real_load = run_module.load_task_data
    monkeypatch.setattr(run_module, "load_task_data", lambda folder: loads.append(folder) or real_load(folder))
    records = asyncio.run(loop.run_training(_settings(tmp_path, run_id="plain", max_steps=2)))
    assert [r["iteration"] for r in records] == [1, 2] and len(loads) == 1
    assert [e[1:] for e in events if e[0] == "iteration"] == [(1, False), (2, True)]  # evaluated at the end


def test_a_failed_run_is_closed_as_failed(tmp_path: Path, events: list[Any]) -> None:
    async def failing() -> None:
        async with open_run(_settings(tmp_path, run_id="boom"), "learn-loop"):
            raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        asyncio.run(failing())
    directory = tmp_path / "codreamer" / "models" / "boom"
    assert json.loads((directory / "run.json").read_text())["status"] == "failed" and events[0][1].closed


# --------------------------------------------------------------------------- the resume state's numbers


def test_a_state_written_with_iterations_from_0_is_read_with_iterations_from_1(tmp_path: Path) -> None:
    old = {"run_id": "r", "iteration": 0, "stage": "trained", "step": 1, "seed": 0, "config_hash": "h"}
    (tmp_path / STATE_FILE).write_text(json.dumps(old))  # as written before the convention (no version)
    state = load_state(tmp_path)
    assert state is not None and (state.iteration, state.version, state.stage) == (1, 2, "trained")
    assert work_dir(tmp_path, state.iteration).name == "iter_0001"  # where the old state kept its work files
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state  # converted once, not at every read


def test_the_state_of_a_committed_iteration_is_not_resumed(tmp_path: Path) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    run: Any = SimpleNamespace(run_id="r", settings=settings, config_hash="h", scorer=SimpleNamespace(events=None))
    save_state(tmp_path, state_of(run, 1, "evaluated", 1))
    assert _resume_state(tmp_path, "r") == load_state(tmp_path)  # iteration 1 in progress
    append_record(tmp_path / "iterations.jsonl", {"iteration": 1, "step": 1})
    assert _resume_state(tmp_path, "r") is None  # killed between its record and the state write
    save_state(tmp_path, state_of(run, 2, "started", 1))  # what the commit writes: the next iteration
    state = _resume_state(tmp_path, "r")
    assert isinstance(state, RunState) and (state.iteration, state.stage) == (2, "started")

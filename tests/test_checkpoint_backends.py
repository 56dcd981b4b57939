"""Checkpoint retention through the backend's own deletion (ART's LocalBackend, ServerlessBackend).

`HostedBackend` is a TEST DOUBLE of a backend whose checkpoints live elsewhere (as W&B's):
it holds a set of steps and implements ART's `_delete_checkpoint_files(model, steps_to_keep)`.
One test drives the real `ServerlessBackend._delete_checkpoint_files` against a double of its
W&B client, so the call matches what ART does with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import art
import pytest
from loguru import logger

from codreamer.checkpoints import checkpoint_steps, prune_through_backend, retained_steps
from codreamer.config import Settings
from codreamer.pipeline.evaluation import EvalSummary, PartStats, store_evaluation
from codreamer.pipeline.iteration import prune_run_checkpoints
from codreamer.pipeline.stages import grpo_update

pytestmark = pytest.mark.timeout(60)


class HostedModel:
    """TEST DOUBLE of a trainable model: its step, as the backend reports it."""

    id = "model-1"

    def __init__(self, step: int) -> None:
        self.step = step

    async def get_step(self) -> int:
        return self.step


class HostedBackend:
    """TEST DOUBLE of a backend with remote checkpoints: deletes what is not kept, records calls."""

    def __init__(self, steps: list[int], *, fail: bool = False, gate: asyncio.Event | None = None) -> None:
        self.steps = set(steps)
        self.kept_calls: list[list[int]] = []
        self.fail = fail
        self.gate = gate
        self.deletions_done = 0
        self.deletions_done_at_train: list[int] = []

    async def _delete_checkpoint_files(self, model: Any, steps_to_keep: list[int]) -> None:
        self.kept_calls.append(list(steps_to_keep))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("W&B is unreachable")
        self.steps &= set(steps_to_keep)
        self.deletions_done += 1

    async def train(self, model: Any, groups: Any, **kwargs: Any) -> art.TrainResult:
        self.deletions_done_at_train.append(self.deletions_done)
        model.step += 1
        self.steps.add(model.step)
        return art.TrainResult(step=model.step, metrics={})


@pytest.fixture
def warnings_seen() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def _summary(step: int, mean: float) -> EvalSummary:
    stats = PartStats(n=2, mean=mean, std=0.0, min=mean, max=mean, ci_low=mean, ci_high=mean)
    return EvalSummary(step=step, n=2, parts={"reward": stats})


def test_the_same_policy_as_the_local_folders() -> None:
    scores = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.1}
    assert retained_steps([1, 2, 3, 4, 5], scores) == {2, 5}
    assert retained_steps([1, 2, 3, 4, 5], scores, keep_last=2, keep_best=False) == {4, 5}
    assert retained_steps([1, 2, 3], {}, keep_last=None) == {1, 2, 3}
    assert retained_steps([1, 2, 3], {}, protect=[1]) == {1, 3}
    with pytest.raises(ValueError, match="keep_last"):
        retained_steps([1], {}, keep_last=0)


def test_hosted_checkpoints_are_pruned_to_the_latest_and_the_best() -> None:
    backend, model = HostedBackend([1, 2, 3, 4, 5]), HostedModel(5)
    kept = asyncio.run(prune_through_backend(backend, model, {0: 0.95, 1: 0.2, 2: 0.9, 3: 0.1, 5: 0.1}))
    assert kept == [0, 5]  # the base model (step 0) scored best: its step is kept, whatever the backend holds for it
    assert backend.steps == {5}
    backend = HostedBackend([1, 2, 3, 4, 5])
    assert asyncio.run(prune_through_backend(backend, model, {1: 0.2, 2: 0.9, 3: 0.1}, protect=[3])) == [2, 3, 5]
    assert backend.steps == {2, 3, 5}
    backend = HostedBackend([1, 2, 3])
    assert asyncio.run(prune_through_backend(backend, model, {2: 0.9}, keep_last=None)) is None
    assert backend.kept_calls == [] and backend.steps == {1, 2, 3}  # `--keep-last all`: the backend is not asked


def test_arts_serverless_deletion_gets_the_steps_to_keep() -> None:
    """The real ServerlessBackend._delete_checkpoint_files, with a double of its W&B client."""
    from art.serverless.backend import ServerlessBackend

    deleted: list[dict[str, Any]] = []

    class Checkpoints:
        async def list(self, model_id: str) -> AsyncIterator[Any]:
            for step in (1, 2, 3, 4):
                yield SimpleNamespace(step=step)

        async def delete(self, **kwargs: Any) -> None:
            deleted.append(kwargs)

    backend = ServerlessBackend.__new__(ServerlessBackend)  # no client, no network
    backend._client = SimpleNamespace(models=SimpleNamespace(checkpoints=Checkpoints()))  # type: ignore[attr-defined]
    kept = asyncio.run(prune_through_backend(backend, HostedModel(4), {1: 0.1, 2: 0.8, 3: 0.3}))
    assert kept == [2, 4] and deleted == [{"model_id": "model-1", "steps": [1, 3]}]


def _run(tmp_path: Path, backend_kind: str, backend: Any, model: Any, **settings: Any) -> Any:
    directory = tmp_path / "runs" / "codreamer" / "models" / "r1"
    directory.mkdir(parents=True, exist_ok=True)
    store_evaluation(directory, _summary(0, 0.1))
    store_evaluation(directory, _summary(2, 0.9))
    store_evaluation(directory, _summary(4, 0.3))
    return SimpleNamespace(
        directory=directory,
        settings=Settings(backend=backend_kind, runs_dir=tmp_path / "runs", wandb_api_key="k" * 40, **settings),
        backend=backend,
        model=model,
    )


def test_the_loop_prunes_art_backends_through_them_and_embedded_folders_itself(tmp_path: Path) -> None:
    def in_loop(run: Any) -> None:
        asyncio.run(prune_run_checkpoints(run))  # awaited between the stages of an iteration

    backend = HostedBackend([1, 2, 3, 4, 5])
    in_loop(_run(tmp_path / "a", "serverless", backend, HostedModel(5)))
    assert backend.steps == {2, 5}
    backend = HostedBackend([1, 2, 3, 4, 5])
    in_loop(_run(tmp_path / "b", "local", backend, HostedModel(5), kl_penalty_reference_step=1))
    assert backend.steps == {1, 2, 5}  # the KL reference checkpoint is kept
    backend = HostedBackend([1, 2, 3, 4, 5])
    in_loop(_run(tmp_path / "c", "serverless", backend, HostedModel(5), keep_last="all"))
    assert backend.kept_calls == []

    # embedded: the run folder's checkpoints, pruned in place as before; the backend is not asked
    run = _run(tmp_path / "d", "embedded", HostedBackend([]), HostedModel(5))
    for step in (1, 2, 3, 4, 5):
        (run.directory / "checkpoints" / f"{step:04d}").mkdir(parents=True)
    in_loop(run)
    assert checkpoint_steps(run.directory / "checkpoints") == [2, 5] and run.backend.kept_calls == []


def test_a_failed_deletion_is_a_warning_and_the_next_pruning_tries_again(
    tmp_path: Path, warnings_seen: list[str]
) -> None:
    backend = HostedBackend([1, 2, 3], fail=True)
    asyncio.run(prune_run_checkpoints(_run(tmp_path, "serverless", backend, HostedModel(3))))  # no exception escapes
    assert any("could not prune checkpoints" in w and "W&B is unreachable" in w for w in warnings_seen)
    assert backend.steps == {1, 2, 3}
    backend.fail = False
    asyncio.run(prune_run_checkpoints(_run(tmp_path, "serverless", backend, HostedModel(3))))
    assert backend.steps == {2, 3}  # the best (step 2 scored 0.9) and the latest
    assert (
        asyncio.run(prune_run_checkpoints(_run(tmp_path, "serverless", backend, HostedModel(3), keep_last="all")))
        is None
    )
    assert len(backend.kept_calls) == 2  # `--keep-last all`: the backend is not asked


def test_a_training_step_never_overlaps_the_pruning(tmp_path: Path) -> None:
    """Otherwise the deletion, which keeps steps up to the one it saw, could remove the new checkpoint."""

    async def scenario() -> HostedBackend:
        gate = asyncio.Event()
        backend, model = HostedBackend([1, 2, 3, 4], gate=gate), HostedModel(4)
        asyncio.get_running_loop().call_later(0.05, gate.set)
        await prune_run_checkpoints(_run(tmp_path, "serverless", backend, model))  # returns when the deletion is done
        await grpo_update(backend, model, [], learning_rate=1e-5, options={})  # type: ignore[arg-type]
        return backend

    backend = asyncio.run(scenario())
    assert backend.deletions_done_at_train == [1]  # trained after the deletion, not during it
    assert backend.steps == {2, 4, 5}  # the pruned set plus the new step, which survived

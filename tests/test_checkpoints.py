"""Checkpoint retention (`codreamer.checkpoints`): what is kept, what is deleted, what is best."""

from __future__ import annotations

from pathlib import Path

import pytest

from codreamer.checkpoints import best_checkpoint, checkpoint_steps, heldout_scores, prune_checkpoints
from codreamer.pipeline.evaluation import EvalSummary, PartStats, store_evaluation
from codreamer.pipeline.history import append_record

pytestmark = pytest.mark.timeout(30)


def make_checkpoints(root: Path, steps: list[int]) -> Path:
    folder = root / "checkpoints"
    for step in steps:
        (folder / f"{step:04d}").mkdir(parents=True)
        (folder / f"{step:04d}" / "adapter.safetensors").write_bytes(b"w")
    return folder


def remaining(folder: Path) -> list[int]:
    return checkpoint_steps(folder)


def test_keeps_newest_and_best(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    deleted = prune_checkpoints(folder, {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.1})
    assert deleted == [1, 3, 4]
    assert remaining(folder) == [2, 5]
    assert not list(folder.glob(".*"))  # nothing half-deleted left behind


def test_newest_is_never_deleted(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3])
    assert prune_checkpoints(folder, {1: 0.9, 2: 0.5, 3: 0.0}, keep_best=False) == [1, 2]
    assert remaining(folder) == [3]
    assert prune_checkpoints(folder, {3: 0.0}) == []  # a single checkpoint stays


def test_keep_last_n(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    assert prune_checkpoints(folder, {1: 0.9}, keep_last=2) == [2, 3]
    assert remaining(folder) == [1, 4, 5]


def test_ties_keep_the_newest_of_the_best(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    assert prune_checkpoints(folder, {2: 0.9, 4: 0.9, 5: 0.1}) == [1, 2, 3]
    assert remaining(folder) == [4, 5]


def test_unscored_steps_are_kept_only_when_recent(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3, 4])
    assert prune_checkpoints(folder, {}, keep_last=2) == [1, 2]  # no score at all: only the recent ones
    folder = make_checkpoints(tmp_path / "b", [1, 2, 3])
    assert prune_checkpoints(folder, {1: float("nan"), 2: 0.4}) == [1]  # NaN is no score


def test_best_is_among_existing_checkpoints(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [2, 3, 4])
    # step 0 (the base model) and step 1 (already pruned) have better scores but no checkpoint
    assert prune_checkpoints(folder, {0: 1.0, 1: 0.95, 2: 0.1, 3: 0.5, 4: 0.2}) == [2]


def test_protected_steps_survive(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3, 4])
    assert prune_checkpoints(folder, {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.0}, protect={1}) == [2]
    assert remaining(folder) == [1, 3, 4]


def test_keep_all_and_refusing_zero(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2, 3])
    assert prune_checkpoints(folder, {1: 0.1}, keep_last=None) == []
    assert remaining(folder) == [1, 2, 3]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(folder, {}, keep_last=0)
    assert remaining(folder) == [1, 2, 3]


def test_other_folders_are_ignored_and_trash_is_cleared(tmp_path: Path) -> None:
    folder = make_checkpoints(tmp_path, [1, 2])
    (folder / ".0003-staging").mkdir()  # a checkpoint being written
    (folder / ".deleting-0007").mkdir()  # a deletion a crash interrupted
    (folder / "notes.txt").write_text("x")
    assert prune_checkpoints(folder, {}) == [1]
    assert (folder / ".0003-staging").is_dir() and (folder / "notes.txt").is_file()
    assert not (folder / ".deleting-0007").exists()
    assert prune_checkpoints(tmp_path / "nowhere", {1: 0.5}) == []


def _summary(step: int, mean: float) -> EvalSummary:
    stats = PartStats(n=2, mean=mean, std=0.0, min=mean, max=mean, ci_low=mean, ci_high=mean)
    return EvalSummary(step=step, n=2, parts={"reward": stats})


def test_heldout_scores_and_best_checkpoint(tmp_path: Path) -> None:
    assert best_checkpoint(tmp_path) is None
    history = tmp_path / "iterations.jsonl"
    append_record(history, {"step": 1, "eval/reward_mean": 0.3})
    append_record(history, {"step": 2, "eval/reward_mean": 0.8})
    append_record(history, {"step": 3, "eval/reward_mean": None})  # NaN in the history
    append_record(history, {"step": 4})  # no evaluation that iteration
    store_evaluation(tmp_path, _summary(0, 0.9))
    store_evaluation(tmp_path, _summary(2, 0.7))  # the stored evaluation wins over the history
    assert heldout_scores(tmp_path) == {0: 0.9, 1: 0.3, 2: 0.7}
    assert best_checkpoint(tmp_path) is None  # no checkpoint on disk yet
    make_checkpoints(tmp_path, [1, 2, 3, 4])
    best = best_checkpoint(tmp_path)
    assert best is not None and (best.step, best.score) == (2, 0.7)
    assert best.path == tmp_path / "checkpoints" / "0002" and best.path.is_dir()


def test_keep_last_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from codreamer.config import Settings

    assert Settings(keep_last="all").keep_last is None
    monkeypatch.setenv("CODREAMER_KEEP_LAST", "ALL")
    assert Settings().keep_last is None
    monkeypatch.setenv("CODREAMER_KEEP_LAST", "3")
    assert Settings().keep_last == 3
    with pytest.raises(ValidationError):
        Settings(keep_last=0)  # 0 never means "keep all"

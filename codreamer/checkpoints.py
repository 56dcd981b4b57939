"""Checkpoint retention: keep the newest and the best by held-out reward, delete the rest.

A run writes `checkpoints/NNNN/` after every step (the embedded backend writes it
atomically); without pruning, a long run fills the disk with LoRA weights and optimizer
states nobody will load. `prune_checkpoints` keeps

- the newest checkpoint, always: a resumed run loads it;
- the `keep_last` newest ones (`keep_last=None` keeps every checkpoint);
- the best by held-out reward (`keep_best`), among the checkpoints that still exist;
- any step in `protect` (e.g. the last committed step while a newer one is uncommitted).

Call it after the iteration's history record is written, so the newest checkpoint is
also the committed one. A checkpoint is first renamed to a hidden folder and then removed,
so a crash mid-deletion never leaves a half checkpoint that looks loadable.

That is the embedded backend's retention: its checkpoints are folders of the run directory
and nothing else. ART's backends own theirs: LocalBackend keeps the adapters its saved
optimizer states belong to (and a Tinker service deletes remotely), ServerlessBackend's
checkpoints live on W&B. For them `prune_through_backend` applies the same policy
(`retained_steps`) through the backend's own deletion, `backend._delete_checkpoint_files(model,
steps_to_keep)` (what ART's `model.delete_checkpoints` calls), so hosted runs are pruned too.
The loop awaits it after each iteration (`codreamer.pipeline.iteration.prune_run_checkpoints`),
so a deletion never overlaps the training step that saves the next checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from codreamer.paths import is_inside
from codreamer.pipeline.evaluation import load_evaluations
from codreamer.pipeline.history import read_history
from codreamer.runs import ITERATIONS_FILE

__all__ = [
    "BestCheckpoint",
    "best_checkpoint",
    "checkpoint_steps",
    "heldout_scores",
    "prune_checkpoints",
    "prune_through_backend",
    "retained_steps",
]

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^\d{4,}$")


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint with the highest held-out reward of a run."""

    step: int
    score: float
    path: Path


def checkpoint_steps(checkpoint_dir: Path) -> list[int]:
    """Steps with a checkpoint folder (`NNNN`), ascending; staging and trash folders are ignored."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def _best_step(steps: Iterable[int], scores: Mapping[int, float]) -> int | None:
    """Highest finite score among `steps`; a tie goes to the newest step (more training, same reward)."""
    scored = [
        (float(scores[s]), s) for s in steps if s in scores and scores[s] is not None and math.isfinite(scores[s])
    ]
    return max(scored)[1] if scored else None


def _remove(folder: Path) -> bool:
    if folder.is_symlink() or not is_inside(folder, folder.parent):
        logger.warning("not deleting checkpoint {}: it is a link or resolves outside {}", folder, folder.parent)
        return False
    trash = folder.with_name(f".deleting-{folder.name}")
    try:
        os.replace(folder, trash)
        shutil.rmtree(trash)
    except OSError as exc:
        logger.warning("could not delete checkpoint {}: {}", folder, exc)
        return not folder.exists()
    return True


def _clear_trash(folder: Path) -> None:
    """Finish deletions a crash interrupted (hidden `.deleting-NNNN` folders)."""
    for trash in folder.glob(".deleting-*") if folder.is_dir() else []:
        shutil.rmtree(trash, ignore_errors=True)


def _check_keep_last(keep_last: int | None) -> None:
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, or None to keep every checkpoint (got {keep_last})")


def retained_steps(
    steps: Iterable[int],
    scores: Mapping[int, float],
    *,
    keep_last: int | None = 1,
    keep_best: bool = True,
    protect: Iterable[int] = (),
) -> set[int]:
    """The steps among `steps` the retention policy keeps: the newest `keep_last` (every step
    when None), the best scored one when `keep_best`, and every `protect`ed step."""
    _check_keep_last(keep_last)
    ordered = sorted(set(steps))
    if keep_last is None:
        return set(ordered) | set(protect)
    keep = set(ordered[-keep_last:]) | set(protect)
    best = _best_step(ordered, scores) if keep_best else None
    if best is not None:
        keep.add(best)
    return keep


def prune_checkpoints(
    checkpoint_dir: Path,
    scores: Mapping[int, float],
    *,
    keep_last: int | None = 1,
    keep_best: bool = True,
    protect: Iterable[int] = (),
) -> list[int]:
    """Delete the checkpoints the retention policy does not keep; return the deleted steps.

    `scores` maps step -> held-out reward (see `heldout_scores`); a step without a score is
    kept only when it is among the newest `keep_last`. `keep_last` must be >= 1 or None
    (None: keep every checkpoint, delete nothing); 0 is refused rather than read as "all".
    The newest checkpoint and every `protect`ed step are never deleted.
    """
    _check_keep_last(keep_last)
    _clear_trash(Path(checkpoint_dir))
    steps = checkpoint_steps(checkpoint_dir)
    if keep_last is None or not steps:
        return []
    keep = retained_steps(steps, scores, keep_last=keep_last, keep_best=keep_best, protect=protect)
    deleted = [s for s in steps if s not in keep and _remove(Path(checkpoint_dir) / f"{s:04d}")]
    if deleted:
        logger.info("pruned checkpoints {} (kept {})", deleted, sorted(keep & set(steps)))
    return deleted


async def prune_through_backend(
    backend: Any,
    model: Any,
    scores: Mapping[int, float],
    *,
    keep_last: int | None = 1,
    keep_best: bool = True,
    protect: Iterable[int] = (),
) -> list[int] | None:
    """Apply the retention policy through the backend's own deletion; return the steps kept
    (None: keep_last is None, nothing deleted).

    The candidates are every step up to the model's current one (`model.get_step()`, asked of
    the backend): a hosted backend's checkpoints cannot be listed from here, and the backend
    deletes only those that exist and are not kept (`_delete_checkpoint_files`).
    """
    _check_keep_last(keep_last)
    if keep_last is None:
        return None
    latest = await model.get_step()
    keep = retained_steps(range(latest + 1), scores, keep_last=keep_last, keep_best=keep_best, protect=protect)
    await backend._delete_checkpoint_files(model, sorted(keep))  # noqa: SLF001 - what ART's model.delete_checkpoints calls
    logger.info("pruned checkpoints through the {} (kept steps {})", type(backend).__name__, sorted(keep))
    return sorted(keep)


def heldout_scores(run_dir: Path) -> dict[int, float]:
    """Held-out mean reward per step: stored evaluations first, else `eval/reward_mean` in the history."""
    scores: dict[int, float] = {}
    records, _ = read_history(Path(run_dir) / ITERATIONS_FILE)
    for record in records:
        value = record.get("eval/reward_mean")
        if isinstance(value, int | float) and math.isfinite(value) and "step" in record:
            scores[int(record["step"])] = float(value)
    for summary in load_evaluations(run_dir):
        if summary.reward is not None:
            scores[summary.step] = summary.reward.mean
    return scores


def best_checkpoint(run_dir: Path) -> BestCheckpoint | None:
    """The existing checkpoint with the highest held-out reward (ties: the newest), or None.

    Only checkpoints still on disk count: step 0 (the base model) has no checkpoint, and a
    pruned step cannot be loaded.
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    scores = heldout_scores(run_dir)
    best = _best_step(checkpoint_steps(folder), scores)
    if best is None:
        return None
    return BestCheckpoint(step=best, score=scores[best], path=folder / f"{best:04d}")

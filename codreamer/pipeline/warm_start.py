"""The warm start: supervised fine-tuning on demonstrations before the first RL step.

RL can only reinforce what the policy already does sometimes. The shipped 135M model never
calls a tool on its own, so GRPO from the raw model has nothing to climb. The warm start
teaches the task's format once per run with ART's own SFT path (`model.train_sft`, which the
embedded backend implements as `_train_sft`), on episodes written by the seeded
`TemplateDemoWriter` for TRAINING prospects only; the held-out prospects stay unseen.

It takes one model step (the step after it is the warm-started policy, evaluated like any
other step) and is recorded in `warm_start.json` in the run directory, written atomically
after the checkpoint. That file is what makes the step committed: a checkpoint of a warm
start that crashed before writing it is discarded on resume, and the warm start runs again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import art
from art.utils.output_dirs import get_model_dir
from loguru import logger
from pydantic import BaseModel, Field, ValidationError

from codreamer.agent.demonstrations import TemplateDemoWriter
from codreamer.config import Settings
from codreamer.domain import Product, Scenario
from codreamer.storage import read_jsonl, write_json_atomic

__all__ = ["WARM_START_FILE", "WarmStartRecord", "demonstrations", "load_warm_start", "run_warm_start"]

WARM_START_FILE = "warm_start.json"


class WarmStartRecord(BaseModel):
    """What the warm start did (`warm_start.json`)."""

    step: int = Field(description="The model step after the warm start.")
    source: str = Field(description="Where the demonstrations came from.")
    demos: int
    seed: int
    learning_rate: float
    batch_size: int
    losses: list[float] = Field(default_factory=list, description="Mean token NLL of each optimizer step.")
    seconds: float


def load_warm_start(directory: Path) -> WarmStartRecord | None:
    """The run's warm-start record, or None when it has none (or an unreadable one: then it runs again)."""
    path = Path(directory) / WARM_START_FILE
    if not path.is_file():
        return None
    try:
        return WarmStartRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, OSError, UnicodeDecodeError) as exc:
        logger.warning("{} is unreadable ({}); the warm start counts as not done", path, type(exc).__name__)
        return None


def demonstrations(product: Product, train: list[Scenario], count: int, seed: int) -> list[art.Trajectory]:
    """`count` demonstration episodes: every training prospect in turn (seeded order), cycled."""
    writer = TemplateDemoWriter(product, seed)
    rounds = math.ceil(count / len(train))
    return writer.episodes(train, per_scenario=rounds)[:count]


def _sft_losses(history: Path, step: int) -> list[float]:
    """The per-optimizer-step losses ART's `train_sft` logged to its `history.jsonl` for `step`."""
    losses: list[float] = []
    rows, _ = read_jsonl(history, encoding_errors="replace")  # ART's file: bad lines are skipped
    for row in rows:
        if not isinstance(row, dict) or row.get("step") != step:
            continue
        losses += [float(v) for k, v in row.items() if k.startswith("sft/") and k.endswith("loss/train")]
    return losses


async def run_warm_start(
    model: art.TrainableModel, settings: Settings, product: Product, train: list[Scenario]
) -> WarmStartRecord:
    """SFT on `settings.warm_start_demos` demonstrations via `model.train_sft`; records and returns what it did."""
    demos = demonstrations(product, train, settings.warm_start_demos, settings.seed)
    config = art.types.TrainSFTConfig(
        learning_rate=settings.warm_start_learning_rate, batch_size=settings.warm_start_batch_size
    )
    logger.info(
        "warm start: SFT on {} TemplateDemoWriter demonstrations (training prospects), lr {:g}, {} per step",
        len(demos),
        config.learning_rate,
        config.batch_size,
    )
    started = time.perf_counter()
    await model.train_sft(demos, config)
    step = await model.get_step()
    record = WarmStartRecord(
        step=step,
        source="TemplateDemoWriter",
        demos=len(demos),
        seed=settings.seed,
        learning_rate=settings.warm_start_learning_rate,
        batch_size=settings.warm_start_batch_size,
        losses=_sft_losses(Path(get_model_dir(model, art_path=model.base_path)) / "history.jsonl", step),
        seconds=time.perf_counter() - started,
    )
    return record


def save_warm_start(directory: Path, record: WarmStartRecord) -> None:
    write_json_atomic(Path(directory) / WARM_START_FILE, record.model_dump(mode="json"))

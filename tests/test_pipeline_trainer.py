"""ART's own `PipelineTrainer` on the embedded backend: training, evaluation, checkpoints, restart.

A tiny task of the test's own (answer "2 + 3" with a number; shorter answers score a little
more, so most groups have reward spread; ART's trainer discards the others) on the real SmolLM2, two rollouts of 8 tokens a group,
one group a step. ART's trainer leases each step's adapter for its rollouts and evaluations
(`name@step`), requires exact policy provenance (`policy_token_spans`) for its evaluation, and
logs `val/reward` to the model's `history.jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import art
import pytest
import torch
from art.pipeline_trainer import PipelineTrainer
from art.pipeline_tuner.config import PipelineRuntimeConfig

from codreamer.backends.embedded.backend import EmbeddedBackend, checkpoint_steps
from codreamer.backends.embedded.policy import GRPOConfig
from codreamer.backends.embedded.weights import EMBEDDED_MODEL_NAME
from codreamer.config import Settings

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]


@pytest.fixture(autouse=True)
def quiet_and_single_threaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reward(choice: Any) -> float:
    text = choice.message.content or ""
    return (1.0 if "5" in text else 0.0) - 0.01 * len(text)


async def _one(model: art.TrainableModel, seed: int | None, temperature: float) -> art.Trajectory:
    reply = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=QUESTION, max_tokens=8, temperature=temperature, seed=seed
    )
    choice = reply.choices[0]
    return art.Trajectory(messages_and_choices=[*QUESTION, choice], reward=_reward(choice))


async def rollout(model: art.TrainableModel, scenario: dict[str, Any], config: None) -> art.TrajectoryGroup:
    return art.TrajectoryGroup([await _one(model, scenario["seed"] + k, 1.0) for k in range(2)])


async def evaluate(model: art.TrainableModel, step: int, config: None) -> list[art.Trajectory]:
    return [await _one(model, None, 0.0)]


def _trainer(model: art.TrainableModel, backend: EmbeddedBackend, steps: int) -> PipelineTrainer[Any, None]:
    return PipelineTrainer(
        model,
        backend,  # type: ignore[arg-type]
        rollout,
        [{"seed": 10 * i} for i in range(40)],
        None,
        evaluate,
        pipeline=PipelineRuntimeConfig(num_rollout_workers=1, min_batch_size=1, max_batch_size=1),
        learning_rate=1e-4,
        max_steps=steps,
        eval_every_n_steps=1,
        eval_at_start=True,
        log_interval_seconds=600,
    )


def _model(tmp_path: Path) -> art.TrainableModel:
    return art.TrainableModel(
        name="pipeline",
        project="p",
        run_name="pt",
        base_model=EMBEDDED_MODEL_NAME,
        base_path=str(tmp_path),
        report_metrics=[],
    )


def _backend() -> EmbeddedBackend:
    return EmbeddedBackend(Settings().model_cache_dir, GRPOConfig(lora_rank=4, lora_alpha=8), max_batch=4)


def _val_rewards(model: art.TrainableModel) -> dict[int, float]:
    history = Path(model.base_path) / model.project / "models" / model.run_name / "history.jsonl"
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    return {int(row["step"]): row["val/reward"] for row in rows if "val/reward" in row}


@pytest.mark.anyio
async def test_pipeline_trainer_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    model = _model(tmp_path)
    backend = _backend()
    try:
        await model.register(backend)
        await _trainer(model, backend, steps=2).train(handle_signals=False)
        assert await model.get_step() == 2
        assert {1, 2} <= set(checkpoint_steps(model))  # PipelineTrainer trained step 1 with save_checkpoint=False: kept
        assert {0, 1, 2} <= set(_val_rewards(model))  # evaluated at the start and after each step
    finally:
        await backend.close()

    restarted = _backend()  # a restart resumes at the last trained step and goes on
    try:
        again = _model(tmp_path)
        await again.register(restarted)
        assert await again.get_step() == 2
        await _trainer(again, restarted, steps=1).train(handle_signals=False)  # max_steps counts this run's steps
        assert await again.get_step() == 3 and 3 in _val_rewards(again)
    finally:
        await restarted.close()

"""The embedded backend driven by ART 0.5.23's own public API, on the real SmolLM2 (offline).

register, `model.openai_client()`, `with art.Trajectory() as t:` capture, `backend.train` with
and without `save_checkpoint`, a restart, model identity, `name@step` and the adapter leases.
Small on purpose (2 rollouts of 8 tokens, rank-4 LoRA): about half a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import art
import pytest

from codreamer.backends.embedded.backend import EmbeddedBackend, ModelIdentityError, checkpoints_dir
from codreamer.backends.embedded.policy import GRPOConfig
from codreamer.backends.embedded.weights import EMBEDDED_MODEL_NAME
from codreamer.config import Settings

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]


def _model(tmp_path: Path, run_name: str = "run-a", base_model: str = EMBEDDED_MODEL_NAME) -> art.TrainableModel:
    return art.TrainableModel(
        name="fidelity", project="p", run_name=run_name, base_model=base_model, base_path=str(tmp_path)
    )


def _backend() -> EmbeddedBackend:
    return EmbeddedBackend(
        Settings().model_cache_dir, GRPOConfig(lora_rank=4, lora_alpha=8, learning_rate=1e-3), max_batch=4
    )


async def _captured_group(model: art.TrainableModel, rewards: tuple[float, float] = (0.2, 1.42)) -> art.TrajectoryGroup:
    """Two trajectories recorded with ART's capture API only (no messages_and_choices)."""
    client = model.openai_client()
    trajectories = []
    for index, reward in enumerate(rewards):
        with art.Trajectory() as trajectory:
            await client.chat.completions.create(
                model=model.get_inference_name(), messages=MESSAGES, max_tokens=8, temperature=1.0, seed=index
            )
        trajectory.reward = reward
        trajectories.append(trajectory)
    assert all(t.exchanges and not t.messages_and_choices for t in trajectories)
    return art.TrajectoryGroup(trajectories)


@pytest.mark.anyio
async def test_captured_trajectories_train_and_every_step_survives_a_restart(tmp_path: Path) -> None:
    model = _model(tmp_path)
    backend = _backend()
    try:
        await model.register(backend)
        first = await backend.train(model, [await _captured_group(model)], learning_rate=1e-3)
        assert first.step == 1 and first.metrics["groups_used"] == 1 and first.metrics["num_sequences"] == 2
        assert first.metrics["mean_importance_ratio"] == pytest.approx(1.0, abs=0.02)  # fresh samples: on-policy
        step_one = checkpoints_dir(model) / "0001"
        assert (step_one / "adapter_config.json").is_file() and (step_one / "optimizer.pt").is_file()

        second = await backend.train(model, [await _captured_group(model)], learning_rate=1e-3, save_checkpoint=False)
        assert second.step == 2
        assert (checkpoints_dir(model) / "0002" / "adapter_model.safetensors").is_file()  # the step is on disk anyway

        flat = await backend.train(model, [await _captured_group(model, (0.5, 0.5))], learning_rate=1e-3)
        assert (
            flat.step == 3
            and flat.metrics["groups_no_reward_spread"] == 1
            and flat.metrics["groups_no_trainable_tokens"] == 0
        )

        async with backend.exact_adapter_lease(model, 1):  # an older step, served from disk
            assert model.get_inference_name() == "fidelity@1"
            reply = await model.openai_client().chat.completions.create(
                model=model.get_inference_name(), messages=MESSAGES, max_tokens=4
            )
            assert reply.choices[0].model_extra["policy_token_spans"][0]["policy_version"] == 1
        with pytest.raises(LookupError, match="step 9"):
            async with backend.exact_adapter_lease(model, 9):
                pass
        await backend._delete_checkpoint_files(model, [1])
        assert sorted(p.name for p in checkpoints_dir(model).iterdir() if not p.name.startswith(".")) == [
            "0001",
            "0003",
        ]  # latest kept
    finally:
        await backend.close()

    restarted = _backend()
    try:
        again = _model(tmp_path)
        await again.register(restarted)
        assert await again.get_step() == 3
        with pytest.raises(ModelIdentityError, match="base_model"):
            await _model(tmp_path, base_model="Qwen/Qwen2.5-0.5B-Instruct").register(_backend())
    finally:
        await restarted.close()
    identity = json.loads((Path(tmp_path) / "p" / "models" / "run-a" / "embedded_model.json").read_text())
    assert identity["run_name"] == "run-a" and identity["base_model"] == EMBEDDED_MODEL_NAME


@pytest.mark.anyio
async def test_unknown_train_options_are_refused_before_anything_changes(tmp_path: Path) -> None:
    model = _model(tmp_path, run_name="run-b")
    backend = _backend()
    try:
        await model.register(backend)
        with pytest.raises(ValueError, match="kl_penalty_coeff"):
            await backend.train(model, [], learning_rate=1e-3, kl_penalty_coeff=0.1)
        assert await model.get_step() == 0
        result = await backend.train(
            model, [await _captured_group(model)], loss_fn="ppo", kl_penalty_coef=0.05, normalize_advantages=False
        )
        assert result.step == 1 and "kl_policy_ref" in result.metrics
    finally:
        await backend.close()


def test_identity_is_recorded_checked_and_adopted_for_runs_written_before_it(tmp_path: Path) -> None:
    from codreamer.backends.embedded.backend import IDENTITY_FILE, check_identity

    legacy = _model(tmp_path, run_name="old-run")
    (checkpoints_dir(legacy) / "0004").mkdir(parents=True)  # a run from before identities: adopted, not refused
    check_identity(legacy)
    assert json.loads((checkpoints_dir(legacy).parent / IDENTITY_FILE).read_text())["name"] == "fidelity"
    renamed = art.TrainableModel(
        name="other", project="p", run_name="old-run", base_model=EMBEDDED_MODEL_NAME, base_path=str(tmp_path)
    )
    with pytest.raises(ModelIdentityError, match="name 'fidelity' on disk, 'other' now"):
        check_identity(renamed)

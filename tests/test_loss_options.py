"""The embedded loss (`loss.py`, `policy_training.py`) and `train`'s keywords (`train_options.py`).

The loss is checked on the tiny random policy of `test_grpo` against hand-computed gradients:
an importance ratio of 1 gives REINFORCE's gradient for both losses; a known ratio scales the
CISPO gradient and is clipped; PPO's clipped side has no gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_grpo import lora_grads, randomize_lora_b, tiny_policy

from codreamer.backends import factory
from codreamer.backends.embedded.loss import LossConfig, policy_loss_sum
from codreamer.backends.embedded.policy_training import trained_logprobs
from codreamer.backends.embedded.sequences import TrainSequence
from codreamer.backends.embedded.train_options import parse_train_options, supported_keywords

pytestmark = pytest.mark.timeout(60)

SEQ = TrainSequence([5, 6, 7, 8], [9, 10, 11], 1.0)


def _grad(sequence: TrainSequence, loss: LossConfig) -> dict[str, torch.Tensor]:
    policy = tiny_policy()
    randomize_lora_b(policy)
    policy.model.zero_grad()
    new, rows = trained_logprobs(policy, [sequence])
    old = torch.tensor(sequence.old_logprobs(), dtype=torch.float32)
    advantages = torch.full_like(new, sequence.advantage)
    value, _ = policy_loss_sum(new, old, advantages, rows, loss)
    value.backward()
    return lora_grads(policy)


def _current_logprobs(sequence: TrainSequence) -> list[float]:
    policy = tiny_policy()
    randomize_lora_b(policy)
    with torch.no_grad():
        return trained_logprobs(policy, [sequence])[0].tolist()


def _with_old(shift: float) -> TrainSequence:
    """SEQ whose sampler log-probs are the current ones minus `shift`: importance ratio exp(shift)."""
    current = _current_logprobs(SEQ)
    return TrainSequence(SEQ.prompt_ids, SEQ.completion_ids, SEQ.advantage, (), tuple(v - shift for v in current))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float = 1.0) -> bool:
    return all(torch.allclose(a[k], b[k] * scale, atol=1e-6, rtol=1e-4) for k in a)


def test_on_policy_both_losses_give_the_reinforce_gradient() -> None:
    reinforce = _grad(SEQ, LossConfig())  # unknown old log-probs: ratio 1
    assert _close(_grad(_with_old(0.0), LossConfig("cispo")), reinforce)
    assert _close(_grad(_with_old(0.0), LossConfig("ppo")), reinforce)


def test_cispo_weighs_by_the_importance_ratio_and_clips_it() -> None:
    reinforce = _grad(SEQ, LossConfig())
    assert _close(_grad(_with_old(math.log(2.0)), LossConfig("cispo")), reinforce, 2.0)  # stale sample: ratio 2
    assert _close(_grad(_with_old(math.log(10.0)), LossConfig("cispo")), reinforce, 5.0)  # clipped at 1 + 4
    assert _close(_grad(_with_old(math.log(10.0)), LossConfig("cispo", epsilon_high=0.5)), reinforce, 1.5)


def test_ppo_has_no_gradient_beyond_its_clip_for_a_positive_advantage() -> None:
    clipped = _grad(_with_old(math.log(1.5)), LossConfig("ppo"))  # ratio 1.5 > 1.2
    assert all(torch.count_nonzero(g) == 0 for g in clipped.values())
    inside = _grad(_with_old(math.log(1.1)), LossConfig("ppo"))
    assert _close(inside, _grad(SEQ, LossConfig()), 1.1)


def test_a_train_step_on_stale_samples_reports_its_ratio() -> None:
    policy = tiny_policy()
    randomize_lora_b(policy)
    metrics = policy.train_step([_with_old(math.log(2.0))], 1e-3, LossConfig("cispo"))
    assert metrics["mean_importance_ratio"] == pytest.approx(2.0, rel=1e-3)
    assert metrics["clipped_fraction"] == 0.0


def test_kl_against_the_base_is_zero_while_the_adapter_is_a_no_op_and_positive_after() -> None:
    policy = tiny_policy()  # LoRA B is zero: the policy is the base model
    kl = LossConfig(kl_penalty_coef=0.5, kl_penalty_source="current_learner")
    first = policy.train_step([SEQ, TrainSequence([5, 6, 7, 8], [12, 13], -1.0)], 1e-2, kl, "base")
    assert first["kl_policy_ref"] == pytest.approx(0.0, abs=1e-6)
    randomize_lora_b(policy)
    second = policy.train_step([SEQ], 1e-2, kl, "base")
    assert abs(second["kl_policy_ref"]) > 1e-4


# ------------------------------------------------------------------------- train keywords
def test_an_unknown_keyword_is_refused_by_name_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match=r"does not know train option\(s\) loss_fnn; supported: .*loss_fn"):
        parse_train_options({"loss_fnn": "ppo"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_fn": "grpo"}, "loss_fn='grpo'"),
        ({"adam_params": {"beta1": 0.8}}, "adam_params only at ART's default"),
        ({"importance_sampling_level": "document"}, "importance_sampling_level"),
        ({"advantage_balance": 2.0}, "advantage_balance"),
        ({"kl_penalty_coef": -1.0}, "kl_penalty_coef"),
    ],
)
def test_values_it_cannot_honour_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_train_options(kwargs)


def test_what_pipeline_trainer_passes_is_accepted() -> None:
    options = parse_train_options(
        {
            "learning_rate": 1e-5,
            "loss_fn": "cispo",
            "loss_fn_config": None,
            "normalize_advantages": True,
            "save_checkpoint": False,
            "adam_params": None,
            "optimizer_save_interval": 5,
            "kl_penalty_coef": 0.1,
            "kl_penalty_source": "sample",
            "kl_penalty_reference_step": 0,
        }
    )
    assert options.save_checkpoint is False and options.loss().kl_penalty_source == "sample"


def test_every_option_codreamer_can_pass_is_a_keyword_the_embedded_backend_takes() -> None:
    assert set(factory.ART_TRAIN_OPTIONS) <= set(supported_keywords())
    options = parse_train_options(
        {"normalize_advantages": False, "epsilon": 0.3, "loss_fn": "ppo", "packed_sequence_length": 512}
    )
    assert options.scale is False and options.loss().clip_range() == pytest.approx((0.7, 1.3))

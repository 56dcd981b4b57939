"""The keywords `EmbeddedBackend.train` takes: ART LocalBackend's names, checked and honoured.

ART's backends take backend-specific keywords; ART's LocalBackend refuses what it does not
support. So does this backend: an unknown keyword (a misspelling) or a value it cannot honour
is a `ValueError` naming it and listing what is supported. Every option CoDreamer passes
(`codreamer.backends.factory.ART_TRAIN_OPTIONS`) and every option ART's `PipelineTrainer`
passes is honoured here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, get_args

from loguru import logger

from codreamer.backends.embedded.loss import ImportanceLevel, KLSource, LossConfig, LossName

#: Keywords accepted only at ART's default value (the embedded backend has no other behaviour for them).
DEFAULT_ONLY: dict[str, Any] = {
    "loss_fn_config": None,
    "adam_params": None,
    "kimi_k2_tau": None,
    "precalculate_logprobs": False,
    "plot_tensors": False,
    "scale_learning_rate_by_reward_std_dev": False,
    "num_trajectories_learning_rate_multiplier_power": 0.0,
    "grad_accumulation_sequences": None,
    "final_training_step": None,
}
#: Keywords accepted and without effect here, and why.
NO_EFFECT: dict[str, str] = {
    "verbose": "the step logs its metrics anyway",
    "logprob_calculation_chunk_size": "log-probs are computed per micro-batch (micro_batch_tokens)",
    "truncated_importance_sampling": (
        "it weighs by the ratio of recomputed to original sampler log-probs; here the sampler's log-probs are "
        "the old ones (ART's Unsloth backend skips it the same way without precalculate_logprobs)"
    ),
}


@dataclass(frozen=True)
class TrainOptions:
    """What one `train` call asked for (ART's keyword names and defaults)."""

    learning_rate: float | None = None
    loss_fn: LossName = "cispo"
    normalize_advantages: bool = True
    scale_rewards: bool = True
    epsilon: float | None = None
    epsilon_high: float | None = None
    importance_sampling_level: ImportanceLevel = "token"
    max_negative_advantage_importance_sampling_weight: float | None = None
    mask_prob_ratio: bool = False
    advantage_balance: float = 0.0
    kl_penalty_coef: float = 0.0
    kl_penalty_source: KLSource = "current_learner"
    kl_penalty_reference_step: int | None = None
    kl_ref_adapter_path: str | None = None
    allow_training_without_logprobs: bool = False
    packed_sequence_length: int | None = None
    save_checkpoint: bool = True
    optimizer_save_interval: int = 1

    def loss(self) -> LossConfig:
        return LossConfig(
            loss_fn=self.loss_fn,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            max_negative_advantage_importance_sampling_weight=self.max_negative_advantage_importance_sampling_weight,
            mask_prob_ratio=self.mask_prob_ratio,
            kl_penalty_coef=self.kl_penalty_coef,
            kl_penalty_source=self.kl_penalty_source,
        )

    @property
    def scale(self) -> bool:
        """ART: `normalize_advantages=False` turns reward-std scaling off."""
        return self.normalize_advantages and self.scale_rewards


def supported_keywords() -> list[str]:
    return sorted([f.name for f in fields(TrainOptions)] + list(DEFAULT_ONLY) + list(NO_EFFECT))


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"train option {name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}"
        )


def _check_values(options: TrainOptions) -> None:
    _check_choice("loss_fn", options.loss_fn, get_args(LossName))
    _check_choice("importance_sampling_level", options.importance_sampling_level, get_args(ImportanceLevel))
    _check_choice("kl_penalty_source", options.kl_penalty_source, get_args(KLSource))
    if options.kl_penalty_coef < 0:
        raise ValueError(f"train option kl_penalty_coef={options.kl_penalty_coef} must be >= 0")
    if not -1.0 <= options.advantage_balance <= 1.0:
        raise ValueError(f"train option advantage_balance={options.advantage_balance} must be in [-1, 1]")
    if (options.epsilon is not None and options.epsilon <= 0) or (
        options.epsilon_high is not None and options.epsilon_high <= 0
    ):
        raise ValueError("train options epsilon and epsilon_high must be > 0")
    if options.optimizer_save_interval < 1:
        raise ValueError(f"train option optimizer_save_interval={options.optimizer_save_interval} must be >= 1")
    if options.kl_penalty_reference_step is not None and options.kl_ref_adapter_path is not None:
        raise ValueError("give kl_penalty_reference_step or kl_ref_adapter_path, not both")


def parse_train_options(kwargs: dict[str, Any]) -> TrainOptions:
    """Check `train`'s keywords; raise ValueError naming any that is unknown or cannot be honoured."""
    known = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(kwargs) - known - set(DEFAULT_ONLY) - set(NO_EFFECT) - {"_pipeline_train_dispatch_event"})
    if unknown:
        raise ValueError(
            f"the embedded backend does not know train option(s) {', '.join(unknown)}; "
            f"supported: {', '.join(supported_keywords())}"
        )
    for name, default in DEFAULT_ONLY.items():
        if name in kwargs and kwargs[name] != default:
            raise ValueError(
                f"the embedded backend supports train option {name} only at ART's default {default!r}, not {kwargs[name]!r}"
            )
    for name, why in NO_EFFECT.items():
        if kwargs.get(name) not in (None, False):
            logger.info("train option {} has no effect on the embedded backend: {}", name, why)
    options = TrainOptions(
        **{k: v for k, v in kwargs.items() if (k in known and v is not None) or k == "learning_rate"}
    )
    _check_values(options)
    return options

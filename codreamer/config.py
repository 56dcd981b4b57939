"""Every knob of CoDreamer, in one place.

`Settings` is read from (highest first) CLI flags, environment variables (`CODREAMER_*`,
plus the usual `WANDB_*` / `WEAVE_PROJECT` names), a `.env` file, then the defaults below.
It is flat on purpose: each field is one CLI flag (`--group-size`) and one env variable
(`CODREAMER_GROUP_SIZE`). Stages receive the small frozen views (`RolloutConfig`, ...)
so that they depend on what they use, not on the whole settings object.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

if TYPE_CHECKING:
    from codreamer.rewards.blend import RewardMixConfig
    from codreamer.rewards.ruler import JudgeConfig

BackendKind = Literal["embedded", "local", "serverless"]

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DATA_DIR = PACKAGE_DIR.parent / "data"


class RolloutConfig(BaseModel):
    """How one agent episode runs."""

    model_config = ConfigDict(frozen=True)

    max_turns: int = Field(default=4, ge=1)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    request_timeout_s: float = Field(default=120.0, gt=0)


class GRPOConfig(BaseModel):
    """One GRPO update on the embedded backend."""

    model_config = ConfigDict(frozen=True)

    learning_rate: float = Field(default=5e-5, gt=0)
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch_tokens: int = Field(default=2048, ge=64)
    seed: int = 0


class Settings(BaseSettings):
    """CoDreamer settings: flags below, or CODREAMER_<NAME> environment variables, or .env."""

    model_config = SettingsConfigDict(
        env_prefix="CODREAMER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        populate_by_name=True,
    )

    # --- run -----------------------------------------------------------------------------
    run_id: str | None = Field(
        default=None,
        description="Name of the run; reuse it to find the run again. Default: a new timestamped id.",
    )
    runs_dir: Path = Field(default=Path("runs"), description="Where run directories are written.")
    project: str = Field(default="codreamer", description="Project name (ART model project).")
    seed: int = Field(default=0, description="Seed for sampling, scenario order and training.")

    # --- data ----------------------------------------------------------------------------
    data_dir: Path = Field(default=REPO_DATA_DIR, description="Folder with prospects.jsonl, splits.json, product.json.")

    # --- loop ----------------------------------------------------------------------------
    iterations: int = Field(default=2, ge=1, description="Learning-loop iterations (one GRPO step each).")
    epochs: int = Field(default=1, ge=1, description="`train`: passes over the training scenarios.")
    max_steps: int | None = Field(default=None, ge=1, description="`train`: stop after this many steps (default: all epochs).")
    scenarios_per_step: int = Field(default=2, ge=1, description="Training scenarios (GRPO groups) per step.")
    group_size: int = Field(default=4, ge=2, description="Rollouts per scenario (GRPO group size).")
    eval_scenarios: int = Field(default=2, ge=0, description="Held-out scenarios evaluated per iteration (0 = skip).")
    max_exceptions: float = Field(
        default=0.5, ge=0, description="Failed rollouts tolerated per stage: a count (>=1) or a fraction (<1)."
    )

    # --- rollout -------------------------------------------------------------------------
    max_turns: int = Field(default=3, ge=1, description="Agent turns before the email is auto-finalised.")
    max_tokens: int = Field(default=48, ge=1, description="New tokens per model call.")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature of the policy.")
    rollout_concurrency: int = Field(default=8, ge=1, description="Rollouts in flight at once.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Timeout of one model call, seconds.")

    # --- training ------------------------------------------------------------------------
    backend: BackendKind = Field(
        default="embedded",
        description="embedded (CPU, in-process), local (ART LocalBackend, needs a CUDA GPU) or serverless (W&B).",
    )
    base_model: str = Field(
        default="SmolLM2-135M-Instruct",
        description="Base model. The embedded backend ships SmolLM2-135M-Instruct; others take a HF id.",
    )
    learning_rate: float = Field(default=5e-5, gt=0, description="GRPO learning rate.")
    lora_rank: int = Field(default=16, ge=1, description="LoRA rank (embedded backend).")
    train_retries: int = Field(default=3, ge=1, description="Attempts of a training step on transient errors.")
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "codreamer",
        description="Where the embedded model is cached as safetensors after the first load.",
    )

    # --- rewards -------------------------------------------------------------------------
    rubric_weight: float = Field(default=0.4, ge=0, description="Weight of the offline rubric in the reward.")
    ruler_weight: float = Field(default=0.4, ge=0, description="Weight of RULER (LLM judge); dropped when no judge is set.")
    online_weight: float = Field(default=0.2, ge=0, description="Weight of online outcomes (opened/replied).")
    outcomes: Literal["simulator", "log", "off"] = Field(
        default="simulator",
        description="Online outcomes: simulator (seeded ProspectSimulator, not real data), log (only events "
        "ingested into the event log) or off.",
    )
    events_path: Path | None = Field(
        default=None, description="JSONL event log of online outcomes. Default: <runs-dir>/<project>/events.jsonl."
    )
    events_secret: CliSuppress[SecretStr | None] = Field(
        default=None, description="Shared HMAC secret of the `codreamer serve-events` webhook. Never logged.", exclude=True
    )
    judge_model: str | None = Field(
        default=None, description="RULER judge as a litellm model name, e.g. openai/gpt-4.1-mini. Unset: no judge."
    )
    judge_base_url: str | None = Field(default=None, description="OpenAI-compatible base URL of the judge.")
    judge_api_key: CliSuppress[SecretStr | None] = Field(
        default=None, description="API key of the judge. Never logged.", exclude=True
    )
    judge_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one judge call, seconds.")
    judge_attempts: int = Field(default=3, ge=1, description="Judge attempts on transient errors.")
    low_reward_threshold: float = Field(
        default=0.4, ge=0, le=1, description="Trajectories below this reward are collected as failures."
    )

    # --- tracking ------------------------------------------------------------------------
    wandb: bool = Field(default=True, description="Use Weave / W&B when a key is set; --no-wandb never does.")
    weave_project: str = Field(
        default="codreamer",
        validation_alias=AliasChoices("weave_project", "WEAVE_PROJECT", "CODREAMER_WEAVE_PROJECT"),
        description="Weave project for traces (used only when a W&B key is set).",
    )
    wandb_api_key: CliSuppress[SecretStr | None] = Field(
        default=None,
        validation_alias=AliasChoices("wandb_api_key", "WANDB_API_KEY"),
        description="W&B key; without it the run is untraced and says so once. Never logged.",
        exclude=True,
    )

    def resolved_events_path(self) -> Path:
        return self.events_path or self.runs_dir / self.project / "events.jsonl"

    def reward_mix(self) -> RewardMixConfig:
        from codreamer.rewards.blend import RewardMixConfig

        return RewardMixConfig(
            rubric_weight=self.rubric_weight, ruler_weight=self.ruler_weight, online_weight=self.online_weight
        )

    def judge_config(self) -> JudgeConfig | None:
        if self.judge_model is None:
            return None
        from codreamer.rewards.ruler import JudgeConfig

        return JudgeConfig(
            model=self.judge_model,
            base_url=self.judge_base_url,
            api_key=self.judge_api_key,
            timeout_s=self.judge_timeout_s,
            attempts=self.judge_attempts,
        )

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(
            max_turns=self.max_turns,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            request_timeout_s=self.request_timeout_s,
        )

    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig(learning_rate=self.learning_rate, lora_rank=self.lora_rank, lora_alpha=2 * self.lora_rank, seed=self.seed)

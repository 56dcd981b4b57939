"""Every knob of CoDreamer, in one place.

`Settings` is flat on purpose: each field is one CLI flag (`--group-size`, `--group_size` is
accepted too) and one env variable (`CODREAMER_GROUP_SIZE`). Stages receive small frozen views
(`RolloutConfig`, `JudgeConfig`, ...) built next to their user by `View.from_settings(settings)`;
a view's defaults are read from here (`default_of`), so every default is written once.

Where a value comes from, highest first (`layered_settings`):

1. command-line flags;
2. environment variables (`CODREAMER_*`, plus the usual `WANDB_*` / `WEAVE_PROJECT` names);
3. the `--config FILE` of `learn-loop` / `train` (TOML or YAML: the run's recipe);
4. a `.env` file in the working directory (this machine's defaults);
5. the defaults below.

A flag is the most deliberate choice; an environment variable is a per-shell or per-job override
(`WANDB_MODE=disabled` for a quick try must beat the recipe); the config file says what a run
is and `.env` only fills what it leaves out. Secrets (`SecretStr` fields) come from the
environment or `.env` only, never from a flag or a config file.

Markers on the fields (`Annotated`, like pydantic-settings' `CliSuppress`):
- `ResumeFree[...]`: the setting may change when a run is resumed (timeouts, retries, where
  things are logged); every other setting shapes what is trained, and a resume with a
  different value is refused without `--force-resume` (`resume_free_fields`). A new field is
  resume-shaping unless marked.
- `LearnLoopOnly[...]` / `TrainOnly[...]`: a flag of that command only (`command_fields`).

This module imports nothing from the project: every other module may import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliSuppress,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

BackendKind = Literal["embedded", "local", "serverless"]
#: How rollouts call the policy: "direct" (aiohttp, no SDK) or "openai" (ART's OpenAI client);
#: see `codreamer.agent.policy_client`.
InferenceClientKind = Literal["direct", "openai"]

#: One folder name (run ids, project names): see `codreamer.paths`.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DATA_DIR = PACKAGE_DIR.parent / "data"

#: The commands that take settings as flags.
Command = Literal["learn-loop", "train"]
COMMANDS: tuple[Command, ...] = ("learn-loop", "train")


@dataclass(frozen=True)
class _Mark:
    """A marker in a field's `Annotated` metadata; pydantic keeps it in `FieldInfo.metadata`."""

    name: str


RESUME_FREE = _Mark("resume_free")

T = TypeVar("T")
#: The setting may differ between a run and its resume (see the module docstring).
ResumeFree = Annotated[T, RESUME_FREE]
#: A flag of `learn-loop` only.
LearnLoopOnly = Annotated[T, _Mark("command:learn-loop")]
#: A flag of `train` only.
TrainOnly = Annotated[T, _Mark("command:train")]


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
    run_id: ResumeFree[str | None] = Field(
        default=None,
        description=(
            "Name of the run; reuse it to find the run again. 1-100 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit. Default: a new timestamped id."
        ),
    )
    runs_dir: ResumeFree[Path] = Field(default=Path("runs"), description="Where run directories are written.")
    project: str = Field(
        default="codreamer", description="Project name (ART model project); the same characters as a run id."
    )
    seed: int = Field(default=0, description="Seed for sampling, scenario order and training.")

    # --- data ----------------------------------------------------------------------------
    data_dir: Path = Field(default=REPO_DATA_DIR, description="Folder with prospects.jsonl, splits.json, product.json.")

    # --- loop ----------------------------------------------------------------------------
    iterations: LearnLoopOnly[ResumeFree[int]] = Field(
        default=3, ge=1, description="Learning-loop iterations (one GRPO step each)."
    )
    epochs: TrainOnly[ResumeFree[int]] = Field(
        default=1, ge=1, description="`train`: passes over the training scenarios."
    )
    max_steps: TrainOnly[ResumeFree[int | None]] = Field(
        default=None, ge=1, description="`train`: stop after this many steps (default: all epochs)."
    )
    scenarios_per_step: int = Field(default=2, ge=1, description="Training scenarios (GRPO groups) per step.")
    group_size: int = Field(default=4, ge=2, description="Rollouts per scenario (GRPO group size).")
    eval_scenarios: int = Field(
        default=12, ge=0, description="Held-out scenarios evaluated (the first N; 12 = all that ship; 0 = skip)."
    )
    max_exceptions: float = Field(
        default=0.5, ge=0, description="Failed rollouts tolerated per stage: a count (>=1) or a fraction (<1)."
    )

    # --- evaluation and checkpoints --------------------------------------------------------
    eval_samples: int = Field(
        default=2, ge=1, description="Samples per held-out scenario (fixed seeds, same every evaluation)."
    )
    eval_before_train: bool = Field(
        default=True,
        description="Evaluate the base model (step 0) before the first step (--no-eval-before-train skips it).",
    )
    eval_every: LearnLoopOnly[ResumeFree[int]] = Field(
        default=0,
        ge=0,
        description="learn-loop: evaluate every N iterations; 0 = after the last only "
        "(base and warm start are always evaluated).",
    )
    bootstrap_samples: int = Field(
        default=1000, ge=100, description="Bootstrap resamples of the 95% confidence intervals."
    )
    keep_last: ResumeFree[int | None] = Field(
        default=1, ge=1, description="Checkpoints kept besides the best: the newest N, or `all` to keep every one."
    )
    keep_best: ResumeFree[bool] = Field(
        default=True, description="Also keep the checkpoint with the best held-out reward."
    )

    @field_validator("run_id", "project")
    @classmethod
    def _safe_folder_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Run ids and project names become folders: one plain name (`codreamer.paths.SAFE_NAME_PATTERN`)."""
        if value is None or re.fullmatch(SAFE_NAME_PATTERN, value):
            return value
        what = "run id" if info.field_name == "run_id" else "project name"
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(
            f"{what} {shown!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..', no absolute path)"
        )

    @field_validator("keep_last", mode="before")
    @classmethod
    def _keep_all(cls, value: object) -> object:
        """`all` (or null/none) from a flag or env variable means no pruning; 0 is refused, not 'all'."""
        return None if isinstance(value, str) and value.strip().lower() in {"all", "null", "none"} else value

    # --- warm start ----------------------------------------------------------------------
    warm_start: Literal["demos", "off"] = Field(
        default="demos",
        description=(
            "Before the first RL step: supervised fine-tuning (ART's train_sft) on demonstrations of the "
            "training prospects written by the seeded TemplateDemoWriter (demos), or none (off)."
        ),
    )
    warm_start_demos: int = Field(
        default=48, ge=1, description="Demonstration episodes of the warm start (training prospects, cycled)."
    )
    warm_start_learning_rate: float = Field(default=1e-3, gt=0, description="Learning rate of the warm start (LoRA).")
    warm_start_batch_size: int = Field(
        default=4, ge=1, description="Demonstrations per optimizer step of the warm start."
    )

    # --- rollout -------------------------------------------------------------------------
    max_turns: int = Field(
        default=2, ge=1, description="Agent turns before the email is auto-finalised (look up, then finalise: 2)."
    )
    max_tokens: int = Field(
        default=256,
        ge=1,
        description="New tokens per model call (a finalize_email call with a ~90-word email needs ~170; a cut one fails).",
    )
    temperature: float = Field(default=0.7, ge=0, description="Sampling temperature of the policy.")
    rollout_concurrency: ResumeFree[int] = Field(
        default=24, ge=1, description="Rollouts in flight at once (the embedded backend samples them as one batch)."
    )
    request_timeout_s: ResumeFree[float] = Field(default=300.0, gt=0, description="Timeout of one model call, seconds.")
    inference_client: ResumeFree[Literal["auto", "direct", "openai"]] = Field(
        default="auto",
        description=(
            "How rollouts call the policy: direct (aiohttp, lowest overhead), openai (ART's OpenAI client, "
            "needed by ART-managed backends) or auto (direct on the embedded backend, else openai)."
        ),
    )

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
    train_retries: ResumeFree[int] = Field(
        default=3, ge=1, description="Attempts of a training step on transient errors."
    )
    model_cache_dir: ResumeFree[Path] = Field(
        default=Path.home() / ".cache" / "codreamer",
        description="Where the embedded model is cached as safetensors after the first load.",
    )
    prefix_store_mb: ResumeFree[int] = Field(
        default=512,
        ge=0,
        description=(
            "Embedded backend: memory for the keys/values of recent conversations, so a rollout's "
            "next turn prefills only its new tokens (0: off)."
        ),
    )
    torch_threads: ResumeFree[int | None] = Field(
        default=None,
        ge=1,
        description=(
            "Embedded backend: torch CPU threads. Unset: OMP_NUM_THREADS if set, else the cores this process "
            "may use (CPU affinity and cgroup quota). Use 1 when other CPU-bound jobs share the machine."
        ),
    )

    # --- ART training options ------------------------------------------------------------
    # Passed as keywords of the same name to `backend.train` when set (`codreamer.backends.factory.
    # ART_TRAIN_OPTIONS`); unset: the backend's own default. The embedded backend ignores them.
    loss_fn: Literal["cispo", "ppo"] | None = Field(
        default=None,
        description="ART backends: RL loss, cispo or ppo (clipped importance ratio). Unset: the backend's default (cispo).",
    )
    kl_penalty_coef: float | None = Field(
        default=None,
        ge=0,
        description="ART backends: KL-penalised advantages, coefficient (0 = off). Unset: the backend's default (0).",
    )
    kl_penalty_reference_step: int | None = Field(
        default=None,
        ge=0,
        description="ART backends: checkpoint step that is the KL reference. Unset: the base model.",
    )
    kl_penalty_source: Literal["current_learner", "sample"] | None = Field(
        default=None,
        description="ART backends: log-probs compared with the KL reference, current_learner or sample (better off-policy).",
    )
    epsilon: float | None = Field(
        default=None,
        gt=0,
        description="ART backends: lower clip of the importance ratio (1 - epsilon). Unset: 0.2 for ppo, 1.0 for cispo.",
    )
    epsilon_high: float | None = Field(
        default=None,
        gt=0,
        description="ART backends: upper clip (1 + epsilon_high). Unset: --epsilon for ppo, 4.0 for cispo.",
    )
    normalize_advantages: bool | None = Field(
        default=None,
        description="ART backends: divide advantages by the group's reward std (false: centre them only). Unset: true.",
    )
    advantage_balance: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="ART backends: weight of negative vs positive advantages, -1..1. Unset: 0 (balanced).",
    )
    importance_sampling_level: Literal["token", "sequence", "average", "geometric_average"] | None = Field(
        default=None, description="ART backends: level of the importance weights. Unset: token."
    )
    max_negative_advantage_importance_sampling_weight: float | None = Field(
        default=None, gt=0, description="ART backends: cap on the importance ratio (ART's name for it). Unset: no cap."
    )
    truncated_importance_sampling: float | None = Field(
        default=None,
        gt=0,
        description="ART backends: truncate the sampler-to-learner importance weight at this value. Unset: off.",
    )
    mask_prob_ratio: bool | None = Field(
        default=None,
        description="ART backends: zero the ratio of tokens outside the clip range (true/false). Unset: false.",
    )
    packed_sequence_length: int | None = Field(
        default=None,
        ge=1,
        description="ART backends: tokens per packed training sequence. Unset: the longest sequence rounded up to 2048.",
    )

    # --- reliability ---------------------------------------------------------------------
    inference_attempts: ResumeFree[int] = Field(
        default=3, ge=1, description="Tries of a model call on transient errors (timeouts, 429, 5xx)."
    )
    retry_initial_s: ResumeFree[float] = Field(
        default=1.0, ge=0, description="First backoff between retries, seconds (doubles, jittered)."
    )
    retry_max_s: ResumeFree[float] = Field(default=30.0, ge=0, description="Longest backoff between retries, seconds.")
    rollout_timeout_s: ResumeFree[float] = Field(
        default=900.0, gt=0, description="A rollout running longer is cancelled and recorded as a failure."
    )
    generate_timeout_s: ResumeFree[float] = Field(
        default=3600.0, gt=0, description="Timeout of the generate stage, seconds."
    )
    score_timeout_s: ResumeFree[float] = Field(default=1800.0, gt=0, description="Timeout of the score stage, seconds.")
    train_timeout_s: ResumeFree[float] = Field(
        default=3600.0, gt=0, description="Timeout of the GRPO update stage, seconds."
    )
    evaluate_timeout_s: ResumeFree[float] = Field(
        default=3600.0, gt=0, description="Timeout of the evaluate stage, seconds."
    )
    force_resume: ResumeFree[bool] = Field(
        default=False, description="Resume a run even though settings that shape training differ from its run.json."
    )

    # --- rewards -------------------------------------------------------------------------
    rubric_weight: float = Field(default=0.4, ge=0, description="Weight of the offline rubric in the reward.")
    ruler_weight: float = Field(
        default=0.4, ge=0, description="Weight of RULER (LLM judge); dropped when no judge is set."
    )
    online_weight: float = Field(default=0.2, ge=0, description="Weight of online outcomes (opened/replied).")
    auto_finalize_factor: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Multiplies the rubric score of an email the agent did not finalise itself (salvaged from its text).",
    )
    outcomes: Literal["simulator", "log", "off"] = Field(
        default="simulator",
        description="Online outcomes: simulator (seeded ProspectSimulator, not real data), log (only events "
        "ingested into the event log) or off.",
    )
    events_path: Path | None = Field(
        default=None, description="JSONL event log of online outcomes. Default: <runs-dir>/<project>/events.jsonl."
    )
    events_secret: ResumeFree[CliSuppress[SecretStr | None]] = Field(
        default=None,
        description="Shared HMAC secret (at least 32 bytes) of the `codreamer serve-events` webhook. Never logged.",
        exclude=True,
    )
    events_tolerance_s: ResumeFree[float] = Field(
        default=300.0,
        gt=0,
        description="Webhook: refuse requests whose signed timestamp is further than this from now, seconds.",
    )
    # --- delayed credit (outcomes that arrive after their step) ------------------------------
    replay_max_groups: int = Field(
        default=4,
        ge=0,
        description="Delayed credit: at most this many earlier groups whose outcomes arrived since the last step "
        "are re-scored and replayed in a GRPO step (0 = off).",
    )
    replay_max_age: int = Field(
        default=10, ge=1, description="Delayed credit: replay only groups of the last N iterations."
    )
    replay_weight: int = Field(
        default=1,
        ge=1,
        description="Delayed credit: each replayed trajectory enters its group this many times, so a replayed group "
        "weighs N times an online group of its size in the token-averaged loss (advantages unchanged).",
    )
    attribution_window_iterations: int | None = Field(
        default=2,
        ge=1,
        description="A sent email without a reply after N iterations gets a 'no reply' event (source window); "
        "unset: no iteration window.",
    )
    attribution_window_s: float | None = Field(
        default=None,
        gt=0,
        description="A sent email without a reply after this many seconds gets a 'no reply' event (source window).",
    )
    simulator_late_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Simulator: share of outcomes (seeded per trajectory) delivered --simulator-late-iterations later.",
    )
    simulator_late_iterations: int = Field(
        default=1, ge=1, description="Simulator: how many iterations late its late outcomes arrive."
    )
    judge_model: str | None = Field(
        default=None, description="RULER judge as a litellm model name, e.g. openai/gpt-4.1-mini. Unset: no judge."
    )
    judge_base_url: str | None = Field(default=None, description="OpenAI-compatible base URL of the judge.")
    judge_api_key: ResumeFree[CliSuppress[SecretStr | None]] = Field(
        default=None, description="API key of the judge. Never logged.", exclude=True
    )
    judge_timeout_s: ResumeFree[float] = Field(default=60.0, gt=0, description="Timeout of one judge call, seconds.")
    judge_attempts: ResumeFree[int] = Field(default=3, ge=1, description="Judge attempts on transient errors.")
    low_reward_threshold: ResumeFree[float] = Field(
        default=0.4, ge=0, le=1, description="Trajectories below this reward are collected as failures."
    )

    # --- LLM prices (usage accounting) ---------------------------------------------------
    policy_price_usd_per_mtok_in: ResumeFree[float | None] = Field(
        default=None, ge=0, description="Policy price, USD per 1M prompt tokens; unset: no policy cost is reported."
    )
    policy_price_usd_per_mtok_out: ResumeFree[float | None] = Field(
        default=None, ge=0, description="Policy price, USD per 1M completion tokens; unset: no policy cost is reported."
    )
    judge_price_usd_per_mtok_in: ResumeFree[float | None] = Field(
        default=None,
        ge=0,
        description="Judge (RULER, failure analyzer) price, USD per 1M prompt tokens; unset: no cost.",
    )
    judge_price_usd_per_mtok_out: ResumeFree[float | None] = Field(
        default=None,
        ge=0,
        description="Judge (RULER, failure analyzer) price, USD per 1M completion tokens; unset: no cost.",
    )

    # --- tracking ------------------------------------------------------------------------
    wandb: ResumeFree[bool] = Field(
        default=True,
        description="Use W&B (and Weave when online) as --wandb-mode says; --no-wandb keeps local files only.",
    )
    wandb_mode: ResumeFree[Literal["online", "offline", "disabled"] | None] = Field(
        default=None,
        validation_alias=AliasChoices("wandb_mode", "WANDB_MODE"),
        description="online (W&B + Weave traces, needs WANDB_API_KEY), offline (a W&B run in the run directory, "
        "uploaded later with `wandb sync`) or disabled. Unset: online with a key, else offline.",
    )
    wandb_project: ResumeFree[str | None] = Field(
        default=None,
        validation_alias=AliasChoices("wandb_project", "WANDB_PROJECT"),
        description="W&B project of the runs. Default: --project.",
    )
    wandb_entity: ResumeFree[str | None] = Field(
        default=None,
        validation_alias=AliasChoices("wandb_entity", "WANDB_ENTITY"),
        description="W&B entity (user or team). Default: the key's default entity.",
    )
    weave_project: ResumeFree[str] = Field(
        default="codreamer",
        validation_alias=AliasChoices("weave_project", "WEAVE_PROJECT", "CODREAMER_WEAVE_PROJECT"),
        description=(
            "Weave project for traces: `project` (under the W&B entity) or `entity/project`, as Weave takes it "
            "(online mode only; use the W&B project's name to link calls to runs)."
        ),
    )
    tracking_timeout_s: ResumeFree[float] = Field(
        default=10.0,
        gt=0,
        description="Longest wait for W&B / Weave to start or flush; past it the run goes on without.",
    )
    wandb_api_key: ResumeFree[CliSuppress[SecretStr | None]] = Field(
        default=None,
        validation_alias=AliasChoices("wandb_api_key", "WANDB_API_KEY"),
        description="W&B key; without it nothing goes online and the run says so once. Never logged.",
        exclude=True,
    )

    @field_validator("wandb_mode", mode="before")
    @classmethod
    def _wandb_mode_aliases(cls, value: object) -> object:
        """wandb also accepts the legacy `dryrun` (offline) and `run` (online) for WANDB_MODE."""
        if isinstance(value, str):
            value = value.strip().lower()
            return {"dryrun": "offline", "run": "online", "": None}.get(value, value)
        return value

    def resolved_events_path(self) -> Path:
        return self.events_path or self.runs_dir / self.project / "events.jsonl"

    def resolved_inference_client(self) -> InferenceClientKind:
        """`inference_client` with "auto" decided: ART's LocalBackend/ServerlessBackend attach
        per-choice metadata through ART's own client, the embedded backend needs none."""
        if self.inference_client != "auto":
            return self.inference_client
        return "direct" if self.backend == "embedded" else "openai"


def default_of(name: str) -> Any:
    """The default of a setting, for the views built from `Settings` (one place per default)."""
    return Settings.model_fields[name].default


def _marks(field: FieldInfo) -> set[str]:
    return {mark.name for mark in field.metadata if isinstance(mark, _Mark)}


def resume_free_fields(model: type[BaseSettings] | None = None) -> frozenset[str]:
    """The settings marked `ResumeFree` (of `Settings` or `model`): a resume may change them;
    every other one is in the run's fingerprint, so a new field is resume-shaping unless marked."""
    fields = (model or Settings).model_fields
    return frozenset(name for name, field in fields.items() if RESUME_FREE.name in _marks(field))


def command_of(name: str) -> Command | None:
    """The only command whose flag `name` is (`LearnLoopOnly` / `TrainOnly`), or None for both."""
    for command in COMMANDS:
        if f"command:{command}" in _marks(Settings.model_fields[name]):
            return command
    return None


def command_fields(command: Command) -> list[str]:
    """The settings `command` takes (in declaration order): all but the other command's own."""
    return [name for name in Settings.model_fields if command_of(name) in (None, command)]


def layered_settings(flags: Mapping[str, Any], file_values: Mapping[str, Any] | None = None) -> Settings:
    """Settings from flags > environment > config file > .env > defaults (see the module docstring).

    `flags` and `file_values` are keyed by field name. The file's values enter as a source of
    their own between the environment and `.env` (pydantic-settings orders sources per class,
    hence the subclass); the result is a plain `Settings`, validated once.
    """
    if not file_values:
        return Settings(**flags)
    values = dict(file_values)

    class _WithConfigFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            from_file = InitSettingsSource(settings_cls, values)
            return init_settings, env_settings, from_file, dotenv_settings, file_secret_settings

    layered = _WithConfigFile(**flags)
    state = {name: getattr(layered, name) for name in Settings.model_fields}
    return Settings.model_construct(_fields_set=set(layered.model_fields_set), **state)

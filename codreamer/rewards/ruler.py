"""RULER judge: ART's LLM-as-judge over one GRPO group, with bounded retries and no lost data.

`judge_group` sends a group to ART's `ruler_score_group` (one judge call that ranks all
trajectories of the group relative to each other) and returns a `GroupJudgement`: one score
per trajectory, in order, or a short `judge_error`. It never raises for judge failures and
never turns a failure into a zero reward.

- Transient errors (timeouts, connection errors, HTTP 429/5xx) are retried by
  `codreamer.retry.retrying` (classified by its `is_transient`, like every other retry) with
  exponential backoff + jitter, capped at `backoff_max_s`, at most `attempts` times. Each
  retry is logged (warning, key redacted) and counted as `retries/RULER judge`. litellm's own
  retries are switched off (`num_retries=0`, which also sets the OpenAI SDK's `max_retries`
  to 0), so the count is ours.
- Permanent errors (malformed JSON from the judge, a wrong number of scores, 4xx such as a
  bad key or a bad request) fail fast: one attempt, then `judge_error`.
- The whole call is bounded by `JudgeConfig.total_budget_s()`.

ART's `ruler_score_group` returns a NEW group that drops the group's metadata, metrics and
exceptions; only its per-trajectory `metrics["ruler_score"]` is read here. The caller keeps
its own group and writes the scores onto it with `apply_judgement` (rewards are left alone:
blending happens in `codreamer.rewards.blend`).

The API key is handed to litellm only; it is redacted (`codreamer.redaction`) from every error
string and log line.
(Importing this module imports `codreamer` first, which keeps litellm's price list offline.)
"""

from __future__ import annotations

import asyncio
import importlib
import math
import re
import time

import art
import weave
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from codreamer.config import Settings, default_of
from codreamer.local_trace import traced
from codreamer.redaction import redact
from codreamer.retry import RetryPolicy, retrying
from codreamer.usage import art_judge_usage, timed_llm_call

__all__ = [
    "GroupJudgement",
    "JudgeConfig",
    "apply_judgement",
    "judge_group",
]

# `art.rewards.ruler` the attribute is the function; the module has to be looked up by name.
_art_ruler = importlib.import_module("art.rewards.ruler")

#: ART re-asks the judge once by itself when the answer has the wrong number/ids of scores,
#: so one of our attempts can be up to this many HTTP requests.
_ART_REQUESTS_PER_ATTEMPT: int = max(1, int(getattr(_art_ruler, "_STRUCTURAL_ATTEMPTS", 1)))

_MAX_ERROR_CHARS = 300


class JudgeConfig(BaseModel):
    """Which model judges, where it lives, and how hard to try."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description='litellm model name, e.g. "openai/gpt-4.1-mini".')
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint (litellm api_base).")
    api_key: SecretStr | None = Field(default=None, description="Judge API key; None: litellm reads the env.")
    timeout_s: float = Field(default=default_of("judge_timeout_s"), gt=0, description="Per HTTP request.")
    attempts: int = Field(
        default=default_of("judge_attempts"), ge=1, description="Tries in all, for transient errors only."
    )
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=20.0, ge=0)
    rubric: str | None = Field(default=None, description="None: ART's default RULER rubric.")

    @classmethod
    def from_settings(cls, settings: Settings) -> JudgeConfig | None:
        """The RULER judge the settings name; None when `--judge-model` is unset (no judge)."""
        if settings.judge_model is None:
            return None
        return cls(
            model=settings.judge_model,
            base_url=settings.judge_base_url,
            api_key=settings.judge_api_key,
            timeout_s=settings.judge_timeout_s,
            attempts=settings.judge_attempts,
        )

    def retry_policy(self) -> RetryPolicy:
        """The judge's tries and backoff, for `codreamer.retry.retrying`."""
        return RetryPolicy(attempts=self.attempts, initial_s=self.backoff_initial_s, max_s=self.backoff_max_s)

    def backoff_budget_s(self) -> float:
        """Longest total sleep between attempts (exponential + jitter, each capped)."""
        return sum(
            min(self.backoff_max_s, self.backoff_initial_s * 2**n + self.backoff_initial_s)
            for n in range(self.attempts - 1)
        )

    def total_budget_s(self) -> float:
        """Bound on one `judge_group` call: every attempt's requests timing out, plus backoff."""
        return self.timeout_s * _ART_REQUESTS_PER_ATTEMPT * self.attempts + self.backoff_budget_s()

    def litellm_params(self) -> dict[str, object]:
        """`extra_litellm_params` for ART's RULER (holds the secret: never log this)."""
        params: dict[str, object] = {"timeout": self.timeout_s, "num_retries": 0}
        if self.base_url is not None:
            params["api_base"] = self.base_url
        if self.api_key is not None:
            params["api_key"] = self.api_key.get_secret_value()
        return params


class GroupJudgement(BaseModel):
    """The judge's verdict on one group."""

    scores: list[float] | None = Field(description="One per trajectory, in order; None on judge error.")
    judge_error: str | None = Field(default=None, description="Exception type + message, key redacted.")
    attempts: int = Field(default=0, ge=0, description="Judge attempts made (our retries; ART may re-ask inside one).")
    latency_s: float = Field(default=0.0, ge=0)

    @property
    def ok(self) -> bool:
        return self.scores is not None


_LITELLM_PREFIX = re.compile(r"^(?:litellm\.)?(\w+Error|Timeout):\s*(?:\1:\s*)?")
_PYDANTIC_HELP = re.compile(r"\s*For further information visit \S+")


def _describe(exc: BaseException, secret: SecretStr | None) -> str:
    """`Type: message`, one line, at most _MAX_ERROR_CHARS, the secret replaced by ***."""
    message = " ".join(str(exc).split())
    message = _PYDANTIC_HELP.sub("", _LITELLM_PREFIX.sub("", message))
    text = redact(f"{type(exc).__name__}: {message}" if message else type(exc).__name__, secret)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


@weave.op
@traced
async def judge_group(group: art.TrajectoryGroup, judge: JudgeConfig) -> GroupJudgement:
    """Score `group` with RULER; never raises for judge failures (see the module docstring).

    `group` is not modified; call `apply_judgement(group, judgement)` to record the result.
    """
    n = len(group.trajectories)
    if n == 0:
        return GroupJudgement(scores=[], attempts=0, latency_s=0.0)

    rubric = judge.rubric if judge.rubric is not None else _art_ruler.DEFAULT_RUBRIC
    params = judge.litellm_params()
    budget_s = judge.total_budget_s()
    attempts = 0

    started = time.perf_counter()
    scored: art.TrajectoryGroup | None = None
    error: str | None = None
    deadline = asyncio.timeout(budget_s)
    try:
        async with deadline:
            async for attempt in retrying(judge.retry_policy(), "RULER judge", secrets=(judge.api_key,)):
                with attempt:
                    attempts += 1
                    # one usage record per attempt (ART may send 2 requests in one: tokens summed)
                    with timed_llm_call("judge", judge.model) as call, art_judge_usage(call):
                        scored = await _art_ruler.ruler_score_group(
                            group,
                            judge_model=judge.model,
                            extra_litellm_params=params,
                            rubric=rubric,
                            swallow_exceptions=False,
                            debug=False,
                        )
    except TimeoutError as exc:
        if deadline.expired():
            error = f"TimeoutError: judge exceeded its overall budget of {budget_s:.1f}s"
        else:
            error = _describe(exc, judge.api_key)
    except Exception as exc:  # noqa: BLE001 - every judge failure becomes judge_error
        error = _describe(exc, judge.api_key)
    latency_s = time.perf_counter() - started

    scores: list[float] | None = None
    if error is None:
        if scored is None:
            error = "ValueError: RULER returned no group"
        else:
            try:
                scores = [float(t.metrics["ruler_score"]) for t in scored.trajectories]
            except (KeyError, TypeError, ValueError) as exc:
                error = _describe(exc, judge.api_key)
            else:
                if len(scores) != n:
                    error = f"ValueError: RULER returned {len(scores)} scores for {n} trajectories"
                    scores = None
                elif not all(math.isfinite(s) for s in scores):
                    error = f"ValueError: judge returned non-finite scores {scores}"
                    scores = None
                elif any(s < 0.0 or s > 1.0 for s in scores):
                    logger.warning("RULER judge {} scores outside [0, 1] clamped: {}", judge.model, scores)
                    scores = [min(1.0, max(0.0, s)) for s in scores]

    if error is not None:
        logger.warning(
            "RULER judge {} failed after {} attempt(s) in {:.2f}s: {}", judge.model, attempts, latency_s, error
        )
        return GroupJudgement(scores=None, judge_error=error, attempts=attempts, latency_s=latency_s)

    logger.debug(
        "RULER judge {} scored {} trajectories in {:.2f}s ({} attempt(s))", judge.model, n, latency_s, attempts
    )
    return GroupJudgement(scores=scores, judge_error=None, attempts=attempts, latency_s=latency_s)


def apply_judgement(group: art.TrajectoryGroup, judgement: GroupJudgement) -> None:
    """Record `judgement` on `group` in place; rewards are left untouched.

    With scores: `metrics["ruler/score"]` on each trajectory. Without: `metrics["ruler/judge_error"] = 1`
    on each trajectory and `metadata["judge_error"]` on the group.
    """
    if judgement.scores is not None and len(judgement.scores) == len(group.trajectories):
        for trajectory, score in zip(group.trajectories, judgement.scores, strict=True):
            trajectory.metrics["ruler/score"] = float(score)
        return
    error = judgement.judge_error
    if error is None:
        error = (
            "missing scores"
            if judgement.scores is None
            else f"{len(judgement.scores)} scores for {len(group.trajectories)} trajectories"
        )
    for trajectory in group.trajectories:
        trajectory.metrics["ruler/judge_error"] = 1
    group.metadata["judge_error"] = error

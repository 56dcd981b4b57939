"""The optional LLM judge of a failure report: root causes and fixes, never an exception.

`explain(report, config)` asks an OpenAI-compatible chat model for root causes and fixes,
validated against a strict schema (`JudgeResponse`). Transient errors are retried by
`codreamer.retry` (classified by its `is_transient`, logged and counted); an answer that does
not validate is asked for once more; any other failure ends as "judge unavailable: <reason>"
in the report. The judge's API key is never logged or written (`codreamer.redaction`).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from codreamer.analysis.categories import FailureCategory
from codreamer.analysis.report import CrossRunReport, JudgeAnalysis, JudgeResponse, Report, RunFailureReport
from codreamer.config import Settings
from codreamer.redaction import redact
from codreamer.tracking.ops import llm_op
from codreamer.usage import LLMPrices, UsageLedger, current_ledger, timed_llm_call, using_ledger

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

__all__ = ["AnalyzerJudgeConfig", "explain", "parse_judge_answer"]

_MAX_REASON_CHARS = 300


class AnalyzerJudgeConfig(BaseModel):
    """An OpenAI-compatible chat model that explains a report (model name sent verbatim)."""

    model_config = ConfigDict(frozen=True)

    model: str
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    attempts: int = Field(default=3, ge=1, description="Tries in all on transient errors (timeouts, 429, 5xx).")
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=20.0, ge=0)
    max_tokens: int = Field(default=1200, ge=64)

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalyzerJudgeConfig | None:
        """The RULER judge's model, spoken to with the OpenAI client; None without a judge.

        litellm model names carry a provider prefix (`openai/gpt-4o-mini`); the OpenAI client
        wants the bare name, so an `openai/` prefix is dropped.
        """
        if settings.judge_model is None:
            return None
        return cls(
            model=settings.judge_model.removeprefix("openai/"),
            base_url=settings.judge_base_url,
            api_key=settings.judge_api_key,
            timeout_s=settings.judge_timeout_s,
            attempts=settings.judge_attempts,
        )


_SYSTEM_PROMPT = (
    "You analyse failures of an LLM agent trained with reinforcement learning (GRPO) to write "
    "personalised cold outreach emails using tools (lookup_prospect, lookup_company, finalize_email). "
    "Given a failure summary, name the most likely root causes and concrete fixes. "
    'Answer with ONLY a JSON object: {"findings": [{"category": <one of the given categories>, '
    '"root_cause": <string>, "suggestion": <string>, "confidence": <number 0..1>}]}. No other keys, no prose.'
)


def _judge_summary(report: RunFailureReport | CrossRunReport) -> dict[str, Any]:
    if isinstance(report, RunFailureReport):
        return {
            "run_id": report.run_id,
            "total_failures": report.total_failures,
            "trajectories_seen": report.trajectories_seen,
            "counts_by_category": {str(c): n for c, n in report.counts_by_category.items()},
            "by_iteration": {str(i): {str(c): n for c, n in cs.items()} for i, cs in report.by_iteration.items()},
            "top_prospects": [p.model_dump(mode="json") for p in report.top_prospects[:5]],
            "stuck": [
                {"prospect_id": s.prospect_id, "category": str(s.category), "iterations": s.iterations}
                for s in report.stuck[:5]
            ],
            "agent_behaviour": {
                str(c): s.model_dump(mode="json", exclude_none=True) for c, s in report.category_stats.items()
            },
            "agent_behaviour_rates": report.behaviour,
            "examples": {str(c): [e.excerpt for e in es[:2]] for c, es in report.examples.items()},
        }
    return {
        "runs": report.run_ids,
        "left_out": report.left_out,
        "counts_by_category": {str(c): n for c, n in report.counts_by_category.items()},
        "consistent_prospects": [i.model_dump(mode="json") for i in report.consistent_prospects[:5]],
        "consistent_categories": [i.model_dump(mode="json") for i in report.consistent_categories],
        "trends": [t.model_dump(mode="json") for t in report.trends],
    }


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def parse_judge_answer(text: str | None) -> JudgeResponse:
    """Validate the judge's answer (code fences tolerated); ValueError when it does not fit."""
    if not text or not text.strip():
        raise ValueError("empty answer")
    body = text.strip()
    fenced = _FENCE_RE.search(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"answer is not JSON ({exc.msg} at char {exc.pos})") from None
    try:
        return JudgeResponse.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"answer does not match the schema ({where}: {first.get('msg')})") from None


def _redact(text: str, config: AnalyzerJudgeConfig) -> str:
    """`text` without the judge's key, clipped for the report."""
    return redact(text, config.api_key)[:_MAX_REASON_CHARS]


@llm_op("analyzer_completion")
async def analyzer_completion(client: Any, model: str, messages: list[Any], max_tokens: int) -> Any:
    """One call to the analyzer's judge: a Weave op (`llm_op`) when Weave runs, its key never recorded."""
    return await client.chat.completions.create(model=model, messages=messages, temperature=0.0, max_tokens=max_tokens)


async def _ask_judge(config: AnalyzerJudgeConfig, report: RunFailureReport | CrossRunReport) -> JudgeAnalysis:
    import openai  # imported here: reading a run's files (`codreamer analyze` without a judge) needs neither

    from codreamer.retry import RetryPolicy, is_transient, retrying

    policy = RetryPolicy(attempts=config.attempts, initial_s=config.backoff_initial_s, max_s=config.backoff_max_s)
    client = openai.AsyncOpenAI(
        base_url=config.base_url,
        api_key=config.api_key.get_secret_value() if config.api_key is not None else "not-set",
        timeout=config.timeout_s,
        max_retries=0,  # retries are ours (codreamer.retry), so they are classified, logged and counted
    )
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": _SYSTEM_PROMPT},
        {
            "role": "user",
            "content": "Categories: "
            + ", ".join(c.value for c in FailureCategory)
            + "\n\nFailure summary:\n"
            + json.dumps(_judge_summary(report), indent=1, default=str),
        },
    ]

    async def one_call() -> str | None:
        async for attempt in retrying(policy, "analysis judge", secrets=(config.api_key,)):
            with attempt, timed_llm_call("analyzer", config.model) as call:
                completion = await analyzer_completion(client, config.model, messages, config.max_tokens)
                call.set_usage(getattr(completion, "usage", None))
                if not completion.choices:
                    return None
                return completion.choices[0].message.content
        raise AssertionError("unreachable")

    reason = "no answer"
    try:
        for attempt in range(2):  # a malformed answer is asked for once more
            try:
                answer = await one_call()
            except Exception as exc:  # noqa: BLE001 - the report says why, the caller goes on
                tries = f" (after {config.attempts} attempts)" if is_transient(exc) and config.attempts > 1 else ""
                reason = _redact(f"{type(exc).__name__}{tries}: {exc}", config)
                break
            try:
                parsed = parse_judge_answer(answer)
            except ValueError as exc:
                reason = _redact(str(exc), config)
                logger.warning("analysis judge answer {} was malformed: {}", attempt + 1, reason)
                continue
            return JudgeAnalysis(status="ok", model=config.model, findings=parsed.findings)
    finally:
        await client.close()
    logger.warning("analysis judge unavailable: {}", reason)
    return JudgeAnalysis(status="unavailable", model=config.model, reason=reason)


async def explain(report: Report, config: AnalyzerJudgeConfig | None, prices: LLMPrices | None = None) -> Report:
    """A copy of `report` with `judge` filled in (root causes + fixes, or why it is unavailable).

    Transient errors (timeouts, connection errors, 429, 5xx) are retried with backoff up to
    `attempts` tries; an answer that does not validate is asked for once more. Nothing
    here raises for a judge failure. The explanation's LLM usage is in the report, and is
    added to the caller's ledger (a running loop's cumulative usage) when there is one.
    """
    if config is None:
        return report.model_copy(update={"judge": JudgeAnalysis(status="not_configured")})
    outer, ledger = current_ledger(), UsageLedger(prices)
    with using_ledger(ledger):  # the explanation's own usage, for the report
        analysis = await _ask_judge(config, report)
    if outer is not None:  # and the caller's (a running loop's) cumulative usage
        outer.merge(ledger)
    usage = {k: v for k, v in ledger.totals().items() if k.startswith("llm/analyzer/")}
    return report.model_copy(update={"judge": analysis.model_copy(update={"usage": usage})})

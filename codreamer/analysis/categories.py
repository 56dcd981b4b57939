"""Failure categories shared by the collector, the analyzer and the reports.

Two kinds of failure are told apart:

- an **exception** (a rollout, the judge or a training step raised): `categorize_exception`
  maps it to one category, by the exception's type name first, then by patterns in its
  message ("429", "timed out", "Connection refused", "JSONDecodeError"...);
- a **bad output** (the episode finished but the email is poor): `categorize_output` applies
  fixed rules to the rubric parts (`metrics["rubric/<part>"]`) and the rollout metadata and
  returns every category that applies, most important first.

When a failure has several categories, its *primary* category is the first of them in
`PRIORITY` (`primary_category`): infrastructure errors first, then the email's own faults
from the most to the least severe, and `low_reward` last (it only applies when no more
specific rule does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EXCEPTION_CATEGORIES",
    "OUTPUT_CATEGORIES",
    "PRIORITY",
    "FailureCategory",
    "OutputThresholds",
    "categorize_exception",
    "categorize_output",
    "email_word_count",
    "exception_type_name",
    "primary_category",
    "sort_categories",
]


class FailureCategory(StrEnum):
    """Why a trajectory (or an attempt at one) failed."""

    RATE_LIMIT = "rate_limit"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    SCHEMA_PARSE = "schema_parse"
    TRAINING_ERROR = "training_error"
    JUDGE_ERROR = "judge_error"
    ROLLOUT_CRASH = "rollout_crash"
    AUTO_FINALIZED = "auto_finalized"
    MALFORMED_EMAIL = "malformed_email"
    MISSING_PERSONALIZATION = "missing_personalization"
    HALLUCINATED_FACT = "hallucinated_fact"
    NO_CALL_TO_ACTION = "no_call_to_action"
    TOO_LONG = "too_long"
    TOO_SHORT = "too_short"
    SPAMMY = "spammy"
    LOW_REWARD = "low_reward"
    NO_REPLY = "no_reply"


#: Fixed priority order: the primary category of a failure is the first of its categories here.
PRIORITY: tuple[FailureCategory, ...] = (
    FailureCategory.RATE_LIMIT,
    FailureCategory.TIMEOUT,
    FailureCategory.CONNECTION,
    FailureCategory.SCHEMA_PARSE,
    FailureCategory.TRAINING_ERROR,
    FailureCategory.JUDGE_ERROR,
    FailureCategory.ROLLOUT_CRASH,
    FailureCategory.MALFORMED_EMAIL,
    FailureCategory.HALLUCINATED_FACT,
    FailureCategory.MISSING_PERSONALIZATION,
    FailureCategory.NO_CALL_TO_ACTION,
    FailureCategory.SPAMMY,
    FailureCategory.TOO_LONG,
    FailureCategory.TOO_SHORT,
    FailureCategory.AUTO_FINALIZED,
    FailureCategory.NO_REPLY,
    FailureCategory.LOW_REWARD,
)
_RANK = {category: rank for rank, category in enumerate(PRIORITY)}

#: Categories of a raised exception (infrastructure or crash).
EXCEPTION_CATEGORIES: frozenset[FailureCategory] = frozenset(PRIORITY[:7])
#: Categories `categorize_output` can return.
OUTPUT_CATEGORIES: frozenset[FailureCategory] = frozenset(
    {
        FailureCategory.AUTO_FINALIZED,
        FailureCategory.MALFORMED_EMAIL,
        FailureCategory.MISSING_PERSONALIZATION,
        FailureCategory.HALLUCINATED_FACT,
        FailureCategory.NO_CALL_TO_ACTION,
        FailureCategory.TOO_LONG,
        FailureCategory.TOO_SHORT,
        FailureCategory.SPAMMY,
        FailureCategory.LOW_REWARD,
    }
)


def sort_categories(categories: Iterable[FailureCategory | str]) -> list[FailureCategory]:
    """Unique categories in priority order."""
    unique = {FailureCategory(c) for c in categories}
    return sorted(unique, key=_RANK.__getitem__)


def primary_category(categories: Iterable[FailureCategory | str]) -> FailureCategory:
    """The first of `categories` in `PRIORITY` (ValueError when there is none)."""
    ordered = sort_categories(categories)
    if not ordered:
        raise ValueError("a failure needs at least one category")
    return ordered[0]


# --------------------------------------------------------------------------- exceptions

# Checked in this order against the exception's type name (case-insensitive).
_TYPE_RULES: tuple[tuple[re.Pattern[str], FailureCategory], ...] = (
    (re.compile(r"ratelimit|toomanyrequests|quota", re.I), FailureCategory.RATE_LIMIT),
    (re.compile(r"timeout|timedout|deadline", re.I), FailureCategory.TIMEOUT),
    (
        re.compile(r"connect|disconnect|brokenpipe|networkerror|socket|remoteprotocol|gaierror", re.I),
        FailureCategory.CONNECTION,
    ),
    (
        re.compile(r"jsondecode|decodeerror|validationerror|parse|schema|unmarshal", re.I),
        FailureCategory.SCHEMA_PARSE,
    ),
    # case-sensitive on purpose: "ConstraintError" is not a training error
    (re.compile(r"Train|TRAIN|GRPO|Grpo|Optimi[sz]er"), FailureCategory.TRAINING_ERROR),
    (re.compile(r"Judge|JUDGE|Ruler|RULER"), FailureCategory.JUDGE_ERROR),
)

# Then against the message.
_MESSAGE_RULES: tuple[tuple[re.Pattern[str], FailureCategory], ...] = (
    (
        re.compile(r"\b429\b|rate[ _-]?limit|too many requests|quota exceeded|throttl", re.I),
        FailureCategory.RATE_LIMIT,
    ),
    (re.compile(r"timed? ?out|timeout|deadline exceeded", re.I), FailureCategory.TIMEOUT),
    (
        re.compile(
            r"connection (?:refused|reset|error|aborted|closed)|could not connect|cannot connect|"
            r"failed to connect|server disconnected|broken pipe|name or service not known|"
            r"network is unreachable|no route to host|connection to .* failed",
            re.I,
        ),
        FailureCategory.CONNECTION,
    ),
    (
        re.compile(
            r"jsondecodeerror|expecting value|expecting property name|unterminated string|invalid json|"
            r"not valid json|validation error|failed to parse|could not parse|schema",
            re.I,
        ),
        FailureCategory.SCHEMA_PARSE,
    ),
    (
        re.compile(r"training step|grpo|out of memory|optimizer|nan loss|loss is nan|backward", re.I),
        FailureCategory.TRAINING_ERROR,
    ),
    (re.compile(r"\bjudge\b|\bruler\b", re.I), FailureCategory.JUDGE_ERROR),
)

_STAGE_FALLBACK = {
    "train": FailureCategory.TRAINING_ERROR,
    "training": FailureCategory.TRAINING_ERROR,
    "judge": FailureCategory.JUDGE_ERROR,
    "score": FailureCategory.JUDGE_ERROR,
}


_CLASS_REPR_RE = re.compile(r"^<class '([^']+)'>$")


def exception_type_name(raw: str | None) -> str:
    """The dotted name of an exception type as ART or Python wrote it.

    ART's `PydanticException.type` is `str(type(exc))`, e.g. ``<class 'openai.APITimeoutError'>``;
    this returns ``openai.APITimeoutError`` (a plain name is returned unchanged).
    """
    text = (raw or "").strip()
    match = _CLASS_REPR_RE.match(text)
    return match.group(1) if match else text


def categorize_exception(type_name: str, message: str, *, stage: str | None = None) -> FailureCategory:
    """Category of an exception, by its type name first, then by its message.

    Only the class name is matched (``openai.APITimeoutError`` -> ``APITimeoutError``), so that
    module names such as ``codreamer.training`` cannot decide the category. `stage`
    ("rollout", "train", "judge") only chooses the fallback when nothing matches:
    `training_error` for "train", `judge_error` for "judge", else `rollout_crash`.
    """
    type_name = exception_type_name(type_name).rsplit(".", 1)[-1]
    message = message or ""
    for pattern, category in _TYPE_RULES:
        if pattern.search(type_name):
            return category
    for pattern, category in _MESSAGE_RULES:
        if pattern.search(message):
            return category
    return _STAGE_FALLBACK.get((stage or "").lower(), FailureCategory.ROLLOUT_CRASH)


# --------------------------------------------------------------------------- outputs


class OutputThresholds(BaseModel):
    """Where the output rules draw the line; each `rubric/<part>` below its value is a fault."""

    model_config = ConfigDict(frozen=True)

    personalization: float = Field(
        default=0.3, ge=0, le=1, description="rubric/personalization below: missing_personalization."
    )
    call_to_action: float = Field(
        default=0.3, ge=0, le=1, description="rubric/call_to_action below: no_call_to_action."
    )
    no_hallucination: float = Field(
        default=0.75, ge=0, le=1, description="rubric/no_hallucination below: hallucinated_fact."
    )
    length: float = Field(default=0.5, ge=0, le=1, description="rubric/length below: too_long or too_short.")
    too_long_words: int = Field(default=150, ge=1, description="Body words above which a bad length is too_long.")
    no_spam: float = Field(default=0.8, ge=0, le=1, description="rubric/no_spam below: spammy.")
    clean_format: float = Field(default=0.5, ge=0, le=1, description="rubric/clean_format below: malformed_email.")
    subject: float = Field(default=0.25, ge=0, le=1, description="rubric/subject below: malformed_email.")
    low_reward: float = Field(default=0.4, description="Reward below: low_reward (when no other rule applies).")


def email_word_count(metadata: Mapping[str, Any]) -> int | None:
    """Words of `metadata["email_body"]`, or None when the body is not recorded."""
    body = metadata.get("email_body")
    if not isinstance(body, str):
        return None
    return len(body.split())


def _metric(metrics: Mapping[str, Any], part: str) -> float | None:
    value = metrics.get(f"rubric/{part}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _below(metrics: Mapping[str, Any], part: str, threshold: float) -> bool:
    value = _metric(metrics, part)
    return value is not None and value < threshold


def categorize_output(
    metrics: Mapping[str, Any],
    metadata: Mapping[str, Any],
    thresholds: OutputThresholds | None = None,
    *,
    reward: float | None = None,
) -> list[FailureCategory]:
    """Every output category that applies to one finished trajectory, in priority order.

    Rules (defaults of `OutputThresholds`):

    - ``malformed_email``: empty body (no words; or, without a recorded body, rubric/length 0),
      rubric/clean_format < 0.5 (leaked markup, JSON, repetition) or rubric/subject < 0.25;
    - ``hallucinated_fact``: rubric/no_hallucination < 0.75;
    - ``missing_personalization``: rubric/personalization < 0.3;
    - ``no_call_to_action``: rubric/call_to_action < 0.3;
    - ``spammy``: rubric/no_spam < 0.8;
    - ``too_long`` / ``too_short``: rubric/length < 0.5, too_long when the body has more than
      150 words, else too_short (also when the body is not recorded);
    - ``auto_finalized``: `metadata["auto_finalized"]` (the agent never called finalize_email);
    - ``low_reward``: `reward` < 0.4 and no other rule applies.

    An empty email is only ``malformed_email`` (plus ``auto_finalized`` when it applies): the
    content rules would all fire on it and say nothing more.
    """
    t = thresholds or OutputThresholds()
    found: list[FailureCategory] = []
    words = email_word_count(metadata)
    length = _metric(metrics, "length")
    empty = words == 0 if words is not None else (length is not None and length == 0.0)

    if empty or _below(metrics, "clean_format", t.clean_format) or _below(metrics, "subject", t.subject):
        found.append(FailureCategory.MALFORMED_EMAIL)
    if not empty:
        if _below(metrics, "no_hallucination", t.no_hallucination):
            found.append(FailureCategory.HALLUCINATED_FACT)
        if _below(metrics, "personalization", t.personalization):
            found.append(FailureCategory.MISSING_PERSONALIZATION)
        if _below(metrics, "call_to_action", t.call_to_action):
            found.append(FailureCategory.NO_CALL_TO_ACTION)
        if _below(metrics, "no_spam", t.no_spam):
            found.append(FailureCategory.SPAMMY)
        if _below(metrics, "length", t.length):
            too_long = words is not None and words > t.too_long_words
            found.append(FailureCategory.TOO_LONG if too_long else FailureCategory.TOO_SHORT)
    if metadata.get("auto_finalized"):
        found.append(FailureCategory.AUTO_FINALIZED)
    if not found and reward is not None and reward < t.low_reward:
        found.append(FailureCategory.LOW_REWARD)
    return sort_categories(found)

"""What a failure record keeps of a trajectory or an exception, as plain JSON.

The collector turns ART objects (trajectories with `Choice`s, `PydanticException`s, live
exceptions) into the fields of a `Failure`; these helpers do the conversions, so the
collector only decides which failures there are.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from codreamer.analysis.categories import exception_type_name

__all__ = [
    "agent_state",
    "email_text",
    "exception_fields",
    "initial_messages",
    "jsonable",
    "messages_as_json",
    "reward_parts",
]

AGENT_STATE_KEYS = (
    "turns",
    "tool_calls",
    "invalid_tool_calls",
    "prospect_lookups",
    "company_lookups",
    "finish_reason",
    "auto_finalized",
    "auto_finalize_source",
)
REWARD_PREFIXES = ("rubric/", "reward/", "ruler/")


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data (a pydantic model dumped, anything else through `str`)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    return json.loads(json.dumps(value, default=str))


def messages_as_json(messages_and_choices: Iterable[Any]) -> list[dict[str, Any]]:
    """Messages and sampled `Choice`s as plain JSON dicts (a Choice becomes its assistant message)."""
    out: list[dict[str, Any]] = []
    for item in messages_and_choices:
        message = getattr(item, "message", None)
        if message is not None and hasattr(item, "finish_reason"):  # an openai Choice
            data = jsonable(message)
            data.setdefault("role", "assistant")
            data["finish_reason"] = item.finish_reason
            out.append(data)
        else:
            data = jsonable(item)
            out.append(data if isinstance(data, dict) else {"content": data})
    return out


def initial_messages(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages before the first assistant turn: the scenario as the agent saw it."""
    first: list[Mapping[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" or role is None:
            break
        first.append({"role": role, "content": message.get("content")})
    return first


def email_text(metadata: Mapping[str, Any]) -> str:
    """The trajectory's email as 'Subject: ...' + body; "" when it wrote none."""
    subject = metadata.get("email_subject")
    body = metadata.get("email_body")
    if subject is None and body is None:
        return ""
    return f"Subject: {subject or ''}\n\n{body or ''}"


def reward_parts(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The reward parts among a trajectory's metrics (`rubric/*`, `reward/*`, `ruler/*`)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key.startswith(REWARD_PREFIXES) and isinstance(value, int | float) and not isinstance(value, bool)
    }


def agent_state(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What the agent did (turns, tool calls, how it finished), from a trajectory's metadata."""
    return {key: metadata[key] for key in AGENT_STATE_KEYS if key in metadata}


def exception_fields(exc: Any) -> tuple[str, str, str]:
    """(type, message, traceback) of an `art` PydanticException, a BaseException or a mapping.

    The type is a dotted name (``openai.APITimeoutError``; builtins bare: ``TimeoutError``),
    the same whether the exception is live or went through ART's `str(type(exc))`.
    """
    if isinstance(exc, BaseException):
        tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ is not None else ""
        cls = type(exc)
        name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        return name, str(exc), tb
    if isinstance(exc, Mapping):
        raw = (str(exc.get("type", "Exception")), str(exc.get("message", "")), str(exc.get("traceback", "")))
    else:
        raw = (
            str(getattr(exc, "type", "Exception")),
            str(getattr(exc, "message", "")),
            str(getattr(exc, "traceback", "")),
        )
    return exception_type_name(raw[0]) or "Exception", raw[1], raw[2]

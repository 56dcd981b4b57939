"""The agent's tools: OpenAI tool schemas and a pure, never-raising executor.

The agent may look up the prospect and their company (facts come from the `Scenario`
object, no I/O) and ends its episode by calling `finalize_email`. Every failure (unknown
tool, malformed JSON, missing fields, wrong prospect id) becomes an error text that is
returned to the model as the tool message, with `ToolResult.ok = False` so the rollout
can count it. `execute_tool` never raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openai.types.chat import ChatCompletionToolParam

from codreamer.domain import Email, Scenario

LOOKUP_PROSPECT = "lookup_prospect"
LOOKUP_COMPANY = "lookup_company"
FINALIZE_EMAIL = "finalize_email"
TOOL_NAMES: tuple[str, ...] = (LOOKUP_PROSPECT, LOOKUP_COMPANY, FINALIZE_EMAIL)

_PROSPECT_ID_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"prospect_id": {"type": "string", "description": "e.g. p001 (optional)"}},
    "required": [],
}

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": LOOKUP_PROSPECT,
            "description": "Get the prospect's title, seniority, persona and pain points.",
            "parameters": _PROSPECT_ID_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": LOOKUP_COMPANY,
            "description": "Get facts about the prospect's company: industry, size, HQ, recent news, tech stack.",
            "parameters": _PROSPECT_ID_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": FINALIZE_EMAIL,
            "description": "Submit the final email. Ends the task.",
            "parameters": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string", "description": "Email subject line."},
                    "body": {"type": "string", "description": "Email body text."},
                },
                "required": ["subject", "body"],
            },
        },
    },
]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """Outcome of one tool call.

    `content` is the JSON text sent back to the model as the tool message. `ok` is False
    for invalid calls (they are counted by the rollout). `email` is set only by a valid
    `finalize_email` call, which ends the episode.
    """

    name: str
    content: str
    ok: bool
    email: Email | None = None
    error: str | None = None

    @property
    def is_final(self) -> bool:
        return self.email is not None


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _error(name: str, message: str) -> ToolResult:
    return ToolResult(name=name, content=_dumps({"error": message}), ok=False, error=message)


def _parse_arguments(arguments_json: Any) -> dict[str, Any] | str:
    """Return the arguments as a dict, or an error message. Empty arguments mean `{}`."""
    if arguments_json is None:
        return {}
    if isinstance(arguments_json, dict):
        return arguments_json
    if not isinstance(arguments_json, str):
        return f"arguments must be a JSON object string, got {type(arguments_json).__name__}"
    if not arguments_json.strip():
        return {}
    try:
        parsed = json.loads(arguments_json)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        return f"arguments are not valid JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else exc})"
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        return f"arguments must be a JSON object, got {type(parsed).__name__}"
    return parsed


def _check_prospect_id(name: str, args: dict[str, Any], scenario: Scenario) -> ToolResult | None:
    expected = scenario.prospect.prospect_id
    given = args.get("prospect_id")
    if given is None or given == "":
        return None
    if not isinstance(given, str):
        return _error(name, f"prospect_id must be a string; use {expected!r}")
    if given.strip() != expected:
        return _error(name, f"unknown prospect_id {given!r}; the prospect is {expected!r}")
    return None


def _lookup_prospect(args: dict[str, Any], scenario: Scenario) -> ToolResult:
    if (err := _check_prospect_id(LOOKUP_PROSPECT, args, scenario)) is not None:
        return err
    p = scenario.prospect
    facts = {
        "prospect_id": p.prospect_id,
        "name": p.full_name,
        "title": p.title,
        "seniority": p.seniority,
        "persona": p.persona,
        "pain_points": list(p.pain_points),
    }
    return ToolResult(name=LOOKUP_PROSPECT, content=_dumps(facts), ok=True)


def _lookup_company(args: dict[str, Any], scenario: Scenario) -> ToolResult:
    if (err := _check_prospect_id(LOOKUP_COMPANY, args, scenario)) is not None:
        return err
    c = scenario.prospect.company
    facts = {
        "name": c.name,
        "industry": c.industry,
        "employees": c.employees,
        "headquarters": c.headquarters,
        "recent_news": c.recent_news,
        "tech_stack": list(c.tech_stack),
    }
    return ToolResult(name=LOOKUP_COMPANY, content=_dumps(facts), ok=True)


def _finalize_email(args: dict[str, Any]) -> ToolResult:
    subject = args.get("subject")
    body = args.get("body")
    missing = [k for k, v in (("subject", subject), ("body", body)) if not isinstance(v, str) or not v.strip()]
    if missing:
        return _error(FINALIZE_EMAIL, f"{' and '.join(missing)} must be a non-empty string")
    assert isinstance(subject, str) and isinstance(body, str)
    email = Email(subject=subject.strip(), body=body.strip())
    return ToolResult(name=FINALIZE_EMAIL, content=_dumps({"status": "email submitted"}), ok=True, email=email)


def execute_tool(name: str, arguments_json: str, scenario: Scenario) -> ToolResult:
    """Run one tool call against `scenario`. Never raises; invalid calls return `ok=False`."""
    try:
        tool = name.strip() if isinstance(name, str) else ""
        if tool not in TOOL_NAMES:
            return _error(str(name), f"unknown tool {name!r}; use one of {', '.join(TOOL_NAMES)}")
        args = _parse_arguments(arguments_json)
        if isinstance(args, str):
            return _error(tool, args)
        if tool == LOOKUP_PROSPECT:
            return _lookup_prospect(args, scenario)
        if tool == LOOKUP_COMPANY:
            return _lookup_company(args, scenario)
        return _finalize_email(args)
    except Exception as exc:  # noqa: BLE001 - a tool must never crash the episode; the error goes back to the model
        return _error(str(name), f"tool failed: {type(exc).__name__}")

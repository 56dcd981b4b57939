"""One agent episode: the policy looks up facts with tools and writes an outreach email.

`rollout` runs a multi-turn tool-calling loop against the model's chat endpoint (through a
`codreamer.agent.policy_client.PolicyClient`) and returns
an `art.Trajectory` whose `messages_and_choices` holds the prompt messages, the sampled
`Choice` objects (what ART trains on) and the tool results. The episode ends when the
model calls `finalize_email` with a valid subject and body; if it never does within
`config.max_turns` model calls, the email is auto-finalised from the best text the model
produced and `metadata["auto_finalized"]` is True.

No reward is computed here: scoring is a separate stage that reads the email back with
`email_from_trajectory`. Client errors (timeouts, connection errors, HTTP errors) are
retried here (`codreamer.retry`: transient ones only, with backoff, counted); what still
fails propagates, so that the caller's gather records it as a group exception.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import art
import weave
from loguru import logger
from openai.types.chat.chat_completion import Choice
from pydantic import BaseModel, ConfigDict, Field

from codreamer.agent.policy_client import PolicyClient, open_policy_client
from codreamer.agent.prompts import NUDGE_MESSAGE, initial_messages
from codreamer.agent.tools import FINALIZE_EMAIL, LOOKUP_COMPANY, LOOKUP_PROSPECT, TOOLS, execute_tool
from codreamer.config import InferenceClientKind, Settings, default_of
from codreamer.domain import Email, Product, Scenario
from codreamer.local_trace import traced
from codreamer.retry import RetryPolicy, retrying
from codreamer.usage import timed_llm_call

__all__ = [
    "METADATA_KEYS",
    "PARTIAL_EPISODE_NOTE",
    "RolloutConfig",
    "auto_finalize_email",
    "clean_assistant_text",
    "email_from_trajectory",
    "rollout",
    "trajectory_id",
]


class RolloutConfig(BaseModel):
    """How one agent episode runs (defaults: the settings' defaults)."""

    model_config = ConfigDict(frozen=True)

    max_turns: int = Field(default=default_of("max_turns"), ge=1)
    max_tokens: int = Field(default=default_of("max_tokens"), ge=1)
    temperature: float = Field(default=default_of("temperature"), ge=0.0)
    request_timeout_s: float = Field(default=default_of("request_timeout_s"), gt=0)
    inference_attempts: int = Field(default=default_of("inference_attempts"), ge=1)
    retry_initial_s: float = Field(default=default_of("retry_initial_s"), ge=0)
    retry_max_s: float = Field(default=default_of("retry_max_s"), ge=0)
    #: The settings' "auto" is decided by the backend (`Settings.resolved_inference_client`);
    #: a view built by hand talks through ART's OpenAI client, which every backend serves.
    inference_client: InferenceClientKind = "openai"

    @classmethod
    def from_settings(cls, settings: Settings) -> RolloutConfig:
        return cls(
            max_turns=settings.max_turns,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            request_timeout_s=settings.request_timeout_s,
            inference_attempts=settings.inference_attempts,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
            inference_client=settings.resolved_inference_client(),
        )


#: Keys always present in `Trajectory.metadata` of a rollout.
METADATA_KEYS: tuple[str, ...] = (
    "scenario_id",
    "split",
    "prospect_id",
    "step",
    "seed",
    "trajectory_id",
    "auto_finalized",
    "auto_finalize_source",
    "turns",
    "tool_calls",
    "invalid_tool_calls",
    "prospect_lookups",
    "company_lookups",
    "finish_reason",
    "email_subject",
    "email_body",
)

#: Prefix of the note a failed rollout's exception carries: the episode so far, as JSON.
PARTIAL_EPISODE_NOTE = "codreamer partial episode: "
_NOTE_MESSAGES = 12
_NOTE_TEXT_CHARS = 600
_ALREADY_FINAL = json.dumps({"error": "the email was already submitted; this call was ignored"})
_DEFAULT_SUBJECT_WORDS = 6
_DEFAULT_SUBJECT_CHARS = 60


# --- trajectory id -----------------------------------------------------------------------


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _canonical_tool_calls(tool_calls: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Name + arguments only: call ids are random per server and must not change the id."""
    out: list[dict[str, Any]] = []
    for call in tool_calls or []:
        fn = _get(call, "function") or _get(call, "custom")  # custom tools carry `input`
        if fn is None:
            out.append({"name": None, "arguments": None})
            continue
        arguments = _get(fn, "arguments")
        out.append({"name": _get(fn, "name"), "arguments": arguments if arguments is not None else _get(fn, "input")})
    return out


def _canonical_message(item: Any) -> dict[str, Any]:
    if isinstance(item, Choice):
        role, content, tool_calls = "assistant", item.message.content, item.message.tool_calls
    else:
        role, content, tool_calls = _get(item, "role"), _get(item, "content"), _get(item, "tool_calls")
    if content is not None and not isinstance(content, str):
        content = [dict(part) if isinstance(part, Mapping) else str(part) for part in content]
    return {"role": role, "content": content or "", "tool_calls": _canonical_tool_calls(tool_calls)}


def trajectory_id(messages_and_choices: Iterable[Any]) -> str:
    """Stable id of a message sequence: sha256 of canonical JSON (role/content/tool_calls), 16 hex.

    Tool-call ids and everything else a server randomises are left out, so two episodes
    with identical messages get the same id.
    """
    canonical = [_canonical_message(item) for item in messages_and_choices]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --- auto-finalise -----------------------------------------------------------------------

_MARKUP_BLOCK_RE = re.compile(r"<(tool_call|tool_response|tools|think)>.*?(?:</\1>|\Z)", re.S | re.I)
_ROLE_HEADER_RE = re.compile(r"<\|im_start\|>\s*(?:system|user|assistant|tool)?\s*", re.I)
_SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_\-]{1,40}\|>")
_STRAY_TAG_RE = re.compile(r"</?(?:tool_call|tool_response|tools|think)>", re.I)
_BARE_CALL_RE = re.compile(r'\[?\s*\{\s*"name"\s*:\s*"[\w\-]*"\s*,\s*"(?:arguments|parameters)"\s*:.*', re.S)
_SUBJECT_LINE_RE = re.compile(
    r"^[ \t]*(?:[*_#>]+[ \t]*)?subject(?:[ \t]+line)?[ \t]*[*_]*:[*_]*[ \t]*(.*?)[ \t*_]*$", re.I | re.M
)
_BODY_LABEL_RE = re.compile(r"^\s*(?:[*_#>]+\s*)?body\s*[*_]*:[*_]*\s*", re.I)
_JSON_STR_FIELD = r'"{field}"\s*:\s*"((?:[^"\\]|\\.)*)'


def clean_assistant_text(text: str | None) -> str:
    """Strip leaked tool-call / chat-template markup from an assistant text."""
    if not text:
        return ""
    text = _MARKUP_BLOCK_RE.sub(" ", text)
    text = _ROLE_HEADER_RE.sub("", text)
    text = _SPECIAL_TOKEN_RE.sub("", text)
    text = _STRAY_TAG_RE.sub("", text)
    text = _BARE_CALL_RE.sub("", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _decode_json_fragment(fragment: str) -> str:
    """Decode a (possibly truncated) JSON string body, leniently."""
    for candidate in (fragment, fragment.rstrip("\\")):
        try:
            return json.loads(f'"{candidate}"')
        except (json.JSONDecodeError, ValueError):
            continue
    return fragment.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _lenient_email_fields(raw: str | None) -> tuple[str, str]:
    """Subject/body from JSON-ish text that may be malformed or cut off by max_tokens."""
    if not raw:
        return "", ""
    fields = []
    for field in ("subject", "body"):
        match = re.search(_JSON_STR_FIELD.format(field=field), raw, re.S)
        fields.append(_decode_json_fragment(match.group(1)).strip() if match else "")
    return fields[0], fields[1]


def _subject_from_text(text: str) -> tuple[str, str]:
    """Split a 'Subject: ...' line off `text`. Returns (subject, rest); subject '' if none."""
    match = _SUBJECT_LINE_RE.search(text)
    if not match or not match.group(1).strip():
        return "", text
    subject = match.group(1).strip().strip("\"'")
    rest = (text[: match.start()] + text[match.end() :]).strip()
    rest = _BODY_LABEL_RE.sub("", rest, count=1).strip()
    return subject, rest or text


def _default_subject(body: str) -> str:
    words = body.split()[:_DEFAULT_SUBJECT_WORDS]
    subject = " ".join(words).strip().rstrip(",.;:!?-–—").strip()
    if len(subject) > _DEFAULT_SUBJECT_CHARS:
        subject = subject[:_DEFAULT_SUBJECT_CHARS].rsplit(" ", 1)[0].rstrip(",.;:!?-")
    return subject


@dataclass(frozen=True, slots=True)
class _Candidate:
    subject: str
    body: str
    source: str


def _candidates(choice: Choice) -> Iterable[_Candidate]:
    """Email candidates from one assistant turn, best first."""
    for call in choice.message.tool_calls or []:
        fn = getattr(call, "function", None)
        if fn is not None and (fn.name or "").strip() == FINALIZE_EMAIL:
            subject, body = _lenient_email_fields(fn.arguments)
            yield _Candidate(subject, clean_assistant_text(body), "finalize_args")
    raw = choice.message.content or ""
    if '"body"' in raw:
        subject, body = _lenient_email_fields(raw)
        yield _Candidate(subject, clean_assistant_text(body), "leaked_tool_call")
    yield _Candidate("", clean_assistant_text(raw), "text")


def auto_finalize_email(messages_and_choices: Iterable[Any]) -> tuple[Email, str]:
    """Build an Email from the best text the model produced; returns (email, source).

    Walks the assistant turns from last to first and takes the first non-empty body from,
    in order: a (malformed or truncated) `finalize_email` call's arguments, a finalize
    call leaked as text, the assistant text itself (leaked markup stripped). The subject is
    the candidate's own, else a 'Subject:' line of the text, else the body's first words.
    Source is 'finalize_args', 'leaked_tool_call', 'text' or 'none' (empty email).
    """
    choices = [item for item in messages_and_choices if isinstance(item, Choice)]
    for choice in reversed(choices):
        for cand in _candidates(choice):
            if not cand.body:
                continue
            subject, body = cand.subject, cand.body
            if not subject:
                subject, body = _subject_from_text(body)
            return Email(subject=subject or _default_subject(body), body=body), cand.source
    return Email(subject="", body=""), "none"


# --- the episode -------------------------------------------------------------------------


def email_from_trajectory(traj: art.Trajectory) -> Email:
    """The email an episode produced (finalised or auto-finalised)."""
    try:
        return Email(subject=traj.metadata["email_subject"], body=traj.metadata["email_body"])
    except KeyError as exc:
        raise ValueError(
            f"trajectory has no email metadata ({exc.args[0]!r} missing); was it made by rollout()?"
        ) from exc


def _trace_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """What Weave records of rollout's inputs: never the model's API key or client."""
    out = {key: value for key, value in inputs.items() if key != "client"}
    model = out.get("model")
    if isinstance(model, art.Model):
        out["model"] = {
            "name": model.name,
            "project": model.project,
            "inference_model_name": model.inference_model_name,
        }
    return out


@traced
async def chat_completion(client: PolicyClient, request: dict[str, Any], timeout_s: float) -> Any:
    """One policy call; a local span of its own so the trace shows every LLM call's latency.

    Counted in the current usage ledger (kind "policy": latency, the server's token usage,
    errors) when the loop has one (`codreamer.usage.using_ledger`).
    """
    async with timed_llm_call("policy", request.get("model")) as call:
        completion = await client.complete(request, timeout_s=timeout_s)
        call.set_usage(getattr(completion, "usage", None))
    return completion


def request_messages(items: Iterable[Any]) -> list[dict[str, Any]]:
    """The chat messages of a request from the episode so far (what `art.trajectories.get_messages`
    returns, without validating every assistant turn again through a new pydantic TypeAdapter,
    which cost ~7 ms of event-loop CPU per trajectory and grew with the square of the turns)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Choice):
            message: dict[str, Any] = {"role": "assistant", "content": item.message.content or ""}
            if item.message.tool_calls:
                message["tool_calls"] = [call.model_dump(mode="json") for call in item.message.tool_calls]
        else:
            message = dict(item)
            if message.get("content") is None:
                message["content"] = ""
        messages.append(message)
    return messages


def _clipped(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    if isinstance(out.get("content"), str):
        out["content"] = out["content"][:_NOTE_TEXT_CHARS]
    if out.get("tool_calls"):
        out["tool_calls"] = [
            {
                **call,
                "function": {
                    **call["function"],
                    "arguments": str(call["function"].get("arguments"))[:_NOTE_TEXT_CHARS],
                },
            }
            if isinstance(call.get("function"), dict)
            else call
            for call in out["tool_calls"]
        ]
    return out


def partial_episode_note(items: list[Any]) -> str:
    """What the episode did before it failed (turns after the prompt, clipped), as one line.

    Added to the exception (`add_note`), so it travels in the traceback text that ART keeps
    for a failed rollout, and the failure collector can show the conversation up to the crash.
    """
    messages = [_clipped(m) for m in request_messages(items)][-_NOTE_MESSAGES:]
    return PARTIAL_EPISODE_NOTE + json.dumps(messages, ensure_ascii=False, separators=(",", ":"), default=str)


def partial_episode(traceback_text: str) -> list[dict[str, Any]] | None:
    """The messages of a `partial_episode_note` found in a traceback text, else None."""
    for line in reversed(traceback_text.splitlines()):
        if line.startswith(PARTIAL_EPISODE_NOTE):
            try:
                messages = json.loads(line.removeprefix(PARTIAL_EPISODE_NOTE))
            except ValueError:
                return None
            return messages if isinstance(messages, list) else None
    return None


async def _complete_with_retries(client: PolicyClient, request: dict[str, Any], config: RolloutConfig) -> Any:
    """`chat_completion`, tried again with backoff on transient errors (`codreamer.retry`)."""
    policy = RetryPolicy(attempts=config.inference_attempts, initial_s=config.retry_initial_s, max_s=config.retry_max_s)
    async for attempt in retrying(policy, "inference"):
        with attempt:
            return await chat_completion(client, request, config.request_timeout_s)
    raise AssertionError("unreachable")  # retrying either returns or re-raises


@weave.op(postprocess_inputs=_trace_inputs)
@traced
async def rollout(
    model: art.Model,
    scenario: Scenario,
    product: Product,
    config: RolloutConfig,
    *,
    step: int = 0,
    seed: int | None = None,
    client: PolicyClient | None = None,
) -> art.Trajectory:
    """Run one episode of the outreach agent on `scenario`; see the module docstring.

    `client` is the stage's shared `PolicyClient` (one connection pool for all rollouts);
    without one, the rollout opens its own of kind `config.inference_client`.
    """
    if client is None:
        async with open_policy_client(model, config.inference_client, max_connections=1) as own_client:
            return await _episode(model, scenario, product, config, step, seed, own_client)
    return await _episode(model, scenario, product, config, step, seed, client)


async def _episode(
    model: art.Model,
    scenario: Scenario,
    product: Product,
    config: RolloutConfig,
    step: int,
    seed: int | None,
    client: PolicyClient,
) -> art.Trajectory:
    model_name = model.get_inference_name()
    prospect = scenario.prospect
    items: list[Any] = list(initial_messages(prospect, product))
    prompt_length = len(items)

    email: Email | None = None
    turns = tool_calls = invalid_tool_calls = prospect_lookups = company_lookups = 0
    finish_reason: str | None = None
    log = logger.bind(scenario_id=scenario.scenario_id, step=step)

    for turn in range(1, config.max_turns + 1):
        request: dict[str, Any] = {
            "model": model_name,
            "messages": request_messages(items),
            "tools": TOOLS,
            "max_completion_tokens": config.max_tokens,
            "temperature": config.temperature,
            "logprobs": True,
        }
        if seed is not None:
            request["seed"] = seed
        try:
            completion = await _complete_with_retries(client, request, config)
        except Exception as exc:
            if len(items) > prompt_length:
                exc.add_note(partial_episode_note(items[prompt_length:]))
            raise
        if not completion.choices:
            raise RuntimeError(f"inference server returned no choices for scenario {scenario.scenario_id}")
        choice = completion.choices[0]
        items.append(choice)
        turns = turn
        finish_reason = choice.finish_reason
        calls = list(choice.message.tool_calls or [])
        log.debug(
            "turn {}/{}: finish={} tool_calls={} text_chars={}",
            turn,
            config.max_turns,
            finish_reason,
            [getattr(getattr(c, "function", None), "name", "?") for c in calls],
            len(choice.message.content or ""),
        )

        for call in calls:
            tool_calls += 1
            fn = getattr(call, "function", None)
            if email is not None:
                content = _ALREADY_FINAL
            elif fn is None:
                invalid_tool_calls += 1
                content = json.dumps({"error": "only function tools are available"})
            else:
                result = execute_tool(fn.name, fn.arguments, scenario)
                content = result.content
                if not result.ok:
                    invalid_tool_calls += 1
                    log.debug("invalid tool call {}: {}", fn.name, result.error)
                elif result.name == LOOKUP_PROSPECT:
                    prospect_lookups += 1
                elif result.name == LOOKUP_COMPANY:
                    company_lookups += 1
                if result.email is not None:
                    email = result.email
            items.append({"role": "tool", "tool_call_id": call.id, "content": content})

        if email is not None:
            break
        if not calls and turn < config.max_turns:
            items.append({"role": "user", "content": NUDGE_MESSAGE})

    auto_finalized = email is None
    source: str | None = None
    if email is None:
        email, source = auto_finalize_email(items)
        log.debug("auto-finalised after {} turns from {}", turns, source)

    traj_id = trajectory_id(items)
    metadata: dict[str, Any] = {
        "scenario_id": scenario.scenario_id,
        "split": scenario.split,
        "prospect_id": prospect.prospect_id,
        "step": step,
        "seed": seed,
        "trajectory_id": traj_id,
        "auto_finalized": auto_finalized,
        "auto_finalize_source": source,
        "turns": turns,
        "tool_calls": tool_calls,
        "invalid_tool_calls": invalid_tool_calls,
        "prospect_lookups": prospect_lookups,
        "company_lookups": company_lookups,
        "finish_reason": finish_reason,
        "email_subject": email.subject,
        "email_body": email.body,
    }
    traj = art.Trajectory(
        messages_and_choices=items,
        tools=TOOLS,
        reward=0.0,
        metadata=metadata,
        metrics={
            "turns": turns,
            "tool_calls": tool_calls,
            "invalid_tool_calls": invalid_tool_calls,
            "auto_finalized": auto_finalized,
        },
        logs=[f"auto-finalised from {source}"] if auto_finalized else [],
    )
    log.debug(
        "rollout done: trajectory_id={} turns={} tool_calls={} invalid={} auto_finalized={}",
        traj_id,
        turns,
        tool_calls,
        invalid_tool_calls,
        auto_finalized,
    )
    return traj

"""OpenAI chat messages and tools <-> the plain ChatML text SmolLM2 was trained on.

SmolLM2's chat template knows only `role` and `content`. Like vLLM's Hermes tool parser,
we describe the tools in the system message, ask for `<tool_call>{json}</tool_call>`
blocks, render earlier tool calls the same way and tool results as `<tool_response>`
blocks, and parse the model's text back into OpenAI `tool_calls`. Keeping this in one
module means the server renders prompts and parses completions with the same rules.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_PREAMBLE = (
    "You can call these tools. To call one, answer only with\n"
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    "Tools:\n"
)


@dataclass
class ParsedCompletion:
    """What the model said: free text and any tool calls found in it."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for tool in tools:
        fn = tool.get("function", tool)
        params = fn.get("parameters", {}).get("properties", {})
        args = ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in params.items())
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '')}".rstrip())
    return TOOLS_PREAMBLE + "\n".join(lines)


def _render_tool_calls(tool_calls: Sequence[Any]) -> str:
    blocks = []
    for call in tool_calls:
        fn = call["function"] if isinstance(call, Mapping) else call.function
        name = fn["name"] if isinstance(fn, Mapping) else fn.name
        raw_args = fn["arguments"] if isinstance(fn, Mapping) else fn.arguments
        try:
            args = json.loads(raw_args or "{}")
        except json.JSONDecodeError:
            args = raw_args
        blocks.append(f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>")
    return "\n".join(blocks)


def _text_of(content: Any) -> str:
    """OpenAI content may be a string or a list of typed parts; we keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def to_chatml_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """Flatten OpenAI messages (tool calls, tool results) into role/content pairs."""
    flat: list[dict[str, str]] = []
    for message in messages:
        role = message["role"]
        text = _text_of(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            text = "\n".join(part for part in (text, _render_tool_calls(message["tool_calls"])) if part)
        elif role == "tool":
            role, text = "user", f"<tool_response>{text}</tool_response>"
        elif role == "developer":
            role = "system"
        flat.append({"role": role, "content": text})
    if tools:
        description = _describe_tools(tools)
        if flat and flat[0]["role"] == "system":
            flat[0] = {"role": "system", "content": f"{flat[0]['content']}\n\n{description}"}
        else:
            flat.insert(0, {"role": "system", "content": description})
    return flat


def parse_completion(text: str, tools_offered: bool) -> ParsedCompletion:
    """Split generated text into content and OpenAI-shaped tool calls.

    A block whose JSON does not parse is still returned as a call (with the raw text as
    arguments) when its name can be read, so the agent loop sees and counts the bad call
    instead of it silently vanishing into content.
    """
    if not tools_offered or "<tool_call>" not in text:
        return ParsedCompletion(content=text)
    calls = []
    for raw in TOOL_CALL_RE.findall(text):
        call = _parse_call(raw)
        if call is not None:
            calls.append(call)
    content = TOOL_CALL_RE.sub("", text).strip() or None
    return ParsedCompletion(content=content, tool_calls=calls)


def _parse_call(raw: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(raw)
        name, arguments = payload["name"], payload.get("arguments", {})
        if not isinstance(name, str):
            return None
        arguments_json = arguments if isinstance(arguments, str) else json.dumps(arguments)
    except (json.JSONDecodeError, KeyError, TypeError):
        match = re.search(r'"name"\s*:\s*"([^"]+)"', raw)
        if match is None:
            return None
        name, arguments_json = match.group(1), raw
    return {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments_json},
    }

"""TEST UTILITY: a scripted, in-process OpenAI-compatible chat server for tests.

Not a model and not for production. `LoopbackOpenAI` is an aiohttp.web server bound to
127.0.0.1 on a free port that answers `POST /v1/chat/completions` from a script, one entry
per request, and records every request body it received::

    script = [
        [Call("lookup_company", {})],          # a list of tool calls
        "Hello there",                          # an assistant text
        HTTPError(500),                         # an HTTP status error
        Delay(2.0, then="late answer"),         # wait, then answer `then`
    ]
    async with LoopbackOpenAI(script) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="x")
        ...
        server.requests  # list of JSON bodies received, in order

Responses are standard `chat.completion` JSON (id, object, created, model, choices with
message/finish_reason/logprobs, usage). When the script runs out the server answers 500
with `x-should-retry: false`, so a test that asks too often fails fast and clearly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Call", "Delay", "HTTPError", "LoopbackOpenAI", "Reply", "ScriptEntry"]


@dataclass(frozen=True)
class Call:
    """One tool call. `arguments` may be a dict (JSON-encoded) or a raw (even malformed) string."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """An assistant message: text and/or tool calls, with an optional finish_reason override."""

    content: str | None = None
    tool_calls: list[Call] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class HTTPError:
    """Answer with an HTTP error. `retryable=False` sends `x-should-retry: false` (no SDK retries)."""

    status: int = 500
    message: str = "scripted error"
    retryable: bool = True


@dataclass(frozen=True)
class Delay:
    """Sleep `seconds`, then answer `then` (default: an empty assistant text)."""

    seconds: float
    then: ScriptEntry | None = None


ScriptEntry = str | list[Call] | Reply | HTTPError | Delay


def _logprobs_for(text: str) -> dict[str, Any]:
    tokens = [tok for tok in text.replace("\n", " \n ").split(" ") if tok] or [""]
    return {
        "content": [
            {"token": tok, "logprob": -0.5, "bytes": list(tok.encode("utf-8")), "top_logprobs": []} for tok in tokens
        ],
        "refusal": None,
    }


def _as_reply(entry: str | list[Call] | Reply | None) -> Reply:
    if entry is None:
        return Reply(content="")
    if isinstance(entry, Reply):
        return entry
    if isinstance(entry, str):
        return Reply(content=entry)
    if isinstance(entry, list):
        return Reply(content=None, tool_calls=entry)
    raise TypeError(f"not a reply script entry: {entry!r}")


class LoopbackOpenAI:
    """Scripted OpenAI-compatible chat server for tests (see the module docstring)."""

    def __init__(self, script: list[ScriptEntry] | None = None, *, model: str = "loopback") -> None:
        self.script: list[ScriptEntry] = list(script or [])
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.served = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LoopbackOpenAI is not running")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def add(self, *entries: ScriptEntry) -> None:
        """Append entries to the script (also while running)."""
        self.script.extend(entries)

    async def start(self) -> LoopbackOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        self._port = sock.getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._port = None

    async def __aenter__(self) -> LoopbackOpenAI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handlers ----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "test"}]}
        )

    async def _next_entry(self) -> ScriptEntry | None:
        async with self._lock:
            if self.served >= len(self.script):
                self.served += 1
                return None
            entry = self.script[self.served]
            self.served += 1
            return entry

    async def _chat_completions(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "request body is not JSON", retryable=False)
        self.requests.append(body)
        entry = await self._next_entry()
        if entry is None:
            return self._error(500, f"loopback script exhausted after {len(self.script)} entries", retryable=False)
        while isinstance(entry, Delay):
            await asyncio.sleep(entry.seconds)
            entry = entry.then
        if isinstance(entry, HTTPError):
            return self._error(entry.status, entry.message, retryable=entry.retryable)
        return web.json_response(self._completion(body, _as_reply(entry)))

    @staticmethod
    def _error(status: int, message: str, *, retryable: bool) -> web.Response:
        headers = {"retry-after-ms": "1"} if retryable else {"x-should-retry": "false"}
        payload = {"error": {"message": message, "type": "loopback_error", "param": None, "code": status}}
        return web.json_response(payload, status=status, headers=headers)

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        tool_calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments),
                },
            }
            for call in reply.tool_calls
        ]
        generated = (reply.content or "") + "".join(tc["function"]["arguments"] for tc in tool_calls)
        logprobs = _logprobs_for(generated)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
        completion_tokens = len(logprobs["content"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": reply.finish_reason or ("tool_calls" if tool_calls else "stop"),
                    "logprobs": logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

"""A loopback OpenAI-compatible endpoint serving the embedded policy.

It speaks `/v1/chat/completions` (messages, tools, temperature, max tokens, n, seed,
logprobs) and `/v1/models`, so the rollout code is the same for the embedded backend, ART's
LocalBackend (vLLM) and any hosted model. Like vLLM with `return_token_ids`, each choice
also carries `prompt_token_ids` and `token_ids`: the exact tokens the GRPO step trains on.

A request whose client is gone (it disconnected, or timed out and closed its connection to
retry) is not generated for: aiohttp cancels its handler (`handler_cancellation`), which
cancels its entry in the batcher's queue, and the batcher drops cancelled entries before it
samples. (A batch already in the sampler finishes; its results for a departed client are
dropped.)
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from loguru import logger
from transformers import PreTrainedTokenizerBase

from codreamer.backends.embedded.batcher import SamplingBatcher
from codreamer.backends.embedded.chat_format import parse_completion, to_chatml_messages
from codreamer.backends.embedded.policy import Sample


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 and this message."""


@dataclass(frozen=True)
class SamplingRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int
    temperature: float
    n: int
    seed: int | None
    tokens_as_ids: bool


def _first_set(*values: Any) -> Any:
    """The first value that is not None: an explicit 0 must be validated, not defaulted."""
    return next(v for v in values if v is not None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(body: Any, default_max_tokens: int) -> SamplingRequest:
    """Validate the JSON body, naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise BadRequest("field 'messages' must be a non-empty list of objects with a 'role'")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("field 'tools' must be a list")
    max_tokens = _first_set(body.get("max_completion_tokens"), body.get("max_tokens"), default_max_tokens)
    temperature = _first_set(body.get("temperature"), 1.0)
    n = _first_set(body.get("n"), 1)
    seed = body.get("seed")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("field 'max_tokens' must be a positive integer")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise BadRequest("field 'temperature' must be a number >= 0")
    if not _is_int(n) or not 1 <= n <= 64:
        raise BadRequest("field 'n' must be an integer from 1 to 64")
    if seed is not None and not _is_int(seed):
        raise BadRequest("field 'seed' must be an integer")
    return SamplingRequest(
        messages=messages,
        tools=tools or None,
        max_tokens=max_tokens,
        temperature=float(temperature),
        n=n,
        seed=seed,
        tokens_as_ids=bool(body.get("return_tokens_as_token_ids", False)),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PolicyServer:
    """aiohttp app on 127.0.0.1 that turns chat requests into batched policy samples."""

    def __init__(
        self,
        batcher: SamplingBatcher,
        tokenizer: PreTrainedTokenizerBase,
        api_key: str,
        model_name: str,
        max_context_tokens: int = 8192,
        default_max_tokens: int = 256,
    ) -> None:
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.model_name = model_name
        self.max_context_tokens = max_context_tokens
        self.default_max_tokens = default_max_tokens
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self.requests_served = 0
        self.requests_abandoned = 0  # handlers cancelled because their client went away

    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that disconnects (or times out) cancels its handler, and
        # with it the request's pending entry in the batcher, so nothing is generated for it
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.batcher.start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        logger.info("embedded policy served at {}", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied, self.api_key):
            return _error(401, "invalid API key")
        return await handler(request)

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            parsed = parse_request(await request.json(), self.default_max_tokens)
            prompt_ids = self._render(parsed)
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        except (KeyError, TypeError, AttributeError) as exc:  # a message or tool of the wrong shape
            return _error(400, f"malformed messages or tools: {type(exc).__name__}: {exc}")
        try:
            samples = await self.batcher.sample(prompt_ids, parsed.n, parsed.max_tokens, parsed.temperature, parsed.seed)
        except asyncio.CancelledError:  # the client disconnected or timed out: its batch entry is cancelled too
            self.requests_abandoned += 1
            logger.debug("chat request abandoned by its client; not generating for it")
            raise
        self.requests_served += 1
        return web.json_response(self._response(parsed, prompt_ids, samples))

    def _render(self, parsed: SamplingRequest) -> list[int]:
        flat = to_chatml_messages(parsed.messages, parsed.tools)
        ids = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) + parsed.max_tokens > self.max_context_tokens:
            raise BadRequest(
                f"prompt of {len(ids)} tokens + max_tokens {parsed.max_tokens} exceeds the context of "
                f"{self.max_context_tokens} tokens"
            )
        return ids

    def _response(self, parsed: SamplingRequest, prompt_ids: list[int], samples: list[Sample]) -> dict[str, Any]:
        choices = [self._choice(i, parsed, prompt_ids, s) for i, s in enumerate(samples)]
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "prompt_token_ids": prompt_ids,
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }

    def _choice(self, index: int, parsed: SamplingRequest, prompt_ids: list[int], sample: Sample) -> dict[str, Any]:
        text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        completion = parse_completion(text, tools_offered=parsed.tools is not None)
        message: dict[str, Any] = {"role": "assistant", "content": completion.content}
        if completion.tool_calls:
            message["tool_calls"] = completion.tool_calls
        finish = "tool_calls" if completion.tool_calls else sample.finish_reason
        return {
            "index": index,
            "message": message,
            "finish_reason": finish,
            "logprobs": {"content": self._logprobs(sample, parsed.tokens_as_ids)},
            "prompt_token_ids": prompt_ids,
            "token_ids": sample.token_ids,
        }

    def _logprobs(self, sample: Sample, tokens_as_ids: bool) -> list[dict[str, Any]]:
        pieces = (
            [f"token_id:{t}" for t in sample.token_ids]
            if tokens_as_ids
            else self.tokenizer.convert_ids_to_tokens(sample.token_ids)
        )
        return [
            {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
            for piece, lp in zip(pieces, sample.logprobs, strict=True)
        ]


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status == 400 else "authentication_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

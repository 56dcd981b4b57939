"""A loopback OpenAI-compatible endpoint serving the embedded policy.

It speaks `/v1/chat/completions` (messages, tools, temperature, max tokens, n, seed,
logprobs, top_logprobs, stop) and `/v1/models`, so the rollout code is the same for the
embedded backend, ART's LocalBackend (vLLM) and any hosted model. Like vLLM with
`return_token_ids`, each choice also carries `prompt_token_ids` and `token_ids` (the
end-of-turn token included): the exact tokens the trainer trains on; and, like ART's vLLM
runtime, `policy_token_spans`/`prompt_policy_token_spans` saying which policy step produced
them (what ART's exact-provenance checks and `PipelineTrainer`'s evaluation read).

`model` is the served name (the latest step) or `name@step` (an older step still on disk);
anything else is a 404. `stream=true` is refused with a 400 (no streaming). To score a given
completion, send it as the last (assistant) message with `"add_generation_prompt": false` and
`"prompt_logprobs": k` (vLLM's extra field): the response's top-level `prompt_logprobs` holds,
per prompt token, `{token_id: {"logprob", "rank", "decoded_token"}}` (None for the first).

A request whose client is gone (it disconnected, or timed out and closed its connection to
retry) is not generated for: aiohttp cancels its handler (`handler_cancellation`), which
cancels its entry in the batcher's queue, and the batcher drops cancelled entries before it
samples. (A batch already in the sampler finishes; its results for a departed client are
dropped.)
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from aiohttp import web
from loguru import logger
from transformers import PreTrainedTokenizerBase

from codreamer.backends.embedded.batcher import SampleOptions, SamplingBatcher
from codreamer.backends.embedded.chat_format import parse_completion, to_chatml_messages
from codreamer.backends.embedded.policy import Sample, StopCheck


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 and this message."""


class NotFound(LookupError):
    """A request for a model this server does not serve (HTTP 404)."""


@dataclass(frozen=True)
class SamplingRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int
    temperature: float
    n: int
    seed: int | None
    tokens_as_ids: bool
    model: str | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    add_generation_prompt: bool = True


MAX_TOP_LOGPROBS = 20


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise BadRequest("field 'stop' must be a non-empty string or a list of non-empty strings")
    return tuple(values)


def _optional_count(body: dict[str, Any], name: str, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= high:
        raise BadRequest(f"field '{name}' must be an integer from 0 to {high}")
    return int(value)


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
    if body.get("stream"):
        raise BadRequest("field 'stream': streaming is not supported by the embedded server; send stream=false")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("field 'model' must be a string")
    add_generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise BadRequest("field 'add_generation_prompt' must be a boolean")
    return SamplingRequest(
        messages=messages,
        tools=tools or None,
        max_tokens=max_tokens,
        temperature=float(temperature),
        n=n,
        seed=seed,
        tokens_as_ids=bool(body.get("return_tokens_as_token_ids", False)),
        model=model,
        stop=_stop_strings(body.get("stop")),
        top_logprobs=_optional_count(body, "top_logprobs", MAX_TOP_LOGPROBS) or 0,
        prompt_logprobs=_optional_count(body, "prompt_logprobs", MAX_TOP_LOGPROBS),
        add_generation_prompt=add_generation_prompt,
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
        resolve: Callable[[str], int | None] | None = None,
    ) -> None:
        self.batcher = batcher
        self.resolve = resolve  # model name -> policy step (None: latest); raises LookupError
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
            version = self._version(parsed.model)
            prompt_ids = self._render(parsed)
        except NotFound as exc:
            return _error(404, str(exc))
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        except (KeyError, TypeError, AttributeError) as exc:  # a message or tool of the wrong shape
            return _error(400, f"malformed messages or tools: {type(exc).__name__}: {exc}")
        options = SampleOptions(parsed.top_logprobs, parsed.stop, version, self._stop_check(parsed.stop))
        try:
            samples = await self.batcher.sample(
                prompt_ids, parsed.n, parsed.max_tokens, parsed.temperature, parsed.seed, options
            )
            scored = await self._prompt_logprobs(parsed, prompt_ids, version)
        except asyncio.CancelledError:  # the client disconnected or timed out: its batch entry is cancelled too
            self.requests_abandoned += 1
            logger.debug("chat request abandoned by its client; not generating for it")
            raise
        except LookupError as exc:  # the step was deleted between the check and the sampling
            return _error(404, str(exc))
        self.requests_served += 1
        response = self._response(parsed, prompt_ids, samples)
        if scored is not None:
            response["prompt_logprobs"] = scored
        return web.json_response(response)

    def _version(self, model: str | None) -> int | None:
        """The policy step `model` names; NotFound for a model not served here."""
        if model is None:
            return None
        if self.resolve is None:
            if model != self.model_name:
                raise NotFound(f"model {model!r} is not served here; serving {self.model_name!r}")
            return None
        try:
            return self.resolve(model)
        except LookupError as exc:
            raise NotFound(str(exc)) from exc

    def _stop_check(self, stop: tuple[str, ...]) -> StopCheck | None:
        """A row stops once its decoded text holds a stop string (checked on the text's tail)."""
        if not stop:
            return None
        longest = max(len(s) for s in stop)

        def produced_stop(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-(longest + 8) :], skip_special_tokens=True)
            return any(s in tail for s in stop)

        return produced_stop

    async def _prompt_logprobs(
        self, parsed: SamplingRequest, prompt_ids: list[int], version: int | None
    ) -> list[Any] | None:
        if parsed.prompt_logprobs is None:
            return None
        policy = self.batcher.policy
        values = await anyio.to_thread.run_sync(
            functools.partial(
                policy.prompt_logprobs,
                prompt_ids,
                parsed.prompt_logprobs,
                version=version,
                adapter_loader=self.batcher.adapter_loader,
            )
        )
        return [
            None if v is None else self._prompt_entry(token, *v) for token, v in zip(prompt_ids, values, strict=True)
        ]

    def _prompt_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        """vLLM's prompt-logprob entry: the prompt token and the top ones, by id, with rank and text."""
        entry = {str(token): {"logprob": logprob, "rank": None, "decoded_token": self.tokenizer.decode([token])}}
        for rank, (other, value) in enumerate(top, start=1):
            entry.setdefault(
                str(other), {"logprob": value, "rank": rank, "decoded_token": self.tokenizer.decode([other])}
            )
            if other == token:
                entry[str(token)]["rank"] = rank
        return entry

    def _render(self, parsed: SamplingRequest) -> list[int]:
        flat = to_chatml_messages(parsed.messages, parsed.tools)
        rendered: Any = self.tokenizer.apply_chat_template(
            flat, add_generation_prompt=parsed.add_generation_prompt, tokenize=True
        )
        ids = [int(t) for t in (rendered["input_ids"] if hasattr(rendered, "keys") else rendered)]
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
            "model": parsed.model or self.model_name,
            "choices": choices,
            "prompt_token_ids": prompt_ids,
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }

    def _choice(self, index: int, parsed: SamplingRequest, prompt_ids: list[int], sample: Sample) -> dict[str, Any]:
        text = _cut_at_stop(str(self.tokenizer.decode(sample.token_ids, skip_special_tokens=True)), parsed.stop)
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
            **self._policy_spans(parsed, len(prompt_ids), len(sample.token_ids), sample.version),
        }

    def _policy_spans(
        self, parsed: SamplingRequest, prompt_tokens: int, completion_tokens: int, version: int
    ) -> dict[str, Any]:
        """ART's provenance: one span per choice, every token from the weights of step `version`
        (a batch never changes weights mid-way: training waits for the sampler's lock)."""
        slot = f"{self.model_name}@{version}"

        def span(start: int, end: int) -> dict[str, Any]:
            return {
                "start_token": start,
                "end_token": end,
                "generation_id": slot,
                "policy_version": version,
                "lora_slot": slot,
                "update_seq": version,
            }

        return {
            "prompt_policy_token_spans": [span(1, prompt_tokens)] if prompt_tokens > 1 else [],
            "policy_token_spans": [span(0, completion_tokens)] if completion_tokens else [],
        }

    def _piece(self, token: int, tokens_as_ids: bool) -> str:
        return f"token_id:{token}" if tokens_as_ids else str(self.tokenizer.convert_ids_to_tokens([token])[0])

    def _logprobs(self, sample: Sample, tokens_as_ids: bool) -> list[dict[str, Any]]:
        tops = sample.top_logprobs or [[] for _ in sample.token_ids]
        entries = []
        for token, lp, top in zip(sample.token_ids, sample.logprobs, tops, strict=True):
            piece = self._piece(token, tokens_as_ids)
            alternatives = [
                {"token": (alt := self._piece(other, tokens_as_ids)), "logprob": value, "bytes": list(alt.encode())}
                for other, value in top
            ]
            entries.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alternatives})
        return entries


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string (vLLM leaves the stop string out of the output)."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "authentication_error")
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

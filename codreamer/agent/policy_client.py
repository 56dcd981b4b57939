"""How rollouts talk to the policy's OpenAI-compatible chat endpoint, one client per stage.

Two clients, one interface (`PolicyClient.complete`):

* `OpenAIPolicyClient` goes through ART's `model.openai_client()` (the OpenAI SDK wrapped by
  ART, which attaches token/policy metadata to each choice on ART-managed backends), with
  the SDK's retries off (ours are classified and counted) and its HTTP transport on aiohttp
  (`openai.DefaultAioHttpClient`): httpx's connection pool walks every connection for every
  request, which at 64 rollouts in flight cost more CPU than the rollouts themselves.
* `DirectPolicyClient` posts the JSON body with aiohttp and validates the answer as a
  `ChatCompletion`, skipping the SDK's per-request walk of the messages against its typed
  parameters. It is for servers that need nothing from ART's wrapper: the embedded backend
  (the default) and plain OpenAI-compatible servers. Errors come out as the SDK's exception
  types (`openai.APITimeoutError`, `openai.RateLimitError`, ...), so retries and failure
  categories treat both clients the same.

Both clients' `complete` is the Weave op `chat_completion` (`codreamer.tracking.ops.llm_op`):
every policy call is a node under its rollout in Weave, whichever client made it (the
direct client is not something Weave patches by itself), its inputs compacted and the
client's key never recorded.

Measured with `scripts/bench_rollouts.py` (see the README's performance section).
A client holds a connection pool bound to the running event loop: open it with
`open_policy_client` around a stage (or one rollout) so it is closed when the stage ends.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from typing import Any, Protocol

import aiohttp
import httpx
import openai
import pydantic
from openai.types.chat import ChatCompletion

from codreamer.config import InferenceClientKind
from codreamer.tracking.ops import llm_op

__all__ = [
    "DirectPolicyClient",
    "InferenceClientKind",
    "InvalidPolicyResponseError",
    "OpenAIPolicyClient",
    "PolicyClient",
    "open_policy_client",
]

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
_ERROR_BODY_CHARS = 500
_MIN_SECRET_CHARS = 8


class InvalidPolicyResponseError(ValueError):
    """The server answered 2xx with something that is not a chat completion (permanent)."""


class PolicyClient(Protocol):
    """One chat-completion call to the policy; raises the OpenAI SDK's exception types."""

    async def complete(self, request: dict[str, Any], *, timeout_s: float) -> ChatCompletion: ...

    async def aclose(self) -> None: ...


@cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle costs ~22 ms, once per client otherwise."""
    return httpx.create_ssl_context()


class OpenAIPolicyClient:
    """ART's OpenAI client (`model.openai_client()`), SDK retries off, aiohttp transport."""

    def __init__(self, model: Any, *, max_connections: int) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = openai.DefaultAioHttpClient(limits=limits, verify=_tls_context())
        self._client = model.openai_client().with_options(max_retries=0, http_client=self._http)

    @llm_op("chat_completion")
    async def complete(self, request: dict[str, Any], *, timeout_s: float) -> ChatCompletion:
        return await self._client.chat.completions.create(**request, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()


class DirectPolicyClient:
    """POST /chat/completions with aiohttp; the answer validated as a `ChatCompletion`."""

    def __init__(self, base_url: str, api_key: str, *, max_connections: int) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key  # sent in the header only; blanked out of error messages
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections), headers=headers)

    @llm_op("chat_completion")
    async def complete(self, request: dict[str, Any], *, timeout_s: float) -> ChatCompletion:
        body = json.dumps(request).encode()
        try:
            async with self._session.post(
                self.url, data=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                content = await response.read()
                status, headers = response.status, dict(response.headers)
        except TimeoutError as exc:
            raise openai.APITimeoutError(request=self._request()) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(message=f"Connection error: {exc}", request=self._request()) from exc
        if status >= 400:
            raise self._status_error(status, headers, content)
        try:
            return ChatCompletion.model_validate_json(content)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise InvalidPolicyResponseError(
                f"{self.url} answered HTTP {status} with something that is not a chat completion: "
                f"{where}: {first['msg']} ({exc.error_count()} problem(s))"
            ) from None

    def _request(self) -> httpx.Request:
        return httpx.Request("POST", self.url)

    def _status_error(self, status: int, headers: dict[str, str], content: bytes) -> openai.APIStatusError:
        """The SDK's exception for this status, with the server's own error message when it sent one."""
        try:
            body: Any = json.loads(content)
        except ValueError:
            body = content.decode(errors="replace")[:_ERROR_BODY_CHARS]
        error = body.get("error") if isinstance(body, dict) else None
        detail = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else body
        message = f"Error code: {status} - {str(detail)[:_ERROR_BODY_CHARS]}"
        if len(self._api_key) >= _MIN_SECRET_CHARS:  # a placeholder key ("x") is no secret to blank out
            message = message.replace(self._api_key, "***")  # a server that echoes the key must not leak it
        response = httpx.Response(status, headers=headers, content=content, request=self._request())
        error_type = _STATUS_ERRORS.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
        return error_type(message, response=response, body=body)

    async def aclose(self) -> None:
        await self._session.close()


@asynccontextmanager
async def open_policy_client(
    model: Any, kind: InferenceClientKind, *, max_connections: int = 64
) -> AsyncIterator[PolicyClient]:
    """A client for `model`'s inference endpoint, closed when the block ends.

    `max_connections` should match the stage's rollout concurrency: more are never used.
    """
    client: PolicyClient
    if kind == "direct":
        if not model.inference_base_url or model.inference_api_key is None:
            raise ValueError(
                f"model {model.name!r} has no inference_base_url / inference_api_key yet: "
                "register it with its backend (or set them) before rollouts"
            )
        client = DirectPolicyClient(model.inference_base_url, model.inference_api_key, max_connections=max_connections)
    else:
        client = OpenAIPolicyClient(model, max_connections=max_connections)
    try:
        yield client
    finally:
        await client.aclose()

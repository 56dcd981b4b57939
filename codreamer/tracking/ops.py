"""LLM calls as Weave ops, without importing Weave where nothing runs it.

`llm_op(name)` makes an async function (or method) a Weave op named `name` when Weave is
loaded, and leaves it a plain call otherwise: a process that never imported weave (the
light commands: `codreamer analyze` reading files) cannot have Weave running, so it pays
nothing for the decorator. With weave loaded and no client (offline, disabled), Weave's op
is itself a plain call. The op's inputs go through `llm_call_inputs` (the client object is
named, never serialised; the request compacted, secrets masked) and its output through
`compact_payload` (no logprobs or token ids); Weave's client-level postprocessing
(`compact_inputs` / `compact_payload`, set by `init_tracking`) applies on top.

Used for every LLM call the project makes itself: the policy (`agent.policy_client`, both
clients, op `chat_completion`, the name its local span has too) and the failure analyzer's
judge (`analysis.judge`, op `analyzer_completion`). The RULER judge is the op `judge_group`
(`rewards.ruler`), whose litellm call Weave patches in by itself.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from codreamer.tracking.payloads import compact_inputs, compact_payload

__all__ = ["llm_call_inputs", "llm_op"]

_REQUEST_KEYS = ("request", "messages")


def llm_call_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """What a trace keeps of an LLM call's inputs: the client's kind and endpoint (never its
    key or connection pool), the request compacted (`compact_inputs`)."""
    out = {k: v for k, v in inputs.items() if k not in ("self", "client")}
    client = inputs.get("self", inputs.get("client"))
    if client is not None:
        out["client"] = type(client).__name__
        url = getattr(client, "url", None)
        if isinstance(url, str):
            out["url"] = url
    return compact_inputs(out)


def llm_op[**P, R](name: str) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate an async function (or method) as the Weave op `name` (module docstring)."""

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        op: Callable[P, Coroutine[Any, Any, R]] | None = None

        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal op
            if "weave" not in sys.modules:  # never imported: Weave cannot be running
                return await fn(*args, **kwargs)
            if op is None:
                import weave

                op = weave.op(fn, name=name, postprocess_inputs=llm_call_inputs, postprocess_output=compact_payload)
            return await op(*args, **kwargs)

        return call

    return decorate

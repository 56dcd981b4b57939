"""Retries with exponential backoff and jitter, for transient errors only, each one counted.

Everything the loop talks to can fail for a moment (the inference server restarts, a judge
returns 503, a connection drops, a busy host runs out of memory) or for good (a bad request,
a wrong key, a bug). Retrying the second kind only hides it for longer, so `is_transient`
classifies first; a permanent error is raised at once with a message naming what failed.

Every retry is logged (what, attempt, wait, error) and counted in the run's `RetryCounter`
(a context variable the loop sets per run), so the history shows `retries/<what>` per run.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx
import openai
from loguru import logger
from pydantic import BaseModel, Field, SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from codreamer.config import Settings, default_of
from codreamer.redaction import redact

__all__ = [
    "RetryCounter",
    "RetryPolicy",
    "TransientError",
    "counting_retries",
    "is_transient",
    "retrying",
    "transient_status",
]

_TRANSIENT_STATUS = {408, 409, 425, 429}
"""Besides every 5xx: request timeout, conflict, too early, too many requests."""
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED}


class TransientError(RuntimeError):
    """Raised by our own code for a failure that is worth another try."""


class RetryPolicy(BaseModel):
    """How many tries in all, and the backoff between them (exponential, jittered, capped)."""

    attempts: int = Field(default=default_of("inference_attempts"), ge=1)
    initial_s: float = Field(default=default_of("retry_initial_s"), ge=0)
    max_s: float = Field(default=default_of("retry_max_s"), ge=0)

    @classmethod
    def from_settings(cls, settings: Settings, attempts: int | None = None) -> RetryPolicy:
        """The settings' backoff; `attempts` defaults to the model-call attempts."""
        return cls(
            attempts=attempts or settings.inference_attempts,
            initial_s=settings.retry_initial_s,
            max_s=settings.retry_max_s,
        )


def transient_status(status: int) -> bool:
    """True for HTTP statuses worth another try: 408, 409, 425, 429 and every 5xx."""
    return status in _TRANSIENT_STATUS or 500 <= status <= 599


def is_transient(exc: BaseException) -> bool:
    """True for errors another try may fix: timeouts, dropped connections, 429 / 5xx, OOM.

    The one classifier for every retry: model calls, training steps and both judges (litellm's
    errors are subclasses of the OpenAI SDK's, so RULER's are classified here too).
    """
    if isinstance(exc, TransientError | TimeoutError | ConnectionError | MemoryError):
        return True
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        if exc.response.headers.get("x-should-retry", "").lower() == "false":
            return False  # the server says another try will not help
        return transient_status(exc.status_code)
    if isinstance(exc, httpx.TimeoutException | httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return transient_status(exc.response.status_code)
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNO
    status = getattr(exc, "status_code", None)  # an SDK error outside the hierarchies above
    return isinstance(status, int) and not isinstance(status, bool) and transient_status(status)


class RetryCounter:
    """Retries per operation name within one run."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, what: str) -> None:
        self.counts[what] += 1

    @classmethod
    def from_metrics(cls, record: Mapping[str, Any]) -> RetryCounter:
        """Continue the counts of a history record's `retries/*` keys (a resumed run)."""
        counter = cls()
        for key, value in record.items():
            if key.startswith("retries/") and isinstance(value, int | float) and not isinstance(value, bool):
                counter.counts[key.removeprefix("retries/")] = int(value)
        return counter

    def as_metrics(self) -> dict[str, float]:
        return {f"retries/{what}": float(n) for what, n in sorted(self.counts.items())}


_counter: ContextVar[RetryCounter | None] = ContextVar("codreamer_retry_counter", default=None)


@contextmanager
def counting_retries(counter: RetryCounter) -> Iterator[RetryCounter]:
    """Count the retries of everything run inside (tasks started inside inherit it)."""
    token = _counter.set(counter)
    try:
        yield counter
    finally:
        _counter.reset(token)


def _describe(exc: BaseException | None, secrets: Sequence[SecretStr | str | None]) -> str:
    if exc is None:
        return "?"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__, *secrets)


def retrying(policy: RetryPolicy, what: str, *, secrets: Sequence[SecretStr | str | None] = ()) -> AsyncRetrying:
    """An `AsyncRetrying` for `what` under `policy`: `async for attempt in retrying(...): with attempt: ...`.

    Only `is_transient` errors are retried; the last error is re-raised. `secrets` (an API key
    an error message may echo) are blanked out of the retry warnings.
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        counter = _counter.get()
        if counter is not None:
            counter.add(what)
        logger.warning(
            "{} failed ({}), attempt {}/{}; retrying in {:.1f}s",
            what,
            _describe(exc, secrets),
            state.attempt_number,
            policy.attempts,
            wait,
        )

    return AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.initial_s, max=policy.max_s, jitter=policy.initial_s),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )

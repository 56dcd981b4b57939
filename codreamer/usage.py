"""LLM usage accounting: every policy, judge and analyzer call, with latency, tokens and cost.

A `UsageLedger` accumulates per kind of call ("policy", "judge", "analyzer"): calls, errors,
latency, prompt/completion tokens and, when a price is configured for that kind, the cost in
USD. The ledger of the running loop is held in a context variable (`using_ledger`), so the
call sites (the rollout's chat call, the RULER judge, the failure analyzer's judge) record
into it with `record_llm_call` / `timed_llm_call` without the ledger being passed through
every signature; with no ledger set, recording is a no-op. Tasks started inside
`using_ledger` (rollouts under `asyncio.gather`, judge groups in a task group) copy the
context and therefore record into the same ledger.

`totals()` gives flat, cumulative `llm/...` figures for the iteration history;
`UsageLedger.from_totals` restores them from the last history record when a run resumes, so
the figures stay cumulative over the whole run.

Token counts come from the server's `usage` (the OpenAI `completion.usage`; the embedded
server and the test loopback fill it in). A call whose server reports no usage is counted in
`calls_without_usage`, and contributes latency but no tokens or cost: nothing is estimated.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from codreamer.config import Settings

__all__ = [
    "KINDS",
    "KindPrices",
    "LLMCall",
    "LLMKind",
    "LLMPrices",
    "UsageLedger",
    "art_judge_usage",
    "current_ledger",
    "record_llm_call",
    "timed_llm_call",
    "usage_tokens",
    "using_ledger",
]

LLMKind = Literal["policy", "judge", "analyzer"]
KINDS: tuple[str, ...] = ("policy", "judge", "analyzer")
PREFIX = "llm"
_PER_MTOK = 1_000_000


# --------------------------------------------------------------------------- prices


class KindPrices(BaseModel):
    """USD per million tokens for one kind of call; None: that side has no price."""

    model_config = ConfigDict(frozen=True)

    prompt_usd_per_mtok: float | None = Field(default=None, ge=0)
    completion_usd_per_mtok: float | None = Field(default=None, ge=0)

    @property
    def priced(self) -> bool:
        return self.prompt_usd_per_mtok is not None or self.completion_usd_per_mtok is not None

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """Cost of one call; None when no price is set. Unknown token counts cost nothing."""
        if not self.priced:
            return None
        usd = (prompt_tokens or 0) * (self.prompt_usd_per_mtok or 0.0)
        usd += (completion_tokens or 0) * (self.completion_usd_per_mtok or 0.0)
        return usd / _PER_MTOK


class LLMPrices(BaseModel):
    """Prices per kind of call; every price is optional (no price: no cost is reported)."""

    model_config = ConfigDict(frozen=True)

    policy: KindPrices = Field(default_factory=KindPrices)
    judge: KindPrices = Field(default_factory=KindPrices)
    analyzer: KindPrices = Field(default_factory=KindPrices)

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMPrices:
        """Prices of the usage ledger; the failure analyzer's judge is priced like the RULER judge."""
        judge = KindPrices(
            prompt_usd_per_mtok=settings.judge_price_usd_per_mtok_in,
            completion_usd_per_mtok=settings.judge_price_usd_per_mtok_out,
        )
        policy = KindPrices(
            prompt_usd_per_mtok=settings.policy_price_usd_per_mtok_in,
            completion_usd_per_mtok=settings.policy_price_usd_per_mtok_out,
        )
        return cls(policy=policy, judge=judge, analyzer=judge)

    def for_kind(self, kind: str) -> KindPrices:
        value = getattr(self, kind, None)
        return value if isinstance(value, KindPrices) else KindPrices()


# --------------------------------------------------------------------------- ledger


@dataclass
class _KindTotals:
    """Running sums of one kind of call."""

    calls: int = 0
    errors: int = 0
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls_without_usage: int = 0
    cost_usd: float | None = None

    def add_cost(self, usd: float | None) -> None:
        if usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + usd


_COUNT_FIELDS = tuple(f.name for f in fields(_KindTotals) if f.name != "cost_usd")


def _tokens(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(0, int(value))


class UsageLedger:
    """Thread- and task-safe accumulator of LLM calls (see the module docstring)."""

    def __init__(self, prices: LLMPrices | None = None) -> None:
        self.prices = prices or LLMPrices()
        self._lock = threading.Lock()
        self._kinds: dict[str, _KindTotals] = {}
        self._models: Counter[str] = Counter()

    def record(
        self,
        kind: str,
        latency_s: float,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        model: str | None = None,
        error: bool = False,
    ) -> None:
        """Count one call. Tokens None (the server reported no usage) are not guessed."""
        prompt, completion = _tokens(prompt_tokens), _tokens(completion_tokens)
        cost = self.prices.for_kind(kind).cost(prompt, completion)
        with self._lock:
            totals = self._kinds.setdefault(kind, _KindTotals())
            totals.calls += 1
            totals.errors += bool(error)
            totals.latency_ms += max(0.0, float(latency_s)) * 1000.0
            totals.prompt_tokens += prompt or 0
            totals.completion_tokens += completion or 0
            totals.calls_without_usage += prompt is None and completion is None
            totals.add_cost(cost)
            if model:
                self._models[f"{kind}:{model}"] += 1

    def merge(self, other: UsageLedger) -> None:
        """Add `other`'s calls (as counted and priced there) to this ledger."""
        with other._lock:
            kinds = {k: _KindTotals(**vars(t)) for k, t in other._kinds.items()}
            models = Counter(other._models)
        with self._lock:
            for kind, totals in kinds.items():
                mine = self._kinds.setdefault(kind, _KindTotals())
                for name in _COUNT_FIELDS:
                    setattr(mine, name, getattr(mine, name) + getattr(totals, name))
                mine.add_cost(totals.cost_usd)
            self._models.update(models)

    def calls_by_model(self) -> dict[str, int]:
        """`{"<kind>:<model>": calls}` of the calls recorded in this process (not restored)."""
        with self._lock:
            return dict(self._models)

    def totals(self) -> dict[str, float]:
        """Cumulative `llm/...` figures, overall and per kind (only kinds that were called).

        Keys: `llm/calls`, `llm/errors`, `llm/latency_ms` (sum), `llm/latency_ms_mean` (when
        there were calls), `llm/prompt_tokens`, `llm/completion_tokens`,
        `llm/calls_without_usage`, `llm/cost_usd` (only when some kind has a cost), and the
        same per kind as `llm/<kind>/...` (`llm/<kind>/cost_usd` only for a priced kind).
        """
        with self._lock:
            kinds = {k: _KindTotals(**vars(t)) for k, t in self._kinds.items()}
        overall = _KindTotals()
        out: dict[str, float] = {}
        for kind in sorted(kinds, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k)):
            totals = kinds[kind]
            out |= _flatten(f"{PREFIX}/{kind}", totals)
            for name in _COUNT_FIELDS:
                setattr(overall, name, getattr(overall, name) + getattr(totals, name))
            overall.add_cost(totals.cost_usd)
        return _flatten(PREFIX, overall) | out

    @classmethod
    def from_totals(cls, totals: Mapping[str, Any], prices: LLMPrices | None = None) -> UsageLedger:
        """A ledger that continues from `totals()` as stored in a history record.

        Only the per-kind keys are read (the overall ones are their sums). Keys that are
        missing or not numbers count as zero; a stored cost is kept as it was computed.
        """
        ledger = cls(prices)
        for key, value in totals.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != PREFIX or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            _, kind, name = parts
            current = ledger._kinds.setdefault(kind, _KindTotals())
            if name == "cost_usd":
                current.cost_usd = float(value)
            elif name == "latency_ms":
                current.latency_ms = float(value)
            elif name in _COUNT_FIELDS:
                setattr(current, name, int(value))
        return ledger


def _flatten(prefix: str, totals: _KindTotals) -> dict[str, float]:
    out: dict[str, float] = {
        f"{prefix}/calls": totals.calls,
        f"{prefix}/errors": totals.errors,
        f"{prefix}/latency_ms": round(totals.latency_ms, 3),
        f"{prefix}/prompt_tokens": totals.prompt_tokens,
        f"{prefix}/completion_tokens": totals.completion_tokens,
        f"{prefix}/calls_without_usage": totals.calls_without_usage,
    }
    if totals.calls:
        out[f"{prefix}/latency_ms_mean"] = round(totals.latency_ms / totals.calls, 3)
    if totals.cost_usd is not None:
        out[f"{prefix}/cost_usd"] = totals.cost_usd
    return out


# --------------------------------------------------------------------------- current ledger

_current: contextvars.ContextVar[UsageLedger | None] = contextvars.ContextVar("codreamer_usage_ledger", default=None)


def current_ledger() -> UsageLedger | None:
    return _current.get()


@contextmanager
def using_ledger(ledger: UsageLedger | None) -> Iterator[UsageLedger | None]:
    """Record every LLM call made inside this block (and tasks it starts) into `ledger`."""
    token = _current.set(ledger)
    try:
        yield ledger
    finally:
        _current.reset(token)


def record_llm_call(
    kind: str,
    latency_s: float,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    model: str | None = None,
    error: bool = False,
) -> None:
    """Record one call into the current ledger; nothing happens when none is set."""
    ledger = _current.get()
    if ledger is not None:
        ledger.record(kind, latency_s, prompt_tokens, completion_tokens, model=model, error=error)


def usage_tokens(usage: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of an OpenAI/litellm `usage` object or dict; None-safe."""
    if usage is None:
        return None, None
    get = usage.get if isinstance(usage, Mapping) else lambda name: getattr(usage, name, None)
    return _tokens(get("prompt_tokens")), _tokens(get("completion_tokens"))


class LLMCall:
    """One timed call: use as `with` or `async with`; set tokens with `set_usage`/`add_usage`.

    The ledger is the one current when the block starts; the call is recorded when the
    block ends, as an error when it ends with an exception (cancellation included).
    """

    def __init__(self, kind: str, model: str | None = None) -> None:
        self.kind = kind
        self.model = model
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.latency_s: float | None = None
        self._ledger: UsageLedger | None = None
        self._started = 0.0

    def set_usage(self, usage: Any) -> None:
        """Tokens from `completion.usage` (None leaves them unknown)."""
        self.prompt_tokens, self.completion_tokens = usage_tokens(usage)

    def add_usage(self, usage: Any) -> None:
        """Add the tokens of one more response (a call made of several requests)."""
        prompt, completion = usage_tokens(usage)
        if prompt is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        if completion is not None:
            self.completion_tokens = (self.completion_tokens or 0) + completion

    def __enter__(self) -> LLMCall:
        self._ledger = _current.get()
        self._started = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.latency_s = time.perf_counter() - self._started
        if self._ledger is not None:
            self._ledger.record(
                self.kind,
                self.latency_s,
                self.prompt_tokens,
                self.completion_tokens,
                model=self.model,
                error=exc_type is not None,
            )

    async def __aenter__(self) -> LLMCall:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def timed_llm_call(kind: str, model: str | None = None) -> LLMCall:
    """`async with timed_llm_call("policy", model) as call: ...; call.set_usage(completion.usage)`."""
    return LLMCall(kind, model)


# --------------------------------------------------------------------------- ART / litellm


@contextmanager
def art_judge_usage(call: LLMCall) -> Iterator[LLMCall]:
    """Add the `usage` of every litellm response ART's RULER receives in this block to `call`.

    ART reports each judge response to the active `art.metrics.MetricsBuilder`
    (`add_response_cost("judge/ruler", response, ...)`, only for judge names with a provider
    prefix such as `openai/...`). This activates a builder that reads the response's usage
    and then hands it on to the builder that was active before, if any, so ART's own cost
    metrics are unchanged.
    """
    from art.metrics import MetricsBuilder

    try:
        outer: MetricsBuilder | None = MetricsBuilder.get_active()
    except LookupError:
        outer = None

    class _UsageTap(MetricsBuilder):
        def add_response_cost(self, source: str, response: Any, **kwargs: Any) -> float | None:
            call.add_usage(getattr(response, "usage", None))
            if outer is None:
                return None
            return outer.add_response_cost(source, response, **kwargs)

    tap = _UsageTap(
        outer.cost_context if outer is not None else "codreamer",
        _shared_state=outer._shared_state if outer is not None else None,  # noqa: SLF001 - share ART's state
    )
    with tap.activate_context():
        yield call

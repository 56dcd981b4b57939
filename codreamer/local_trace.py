"""A local, readable trace of every stage call, whatever the tracking mode.

Why our own: Weave 0.54 cannot record without a trace server. `weave.init` asks the server
for its version and creates the project before a client exists, and the only local files
it writes (the write-ahead log under ~/.weave/wal, the dropped-items log) are request
queues for that server, not a record one can read. So a run without W&B (offline,
air-gapped, CI) would keep no trace at all; this module keeps one in every mode.

`traced` wraps a function (async or not): each call appends one JSON line to the run's
`trace.jsonl` when it ends: name, ids of the call and its parent, start and end (UTC),
duration, status, error, and a short summary of inputs and output (never a payload or a
secret). Parents come from a context variable, so concurrent rollouts nest correctly.
Each line is one locked append (`codreamer.storage.append_jsonl`, without fsync): it reaches
the kernel at once and survives a crash of the process; the fsync is left to the iteration's
history record, which is the commit point of an iteration. Inputs whose name says they are a
credential (`codreamer.redaction.is_secret_name`) are shown as `***`.
`codreamer trace RUN_ID` prints the tree.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from loguru import logger

from codreamer.redaction import MASK, is_secret_name
from codreamer.storage import append_jsonl, read_jsonl

TRACE_FILE = "trace.jsonl"
GROUP_LEAVES_FROM = 5  # this many same-name leaf siblings in a row print as one line
_SCENARIO_ID = re.compile(r"scenario_id='([^']*)'")

_trace_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("trace_path", default=None)
_parent: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_parent", default=None)


@contextmanager
def recording_to(run_directory: Path) -> Iterator[None]:
    """Record the spans of everything called inside this block into the run's trace file."""
    token = _trace_path.set(run_directory / TRACE_FILE)
    try:
        yield
    finally:
        _trace_path.reset(token)


def summarize(value: Any, depth: int = 0) -> Any:
    """A few characters that say what a value was, never its full payload (or a secret)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= 60 else f"{value[:57]}..."
    if isinstance(value, list | tuple):
        return f"{type(value).__name__}[{len(value)}]"
    if isinstance(value, dict):
        if depth:
            return f"dict[{len(value)}]"
        return {str(k): _summarize_named(str(k), v) for k, v in list(value.items())[:8]}
    for attribute in ("scenario_id", "run_id", "step", "total", "reward"):
        found = _plain_attribute(value, attribute)
        if isinstance(found, str | int | float) and not isinstance(found, bool):
            return f"{type(value).__name__}({attribute}={found!r})"
    return type(value).__name__


def _plain_attribute(value: Any, name: str) -> Any:
    """`getattr(value, name, None)` without a miss on a pydantic model (which raises inside
    `__getattr__`, costly on every span of every rollout): instance fields, then class attributes."""
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict) and name in fields:
        return fields[name]
    return getattr(value, name, None) if hasattr(type(value), name) else None


def _summarize_named(name: str, value: Any) -> Any:
    """Like `summarize`, but a value whose name says it is a credential is never shown."""
    if value is not None and is_secret_name(name):
        return MASK
    return summarize(value, 1)


def _inputs(signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if signature is None:
        return {}
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return {}
    return {
        name: _summarize_named(name, value) for name, value in bound.arguments.items() if name not in ("self", "cls")
    }


class _Span:
    """One call being recorded: opened before the call, written when it ends."""

    def __init__(self, name: str, path: Path, inputs: dict[str, Any]) -> None:
        self.name, self.path, self.inputs = name, path, inputs
        self.span_id, self.parent_id = uuid.uuid4().hex[:12], _parent.get()
        self.started, self.wall_start = time.perf_counter(), datetime.now(UTC)
        self.token = _parent.set(self.span_id)

    def close(self, output: Any, error: BaseException | None) -> None:
        _parent.reset(self.token)
        try:
            append_jsonl(self.path, [self._record(output, error)], fsync=False)
        except (OSError, TypeError, ValueError) as exc:  # a full disk must not fail a finished call
            logger.warning("span {} not recorded in {}: {}", self.name, self.path, exc)

    def _record(self, output: Any, error: BaseException | None) -> dict[str, Any]:
        ended = datetime.now(UTC)
        return {
            "name": self.name,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "start": self.wall_start.isoformat(timespec="microseconds"),
            "end": ended.isoformat(timespec="microseconds"),
            "duration_s": round(time.perf_counter() - self.started, 6),
            "status": "ok" if error is None else "error",
            "error": None if error is None else f"{type(error).__name__}: {error}"[:300],
            "inputs": self.inputs,
            "output": summarize(output),
        }


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """Computed once per function, not per call (`inspect.signature` was ~7% of a rollout's CPU)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _wrap[**P](fn: Callable[P, Any], name: str) -> Callable[P, Any]:
    signature = _signature(fn)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            path = _trace_path.get()
            if path is None:
                return await fn(*args, **kwargs)
            span = _Span(name, path, _inputs(signature, args, kwargs))
            try:
                output = await fn(*args, **kwargs)
            except BaseException as exc:
                span.close(None, exc)
                raise
            span.close(output, None)
            return output

        return async_wrapper

    @functools.wraps(fn)
    def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        path = _trace_path.get()
        if path is None:
            return fn(*args, **kwargs)
        span = _Span(name, path, _inputs(signature, args, kwargs))
        try:
            output = fn(*args, **kwargs)
        except BaseException as exc:
            span.close(None, exc)
            raise
        span.close(output, None)
        return output

    return sync_wrapper


@overload
def traced[**P, R](fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def traced[**P, R](*, name: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def traced[**P, R](fn: Callable[P, R] | None = None, /, *, name: str | None = None) -> Any:
    """Record each call of `fn` (sync or async) as a span; a plain call outside `recording_to`.

    Use as `@traced` or `@traced(name="score.rubric")`; the span is named after the function
    unless `name` is given.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        return _wrap(func, name or func.__name__)

    return decorate(fn) if fn is not None else decorate


def read_trace(run_directory: Path) -> list[dict[str, Any]]:
    """Every span recorded for the run (a torn last line, from a crash, is skipped)."""
    records, _ = read_jsonl(run_directory / TRACE_FILE)
    return [r for r in records if isinstance(r, dict) and "span_id" in r and "start" in r]


def _when(span: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(span["start"])


def _detail(span: dict[str, Any]) -> str:
    inputs = span.get("inputs") or {}
    iteration = inputs.get("iteration")
    if isinstance(iteration, int) and not isinstance(iteration, bool):
        return f"iteration {iteration}"  # numbered from 1, as in iterations.jsonl
    scenario = inputs.get("scenario")
    if not isinstance(scenario, str):
        return ""
    found = _SCENARIO_ID.search(scenario)
    return found.group(1) if found else scenario


def _line(span: dict[str, Any], depth: int, origin: datetime) -> str:
    offset = (_when(span) - origin).total_seconds()
    mark = "" if span.get("status") == "ok" else f"  !! {span.get('error')}"
    label = f"{'  ' * depth}{span['name']}"
    return f"{label:<34} {span['duration_s']:>9.3f}s  +{offset:>8.3f}s  {_detail(span)}{mark}".rstrip()


def _group_line(group: list[dict[str, Any]], depth: int, origin: datetime) -> str:
    durations = [float(s["duration_s"]) for s in group]
    offset = (_when(group[0]) - origin).total_seconds()
    errors = sum(1 for s in group if s.get("status") != "ok")
    label = f"{'  ' * depth}{group[0]['name']} x{len(group)}"
    mean = sum(durations) / len(group)
    text = f"{label:<34} {sum(durations):>9.3f}s  +{offset:>8.3f}s  mean {mean:.3f}s max {max(durations):.3f}s"
    return text + (f"  !! {errors} failed" if errors else "")


def format_tree(spans: list[dict[str, Any]], root_filter: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """Indented call tree, children in start order: duration, start offset from the root, status.

    A run of `GROUP_LEAVES_FROM` or more consecutive leaf calls of the same name (LLM calls,
    per-email scoring) prints as one line with their count, total, mean and max.
    """
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=_when):
        children.setdefault(span.get("parent_id"), []).append(span)
    known = {s["span_id"] for s in spans}
    roots = sorted((s for s in spans if s.get("parent_id") not in known), key=_when)
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int, origin: datetime) -> None:
        lines.append(_line(span, depth, origin))
        kids = children.get(span["span_id"], [])
        i = 0
        while i < len(kids):
            j = i
            while j < len(kids) and kids[j]["name"] == kids[i]["name"] and kids[j]["span_id"] not in children:
                j += 1
            if j - i >= GROUP_LEAVES_FROM:
                lines.append(_group_line(kids[i:j], depth + 1, origin))
                i = j
            else:
                walk(kids[i], depth + 1, origin)
                i += 1

    for root in roots:
        if root_filter is None or root_filter(root):
            walk(root, 0, _when(root))
    return "\n".join(lines)

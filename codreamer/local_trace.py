"""A local, readable trace of every stage call, whatever the tracking mode.

Weave needs a server to record to, so a run without W&B (offline, air-gapped, CI) would keep
no trace at all. `traced` wraps a stage: each call appends one JSON line to the run's
`trace.jsonl` when it ends (name, ids of the call and its parent, start, end, duration,
status, error, a short summary of inputs and output), through the same flock'd appender as
the history. Parents come from a context variable, so concurrent rollouts nest correctly.
`codreamer trace RUN_ID` prints the tree.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from codreamer.pipeline.history import append_record, read_history

TRACE_FILE = "trace.jsonl"

_trace_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("trace_path", default=None)
_parent: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_parent", default=None)

P = ParamSpec("P")
R = TypeVar("R")


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
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= 60 else f"{value[:57]}..."
    if isinstance(value, list | tuple):
        return f"{type(value).__name__}[{len(value)}]"
    if isinstance(value, dict):
        return f"dict[{len(value)}]" if depth else {k: summarize(v, 1) for k, v in list(value.items())[:8]}
    for attribute in ("scenario_id", "run_id", "step"):
        if hasattr(value, attribute) and not callable(getattr(value, attribute)):
            return f"{type(value).__name__}({attribute}={getattr(value, attribute)!r})"
    return type(value).__name__


def _inputs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except TypeError:
        return {}
    return {name: summarize(value, 1) for name, value in bound.arguments.items()}


def traced(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Record each call of the async function `fn` as a span (no-op outside `recording_to`)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        path = _trace_path.get()
        if path is None:
            return await fn(*args, **kwargs)
        span_id, parent = uuid.uuid4().hex[:12], _parent.get()
        token = _parent.set(span_id)
        started, wall_start = time.perf_counter(), datetime.now(UTC)
        status, error, output = "ok", None, None
        try:
            output = await fn(*args, **kwargs)
            return output
        except BaseException as exc:
            status, error = "error", f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            _parent.reset(token)
            append_record(
                path,
                {
                    "name": fn.__name__,
                    "span_id": span_id,
                    "parent_id": parent,
                    "start": wall_start.isoformat(),
                    "duration_s": round(time.perf_counter() - started, 4),
                    "status": status,
                    "error": error,
                    "inputs": _inputs(fn, args, kwargs),
                    "output": summarize(output),
                },
            )

    return wrapper


def read_trace(run_directory: Path) -> list[dict[str, Any]]:
    records, _ = read_history(run_directory / TRACE_FILE)
    return records


def format_tree(spans: list[dict[str, Any]], root_filter: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """Indented call tree, children in start order, with durations and status."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: s["start"]):
        children.setdefault(span.get("parent_id"), []).append(span)
    known = {s["span_id"] for s in spans}
    roots = [s for s in spans if s.get("parent_id") not in known]
    roots = sorted((r for r in roots if root_filter is None or root_filter(r)), key=lambda s: s["start"])
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        mark = "" if span["status"] == "ok" else f"  !! {span.get('error')}"
        inputs = span.get("inputs") or {}
        iteration = inputs.get("iteration")
        detail = f"iteration {iteration + 1}" if isinstance(iteration, int) else inputs.get("scenario", "")
        lines.append(f"{'  ' * depth}{span['name']:<{max(1, 28 - 2 * depth)}} {span['duration_s']:>9.3f}s {detail}{mark}")
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)

"""`codreamer sync-traces RUN_ID`: a run's local `trace.jsonl` into Weave, after the fact.

What `wandb sync` is for the W&B run, this is for the trace: an offline run (no key, no
server) keeps its spans in `trace.jsonl` (`codreamer.local_trace`); syncing sends each span
as a Weave call through Weave's own client (`create_call` / `finish_call`), so the tree is
the one the run would have had online:

- same tree: each span's parent is its recorded parent; a span whose parent was never
  written (the process died inside it) becomes a root, marked `parent_missing`;
- same names: the span's name is the op name (`learning_loop`, `iteration`, `generate`,
  `rollout`, `chat_completion`, `judge_group`, ...), as the live ops are named;
- original timestamps: `started_at` / `ended_at` are the span's `start` / `end`;
- inputs and outputs are the span's summaries (the local trace keeps no payload or secret),
  errors are the call's exception; attributes say it was synced (`codreamer.synced_from`).

Idempotent: call ids are derived from (project, run id, span id), so the same span is always
the same call, and `weave_sync.json` in the run directory lists the spans each project has
already received; a second sync sends nothing, a sync after the run went on sends the new
spans only (their parents' ids are the same derived ids).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from codreamer.local_trace import read_trace
from codreamer.storage import write_json_atomic

__all__ = ["SYNC_FILE", "SyncResult", "call_id", "sync_trace"]

SYNC_FILE = "weave_sync.json"
_NAMESPACE = uuid.UUID("6f1d7c0e-4b8a-4f3e-9a51-2c7e0d9b1a44")  # CoDreamer's, for derived call ids


class SyncedSpanError(Exception):
    """A span that ended in an error, as the exception of its Weave call (its recorded text)."""


@dataclass(frozen=True)
class SyncResult:
    project: str
    sent: int
    already: int
    roots: int
    parent_missing: int


def call_id(project: str, run_id: str, span_id: str) -> str:
    """The Weave call id of a span: the same every time (a UUID derived from project, run, span)."""
    return str(uuid.uuid5(_NAMESPACE, f"{project}\0{run_id}\0{span_id}"))


def _synced(run_dir: Path, project: str) -> set[str]:
    try:
        data = json.loads((run_dir / SYNC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    spans = data.get(project) if isinstance(data, dict) else None
    return {str(s) for s in spans} if isinstance(spans, list) else set()


def _record_synced(run_dir: Path, project: str, span_ids: set[str]) -> None:
    try:
        data = json.loads((run_dir / SYNC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    data[project] = sorted(span_ids)
    write_json_atomic(run_dir / SYNC_FILE, data)


def _depth(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> int:
    depth, seen, parent = 0, set(), span.get("parent_id")
    while parent in by_id and parent not in seen:
        seen.add(parent)
        depth, parent = depth + 1, by_id[parent].get("parent_id")
    return depth


def sync_trace(run_dir: Path, run_id: str, client: Any) -> SyncResult:
    """Send the spans of `run_dir/trace.jsonl` not yet sent to `client`'s project; flush; record.

    `client` is Weave's `WeaveClient` (from `weave.init`, or built over any trace server).
    """
    project = f"{client.entity}/{client.project}"
    spans = read_trace(run_dir)
    by_id = {str(s["span_id"]): s for s in spans}
    done = _synced(run_dir, project)
    todo = sorted(
        (s for s in spans if str(s["span_id"]) not in done),
        key=lambda s: (s["start"], _depth(s, by_id)),  # parents before children
    )
    calls: dict[str, Any] = {}
    roots = missing = 0
    for span in todo:
        span_id, parent_span = str(span["span_id"]), span.get("parent_id")
        parent = calls.get(str(parent_span)) if parent_span else None
        attributes: dict[str, Any] = {"synced_from": "trace.jsonl", "run_id": run_id, "span_id": span_id}
        if parent is None and parent_span:
            if str(parent_span) in done:  # sent by an earlier sync: refer to it by its derived id
                parent = _Parent(call_id(project, run_id, str(parent_span)), _root_id(by_id, span, project, run_id))
            else:
                attributes["parent_missing"] = str(parent_span)
                missing += 1
        roots += parent is None
        call = client.create_call(
            str(span["name"]),
            dict(span.get("inputs") or {}),
            parent=parent,
            attributes={"codreamer": attributes},
            use_stack=False,
            _call_id_override=call_id(project, run_id, span_id),
            started_at=datetime.fromisoformat(span["start"]),
        )
        calls[span_id] = call
        error = SyncedSpanError(span.get("error") or "error") if span.get("status") == "error" else None
        client.finish_call(call, span.get("output"), error, ended_at=datetime.fromisoformat(span["end"]))
    client.flush()
    if todo:
        _record_synced(run_dir, project, done | {str(s["span_id"]) for s in todo})
    return SyncResult(project, len(todo), len(spans) - len(todo), roots, missing)


@dataclass
class _Parent:
    """A parent call sent by an earlier sync: what `create_call` reads of a parent."""

    id: str
    trace_id: str
    thread_id: str | None = None

    def __post_init__(self) -> None:
        self._children: list[Any] = []


def _root_id(by_id: dict[str, dict[str, Any]], span: dict[str, Any], project: str, run_id: str) -> str:
    """The trace id of `span`: its topmost recorded ancestor's call id (Weave: trace id = root id)."""
    top, seen = span, set()
    while (parent := top.get("parent_id")) in by_id and parent not in seen:
        seen.add(parent)
        top = by_id[parent]
    return call_id(project, run_id, str(top["span_id"]))


def cmd_sync_traces(settings: Any, run_dir: Path, run_id: str, project: str | None = None) -> int:
    """`codreamer sync-traces`: start Weave (needs WANDB_API_KEY), sync, print what was sent."""
    import os
    import sys

    from codreamer.tracking.modes import has_key
    from codreamer.tracking.payloads import compact_inputs, compact_payload
    from codreamer.tracking.start import weave_project_name

    if not read_trace(run_dir):
        print(f"sync-traces: no trace recorded in {run_dir}", file=sys.stderr)
        return 2
    if not has_key(settings):
        print("sync-traces: WANDB_API_KEY is not set (Weave needs its server)", file=sys.stderr)
        return 2
    os.environ["WANDB_API_KEY"] = settings.wandb_api_key.get_secret_value()  # Weave reads the environment
    os.environ.setdefault("WEAVE_PRINT_CALL_LINK", "false")
    os.environ.pop("WEAVE_DISABLED", None)
    import weave

    name = weave_project_name(project or settings.weave_project, settings.wandb_entity)
    client = weave.init(name, postprocess_inputs=compact_inputs, postprocess_output=compact_payload)
    result = sync_trace(run_dir, run_id, client)
    print(
        f"synced {result.sent} span(s) of run {run_id} to Weave project {result.project} "
        f"({result.already} already there, {result.roots} root(s), {result.parent_missing} with a missing parent)"
    )
    return 0

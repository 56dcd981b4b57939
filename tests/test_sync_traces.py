"""`codreamer sync-traces`: a run's local trace into Weave after the fact, idempotently.

The trace is recorded by `codreamer.local_trace` as an offline run records it (nested spans
from concurrent async calls, one that fails); it is sent by Weave's own client and HTTP
binding to `RecordingWeaveServer`, a loopback TEST DOUBLE that records what the client sends
(tests/weave_recorder.py, which also says what a real server does that it does not)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from codreamer.local_trace import read_trace, recording_to, traced
from codreamer.tracking.sync import SYNC_FILE, call_id, sync_trace

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from weave_recorder import RecordingWeaveServer, weave_client
except ModuleNotFoundError:  # pragma: no cover
    from tests.weave_recorder import RecordingWeaveServer, weave_client

pytestmark = pytest.mark.timeout(120)
PROJECT = "team/codreamer"


@traced
async def chat_completion(prompt: str) -> str:
    await asyncio.sleep(0.01)
    return prompt.upper()


@traced
async def rollout(scenario_id: str) -> float:
    await chat_completion(f"write to {scenario_id}")
    await chat_completion("finalize")
    if scenario_id == "s-3":
        raise TimeoutError("policy timed out")
    return 0.5


@traced
async def generate_trajectories(iteration: int) -> int:
    results = await asyncio.gather(*(rollout(f"s-{i}") for i in range(4)), return_exceptions=True)
    return sum(1 for r in results if not isinstance(r, BaseException))


@traced
async def run_iteration(iteration: int) -> dict[str, Any]:
    return {"trajectories": await generate_trajectories(iteration)}


def _record(run_dir: Path, iterations: int) -> None:
    async def loop() -> None:
        for it in range(1, iterations + 1):
            await run_iteration(it)

    with recording_to(run_dir):
        asyncio.run(loop())


def _name(op_name: str) -> str:
    return op_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_an_offline_trace_syncs_as_the_same_tree_with_its_timings_and_only_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    _record(run_dir, iterations=1)
    spans = read_trace(run_dir)
    assert len(spans) == 1 + 1 + 4 + 8
    with RecordingWeaveServer() as server:
        with weave_client(server, PROJECT) as client:
            result = sync_trace(run_dir, "run-1", client)
        starts, ends = server.calls()
        assert (result.sent, result.already, result.roots, result.parent_missing) == (14, 0, 1, 0)
        assert len(starts) == len(ends) == 14

        # same tree, same names, original timestamps
        by_id = {s["id"]: s for s in starts}
        ended = {e["id"]: e for e in ends}
        for span in spans:
            start = by_id[call_id(PROJECT, "run-1", span["span_id"])]
            assert _name(start["op_name"]) == span["name"] and start["op_name"].startswith(f"weave:///{PROJECT}/op/")
            parent = span["parent_id"] and call_id(PROJECT, "run-1", span["parent_id"])
            assert start["parent_id"] == (parent or None)
            assert _when(start["started_at"]) == datetime.fromisoformat(span["start"])
            end = ended[start["id"]]
            assert _when(end["ended_at"]) == datetime.fromisoformat(span["end"])
            assert (end.get("exception") is not None) == (span["status"] == "error")
            assert start["attributes"]["codreamer"]["span_id"] == span["span_id"]
        root = next(s for s in starts if s["parent_id"] is None)
        assert _name(root["op_name"]) == "run_iteration" and all(s["trace_id"] == root["id"] for s in starts)
        failed = [e for e in ends if e.get("exception")]
        assert len(failed) == 1 and "policy timed out" in failed[0]["exception"]
        names = sorted(_name(s["op_name"]) for s in starts)
        assert names.count("rollout") == 4 and names.count("chat_completion") == 8

        # a second sync sends nothing (another client, as a later `codreamer sync-traces` would be)
        before = len(server.requests)
        with weave_client(server, PROJECT) as client:
            again = sync_trace(run_dir, "run-1", client)
        assert (again.sent, again.already) == (0, 14) and len(server.requests) == before

        # the run went on: only the new iteration's spans are sent, under their own root
        _record(run_dir, iterations=1)
        with weave_client(server, PROJECT) as client:
            more = sync_trace(run_dir, "run-1", client)
        assert (more.sent, more.already) == (14, 14)
        assert len(server.calls()[0]) == 28 and len({s["id"] for s in server.calls()[0]}) == 28
    assert (run_dir / SYNC_FILE).is_file()


def test_a_span_whose_parent_was_never_written_becomes_a_marked_root(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-2"
    run_dir.mkdir()
    _record(run_dir, iterations=1)
    lines = (run_dir / "trace.jsonl").read_text().splitlines()
    (run_dir / "trace.jsonl").write_text("\n".join(line for line in lines if '"run_iteration"' not in line) + "\n")
    with RecordingWeaveServer() as server:
        with weave_client(server, PROJECT) as client:
            result = sync_trace(run_dir, "run-2", client)
        starts, _ = server.calls()
    assert (result.sent, result.roots, result.parent_missing) == (13, 1, 1)
    [root] = [s for s in starts if s["parent_id"] is None]
    assert _name(root["op_name"]) == "generate_trajectories" and root["attributes"]["codreamer"]["parent_missing"]


def test_the_sync_traces_verb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import weave
    from pydantic import SecretStr

    from codreamer.cli.verbs import VERBS
    from codreamer.config import Settings
    from codreamer.runs import models_root

    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WEAVE_PROJECT", "WEAVE_DISABLED", "WEAVE_PRINT_CALL_LINK"):
        monkeypatch.setenv(name, "")  # recorded, so what the verb sets is undone after the test
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None, runs_dir=tmp_path)  # type: ignore[call-arg]
    run_dir = models_root(settings) / "run-3"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"run_id": "run-3", "status": "finished"}')
    verb = VERBS["sync-traces"](run_id="run-3")
    assert verb.run(settings) == 2 and "no trace recorded" in capsys.readouterr().err
    _record(run_dir, iterations=1)
    assert verb.run(settings) == 2 and "WANDB_API_KEY is not set" in capsys.readouterr().err

    keyed = Settings(_env_file=None, runs_dir=tmp_path, wandb_api_key=SecretStr("k" * 40), weave_project="team/x")  # type: ignore[call-arg]
    with RecordingWeaveServer() as server:
        projects: list[str] = []

        def init(project: str, **kwargs: Any) -> Any:  # stands in for weave.init: no W&B login here
            projects.append(project)
            return stack.enter_context(weave_client(server, project))

        from contextlib import ExitStack

        with ExitStack() as stack:
            monkeypatch.setattr(weave, "init", init)
            assert verb.run(keyed) == 0
            assert verb.run(keyed) == 0
        out = capsys.readouterr().out
    assert projects == ["team/x", "team/x"]
    assert "synced 14 span(s) of run run-3 to Weave project team/x" in out and "synced 0 span(s)" in out

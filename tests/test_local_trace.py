"""The local trace: spans nest by context (also across concurrent tasks), errors are recorded,
nothing is written outside a run, secrets and payloads stay out, and the tree prints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from codreamer.local_trace import TRACE_FILE, format_tree, read_trace, recording_to, summarize, traced


@traced
async def llm_call(prompt: str, api_key: str | None = None) -> str:
    await asyncio.sleep(0)
    return f"reply to {prompt}"


@traced
def score_one(text: str) -> float:
    return float(len(text))


@traced(name="rollout")
async def run_rollout(scenario: str, turns: int) -> float:
    replies = [await llm_call(f"{scenario}-{turn}", api_key="sk-secret-123") for turn in range(turns)]
    return score_one(replies[-1])


@traced
async def stage(iteration: int, scenarios: list[str]) -> list[float]:
    return list(await asyncio.gather(*(run_rollout(s, 2) for s in scenarios)))


@traced
async def broken(iteration: int) -> None:
    await llm_call("x")
    raise ValueError("judge said no")


class Scorer:
    @traced
    def part(self, values: list[int]) -> int:
        return sum(values)


def _by_id(spans: list[dict]) -> dict[str, dict]:
    return {s["span_id"]: s for s in spans}


def test_concurrent_spans_nest_under_their_own_parents(tmp_path: Path) -> None:
    with recording_to(tmp_path):
        assert asyncio.run(stage(0, ["s1", "s2"])) == [len("reply to s1-1"), len("reply to s2-1")]
    spans = read_trace(tmp_path)
    by_id = _by_id(spans)
    [root] = [s for s in spans if s["name"] == "stage"]
    assert root["parent_id"] is None and root["inputs"] == {"iteration": 0, "scenarios": "list[2]"}
    rollouts = [s for s in spans if s["name"] == "rollout"]
    assert sorted(r["inputs"]["scenario"] for r in rollouts) == ["s1", "s2"]
    assert all(r["parent_id"] == root["span_id"] for r in rollouts)
    for call in (s for s in spans if s["name"] in ("llm_call", "score_one")):
        parent = by_id[call["parent_id"]]
        assert parent["name"] == "rollout"
        if call["name"] == "llm_call":  # each LLM call sits under the rollout of its own scenario
            assert call["inputs"]["prompt"].startswith(parent["inputs"]["scenario"])
    assert len([s for s in spans if s["name"] == "llm_call"]) == 4
    assert all(s["status"] == "ok" and s["start"] <= s["end"] and s["duration_s"] >= 0 for s in spans)


def test_an_error_is_recorded_on_its_span_and_still_raised(tmp_path: Path) -> None:
    with recording_to(tmp_path), pytest.raises(ValueError, match="judge said no"):
        asyncio.run(broken(3))
    spans = read_trace(tmp_path)
    [failed] = [s for s in spans if s["name"] == "broken"]
    [ok] = [s for s in spans if s["name"] == "llm_call"]
    assert failed["status"] == "error" and failed["error"] == "ValueError: judge said no"
    assert ok["status"] == "ok" and ok["parent_id"] == failed["span_id"]


def test_nothing_is_written_outside_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert asyncio.run(run_rollout("s", 1)) == len("reply to s-0")
    assert list(tmp_path.iterdir()) == []


def test_secrets_self_and_payloads_stay_out_of_spans(tmp_path: Path) -> None:
    with recording_to(tmp_path):
        asyncio.run(run_rollout("s", 1))
        assert Scorer().part(list(range(500))) == sum(range(500))
    text = (tmp_path / TRACE_FILE).read_text()
    assert "sk-secret-123" not in text
    spans = read_trace(tmp_path)
    [call] = [s for s in spans if s["name"] == "llm_call"]
    assert call["inputs"]["api_key"] == "***"
    [part] = [s for s in spans if s["name"] == "part"]
    assert part["inputs"] == {"values": "list[500]"} and part["output"] == sum(range(500))
    assert summarize("x" * 500).endswith("...") and len(summarize("x" * 500)) == 60
    assert summarize(float("nan")) is None


def test_a_torn_last_line_is_skipped_and_later_spans_stay_readable(tmp_path: Path) -> None:
    (tmp_path / TRACE_FILE).write_text('{"name": "cut', encoding="utf-8")  # a crash mid-write
    with recording_to(tmp_path):
        asyncio.run(llm_call("after the crash"))
    [span] = read_trace(tmp_path)
    assert span["inputs"]["prompt"] == "after the crash"


def test_format_tree_shows_one_iteration_with_timings_and_groups_repeated_leaves(tmp_path: Path) -> None:
    with recording_to(tmp_path):
        asyncio.run(stage(1, ["s1"]))
        with pytest.raises(ValueError, match="judge said no"):
            asyncio.run(broken(2))
    spans = read_trace(tmp_path)
    tree = format_tree(spans, lambda root: root["inputs"].get("iteration") == 1)
    lines = tree.splitlines()
    assert lines[0].startswith("stage") and "iteration 1" in lines[0] and "+   0.000s" in lines[0]
    assert lines[1].startswith("  rollout") and lines[1].endswith("s1")
    assert [line.split()[0] for line in lines[2:]] == ["llm_call", "llm_call", "score_one"]
    assert "broken" not in tree
    assert "!! ValueError: judge said no" in format_tree(spans, lambda root: root["name"] == "broken")


def _span(span_id: str, parent: str | None, name: str, start_s: float, duration_s: float, ok: bool = True) -> dict:
    return {
        "name": name,
        "span_id": span_id,
        "parent_id": parent,
        "start": f"2026-01-01T00:00:{start_s:09.6f}+00:00",
        "duration_s": duration_s,
        "status": "ok" if ok else "error",
        "error": None if ok else "TimeoutError: slow",
        "inputs": {},
        "output": None,
    }


def test_format_tree_groups_long_runs_of_same_name_leaves_only() -> None:
    root = _span("r", None, "rollout", 0.0, 7.0)
    chats = [_span(f"c{i}", "r", "chat_completion", 1.0 + i, 1.0, ok=i != 2) for i in range(6)]
    tree = format_tree([root, *chats]).splitlines()
    assert len(tree) == 2 and tree[1].split()[:2] == ["chat_completion", "x6"]
    assert "6.000s" in tree[1] and "+   1.000s" in tree[1] and "max 1.000s" in tree[1] and "!! 1 failed" in tree[1]

    few = format_tree([root, *chats[:4]]).splitlines()
    assert [line.split()[0] for line in few] == ["rollout", *["chat_completion"] * 4]
    assert "!! TimeoutError: slow" in few[3]


def test_format_tree_names_the_scenario_of_a_rollout() -> None:
    root = _span("r", None, "generate_trajectories", 0.0, 2.0)
    rollout = dict(_span("o", "r", "rollout", 0.5, 1.0), inputs={"scenario": "Scenario(scenario_id='outreach-p007')"})
    assert format_tree([root, rollout]).splitlines()[1].endswith("outreach-p007")

"""The failure layer: categories, FailureCollector, FailureAnalyzer, reports, charts, CLI, judge.

Groups are built by hand in the shape `rollout` + `RewardScorer` give them (metadata keys of
`METADATA_KEYS`, `rubric/*` and `reward/*` metrics, `ruler/judge_error`, ART's
`PydanticException`s in `group.exceptions`), plus one test that runs the real stages
(`generate_trajectories`, `RewardScorer` with a judge) against a loopback server with an
injected crash and a failing judge.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import art
import pytest
from art.trajectories import PydanticException
from openai.types.chat.chat_completion import ChatCompletionMessage, Choice
from openai.types.chat.chat_completion_message_tool_call import ChatCompletionMessageToolCall, Function

from codreamer.analysis.analyzer import FailureAnalyzer
from codreamer.analysis.categories import (
    FailureCategory,
    categorize_exception,
    categorize_output,
    exception_type_name,
)
from codreamer.analysis.collector import FailureCollector
from codreamer.analysis.commands import CHART_FILE, CROSS_RUN_DIR, REPORT_FILE, cmd_analyze
from codreamer.analysis.failures import FAILURES_FILE, Failure, load_failures, sha256_text
from codreamer.analysis.judge import AnalyzerJudgeConfig, parse_judge_answer
from codreamer.analysis.markdown import NO_JUDGE_LINE, generate_improvement_report
from codreamer.pipeline.history import append_record
from codreamer.runs import ITERATIONS_FILE, RUN_FILE
from codreamer.storage import write_json_atomic
from codreamer.usage import UsageLedger, using_ledger

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import Call, HTTPError, LoopbackOpenAI
except ModuleNotFoundError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.loopback import Call, HTTPError, LoopbackOpenAI

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]

C = FailureCategory
SECRET = "sk-test-ANALYZER-SECRET-1234"
GOOD_PARTS = {
    "personalization": 0.8,
    "call_to_action": 1.0,
    "length": 1.0,
    "subject": 1.0,
    "no_hallucination": 1.0,
    "no_spam": 1.0,
    "clean_format": 1.0,
}
SYSTEM = {"role": "system", "content": "You are Sam Lee, Account Executive. Write a first outreach email."}


# --------------------------------------------------------------------------- builders


def user(prospect_id: str) -> dict[str, str]:
    return {"role": "user", "content": f"Prospect: someone (prospect_id {prospect_id}). Look up the facts."}


def finalize_choice(subject: str, body: str) -> Choice:
    call = ChatCompletionMessageToolCall(
        id="call_1",
        type="function",
        function=Function(name="finalize_email", arguments=json.dumps({"subject": subject, "body": body})),
    )
    message = ChatCompletionMessage(role="assistant", content=None, tool_calls=[call])
    return Choice(index=0, finish_reason="tool_calls", message=message)


def trajectory(
    tid: str,
    scenario_id: str,
    prospect_id: str,
    *,
    reward: float,
    body: str = "Hi Ana, congrats on Leipzig. FreightPilot cuts invoice audits. A 15-minute call next week? Sam",
    subject: str = "Leipzig and invoice audits",
    auto_finalized: bool = False,
    **parts: float,
) -> art.Trajectory:
    rubric = {**GOOD_PARTS, **parts}
    metrics: dict[str, Any] = {f"rubric/{k}": v for k, v in rubric.items()}
    metrics |= {"rubric/total": 0.5, "reward/rubric": 0.5, "reward/total": reward, "turns": 2, "tool_calls": 2}
    metadata = {
        "scenario_id": scenario_id,
        "split": "train",
        "prospect_id": prospect_id,
        "step": 0,
        "seed": 1,
        "trajectory_id": tid,
        "auto_finalized": auto_finalized,
        "auto_finalize_source": "text" if auto_finalized else None,
        "turns": 2,
        "tool_calls": 2,
        "invalid_tool_calls": 0,
        "prospect_lookups": 0,
        "company_lookups": 1,
        "finish_reason": "tool_calls",
        "email_subject": subject,
        "email_body": body,
    }
    items = [
        SYSTEM,
        user(prospect_id),
        finalize_choice(subject, body),
        {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
    ]
    return art.Trajectory(messages_and_choices=items, reward=reward, metrics=metrics, metadata=metadata)


def group(
    scenario_id: str,
    prospect_id: str,
    trajectories: list[art.Trajectory],
    exceptions: list[Any] = (),  # type: ignore[assignment]
    judge_error: str | None = None,
) -> art.TrajectoryGroup:
    g = art.TrajectoryGroup(
        trajectories,
        exceptions=list(exceptions),
        metadata={"scenario_id": scenario_id, "prospect_id": prospect_id, "step": 0},
    )
    if judge_error is not None:
        for t in g.trajectories:
            t.metrics["ruler/judge_error"] = 1
        g.metadata["judge_error"] = judge_error
    return g


def iteration_groups(run: str, it: int, *, b_fails: bool = True) -> list[art.TrajectoryGroup]:
    """Two groups of one iteration: p001 always misses personalisation; p002 fails when `b_fails`."""
    a_exc = [TimeoutError("read timed out")] if it == 1 else []
    a = group(
        "s-a",
        "p001",
        [
            trajectory(f"{run}-{it}-a0", "s-a", "p001", reward=0.3, personalization=0.1),
            trajectory(f"{run}-{it}-a1", "s-a", "p001", reward=0.8),
        ],
        a_exc,
    )
    if not b_fails:
        return [a, group("s-b", "p002", [trajectory(f"{run}-{it}-b0", "s-b", "p002", reward=0.9)])]
    b_exc: list[Any] = []
    if it == 2:
        b_exc.append(
            PydanticException(
                type="<class 'openai.RateLimitError'>", message="Error code: 429 - slow down", traceback=""
            )
        )
    if it == 3:
        b_exc.append(ConnectionRefusedError(111, "Connection refused"))
    b = group(
        "s-b",
        "p002",
        [
            trajectory(f"{run}-{it}-b0", "s-b", "p002", reward=0.2),
            trajectory(f"{run}-{it}-b1", "s-b", "p002", reward=0.1, body="", length=0.0, clean_format=0.0),
            trajectory(f"{run}-{it}-b2", "s-b", "p002", reward=0.5, auto_finalized=True, body="Hi.", length=0.2),
        ],
        b_exc,
        judge_error="AuthenticationError: bad key" if it == 2 else None,
    )
    return [a, b]


def make_run(root: Path, run_id: str, day: int, *, b_fails: bool = True, iterations: int = 3) -> Path:
    """A run directory as the learning loop leaves it: run.json, iterations.jsonl, failures."""
    directory = root / run_id
    write_json_atomic(directory / RUN_FILE, {"run_id": run_id, "created_at": f"2026-01-{day:02d}T00:00:00+00:00"})
    collector = FailureCollector(directory, run_id, low_reward_threshold=0.4)
    ledger = UsageLedger()
    for it in range(1, iterations + 1):
        groups = iteration_groups(run_id, it, b_fails=b_fails)
        collector.collect_groups(groups, iteration=it, step=it)
        for _ in (t for g in groups for t in g.trajectories):
            ledger.record("policy", 0.05, 100, 20)
        record = {
            "run_id": run_id,
            "iteration": it,
            "step": it,
            "scenarios": ["s-a", "s-b"],
            "train/trajectories": float(sum(len(g.trajectories) for g in groups)),
            "train/exceptions": float(sum(len(g.exceptions) for g in groups)),
        }
        append_record(directory / ITERATIONS_FILE, record | ledger.totals())
    return directory


def table(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / FAILURES_FILE).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- categories


@pytest.mark.parametrize(
    ("type_name", "message", "stage", "expected"),
    [
        ("<class 'TimeoutError'>", "", "rollout", C.TIMEOUT),
        ("<class 'openai.APITimeoutError'>", "Request timed out.", "rollout", C.TIMEOUT),
        ("<class 'openai.RateLimitError'>", "Error code: 429", "rollout", C.RATE_LIMIT),
        ("RuntimeError", "HTTP 429 Too Many Requests", "rollout", C.RATE_LIMIT),
        ("<class 'ConnectionRefusedError'>", "[Errno 111] Connect call failed", "rollout", C.CONNECTION),
        ("openai.APIConnectionError", "Connection error.", "rollout", C.CONNECTION),
        (
            "<class 'json.decoder.JSONDecodeError'>",
            "Expecting value: line 1 column 1 (char 0)",
            "rollout",
            C.SCHEMA_PARSE,
        ),
        ("pydantic_core._pydantic_core.ValidationError", "1 validation error for Email", "rollout", C.SCHEMA_PARSE),
        ("RuntimeError", "loss is nan in the training step", "train", C.TRAINING_ERROR),
        ("RuntimeError", "boom", "train", C.TRAINING_ERROR),
        ("RuntimeError", "boom", "judge", C.JUDGE_ERROR),
        ("RuntimeError", "boom", "rollout", C.ROLLOUT_CRASH),
        # the module path must not decide: "training" / "Ruler" only count in the class name
        ("<class 'codreamer.agent.rollout.Boom'>", "x", "rollout", C.ROLLOUT_CRASH),
    ],
)
def test_categorize_exception(type_name: str, message: str, stage: str, expected: FailureCategory) -> None:
    assert categorize_exception(type_name, message, stage=stage) == expected


def test_exception_type_name_unwraps_art_repr() -> None:
    assert exception_type_name("<class 'openai.APITimeoutError'>") == "openai.APITimeoutError"
    assert exception_type_name("TimeoutError") == "TimeoutError"


@pytest.mark.parametrize(
    ("parts", "meta", "reward", "expected"),
    [
        ({}, {}, 0.8, []),
        ({"personalization": 0.1}, {}, 0.3, [C.MISSING_PERSONALIZATION]),
        ({"no_hallucination": 0.5, "call_to_action": 0.0}, {}, 0.3, [C.HALLUCINATED_FACT, C.NO_CALL_TO_ACTION]),
        ({"length": 0.2}, {"email_body": " ".join(["word"] * 200)}, 0.5, [C.TOO_LONG]),
        ({"length": 0.2}, {"email_body": "Hi."}, 0.5, [C.TOO_SHORT]),
        ({"no_spam": 0.5}, {}, 0.5, [C.SPAMMY]),
        ({"length": 0.0, "personalization": 0.0}, {"email_body": ""}, 0.1, [C.MALFORMED_EMAIL]),
        ({}, {"auto_finalized": True}, 0.8, [C.AUTO_FINALIZED]),
        ({}, {}, 0.2, [C.LOW_REWARD]),
    ],
)
def test_categorize_output(parts: dict[str, float], meta: dict[str, Any], reward: float, expected: list[C]) -> None:
    metrics = {f"rubric/{k}": v for k, v in {**GOOD_PARTS, **parts}.items()}
    metadata = {"email_body": "Hi Ana, a short but fine email body. Call next week?", **meta}
    assert categorize_output(metrics, metadata, reward=reward) == expected


# --------------------------------------------------------------------------- collector


def test_collect_groups_records_each_failure_exactly_once(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    groups = iteration_groups("run-x", 2)
    added = collector.collect_groups(groups, iteration=2, step=2)
    # a0 (personalisation), b0 (low reward), b1 (malformed), b2 (auto-finalised + too short),
    # the 429 exception, one judge failure for group b
    assert Counter(f.source for f in added) == {"output": 4, "exception": 1, "judge": 1}
    assert Counter(f.category for f in added) == {
        C.MISSING_PERSONALIZATION: 1,
        C.LOW_REWARD: 1,
        C.MALFORMED_EMAIL: 1,
        C.TOO_SHORT: 1,
        C.RATE_LIMIT: 1,
        C.JUDGE_ERROR: 1,
    }
    auto = next(f for f in added if f.trajectory_id == "run-x-2-b2")
    assert auto.categories == [C.TOO_SHORT, C.AUTO_FINALIZED]

    assert collector.collect_groups(groups, iteration=2, step=2) == []
    reopened = FailureCollector(tmp_path, "run-x")
    assert len(reopened) == len(added)
    assert reopened.collect_groups(iteration_groups("run-x", 2), iteration=2, step=2) == []
    rows = table(tmp_path)
    assert len(rows) == len(added) == len({r["failure_id"] for r in rows})
    # a new iteration is new failures
    assert len(reopened.collect_groups(iteration_groups("run-x", 3), iteration=3, step=3)) > 0


def test_failure_has_full_text_hashes_state_and_reward_parts(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    collector.collect_groups(iteration_groups("run-x", 1), iteration=1, step=1)
    failure = next(f for f in load_failures(tmp_path)[0] if f.trajectory_id == "run-x-1-a0")
    assert failure.scenario_id == "s-a" and failure.prospect_id == "p001"
    assert failure.iteration == 1 and failure.step == 1 and failure.source == "output"
    assert failure.output.startswith("Subject: Leipzig and invoice audits\n\nHi Ana, congrats on Leipzig.")
    assert failure.output_hash == sha256_text(failure.output)
    roles = [m.get("role") for m in failure.input]
    assert roles == ["system", "user", "assistant", "tool"]
    assert (
        json.loads(failure.input[2]["tool_calls"][0]["function"]["arguments"])["subject"]
        == "Leipzig and invoice audits"
    )
    assert failure.agent_state["turns"] == 2 and failure.agent_state["company_lookups"] == 1
    assert failure.reward_parts["rubric/personalization"] == 0.1 and "reward/total" in failure.reward_parts
    assert failure.reward == pytest.approx(0.3)
    # the input hash is the scenario as the agent saw it: same for every attempt at s-a
    other = next(f for f in load_failures(tmp_path)[0] if f.scenario_id == "s-a" and f.source == "output")
    assert other.input_hash == failure.input_hash

    timeout = next(f for f in load_failures(tmp_path)[0] if f.source == "exception")
    assert timeout.category == C.TIMEOUT
    assert timeout.error_message == "TimeoutError: read timed out"
    assert timeout.agent_state == {"stage": "rollout", "exception_type": "TimeoutError"}


def test_version_files_hold_every_failed_version_per_scenario(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    for it in (1, 2, 3):
        collector.collect_groups(iteration_groups("run-x", it), iteration=it, step=it)
    failures, _ = load_failures(tmp_path)
    for failure in failures:
        path = failure.version_path(tmp_path)
        assert path.is_file(), path
        assert Failure.model_validate_json(path.read_text()) == failure
    assert {p.name for p in (tmp_path / "failures").iterdir()} == {"s-a", "s-b"}
    lineage = collector.lineage("s-a")
    assert len(lineage) == sum(f.scenario_id == "s-a" for f in failures)
    assert [f.iteration for f in lineage] == sorted(f.iteration for f in lineage)
    assert lineage[-1].iteration == 3


def test_exception_input_is_the_scenario_prompt_when_scenarios_are_given(tmp_path: Path) -> None:
    from codreamer.agent.prompts import initial_messages
    from codreamer.config import REPO_DATA_DIR
    from codreamer.data import load_task_data

    task = load_task_data(REPO_DATA_DIR)
    scenario = task.train[0]
    pid = scenario.prospect.prospect_id
    prompt = [dict(m) for m in initial_messages(scenario.prospect, task.product)]
    t = art.Trajectory(
        messages_and_choices=[*prompt, finalize_choice("Hi", "short")],
        reward=0.1,
        metrics={f"rubric/{k}": v for k, v in GOOD_PARTS.items()},
        metadata={
            "trajectory_id": "t1",
            "scenario_id": scenario.scenario_id,
            "prospect_id": pid,
            "email_subject": "Hi",
            "email_body": "short",
        },
    )
    g = group(scenario.scenario_id, pid, [t], [RuntimeError("boom")])
    collector = FailureCollector(tmp_path, "run-x", product=task.product)
    added = collector.collect_groups([g], iteration=1, step=0, scenarios=task.train)
    crash = next(f for f in added if f.source == "exception")
    output = next(f for f in added if f.source == "output")
    assert crash.category == C.ROLLOUT_CRASH
    assert crash.input == prompt
    assert crash.input_hash == output.input_hash
    assert "RuntimeError: boom" in crash.output


def test_judge_error_is_one_failure_per_group_with_the_emails(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    g = group("s-b", "p002", [trajectory("t1", "s-b", "p002", reward=0.9), trajectory("t2", "s-b", "p002", reward=0.9)],
              judge_error="TimeoutError: judge exceeded its overall budget")  # fmt: skip
    added = collector.collect_groups([g], iteration=1, step=0)
    assert [f.source for f in added] == ["judge"]
    judge = added[0]
    assert judge.category == C.JUDGE_ERROR
    assert judge.error_message == "TimeoutError: judge exceeded its overall budget"
    assert [e["trajectory_id"] for e in judge.input] == ["t1", "t2"]
    assert judge.input[0]["email"].startswith("Subject: ")
    assert judge.agent_state == {"stage": "judge", "group_size": 2}


def test_add_failure_add_exception_and_training_errors(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    f = collector.add_failure(iteration=1, step=1, category="too_long", categories=[C.SPAMMY], source="output",
                              scenario_id="s-z", prospect_id="p009", output="Subject: x\n\nlong", reward=0.2)  # fmt: skip
    assert f.category == C.SPAMMY and f.categories == [C.SPAMMY, C.TOO_LONG]
    train = collector.add_exception(MemoryError("out of memory"), iteration=1, step=1, stage="train")
    assert train.category == C.TRAINING_ERROR and train.source == "exception"
    assert train.version_path(tmp_path).parent.name == "_train"
    # the same error again is the same failure; a separate attempt key keeps retries apart
    assert (
        collector.add_exception(MemoryError("out of memory"), iteration=1, step=1, stage="train").failure_id
        == train.failure_id
    )
    collector.add_exception(MemoryError("out of memory"), iteration=1, step=1, stage="train", key="train:attempt2")
    assert len(table(tmp_path)) == 3


def test_collect_no_replies_after_the_outcome_window(tmp_path: Path) -> None:
    from codreamer.events.models import OutcomeSummary

    collector = FailureCollector(tmp_path, "run-x")
    g = group("s-a", "p001", [trajectory(t, "s-a", "p001", reward=0.9) for t in ("t1", "t2", "t3")])
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    outcomes = {
        "t1": OutcomeSummary(
            trajectory_id="t1", opened=True, replied=True, event_count=2, first_timestamp=now, last_timestamp=now
        ),
        "t2": OutcomeSummary(trajectory_id="t2", opened=True, event_count=1, first_timestamp=now, last_timestamp=now),
    }
    early = collector.collect_no_replies(
        [g], outcomes, iteration=1, step=1, sent_at=sent, window_s=3600, now=sent + timedelta(minutes=5)
    )
    assert early == []
    added = collector.collect_no_replies(
        [g], outcomes, iteration=1, step=1, sent_at=sent, window_s=3600, now=sent + timedelta(hours=2)
    )
    assert sorted(f.trajectory_id for f in added) == ["t2", "t3"]
    assert all(f.category == C.NO_REPLY and f.source == "outcome" and f.output.startswith("Subject:") for f in added)
    assert added[0].error_message == "no reply within 3600s"
    again = collector.collect_no_replies([g], outcomes, iteration=1, step=1, sent_at=sent, window_s=3600, now=now)
    assert again == []


def test_unreadable_table_line_is_skipped_and_counted(tmp_path: Path) -> None:
    collector = FailureCollector(tmp_path, "run-x")
    collector.collect_groups(iteration_groups("run-x", 1), iteration=1, step=1)
    n = len(collector)
    with (tmp_path / FAILURES_FILE).open("a") as handle:
        handle.write('{"torn": \n')
    failures, skipped = load_failures(tmp_path)
    assert len(failures) == n and skipped == 1
    assert len(FailureCollector(tmp_path, "run-x")) == n


# --------------------------------------------------------------------------- analyzer


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "codreamer" / "models"
    make_run(root, "run-a", 1)
    make_run(root, "run-b", 2)
    make_run(root, "run-c", 3, b_fails=False)
    return root


def test_analyze_run_is_consistent_with_the_table(runs_root: Path) -> None:
    report = FailureAnalyzer(runs_root).analyze_run("run-a")
    rows = table(runs_root / "run-a")
    assert report.total_failures == len(rows)
    assert report.counts_by_category == Counter(C(r["category"]) for r in rows)
    assert report.by_source == Counter(r["source"] for r in rows)
    assert report.iterations == [1, 2, 3]
    for it, counts in report.by_iteration.items():
        assert counts == Counter(C(r["category"]) for r in rows if r["iteration"] == it)
    assert report.top_prospects[0].prospect_id == "p002"
    assert {(s.prospect_id, s.category, tuple(s.iterations)) for s in report.stuck} >= {
        ("p001", C.MISSING_PERSONALIZATION, (1, 2, 3)),
        ("p002", C.MALFORMED_EMAIL, (1, 2, 3)),
    }
    assert set(report.examples) == set(report.counts_by_category)
    assert all(1 <= len(e) <= 3 for e in report.examples.values())
    assert report.trajectories_seen == 15 and report.exceptions_seen == 3
    assert report.failed_trajectories == 12  # a0, b0, b1, b2 in each of 3 iterations
    assert report.llm_usage["llm/policy/calls"] == 15
    assert report.llm_usage["llm/prompt_tokens"] == 1500


def test_markdown_report_shows_the_table_categories(runs_root: Path) -> None:
    analyzer = FailureAnalyzer(runs_root)
    report = analyzer.analyze_run("run-a")
    markdown = analyzer.generate_improvement_report(report)
    rows = table(runs_root / "run-a")
    for category, n in Counter(r["category"] for r in rows).items():
        assert re.search(rf"^\| {category} \| {n} \|", markdown, re.M), category
        assert f"**{category}** ({n})" in markdown  # one recommendation per category
    assert f"failures recorded: **{len(rows)}**" in markdown
    assert NO_JUDGE_LINE in markdown
    assert "## LLM usage" in markdown and re.search(r"^\| policy \| 15 \| 0 \| 1500 \| 300 \|", markdown, re.M)
    assert "no price set" in markdown


def test_cross_run_patterns_over_three_runs(runs_root: Path) -> None:
    analyzer = FailureAnalyzer(runs_root)
    report = analyzer.analyze_cross_run_patterns(last_n_runs=10)
    assert report.run_ids == ["run-a", "run-b", "run-c"]
    assert report.failures_per_run == {r: len(table(runs_root / r)) for r in report.run_ids}
    all_rows = [row for r in report.run_ids for row in table(runs_root / r)]
    assert report.counts_by_category == Counter(C(r["category"]) for r in all_rows)
    prospects = {i.prospect_id: i for i in report.consistent_prospects}
    assert prospects["p001"].failed_runs == 3 and prospects["p001"].seen_runs == 3
    assert prospects["p002"].failed_runs == 2 and prospects["p002"].seen_runs == 3
    assert any(i.category == C.MISSING_PERSONALIZATION and i.failed_runs == 3 for i in report.consistent_categories)
    trend = {t.category: t for t in report.trends}
    assert trend[C.MISSING_PERSONALIZATION].direction == "rising"  # the only failure left in run-c
    assert set(report.llm_usage_per_run) == {"run-a", "run-b", "run-c"}

    assert analyzer.analyze_cross_run_patterns(last_n_runs=2).run_ids == ["run-b", "run-c"]
    markdown = generate_improvement_report(report)
    assert "last 3 run(s)" in markdown and all(r in markdown for r in report.run_ids)
    for category, n in report.counts_by_category.items():
        assert re.search(rf"^\| {category.value} \| {n} \|", markdown, re.M)
    assert NO_JUDGE_LINE in markdown


def test_chart_png_written(runs_root: Path, tmp_path: Path) -> None:
    from codreamer.analysis.charts import plot_categories_over_iterations

    analyzer = FailureAnalyzer(runs_root)
    run_png = plot_categories_over_iterations(analyzer.analyze_run("run-a"), tmp_path / "run.png")
    cross_png = plot_categories_over_iterations(analyzer.analyze_cross_run_patterns(3), tmp_path / "cross.png")
    for path in (run_png, cross_png):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cmd_analyze_writes_report_and_chart_and_exit_codes(
    runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_analyze(runs_root, "run-a", None, None) == 0
    out = capsys.readouterr().out
    assert "failure analysis of run run-a" in out
    assert (runs_root / "run-a" / REPORT_FILE).read_text().startswith("# Failure report: run `run-a`")
    assert (runs_root / "run-a" / CHART_FILE).read_bytes()[:4] == b"\x89PNG"

    assert cmd_analyze(runs_root, None, 3, None) == 0
    assert (runs_root / CROSS_RUN_DIR / REPORT_FILE).is_file() and (runs_root / CROSS_RUN_DIR / CHART_FILE).is_file()
    capsys.readouterr()

    assert cmd_analyze(runs_root, "no-such-run", None, None) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert cmd_analyze(runs_root, "..", None, None) == 2
    assert cmd_analyze(runs_root, "run-a", 3, None) == 2
    assert "not both" in capsys.readouterr().err
    assert cmd_analyze(runs_root, None, 0, None) == 2
    assert cmd_analyze(tmp_path / "empty", None, 3, None) == 2
    assert cmd_analyze(tmp_path / "empty", None, None, None) == 2
    # the cross-run folder is not a run
    assert [p.name for p in FailureAnalyzer(runs_root).run_dirs()] == ["run-a", "run-b", "run-c"]


# --------------------------------------------------------------------------- the judge


def judge_config(base_url: str, **overrides: Any) -> AnalyzerJudgeConfig:
    fields: dict[str, Any] = {
        "model": "judge",
        "base_url": base_url,
        "api_key": SECRET,
        "timeout_s": 5.0,
        "attempts": 2,
        "backoff_initial_s": 0.0,
        "backoff_max_s": 0.0,
    }
    return AnalyzerJudgeConfig(**(fields | overrides))


GOOD_ANSWER = json.dumps(
    {
        "findings": [
            {
                "category": "missing_personalization",
                "root_cause": "the policy skips lookup_company",
                "suggestion": "reward a lookup before finalize_email",
                "confidence": 0.8,
            }
        ]
    }
)


@pytest.mark.anyio
async def test_judge_good_answer_adds_findings_and_counts_usage(runs_root: Path) -> None:
    ledger = UsageLedger()
    async with LoopbackOpenAI([f"```json\n{GOOD_ANSWER}\n```"]) as server:
        analyzer = FailureAnalyzer(runs_root, judge=judge_config(server.base_url))
        with using_ledger(ledger):
            report = await analyzer.explain(analyzer.analyze_run("run-a"))
        request = server.requests[0]
    assert report.judge.status == "ok" and report.judge.model == "judge"
    finding = report.judge.findings[0]
    assert finding.category == C.MISSING_PERSONALIZATION and finding.confidence == 0.8
    assert "missing_personalization" in request["messages"][1]["content"]
    markdown = generate_improvement_report(report)
    assert (
        "| missing_personalization | the policy skips lookup_company | reward a lookup before finalize_email | 0.80 |"
        in markdown
    )
    assert NO_JUDGE_LINE not in markdown
    totals = ledger.totals()  # the caller's ledger got the explanation's usage
    assert totals["llm/analyzer/calls"] == 1 and totals["llm/analyzer/errors"] == 0
    assert totals["llm/analyzer/prompt_tokens"] > 0 and totals["llm/analyzer/completion_tokens"] > 0
    assert report.judge.usage == {k: v for k, v in totals.items() if k.startswith("llm/analyzer/")}
    assert f"Judge calls: 1 (0 failed), {int(totals['llm/analyzer/prompt_tokens'])} prompt" in markdown


@pytest.mark.anyio
async def test_judge_malformed_answer_is_asked_once_more(runs_root: Path) -> None:
    async with LoopbackOpenAI(["not json at all", '{"findings": []}']) as server:
        analyzer = FailureAnalyzer(runs_root, judge=judge_config(server.base_url))
        report = await analyzer.explain(analyzer.analyze_run("run-a"))
        served = len(server.requests)
    assert served == 2
    assert report.judge.status == "unavailable" and report.judge.findings == []
    assert "schema" in (report.judge.reason or "")
    markdown = generate_improvement_report(report)
    assert "judge unavailable: answer does not match the schema" in markdown
    assert "rule-based only" in markdown

    async with LoopbackOpenAI(['{"findings": [{"category": "not_a_category"}]}', GOOD_ANSWER]) as server:
        analyzer = FailureAnalyzer(runs_root, judge=judge_config(server.base_url))
        report = await analyzer.explain(analyzer.analyze_cross_run_patterns(3))
    assert report.judge.status == "ok" and len(report.judge.findings) == 1


@pytest.mark.anyio
async def test_judge_server_error_is_unavailable_without_the_secret(runs_root: Path) -> None:
    script = [HTTPError(500, f"upstream failed for key {SECRET}"), HTTPError(500, f"upstream failed for key {SECRET}")]
    async with LoopbackOpenAI(script) as server:
        analyzer = FailureAnalyzer(runs_root, judge=judge_config(server.base_url))
        report = await analyzer.explain(analyzer.analyze_run("run-a"))
        served = len(server.requests)
    assert served == 2  # retried once (attempts=2), then given up
    assert report.judge.status == "unavailable"
    assert report.judge.usage["llm/analyzer/calls"] == 2 and report.judge.usage["llm/analyzer/errors"] == 2
    reason = report.judge.reason or ""
    assert reason.startswith("InternalServerError (after 2 attempts)")
    assert SECRET not in reason and SECRET not in report.model_dump_json()
    assert SECRET not in generate_improvement_report(report)


@pytest.mark.anyio
async def test_judge_unreachable_is_unavailable_with_reason(runs_root: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    analyzer = FailureAnalyzer(runs_root, judge=judge_config(f"http://127.0.0.1:{port}/v1", timeout_s=2.0))
    report = await analyzer.explain(analyzer.analyze_run("run-a"))
    assert report.judge.status == "unavailable"
    assert (report.judge.reason or "").startswith("APIConnectionError")


def test_without_judge_the_report_says_rule_based_only(runs_root: Path) -> None:
    import asyncio

    analyzer = FailureAnalyzer(runs_root)
    report = asyncio.run(analyzer.explain(analyzer.analyze_run("run-a")))
    assert report.judge.status == "not_configured"
    assert NO_JUDGE_LINE in generate_improvement_report(report)


def test_parse_judge_answer_is_strict() -> None:
    assert parse_judge_answer(GOOD_ANSWER).findings[0].confidence == 0.8
    for bad in ("", "[]", '{"findings": [{"category": "too_long", "root_cause": "x", "suggestion": "y", "confidence": 2}]}',
                '{"findings": [], "extra": 1}'):  # fmt: skip
        with pytest.raises(ValueError, match=r"answer|empty"):
            parse_judge_answer(bad)


# --------------------------------------------------------------------------- W&B (offline)


def test_log_to_wandb_offline_logs_table_and_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # wandb.init also inits Weave when weave is imported (it is, by codreamer), and Weave then
    # asks for an API key on the terminal even in offline mode
    monkeypatch.setenv("WANDB_DISABLE_WEAVE", "true")
    (tmp_path / "wandb-dir").mkdir()
    run_dir = tmp_path / "run"
    collector = FailureCollector(run_dir, "run-w")
    collector.collect_groups(iteration_groups("run-w", 1), iteration=1, step=1)
    assert collector.log_to_wandb() is False  # no active run: nothing to log to

    run = wandb.init(project="codreamer-test", mode="offline", dir=str(tmp_path / "wandb-dir"))
    try:
        assert collector.log_to_wandb(run) is True
    finally:
        run.finish()
        wandb.teardown()  # offline, finish() can return before wandb-core has written the run file
    offline = [p for p in (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*") if p.is_dir()]
    assert len(offline) == 1
    tables = list((offline[0] / "files" / "media" / "table" / "failures").glob("table_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert len(logged["data"]) == len(collector) and "category" in logged["columns"]
    records = next(offline[0].glob("run-*.wandb")).read_bytes()
    assert b"failures-run-w" in records


# --------------------------------------------------------------------------- the real stages


@pytest.mark.anyio
async def test_real_stages_with_injected_crash_and_judge_error(tmp_path: Path) -> None:
    """generate_trajectories + RewardScorer (with a judge) against a loopback server: one
    rollout crashes (429), the judge refuses (401); every failure lands once, usage counted."""
    from codreamer.agent.rollout import RolloutConfig
    from codreamer.config import REPO_DATA_DIR
    from codreamer.data import load_task_data
    from codreamer.pipeline.stages import RolloutPlan, generate_trajectories
    from codreamer.rewards.blend import RewardMixConfig
    from codreamer.rewards.ruler import JudgeConfig
    from codreamer.rewards.scoring import RewardScorer

    task = load_task_data(REPO_DATA_DIR)
    scenario = task.train[0]
    final = {"subject": "Quick idea", "body": "Hi. Short note. Sam"}
    script = [
        [Call("finalize_email", final)],
        HTTPError(429, "slow down", retryable=False),
        HTTPError(401, f"Incorrect API key provided: {SECRET}", retryable=False),
    ]
    ledger = UsageLedger()
    async with LoopbackOpenAI(script) as server:
        model = art.Model(
            name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
        )
        plan = RolloutPlan(
            task.product,
            RolloutConfig(max_turns=1, max_tokens=16, request_timeout_s=10, inference_attempts=1, retry_initial_s=0),
            2,
            1,
            1,
            0,
        )
        judge = JudgeConfig(model="openai/judge", base_url=server.base_url, api_key=SECRET, timeout_s=5, attempts=1)
        scorer = RewardScorer(task.product, RewardMixConfig(), judge=judge)
        with using_ledger(ledger):
            groups = await generate_trajectories(model, [scenario], plan, step=0)
            summary = await scorer.score(groups, [scenario], step=0, emails_sent=False)
    assert summary.judge_errors == 1
    assert len(groups[0].trajectories) == 1 and len(groups[0].exceptions) == 1

    collector = FailureCollector(tmp_path, "run-real", product=task.product)
    added = collector.collect_groups(groups, iteration=1, step=0, scenarios=[scenario])
    assert collector.collect_groups(groups, iteration=1, step=0, scenarios=[scenario]) == []
    by_source = {f.source: f for f in added}
    assert set(by_source) == {"exception", "output", "judge"}
    assert by_source["exception"].category == C.RATE_LIMIT
    assert by_source["exception"].agent_state["exception_type"] == "openai.RateLimitError"
    assert by_source["exception"].input_hash == by_source["output"].input_hash
    assert by_source["output"].output == f"Subject: {final['subject']}\n\n{final['body']}"
    assert by_source["judge"].category == C.JUDGE_ERROR and "AuthenticationError" in (
        by_source["judge"].error_message or ""
    )
    assert SECRET not in (tmp_path / FAILURES_FILE).read_text()

    totals = ledger.totals()
    assert totals["llm/policy/calls"] == 2 and totals["llm/policy/errors"] == 1
    assert totals["llm/policy/completion_tokens"] > 0
    assert totals["llm/judge/calls"] == 1 and totals["llm/judge/errors"] == 1


@pytest.mark.anyio
async def test_a_rollout_that_crashes_mid_episode_keeps_its_conversation_so_far(tmp_path: Path) -> None:
    """The exception of a failed rollout carries the turns before the crash (an exception
    note that ART's traceback text keeps); the failure's input is the prompt plus those turns."""
    from codreamer.agent.rollout import RolloutConfig
    from codreamer.config import REPO_DATA_DIR
    from codreamer.data import load_task_data
    from codreamer.pipeline.stages import RolloutPlan, generate_trajectories

    task = load_task_data(REPO_DATA_DIR)
    scenario = task.train[0]
    script = [[Call("lookup_company", {})], HTTPError(400, "context too long", retryable=False)]
    async with LoopbackOpenAI(script) as server:
        model = art.Model(
            name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
        )
        config = RolloutConfig(max_turns=3, request_timeout_s=10, inference_attempts=1, inference_client="direct")
        groups = await generate_trajectories(model, [scenario], RolloutPlan(task.product, config, 1, 1, 1, 0), step=0)
    assert len(groups[0].exceptions) == 1

    collector = FailureCollector(tmp_path, "run-partial", product=task.product)
    [crash] = collector.collect_groups(groups, iteration=1, step=0, scenarios=[scenario])
    prompt_length = 2  # system + user
    assert crash.error_message.startswith("openai.BadRequestError: Error code: 400 - context too long")
    assistant, tool = crash.input[prompt_length:]
    assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["function"]["name"] == "lookup_company"
    assert tool["role"] == "tool" and scenario.prospect.company.name in tool["content"]
    assert crash.input_hash == sha256_text(
        json.dumps(crash.input[:prompt_length], sort_keys=True, separators=(",", ":"))
    )

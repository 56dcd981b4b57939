"""What the failure analysis counts and says: finished iterations only (and the runs left out),
the judge prices of `codreamer analyze`, tool-use and auto-finalisation rates in both reports,
and the light commands (`analyze`, `runs`, `show`, `trace`) importing nothing heavy.

Runs are written as files (run.json, iterations.jsonl, failures.jsonl) without art, so this
module stays fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from codreamer.analysis.analyzer import FailureAnalyzer
from codreamer.analysis.behaviour import behaviour_lines, behaviour_summary
from codreamer.analysis.failures import FAILURES_FILE, Failure, failure_id
from codreamer.analysis.markdown import generate_improvement_report
from codreamer.config import Settings
from codreamer.pipeline.history import append_record
from codreamer.runs import ITERATIONS_FILE, RUN_FILE
from codreamer.storage import append_jsonl, write_json_atomic

REPO = Path(__file__).resolve().parent.parent


def _failure(run_id: str, iteration: int, n: int, category: str) -> dict[str, Any]:
    return Failure(
        failure_id=failure_id(run_id, iteration, f"t{n}", "output"),
        run_id=run_id,
        iteration=iteration,
        step=iteration,
        scenario_id=f"outreach-p00{n}",
        prospect_id=f"p00{n}",
        trajectory_id=f"t{n}",
        input_hash="i",
        output_hash="o",
        category=category,  # type: ignore[arg-type]
        categories=[category],  # type: ignore[list-item]
        source="output",
    ).model_dump(mode="json")


def make_run(
    root: Path, run_id: str, day: int, *, finished: int, failing: int, status: str = "finished", **rates: float
) -> Path:
    """A run that finished `finished` iterations and has failures of iterations 1..`failing`."""
    directory = root / run_id
    meta = {"run_id": run_id, "status": status, "created_at": f"2026-01-{day:02d}T00:00:00+00:00"}
    write_json_atomic(directory / RUN_FILE, meta)
    for it in range(1, finished + 1):
        record = {"run_id": run_id, "iteration": it, "step": it, "scenarios": ["outreach-p001", "outreach-p002"]}
        record |= {
            "train/trajectories": 8.0,
            "train/exceptions": 0.0,
            "train/reward_mean": 0.5,
            "train/reward_std": 0.1,
        }
        record |= {f"train/behaviour/{k}": v for k, v in rates.items()}
        record |= {f"eval/behaviour/{k}": v for k, v in rates.items()}
        append_record(directory / ITERATIONS_FILE, record)
    rows = [_failure(run_id, it, n, "missing_personalization") for it in range(1, failing + 1) for n in (1, 2)]
    rows += [_failure(run_id, it, 3, "too_long") for it in range(1, failing + 1)]
    if rows:
        append_jsonl(directory / FAILURES_FILE, rows)
    else:
        (directory / FAILURES_FILE).touch()
    return directory


def test_cross_run_counts_finished_iterations_only_and_names_what_it_left_out(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_run(root, "run-a", 1, finished=2, failing=2)
    make_run(root, "run-b", 2, finished=2, failing=3, status="running")  # iteration 3 in progress
    make_run(root, "run-c", 3, finished=0, failing=0, status="running")  # just started
    make_run(root, "run-d", 4, finished=0, failing=1, status="failed")  # died in its first iteration
    report = FailureAnalyzer(root).analyze_cross_run_patterns(last_n_runs=2)
    assert report.run_ids == ["run-a", "run-b"]  # the last 2 runs with a finished iteration
    assert report.failures_per_run == {"run-a": 6, "run-b": 6}  # run-b's iteration 3 is not counted
    assert set(report.left_out) == {"run-b", "run-c", "run-d"}
    assert "no finished iteration (running)" in report.left_out["run-c"]
    assert "no finished iteration (failed)" in report.left_out["run-d"]
    assert "3 failure(s) of unfinished iterations" in report.left_out["run-b"]
    assert all(t.direction == "flat" for t in report.trends)  # no empty run reads as "falling"
    markdown = generate_improvement_report(report)
    assert "Only finished iterations are counted" in markdown and "- run-c: no finished iteration" in markdown


def test_failure_and_run_reports_show_tool_use_and_flag_always_auto_finalised(tmp_path: Path) -> None:
    from codreamer.reports import load_run, render_markdown

    root = tmp_path / "models"
    make_run(root, "stuck", 1, finished=2, failing=2, looked_up=0.0, auto_finalized=1.0, tool_calls=0.0)
    make_run(root, "fine", 2, finished=1, failing=1, looked_up=0.75, auto_finalized=0.25, tool_calls=2.5)
    analyzer = FailureAnalyzer(root)
    stuck = generate_improvement_report(analyzer.analyze_run("stuck"))
    assert "tool use (looked up) 0%" in stuck and "auto-finalised 100%" in stuck
    assert "WARNING: auto-finalisation rate 1.0" in stuck
    fine = generate_improvement_report(analyzer.analyze_run("fine"))
    assert "tool use (looked up) 75%, 2.50 tool calls per episode; auto-finalised 25%" in fine
    assert "WARNING" not in fine
    run_md = render_markdown(load_run(root / "stuck"))
    assert "auto-finalised 100%" in run_md and "WARNING: auto-finalisation rate 1.0" in run_md
    assert behaviour_lines(behaviour_summary([])) == []
    # older records without behaviour rates: the rollout-health rate still counts
    assert behaviour_summary([{"train/auto_finalized_rate": 1.0}]) == {"train/auto_finalized": 1.0}


def test_analyze_passes_the_judge_prices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import codreamer.analysis.commands as commands
    from codreamer.cli.verbs import Analyze

    seen: dict[str, Any] = {}
    monkeypatch.setattr(commands, "cmd_analyze", lambda *args, **kwargs: seen.update(kwargs) or 0)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, runs_dir=tmp_path, judge_price_usd_per_mtok_in=2.0, judge_price_usd_per_mtok_out=8.0
    )
    assert Analyze().run(settings) == 0
    prices = seen["prices"]
    assert prices.analyzer.prompt_usd_per_mtok == 2.0 and prices.analyzer.completion_usd_per_mtok == 8.0


LIGHT = """
import json, sys
from codreamer.cli import codreamer_main
sys.argv = ["codreamer", "--runs-dir", sys.argv[1], *sys.argv[2:]]
try:
    codreamer_main()
except SystemExit:
    pass
heavy = ("art", "torch", "weave", "wandb", "transformers", "openai", "litellm", "aiohttp", "peft")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


@pytest.mark.parametrize("verb", [["runs"], ["show", "run-a"], ["trace", "run-a"], ["analyze", "run-a"]])
def test_light_commands_import_nothing_heavy(tmp_path: Path, verb: list[str]) -> None:
    root = tmp_path / "runs"
    make_run(root / "codreamer" / "models", "run-a", 1, finished=1, failing=1)
    done = subprocess.run(
        [sys.executable, "-c", LIGHT, str(root), *verb], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run-a" in done.stdout or "no trace recorded" in done.stdout, done.stdout  # the command ran
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout

"""`codreamer analyze`: write a run's (or the last runs') failure report and chart."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from codreamer.analysis.analyzer import FailureAnalyzer
from codreamer.analysis.charts import plot_categories_over_iterations
from codreamer.analysis.judge import AnalyzerJudgeConfig
from codreamer.analysis.report import CrossRunReport, RunFailureReport
from codreamer.paths import UnsafePathError
from codreamer.usage import LLMPrices

__all__ = ["CHART_FILE", "CROSS_RUN_DIR", "REPORT_FILE", "cmd_analyze"]

REPORT_FILE = "failure_report.md"
CHART_FILE = "failure_categories.png"
CROSS_RUN_DIR = "_cross_run"


def cmd_analyze(
    runs_root: Path,
    run_id: str | None,
    last: int | None,
    judge: AnalyzerJudgeConfig | None,
    *,
    prices: LLMPrices | None = None,
) -> int:
    """Analyse one run (`run_id`; default: the most recent) or the `last` N runs.

    Writes `failure_report.md` and `failure_categories.png` into the run directory (for
    `last`: into `runs_root/_cross_run/`) and prints where. Returns 0, or 2 with a message on
    stderr for an unknown run, no runs, or both `run_id` and `last` given.
    """
    runs_root = Path(runs_root)
    if run_id is not None and last is not None:
        print("analyze: give either a run id or --last N, not both", file=sys.stderr)
        return 2
    if last is not None and last < 1:
        print("analyze: --last must be at least 1", file=sys.stderr)
        return 2
    analyzer = FailureAnalyzer(runs_root, judge=judge, prices=prices)
    report: RunFailureReport | CrossRunReport
    if last is not None:
        if not analyzer.run_dirs():
            print(f"analyze: no runs under {runs_root}", file=sys.stderr)
            return 2
        report = analyzer.analyze_cross_run_patterns(last)
        if judge is not None:
            report = asyncio.run(analyzer.explain(report))
        out_dir = runs_root / CROSS_RUN_DIR
    else:
        if run_id is None:
            dirs = analyzer.run_dirs()
            if not dirs:
                print(f"analyze: no runs under {runs_root}", file=sys.stderr)
                return 2
            run_id = dirs[-1].name
        try:
            out_dir = analyzer.run_dir(run_id)
        except (FileNotFoundError, UnsafePathError) as exc:
            print(f"analyze: {exc}", file=sys.stderr)
            return 2
        report = analyzer.analyze_run(run_id)
        if judge is not None:
            report = asyncio.run(analyzer.explain(report))
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    report_path.write_text(analyzer.generate_improvement_report(report), encoding="utf-8")
    chart_path = plot_categories_over_iterations(report, out_dir / CHART_FILE)
    what = f"run {run_id}" if isinstance(report, RunFailureReport) else f"last {len(report.run_ids)} run(s)"
    failures = report.total_failures
    print(f"failure analysis of {what}: {failures} failure(s)")
    print(f"report: {report_path}")
    print(f"chart:  {chart_path}")
    if report.judge.status == "unavailable":
        print(f"judge unavailable: {report.judge.reason}")
    if report.judge.usage:
        usage = report.judge.usage
        cost = usage.get("llm/analyzer/cost_usd")
        print(
            f"judge calls: {usage.get('llm/analyzer/calls', 0):.0f}, tokens: "
            f"{usage.get('llm/analyzer/prompt_tokens', 0):.0f} + {usage.get('llm/analyzer/completion_tokens', 0):.0f}"
            + (f", cost ${cost:.4f}" if cost is not None else "")
        )
    return 0

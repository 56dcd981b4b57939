"""The failure analyzer: what fails, where, how persistently, and what to change.

`FailureAnalyzer(runs_root)` reads the runs under `runs_root` (= `runs/<project>/models`)
and hands what they recorded to the rules, the judge and the Markdown:

- `analyze_run(run_id)` -> `RunFailureReport`: counts by primary category, by iteration x
  category, the most failing prospects, stuck-at patterns (one prospect failing with the same
  category in >= 3 consecutive attempts), a few examples per category, and the number of
  trajectories seen and the run's cumulative LLM usage (both from `iterations.jsonl`);
  see `codreamer.analysis.rules`;
- `analyze_cross_run_patterns(last_n_runs)` -> `CrossRunReport`: prospects and categories
  that fail in >= 2/3 of the runs they appear in, and each category's share across runs in
  chronological order;
- `generate_improvement_report(report)` -> Markdown (`codreamer.analysis.markdown`);
- `await explain(report)` (only with an `AnalyzerJudgeConfig`) asks an LLM judge for root
  causes and fixes (`codreamer.analysis.judge`); a judge failure ends as "judge unavailable:
  <reason>" in the report, never as an exception.

Runs are found by `codreamer.runs.find_runs`, oldest first, the one order every listing uses.
The analysis reads only files; the judge's API key is never logged or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codreamer.analysis.failures import Failure, load_failures
from codreamer.analysis.judge import AnalyzerJudgeConfig, explain, parse_judge_answer
from codreamer.analysis.markdown import NO_JUDGE_LINE, generate_improvement_report
from codreamer.analysis.report import CrossRunReport, Report, RunFailureReport
from codreamer.analysis.rules import cross_run_report, llm_usage, recommendation, run_report, scheduled_scenarios
from codreamer.pipeline.history import read_history
from codreamer.runs import ITERATIONS_FILE, find_run_in, find_runs, read_run_file
from codreamer.usage import LLMPrices

__all__ = [
    "NO_JUDGE_LINE",
    "AnalyzerJudgeConfig",
    "CrossRunReport",
    "FailureAnalyzer",
    "RunFailureReport",
    "generate_improvement_report",
    "parse_judge_answer",
    "recommendation",
]


def _status(run_dir: Path) -> str:
    """The run's status as run.json says (`running`, `finished`, ...), or `no run.json`."""
    try:
        return str(read_run_file(run_dir).get("status") or "status unknown")
    except Exception:  # noqa: BLE001 - a missing or unreadable run.json is only named
        return "no readable run.json"


def _history(run_dir: Path) -> list[dict[str, Any]]:
    records, _ = read_history(run_dir / ITERATIONS_FILE)
    return records


class FailureAnalyzer:
    """Reads failures of the runs under `runs_root` (= `runs/<project>/models`)."""

    def __init__(
        self, runs_root: Path, judge: AnalyzerJudgeConfig | None = None, *, prices: LLMPrices | None = None
    ) -> None:
        self.runs_root = Path(runs_root)
        self.judge = judge
        self.prices = prices

    def run_dirs(self) -> list[Path]:
        """Run directories (run.json or failures.jsonl), oldest first (`codreamer.runs.find_runs`)."""
        return find_runs(self.runs_root)

    def run_dir(self, run_id: str) -> Path:
        """The run's directory; UnsafePathError for a hostile id, FileNotFoundError for no such run."""
        return find_run_in(self.runs_root, run_id)

    def analyze_run(self, run_id: str) -> RunFailureReport:
        directory = self.run_dir(run_id)
        failures, skipped = load_failures(directory)
        return run_report(run_id, failures, _history(directory), skipped_lines=skipped)

    def analyze_cross_run_patterns(self, last_n_runs: int = 10) -> CrossRunReport:
        """Patterns across the last `last_n_runs` runs that finished at least one iteration.

        Only finished iterations count (those with a record in `iterations.jsonl`, and the base
        evaluation before them): a run still running contributes what it has committed, a run
        without a finished iteration is left out (a 0-iteration run would read as every
        category "falling"); the report names what it left out and why.
        """
        loaded: dict[str, list[Failure]] = {}
        scheduled: dict[str, set[str]] = {}
        usage: dict[str, dict[str, float]] = {}
        left_out: dict[str, str] = {}
        for d in reversed(self.run_dirs()) if last_n_runs > 0 else ():
            if len(loaded) >= last_n_runs:
                break
            records = _history(d)
            finished = max((int(r["iteration"]) for r in records if isinstance(r.get("iteration"), int)), default=None)
            if finished is None:
                left_out[d.name] = f"no finished iteration ({_status(d)})"
                continue
            failures, _ = load_failures(d)
            kept = [f for f in failures if f.iteration <= finished]
            if len(kept) < len(failures):
                left_out[d.name] = (
                    f"{len(failures) - len(kept)} failure(s) of unfinished iterations left out "
                    f"({_status(d)}, {len(records)} finished iteration(s) used)"
                )
            loaded[d.name] = kept
            if found := llm_usage(records):
                usage[d.name] = found
            per_iteration = scheduled_scenarios(records)
            scheduled[d.name] = set().union(*per_iteration.values()) if per_iteration else set()
        ordered = dict(reversed(loaded.items()))  # oldest first
        report = cross_run_report(ordered, scheduled, dict(reversed(usage.items())))
        report.left_out = dict(reversed(left_out.items()))
        return report

    def generate_improvement_report(self, report: RunFailureReport | CrossRunReport) -> str:
        """Markdown for `report` (see `codreamer.analysis.markdown.generate_improvement_report`)."""
        return generate_improvement_report(report)

    async def explain(self, report: Report) -> Report:
        """A copy of `report` with `judge` filled in (see `codreamer.analysis.judge.explain`)."""
        return await explain(report, self.judge, self.prices)

"""The failure analyzer: what fails, where, how persistently, and what to change.

`FailureAnalyzer(runs_root)` reads the runs under `runs_root` (= `runs/<project>/models`):

- `analyze_run(run_id)` -> `RunFailureReport`: counts by primary category, by iteration x
  category, the most failing prospects, stuck-at patterns (one prospect failing with the same
  category in >= 3 consecutive attempts), a few examples per category, and the number of
  trajectories seen and the run's cumulative LLM usage (both from `iterations.jsonl`);
- `analyze_cross_run_patterns(last_n_runs)` -> `CrossRunReport`: prospects and categories
  that fail in >= 2/3 of the runs they appear in, and each category's share across runs in
  chronological order;
- `generate_improvement_report(report)` -> Markdown, with rule-based recommendations;
- `await explain(report)` (only with an `AnalyzerJudgeConfig`) asks an OpenAI-compatible chat
  model for root causes and fixes, validated against a strict schema; any failure of the
  judge ends as "judge unavailable: <reason>" in the report, never as an exception.

The analysis reads only files; the judge's API key is never logged or written.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from codreamer.config import Settings
from codreamer.analysis.categories import PRIORITY, FailureCategory, sort_categories
from codreamer.analysis.collector import FAILURES_FILE, Failure, load_failures
from codreamer.paths import check_name, is_inside, is_safe_name
from codreamer.pipeline.history import read_history
from codreamer.runs import ITERATIONS_FILE, RUN_FILE
from codreamer.usage import KINDS, LLMPrices, UsageLedger, current_ledger, timed_llm_call, using_ledger

__all__ = [
    "AnalyzerJudgeConfig",
    "CategoryStats",
    "CategoryTrend",
    "CrossRunItem",
    "CrossRunReport",
    "FailureAnalyzer",
    "FailureExample",
    "JudgeAnalysis",
    "JudgeFinding",
    "JudgeResponse",
    "ProspectFailures",
    "RunFailureReport",
    "StuckPattern",
    "generate_improvement_report",
    "recommendation",
]

STUCK_MIN_ATTEMPTS = 3
CONSISTENT_SHARE = 2 / 3
EXAMPLES_PER_CATEGORY = 3
EXCERPT_CHARS = 240
TOP_PROSPECTS = 10
NO_JUDGE_LINE = "rule-based analysis only (no LLM judge configured)"


# --------------------------------------------------------------------------- report models


class FailureExample(BaseModel):
    failure_id: str
    iteration: int
    prospect_id: str | None
    scenario_id: str | None
    reward: float | None
    source: str
    excerpt: str


class ProspectFailures(BaseModel):
    prospect_id: str
    failures: int
    top_category: FailureCategory
    iterations: list[int]


class StuckPattern(BaseModel):
    """A prospect failing with the same category in `length` consecutive attempts."""

    prospect_id: str
    category: FailureCategory
    iterations: list[int]

    @property
    def length(self) -> int:
        return len(self.iterations)


class CategoryStats(BaseModel):
    """Agent behaviour behind one (primary) category, for the recommendations."""

    count: int
    mean_reward: float | None = None
    mean_turns: float | None = None
    no_company_lookup_share: float | None = None
    no_tool_call_share: float | None = None
    auto_finalized_share: float | None = None
    invalid_tool_call_share: float | None = None
    truncated_share: float | None = None


class JudgeFinding(BaseModel):
    """One root cause the judge names; the strict schema its answer must follow."""

    model_config = ConfigDict(extra="forbid")

    category: FailureCategory
    root_cause: str = Field(min_length=1)
    suggestion: str = Field(min_length=1)
    confidence: float = Field(ge=0.0, le=1.0)


class JudgeResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    findings: list[JudgeFinding] = Field(min_length=1)


class JudgeAnalysis(BaseModel):
    status: Literal["ok", "unavailable", "not_configured"] = "not_configured"
    model: str | None = None
    reason: str | None = None
    findings: list[JudgeFinding] = Field(default_factory=list)
    usage: dict[str, float] = Field(default_factory=dict, description="`llm/analyzer/*` figures of this explanation.")


class RunFailureReport(BaseModel):
    run_id: str
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    total_failures: int = 0
    skipped_lines: int = 0
    by_source: dict[str, int] = Field(default_factory=dict)
    counts_by_category: dict[FailureCategory, int] = Field(default_factory=dict, description="Primary categories.")
    any_category_counts: dict[FailureCategory, int] = Field(default_factory=dict, description="Every category a failure has.")
    by_iteration: dict[int, dict[FailureCategory, int]] = Field(default_factory=dict)
    iterations: list[int] = Field(default_factory=list)
    top_prospects: list[ProspectFailures] = Field(default_factory=list)
    stuck: list[StuckPattern] = Field(default_factory=list)
    examples: dict[FailureCategory, list[FailureExample]] = Field(default_factory=dict)
    category_stats: dict[FailureCategory, CategoryStats] = Field(default_factory=dict)
    trajectories_seen: int | None = None
    exceptions_seen: int | None = None
    failed_trajectories: int = 0
    llm_usage: dict[str, float] = Field(
        default_factory=dict, description="Cumulative `llm/*` figures of the last iterations.jsonl record."
    )
    judge: JudgeAnalysis = Field(default_factory=JudgeAnalysis)

    @property
    def failure_rate(self) -> float | None:
        """Share of the training trajectories seen that failed (None without iterations.jsonl)."""
        if not self.trajectories_seen:
            return None
        return self.failed_trajectories / self.trajectories_seen


class CrossRunItem(BaseModel):
    """A prospect, category or (prospect, category) pair and how consistently it fails."""

    prospect_id: str | None = None
    category: FailureCategory | None = None
    failed_runs: int
    seen_runs: int
    runs: list[str] = Field(default_factory=list)

    @property
    def share(self) -> float:
        return self.failed_runs / self.seen_runs if self.seen_runs else 0.0


class CategoryTrend(BaseModel):
    category: FailureCategory
    shares: list[float]
    change: float
    direction: Literal["rising", "falling", "flat"]


class CrossRunReport(BaseModel):
    run_ids: list[str] = Field(default_factory=list, description="Chronological (oldest first).")
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    failures_per_run: dict[str, int] = Field(default_factory=dict)
    counts_by_category: dict[FailureCategory, int] = Field(default_factory=dict, description="Primary, all runs.")
    category_counts_per_run: dict[str, dict[FailureCategory, int]] = Field(default_factory=dict)
    category_shares: dict[str, dict[FailureCategory, float]] = Field(default_factory=dict)
    consistent_prospects: list[CrossRunItem] = Field(default_factory=list)
    consistent_categories: list[CrossRunItem] = Field(default_factory=list)
    consistent_pairs: list[CrossRunItem] = Field(default_factory=list)
    trends: list[CategoryTrend] = Field(default_factory=list)
    llm_usage_per_run: dict[str, dict[str, float]] = Field(default_factory=dict, description="Runs that recorded usage.")
    judge: JudgeAnalysis = Field(default_factory=JudgeAnalysis)

    @property
    def total_failures(self) -> int:
        return sum(self.failures_per_run.values())


Report = TypeVar("Report", RunFailureReport, CrossRunReport)


# --------------------------------------------------------------------------- judge config


class AnalyzerJudgeConfig(BaseModel):
    """An OpenAI-compatible chat model that explains a report (model name sent verbatim)."""

    model_config = ConfigDict(frozen=True)

    model: str
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    attempts: int = Field(default=3, ge=1, description="Tries in all on transient errors (timeouts, 429, 5xx).")
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=20.0, ge=0)
    max_tokens: int = Field(default=1200, ge=64)

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalyzerJudgeConfig | None:
        """The RULER judge's model, spoken to with the OpenAI client; None without a judge.

        litellm model names carry a provider prefix (`openai/gpt-4o-mini`); the OpenAI client
        wants the bare name, so an `openai/` prefix is dropped.
        """
        if settings.judge_model is None:
            return None
        return cls(
            model=settings.judge_model.removeprefix("openai/"),
            base_url=settings.judge_base_url,
            api_key=settings.judge_api_key,
            timeout_s=settings.judge_timeout_s,
            attempts=settings.judge_attempts,
        )


# --------------------------------------------------------------------------- helpers


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _ordered_counts(counter: Mapping[FailureCategory, int]) -> dict[FailureCategory, int]:
    """Most frequent first; ties in priority order."""
    rank = {c: i for i, c in enumerate(PRIORITY)}
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], rank[kv[0]])))


def _category_stats(failures: Sequence[Failure]) -> CategoryStats:
    states = [f.agent_state for f in failures if f.source != "exception"]

    def num(key: str) -> list[float]:
        return [float(s[key]) for s in states if isinstance(s.get(key), int | float)]

    return CategoryStats(
        count=len(failures),
        mean_reward=_mean([f.reward for f in failures if f.reward is not None]),
        mean_turns=_mean(num("turns")),
        no_company_lookup_share=_share([v == 0 for v in num("company_lookups")]),
        no_tool_call_share=_share([v == 0 for v in num("tool_calls")]),
        auto_finalized_share=_share([bool(s["auto_finalized"]) for s in states if "auto_finalized" in s]),
        invalid_tool_call_share=_share([v > 0 for v in num("invalid_tool_calls")]),
        truncated_share=_share([s.get("finish_reason") == "length" for s in states if "finish_reason" in s]),
    )


def _llm_usage(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The `llm/*` figures of the last record that has them (they are cumulative per run)."""
    for record in reversed(records):
        usage = {
            k: float(v)
            for k, v in record.items()
            if k.startswith("llm/") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if usage:
            return usage
    return {}


def _runs_in(run_dir: Path) -> tuple[list[dict[str, Any]], dict[int, set[str]]]:
    """iterations.jsonl records and the scenarios each iteration trained on."""
    records, _ = read_history(run_dir / ITERATIONS_FILE)
    scheduled: dict[int, set[str]] = defaultdict(set)
    for record in records:
        if isinstance(record.get("iteration"), int):
            scheduled[record["iteration"]].update(str(s) for s in record.get("scenarios") or [])
    return records, scheduled


def _stuck_runs(prospect: str, attempts: list[int], failing: Mapping[FailureCategory, set[int]]) -> list[StuckPattern]:
    """Maximal runs of >= STUCK_MIN_ATTEMPTS consecutive attempts failing with one category."""
    patterns = []
    for category, its in failing.items():
        run: list[int] = []
        for it in attempts + [None]:  # sentinel flushes the last run
            if it is not None and it in its:
                run.append(it)
                continue
            if len(run) >= STUCK_MIN_ATTEMPTS:
                patterns.append(StuckPattern(prospect_id=prospect, category=category, iterations=run))
            run = []
    return patterns


def recommendation(category: FailureCategory, stats: CategoryStats | None = None) -> str:
    """A rule-based fix for one category, citing the agent's behaviour where it was recorded."""
    s = stats or CategoryStats(count=0)

    def pct(value: float | None) -> str:
        return f"{value:.0%}" if value is not None else "n/a"

    C = FailureCategory
    match category:
        case C.RATE_LIMIT:
            return ("the inference/judge endpoint throttles: lower `--rollout-concurrency`, add backoff "
                    "(retry-after), or raise the provider quota.")  # fmt: skip
        case C.TIMEOUT:
            return ("calls time out: raise `--request-timeout-s` (or `--judge-timeout-s`), lower "
                    "`--rollout-concurrency`, or shorten prompts/`--max-tokens` so calls finish sooner.")  # fmt: skip
        case C.CONNECTION:
            return ("the server was unreachable: check the backend's inference server is up (embedded "
                    "backend: its loopback port), and that the run is not outliving the backend.")  # fmt: skip
        case C.SCHEMA_PARSE:
            return ("a response could not be parsed: log the raw text, make the parser lenient (fences, "
                    "truncation), and constrain the output format (JSON mode / tool schema).")  # fmt: skip
        case C.TRAINING_ERROR:
            return ("the GRPO step failed: check memory (`--micro-batch-tokens`, fewer/shorter turns), "
                    "`--train-retries`, and for NaN losses a lower `--learning-rate`.")  # fmt: skip
        case C.JUDGE_ERROR:
            return ("RULER could not score groups (their reward fell back to the other parts): check the "
                    "judge endpoint/key, raise `--judge-timeout-s` / `--judge-attempts`.")  # fmt: skip
        case C.ROLLOUT_CRASH:
            return ("rollouts raised unexpected errors: read the tracebacks in failures/<scenario>/, "
                    "fix the crash, and keep `--max-exceptions` low so it cannot hide.")  # fmt: skip
        case C.AUTO_FINALIZED:
            return (f"the policy did not call finalize_email within the turn budget (mean {s.mean_turns or 0:.1f} turns, "
                    f"{pct(s.invalid_tool_call_share)} with invalid tool calls): raise `--max-turns`, shorten the "
                    "system prompt, add a small reward for a valid finalize_email call.")  # fmt: skip
        case C.MALFORMED_EMAIL:
            return (f"emails are empty or carry markup ({pct(s.truncated_share)} cut off by max_tokens): raise "
                    "`--max-tokens`, strip chat-template markup before scoring, reward clean_format more.")  # fmt: skip
        case C.MISSING_PERSONALIZATION:
            return (f"the policy rarely calls lookup_company ({pct(s.no_company_lookup_share)} of these failures "
                    "made no company lookup): raise `--max-turns`, reward tool use (a lookup before "
                    "finalize_email), put the prospect's name and company in the task message.")  # fmt: skip
        case C.HALLUCINATED_FACT:
            return ("the email cites names/numbers not in the facts: lower `--temperature`, make "
                    "\"use only facts from the tools\" explicit, weight no_hallucination higher.")  # fmt: skip
        case C.NO_CALL_TO_ACTION:
            return ("no clear ask: end the prompt's rules with the exact call to action, and reward a "
                    "closing question (call_to_action weight).")  # fmt: skip
        case C.TOO_LONG:
            return "emails run long: lower `--max-tokens`, state the word limit, weight the length part higher."
        case C.TOO_SHORT:
            return (f"emails are too short ({pct(s.truncated_share)} cut off by max_tokens): raise `--max-tokens` "
                    "so a 50-150 word body fits in one finalize_email call.")  # fmt: skip
        case C.SPAMMY:
            return "spam phrases, '!' or ALL CAPS: list banned phrases in the prompt, weight no_spam higher."
        case C.LOW_REWARD:
            return (f"low reward with no single rule broken (mean reward {s.mean_reward or 0:.2f}): inspect the "
                    "examples, check RULER/online parts, consider more GRPO steps or a larger group size.")  # fmt: skip
        case C.NO_REPLY:
            return ("emails got no reply within the outcome window: compare replied vs unreplied emails for "
                    "the same prospect, raise the online weight only once outcomes are frequent.")  # fmt: skip
    return "no recommendation."


# --------------------------------------------------------------------------- analyzer


class FailureAnalyzer:
    """Reads failures of the runs under `runs_root` (= `runs/<project>/models`)."""

    def __init__(self, runs_root: Path, judge: AnalyzerJudgeConfig | None = None, *, prices: LLMPrices | None = None) -> None:
        self.runs_root = Path(runs_root)
        self.judge = judge
        self.prices = prices

    # --- runs --------------------------------------------------------------------------

    def run_dirs(self) -> list[Path]:
        """Run directories (run.json or failures.jsonl), oldest first by run.json's created_at."""
        if not self.runs_root.is_dir():
            return []
        dirs = [
            p
            for p in self.runs_root.iterdir()
            if p.is_dir()
            and is_safe_name(p.name)  # not `_cross_run`, hidden folders or odd names
            and is_inside(p, self.runs_root)  # no symlink out of the runs folder
            and ((p / RUN_FILE).is_file() or (p / FAILURES_FILE).is_file())
        ]

        def created(path: Path) -> tuple[str, float, str]:
            stamp = ""
            try:
                stamp = str(json.loads((path / RUN_FILE).read_text(encoding="utf-8")).get("created_at") or "")
            except (OSError, ValueError, AttributeError):
                pass
            return stamp, path.stat().st_mtime, path.name

        return sorted(dirs, key=created)

    def run_dir(self, run_id: str) -> Path:
        path = self.runs_root / check_name(run_id, "run id")  # UnsafePathError for `../x`, `/abs`, ...
        if not is_inside(path, self.runs_root) or not path.is_dir() or not ((path / RUN_FILE).is_file() or (path / FAILURES_FILE).is_file()):
            known = ", ".join(p.name for p in self.run_dirs()[-5:]) or "none"
            raise FileNotFoundError(f"no run '{run_id}' under {self.runs_root} (recent runs: {known})")
        return path

    # --- one run -----------------------------------------------------------------------

    def analyze_run(self, run_id: str) -> RunFailureReport:
        directory = self.run_dir(run_id)
        failures, skipped = load_failures(directory)
        records, scheduled = _runs_in(directory)
        report = RunFailureReport(run_id=run_id, skipped_lines=skipped, total_failures=len(failures))

        report.by_source = dict(Counter(f.source for f in failures))
        report.counts_by_category = _ordered_counts(Counter(f.category for f in failures))
        report.any_category_counts = _ordered_counts(Counter(c for f in failures for c in f.categories))
        by_iteration: dict[int, Counter[FailureCategory]] = defaultdict(Counter)
        for f in failures:
            by_iteration[f.iteration][f.category] += 1
        iterations = sorted(set(by_iteration) | {r["iteration"] for r in records if isinstance(r.get("iteration"), int)})
        report.iterations = iterations
        report.by_iteration = {it: _ordered_counts(by_iteration.get(it, Counter())) for it in iterations}

        # most failing prospects
        per_prospect: dict[str, list[Failure]] = defaultdict(list)
        for f in failures:
            if f.prospect_id:
                per_prospect[f.prospect_id].append(f)
        ranked = sorted(per_prospect.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        report.top_prospects = [
            ProspectFailures(
                prospect_id=pid,
                failures=len(fs),
                top_category=next(iter(_ordered_counts(Counter(f.category for f in fs)))),
                iterations=sorted({f.iteration for f in fs}),
            )
            for pid, fs in ranked[:TOP_PROSPECTS]
        ]

        # stuck-at: attempts = iterations that scheduled one of the prospect's scenarios, or
        # in which it failed (evaluation scenarios are not in the schedule)
        scenario_prospect = {f.scenario_id: f.prospect_id for f in failures if f.scenario_id and f.prospect_id}
        for pid, fs in per_prospect.items():
            attempts = {f.iteration for f in fs}
            attempts |= {it for it, sids in scheduled.items() if any(scenario_prospect.get(s) == pid for s in sids)}
            failing: dict[FailureCategory, set[int]] = defaultdict(set)
            for f in fs:
                for c in f.categories:
                    failing[c].add(f.iteration)
            report.stuck.extend(_stuck_runs(pid, sorted(attempts), failing))
        rank = {c: i for i, c in enumerate(PRIORITY)}
        report.stuck.sort(key=lambda s: (-s.length, s.prospect_id, rank[s.category]))

        # examples and behaviour per primary category
        by_category: dict[FailureCategory, list[Failure]] = defaultdict(list)
        for f in failures:
            by_category[f.category].append(f)
        for category in report.counts_by_category:
            fs = by_category[category]
            picks = sorted(fs, key=lambda f: (f.reward if f.reward is not None else -1.0, -f.iteration))
            report.examples[category] = [
                FailureExample(
                    failure_id=f.failure_id,
                    iteration=f.iteration,
                    prospect_id=f.prospect_id,
                    scenario_id=f.scenario_id,
                    reward=f.reward,
                    source=f.source,
                    excerpt=_excerpt(f.output or f.error_message or ""),
                )
                for f in picks[:EXAMPLES_PER_CATEGORY]
            ]
            report.category_stats[category] = _category_stats(fs)

        # totals from iterations.jsonl
        seen = [r["train/trajectories"] for r in records if isinstance(r.get("train/trajectories"), int | float)]
        if seen:
            report.trajectories_seen = int(sum(seen))
            report.exceptions_seen = int(sum(r.get("train/exceptions") or 0 for r in records))
        report.failed_trajectories = len(
            {(f.iteration, f.trajectory_id) for f in failures if f.split == "train" and f.source == "output" and f.trajectory_id}
        )
        report.llm_usage = _llm_usage(records)
        return report

    # --- across runs -------------------------------------------------------------------

    def analyze_cross_run_patterns(self, last_n_runs: int = 10) -> CrossRunReport:
        dirs = self.run_dirs()[-last_n_runs:] if last_n_runs > 0 else []
        report = CrossRunReport(run_ids=[d.name for d in dirs])
        loaded: dict[str, list[Failure]] = {}
        scheduled: dict[str, set[str]] = {}
        for d in dirs:
            loaded[d.name], _ = load_failures(d)
            records, per_iteration = _runs_in(d)
            if usage := _llm_usage(records):
                report.llm_usage_per_run[d.name] = usage
            scheduled[d.name] = set().union(*per_iteration.values()) if per_iteration else set()
        scenario_prospect = {
            f.scenario_id: f.prospect_id for fs in loaded.values() for f in fs if f.scenario_id and f.prospect_id
        }

        total: Counter[FailureCategory] = Counter()
        prospect_seen: dict[str, set[str]] = defaultdict(set)
        prospect_failed: dict[str, set[str]] = defaultdict(set)
        category_failed: dict[FailureCategory, set[str]] = defaultdict(set)
        pair_failed: dict[tuple[str, FailureCategory], set[str]] = defaultdict(set)
        for run_id, fs in loaded.items():
            counts = Counter(f.category for f in fs)
            total.update(counts)
            report.failures_per_run[run_id] = len(fs)
            report.category_counts_per_run[run_id] = _ordered_counts(counts)
            report.category_shares[run_id] = {c: n / len(fs) for c, n in _ordered_counts(counts).items()} if fs else {}
            for sid in scheduled[run_id]:
                if sid in scenario_prospect:
                    prospect_seen[scenario_prospect[sid]].add(run_id)
            for f in fs:
                for c in f.categories:
                    category_failed[c].add(run_id)
                if f.prospect_id:
                    prospect_seen[f.prospect_id].add(run_id)
                    prospect_failed[f.prospect_id].add(run_id)
                    for c in f.categories:
                        pair_failed[(f.prospect_id, c)].add(run_id)
        report.counts_by_category = _ordered_counts(total)

        def consistent(failed: set[str], seen: set[str]) -> bool:
            return len(failed) >= 2 and len(failed) >= CONSISTENT_SHARE * len(seen) - 1e-9

        order = report.run_ids.index
        rank = {c: i for i, c in enumerate(PRIORITY)}
        report.consistent_prospects = sorted(
            (
                CrossRunItem(prospect_id=p, failed_runs=len(r), seen_runs=len(prospect_seen[p]), runs=sorted(r, key=order))
                for p, r in prospect_failed.items()
                if consistent(r, prospect_seen[p])
            ),
            key=lambda i: (-i.share, -i.failed_runs, i.prospect_id),
        )
        report.consistent_categories = sorted(
            (
                CrossRunItem(category=c, failed_runs=len(r), seen_runs=len(dirs), runs=sorted(r, key=order))
                for c, r in category_failed.items()
                if consistent(r, set(report.run_ids))
            ),
            key=lambda i: (-i.share, rank[i.category]),
        )
        report.consistent_pairs = sorted(
            (
                CrossRunItem(prospect_id=p, category=c, failed_runs=len(r), seen_runs=len(prospect_seen[p]), runs=sorted(r, key=order))
                for (p, c), r in pair_failed.items()
                if consistent(r, prospect_seen[p])
            ),
            key=lambda i: (-i.share, -i.failed_runs, i.prospect_id, rank[i.category]),
        )
        for category in report.counts_by_category:
            shares = [report.category_shares[r].get(category, 0.0) for r in report.run_ids]
            change = shares[-1] - shares[0] if len(shares) >= 2 else 0.0
            direction = "flat" if abs(change) < 0.05 else ("rising" if change > 0 else "falling")
            report.trends.append(CategoryTrend(category=category, shares=shares, change=change, direction=direction))
        return report

    def generate_improvement_report(self, report: RunFailureReport | CrossRunReport) -> str:
        """Markdown for `report` (see the module-level `generate_improvement_report`)."""
        return generate_improvement_report(report)

    # --- the judge ---------------------------------------------------------------------

    async def explain(self, report: Report) -> Report:
        """A copy of `report` with `judge` filled in (root causes + fixes, or why it is unavailable).

        Transient errors (timeouts, connection errors, 429, 5xx) are retried with backoff up to
        `attempts` tries; an answer that does not validate is asked for once more. Nothing
        here raises for a judge failure.
        """
        if self.judge is None:
            return report.model_copy(update={"judge": JudgeAnalysis(status="not_configured")})
        outer, ledger = current_ledger(), UsageLedger(self.prices)
        with using_ledger(ledger):  # the explanation's own usage, for the report
            analysis = await _ask_judge(self.judge, report)
        if outer is not None:  # and the caller's (a running loop's) cumulative usage
            outer.merge(ledger)
        usage = {k: v for k, v in ledger.totals().items() if k.startswith("llm/analyzer/")}
        return report.model_copy(update={"judge": analysis.model_copy(update={"usage": usage})})


# --------------------------------------------------------------------------- judge call

_SYSTEM_PROMPT = (
    "You analyse failures of an LLM agent trained with reinforcement learning (GRPO) to write "
    "personalised cold outreach emails using tools (lookup_prospect, lookup_company, finalize_email). "
    "Given a failure summary, name the most likely root causes and concrete fixes. "
    'Answer with ONLY a JSON object: {"findings": [{"category": <one of the given categories>, '
    '"root_cause": <string>, "suggestion": <string>, "confidence": <number 0..1>}]}. No other keys, no prose.'
)


def _judge_summary(report: RunFailureReport | CrossRunReport) -> dict[str, Any]:
    if isinstance(report, RunFailureReport):
        return {
            "run_id": report.run_id,
            "total_failures": report.total_failures,
            "trajectories_seen": report.trajectories_seen,
            "counts_by_category": {str(c): n for c, n in report.counts_by_category.items()},
            "by_iteration": {str(i): {str(c): n for c, n in cs.items()} for i, cs in report.by_iteration.items()},
            "top_prospects": [p.model_dump(mode="json") for p in report.top_prospects[:5]],
            "stuck": [{"prospect_id": s.prospect_id, "category": str(s.category), "iterations": s.iterations} for s in report.stuck[:5]],
            "agent_behaviour": {str(c): s.model_dump(mode="json", exclude_none=True) for c, s in report.category_stats.items()},
            "examples": {str(c): [e.excerpt for e in es[:2]] for c, es in report.examples.items()},
        }
    return {
        "runs": report.run_ids,
        "counts_by_category": {str(c): n for c, n in report.counts_by_category.items()},
        "consistent_prospects": [i.model_dump(mode="json") for i in report.consistent_prospects[:5]],
        "consistent_categories": [i.model_dump(mode="json") for i in report.consistent_categories],
        "trends": [t.model_dump(mode="json") for t in report.trends],
    }


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def parse_judge_answer(text: str | None) -> JudgeResponse:
    """Validate the judge's answer (code fences tolerated); ValueError when it does not fit."""
    if not text or not text.strip():
        raise ValueError("empty answer")
    body = text.strip()
    fenced = _FENCE_RE.search(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"answer is not JSON ({exc.msg} at char {exc.pos})") from None
    try:
        return JudgeResponse.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"answer does not match the schema ({where}: {first.get('msg')})") from None


def _redact(text: str, config: AnalyzerJudgeConfig) -> str:
    if config.api_key is not None:
        secret = config.api_key.get_secret_value()
        if secret:
            text = text.replace(secret, "***")
    return text[:300]


async def _ask_judge(config: AnalyzerJudgeConfig, report: RunFailureReport | CrossRunReport) -> JudgeAnalysis:
    import openai

    from codreamer.retry import RetryPolicy, is_transient, retrying

    policy = RetryPolicy(attempts=config.attempts, initial_s=config.backoff_initial_s, max_s=config.backoff_max_s)
    client = openai.AsyncOpenAI(
        base_url=config.base_url,
        api_key=config.api_key.get_secret_value() if config.api_key is not None else "not-set",
        timeout=config.timeout_s,
        max_retries=0,  # retries are ours (codreamer.retry), so they are classified, logged and counted
    )
    messages = [
        {"role": "system", "content": _SYSTEM_PROMPT},
        {
            "role": "user",
            "content": "Categories: " + ", ".join(c.value for c in FailureCategory) + "\n\nFailure summary:\n"
            + json.dumps(_judge_summary(report), indent=1, default=str),
        },
    ]

    async def one_call() -> str | None:
        async for attempt in retrying(policy, "analysis judge"):
            with attempt, timed_llm_call("analyzer", config.model) as call:
                completion = await client.chat.completions.create(
                    model=config.model, messages=messages, temperature=0.0, max_tokens=config.max_tokens
                )
                call.set_usage(getattr(completion, "usage", None))
                if not completion.choices:
                    return None
                return completion.choices[0].message.content
        raise AssertionError("unreachable")

    reason = "no answer"
    try:
        for attempt in range(2):  # a malformed answer is asked for once more
            try:
                answer = await one_call()
            except Exception as exc:  # noqa: BLE001 - the report says why, the caller goes on
                tries = f" (after {config.attempts} attempts)" if is_transient(exc) and config.attempts > 1 else ""
                reason = _redact(f"{type(exc).__name__}{tries}: {exc}", config)
                break
            try:
                parsed = parse_judge_answer(answer)
            except ValueError as exc:
                reason = _redact(str(exc), config)
                logger.warning("analysis judge answer {} was malformed: {}", attempt + 1, reason)
                continue
            return JudgeAnalysis(status="ok", model=config.model, findings=parsed.findings)
    finally:
        await client.close()
    logger.warning("analysis judge unavailable: {}", reason)
    return JudgeAnalysis(status="unavailable", model=config.model, reason=reason)


# --------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _judge_usage_line(judge: JudgeAnalysis) -> list[str]:
    if not judge.usage:
        return []
    _, calls, errors, prompt, completion, mean, cost = _usage_row("", judge.usage, "llm/analyzer")
    return [
        f"Judge calls: {calls} ({errors} failed), {prompt} prompt + {completion} completion tokens, "
        f"mean latency {mean} ms, cost: {cost}.",
        "",
    ]


def _judge_section(judge: JudgeAnalysis) -> list[str]:
    lines = ["## LLM judge analysis", ""]
    if judge.status == "not_configured":
        return lines + [NO_JUDGE_LINE, ""]
    if judge.status == "unavailable":
        lines += [f"judge unavailable: {judge.reason}", "", "The recommendations above are rule-based only.", ""]
        return lines + _judge_usage_line(judge)
    lines += [f"Judge model: `{judge.model}`.", ""] + _judge_usage_line(judge)
    rows = [(f.category.value, f.root_cause, f.suggestion, f"{f.confidence:.2f}") for f in judge.findings]
    return lines + _table(["category", "root cause", "suggestion", "confidence"], rows) + [""]


def _usage_kinds(usage: Mapping[str, float]) -> list[str]:
    kinds = {k.split("/")[1] for k in usage if k.count("/") == 2}
    return sorted(kinds, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))


def _usage_row(label: str, usage: Mapping[str, float], prefix: str) -> tuple[Any, ...]:
    def get(name: str) -> float:
        return float(usage.get(f"{prefix}/{name}", 0.0))

    cost = usage.get(f"{prefix}/cost_usd")
    mean = usage.get(f"{prefix}/latency_ms_mean")
    return (
        label,
        int(get("calls")),
        int(get("errors")),
        int(get("prompt_tokens")),
        int(get("completion_tokens")),
        f"{mean:.0f}" if mean is not None else "-",
        f"{cost:.4f}" if cost is not None else "no price set",
    )


_USAGE_HEADER = ["calls", "errors", "prompt tokens", "completion tokens", "mean latency (ms)", "cost (USD)"]


def _usage_section(usage: Mapping[str, float]) -> list[str]:
    """Cumulative LLM usage of a run (the last history record's `llm/*` figures)."""
    lines = ["## LLM usage", ""]
    if not usage:
        return lines + ["No LLM usage recorded in iterations.jsonl.", ""]
    lines += ["Cumulative over the run (last iteration record).", ""]
    rows = [_usage_row(kind, usage, f"llm/{kind}") for kind in _usage_kinds(usage)]
    rows.append(_usage_row("**all**", usage, "llm"))
    lines += _table(["kind", *_USAGE_HEADER], rows)
    without = int(usage.get("llm/calls_without_usage", 0))
    if without:
        lines.append("")
        lines.append(f"{without} call(s) reported no token usage: their tokens and cost are not counted.")
    return lines + [""]


def _run_markdown(report: RunFailureReport) -> str:
    lines = [f"# Failure report: run `{report.run_id}`", "", f"Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC.", ""]
    lines += ["## Summary", ""]
    lines.append(f"- failures recorded: **{report.total_failures}**")
    if report.by_source:
        lines.append("- by source: " + ", ".join(f"{s} {n}" for s, n in sorted(report.by_source.items())))
    if report.trajectories_seen is not None:
        rate = report.failure_rate
        lines.append(
            f"- training trajectories seen: {report.trajectories_seen} (rollout exceptions: {report.exceptions_seen or 0}); "
            f"failed: {report.failed_trajectories}" + (f" ({rate:.0%})" if rate is not None else "")
        )
    if report.iterations:
        lines.append(f"- iterations: {report.iterations[0]}-{report.iterations[-1]}")
    if report.skipped_lines:
        lines.append(f"- unreadable lines skipped in {FAILURES_FILE}: {report.skipped_lines}")
    lines.append("")
    if not report.total_failures:
        lines += ["No failures recorded for this run.", ""]

    lines += ["## Failures by category", "", "Primary category of each failure (first by priority).", ""]
    total = report.total_failures or 1
    lines += _table(
        ["category", "failures", "share", "failures with it (any)"],
        [(c.value, n, f"{n / total:.0%}", report.any_category_counts.get(c, n)) for c, n in report.counts_by_category.items()],
    )
    lines.append("")

    if report.by_iteration:
        cats = list(report.counts_by_category)
        lines += ["## Categories by iteration", ""]
        lines += _table(
            ["iteration", *[c.value for c in cats], "total"],
            [(it, *[cs.get(c, 0) for c in cats], sum(cs.values())) for it, cs in report.by_iteration.items()],
        )
        lines.append("")

    lines += ["## Most failing prospects", ""]
    if report.top_prospects:
        lines += _table(
            ["prospect", "failures", "top category", "iterations"],
            [(p.prospect_id, p.failures, p.top_category.value, ", ".join(map(str, p.iterations))) for p in report.top_prospects],
        )
    else:
        lines.append("None.")
    lines.append("")

    lines += ["## Stuck-at patterns", "", f"Same prospect, same category, >= {STUCK_MIN_ATTEMPTS} consecutive attempts.", ""]
    if report.stuck:
        lines += _table(
            ["prospect", "category", "attempts", "iterations"],
            [(s.prospect_id, s.category.value, s.length, ", ".join(map(str, s.iterations))) for s in report.stuck],
        )
    else:
        lines.append("None.")
    lines.append("")

    if report.examples:
        lines += ["## Examples", ""]
        for category, examples in report.examples.items():
            lines += [f"### {category.value}", ""]
            for e in examples:
                reward = f", reward {e.reward:.2f}" if e.reward is not None else ""
                lines.append(f"- iteration {e.iteration}, prospect {e.prospect_id or '-'} ({e.source}{reward}): `{e.excerpt}`")
            lines.append("")

    lines += ["## Recommendations", ""]
    if report.counts_by_category:
        for category, n in report.counts_by_category.items():
            lines.append(f"- **{category.value}** ({n}): {recommendation(category, report.category_stats.get(category))}")
        for s in report.stuck[:5]:
            lines.append(
                f"- **stuck**: prospect {s.prospect_id} keeps failing with {s.category.value} "
                f"(iterations {', '.join(map(str, s.iterations))}): look at its facts and its failed versions "
                f"in failures/<scenario>/; consider more rollouts on it."
            )
    else:
        lines.append("Nothing to recommend.")
    lines.append("")
    lines += _usage_section(report.llm_usage)
    lines += _judge_section(report.judge)
    return "\n".join(lines)


def _cross_markdown(report: CrossRunReport) -> str:
    n_runs = len(report.run_ids)
    lines = [f"# Cross-run failure report: last {n_runs} run(s)", "", f"Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC.", ""]
    lines += ["## Runs", "", "Oldest first.", ""]
    lines += _table(
        ["run", "failures", "top category"],
        [
            (r, report.failures_per_run.get(r, 0), next(iter(report.category_counts_per_run.get(r) or {"-": 0})))
            for r in report.run_ids
        ],
    )
    lines.append("")
    total = report.total_failures or 1
    lines += ["## Failures by category", "", "Primary category of each failure, all runs.", ""]
    lines += _table(["category", "failures", "share"], [(c.value, n, f"{n / total:.0%}") for c, n in report.counts_by_category.items()])
    lines.append("")

    share = f"{CONSISTENT_SHARE:.0%}"
    lines += ["## Consistently failing prospects", "", f"Failing in >= {share} of the runs they appear in (at least 2).", ""]
    lines += (
        _table(["prospect", "failed runs", "runs seen", "share"], [(i.prospect_id, i.failed_runs, i.seen_runs, f"{i.share:.0%}") for i in report.consistent_prospects])
        if report.consistent_prospects
        else ["None."]
    )
    lines += ["", "## Consistently failing categories", ""]
    lines += (
        _table(["category", "failed runs", "runs", "share"], [(i.category.value, i.failed_runs, i.seen_runs, f"{i.share:.0%}") for i in report.consistent_categories if i.category])
        if report.consistent_categories
        else ["None."]
    )
    lines += ["", "## Consistent prospect x category pairs", ""]
    lines += (
        _table(["prospect", "category", "failed runs", "runs seen"], [(i.prospect_id, i.category.value, i.failed_runs, i.seen_runs) for i in report.consistent_pairs[:20] if i.category])
        if report.consistent_pairs
        else ["None."]
    )
    lines += ["", "## Category share trends", "", "Share of each run's failures, oldest run first.", ""]
    lines += (
        _table(
            ["category", *report.run_ids, "change", "trend"],
            [(t.category.value, *[f"{s:.0%}" for s in t.shares], f"{t.change:+.0%}", t.direction) for t in report.trends],
        )
        if report.trends
        else ["None."]
    )
    lines += ["", "## Recommendations", ""]
    focus = [i.category for i in report.consistent_categories if i.category] or list(report.counts_by_category)[:3]
    if focus:
        for category in sort_categories(focus):
            lines.append(f"- **{category.value}** ({report.counts_by_category.get(category, 0)} over all runs): {recommendation(category)}")
        for t in report.trends:
            if t.direction == "rising":
                lines.append(f"- **{t.category.value}** is rising ({t.change:+.0%} of failures from the first to the last run): check what changed between those runs.")
    else:
        lines.append("Nothing to recommend.")
    lines.append("")
    lines += ["## LLM usage", ""]
    if report.llm_usage_per_run:
        lines += ["Cumulative per run (last iteration record of each).", ""]
        lines += _table(["run", *_USAGE_HEADER], [_usage_row(r, u, "llm") for r, u in report.llm_usage_per_run.items()])
    else:
        lines.append("No LLM usage recorded in these runs.")
    lines.append("")
    lines += _judge_section(report.judge)
    return "\n".join(lines)


def generate_improvement_report(report: RunFailureReport | CrossRunReport) -> str:
    """Markdown: summary, distributions, prospects, patterns, examples, recommendations, judge."""
    if isinstance(report, RunFailureReport):
        return _run_markdown(report)
    return _cross_markdown(report)

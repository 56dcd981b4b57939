"""The rule-based failure analysis: counts, most failing prospects, stuck-at patterns,
cross-run consistency and trends, and a fix for each category.

Pure functions over what a run recorded (its failures and its `iterations.jsonl` records);
`FailureAnalyzer` reads the files and calls in here.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from codreamer.analysis.behaviour import behaviour_summary
from codreamer.analysis.categories import PRIORITY, FailureCategory
from codreamer.analysis.failures import Failure
from codreamer.analysis.report import (
    CategoryStats,
    CategoryTrend,
    CrossRunItem,
    CrossRunReport,
    FailureExample,
    ProspectFailures,
    RunFailureReport,
    StuckPattern,
)

__all__ = [
    "CONSISTENT_SHARE",
    "STUCK_MIN_ATTEMPTS",
    "cross_run_report",
    "llm_usage",
    "recommendation",
    "run_report",
    "scheduled_scenarios",
]

STUCK_MIN_ATTEMPTS = 3
CONSISTENT_SHARE = 2 / 3
EXAMPLES_PER_CATEGORY = 3
EXCERPT_CHARS = 240
TOP_PROSPECTS = 10
_RANK = {c: i for i, c in enumerate(PRIORITY)}


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
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], _RANK[kv[0]])))


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


def llm_usage(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
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


def scheduled_scenarios(records: Sequence[Mapping[str, Any]]) -> dict[int, set[str]]:
    """The scenarios each iteration trained on, from its `iterations.jsonl` record."""
    scheduled: dict[int, set[str]] = defaultdict(set)
    for record in records:
        if isinstance(record.get("iteration"), int):
            scheduled[record["iteration"]].update(str(s) for s in record.get("scenarios") or [])
    return scheduled


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


# --------------------------------------------------------------------------- recommendations


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


# --------------------------------------------------------------------------- one run


def run_report(
    run_id: str,
    failures: Sequence[Failure],
    records: Sequence[Mapping[str, Any]],
    *,
    skipped_lines: int = 0,
) -> RunFailureReport:
    """The report of one run from its failures and its iteration records."""
    report = RunFailureReport(run_id=run_id, skipped_lines=skipped_lines, total_failures=len(failures))
    report.by_source = dict(Counter(f.source for f in failures))
    report.counts_by_category = _ordered_counts(Counter(f.category for f in failures))
    report.any_category_counts = _ordered_counts(Counter(c for f in failures for c in f.categories))
    by_iteration: dict[int, Counter[FailureCategory]] = defaultdict(Counter)
    for f in failures:
        by_iteration[f.iteration][f.category] += 1
    iterations = sorted(set(by_iteration) | {r["iteration"] for r in records if isinstance(r.get("iteration"), int)})
    report.iterations = iterations
    report.by_iteration = {it: _ordered_counts(by_iteration.get(it, Counter())) for it in iterations}

    per_prospect: dict[str, list[Failure]] = defaultdict(list)
    for f in failures:
        if f.prospect_id:
            per_prospect[f.prospect_id].append(f)
    report.top_prospects = _top_prospects(per_prospect)
    report.stuck = _stuck_patterns(failures, per_prospect, scheduled_scenarios(records))
    _add_examples(report, failures)

    # totals from iterations.jsonl
    seen = [r["train/trajectories"] for r in records if isinstance(r.get("train/trajectories"), int | float)]
    if seen:
        report.trajectories_seen = int(sum(seen))
        report.exceptions_seen = int(sum(r.get("train/exceptions") or 0 for r in records))
    report.failed_trajectories = len(
        {
            (f.iteration, f.trajectory_id)
            for f in failures
            if f.split == "train" and f.source == "output" and f.trajectory_id
        }
    )
    report.llm_usage = llm_usage(records)
    report.behaviour = behaviour_summary(records)
    return report


def _top_prospects(per_prospect: Mapping[str, list[Failure]]) -> list[ProspectFailures]:
    ranked = sorted(per_prospect.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        ProspectFailures(
            prospect_id=pid,
            failures=len(fs),
            top_category=next(iter(_ordered_counts(Counter(f.category for f in fs)))),
            iterations=sorted({f.iteration for f in fs}),
        )
        for pid, fs in ranked[:TOP_PROSPECTS]
    ]


def _stuck_patterns(
    failures: Sequence[Failure], per_prospect: Mapping[str, list[Failure]], scheduled: Mapping[int, set[str]]
) -> list[StuckPattern]:
    """Stuck-at patterns, longest first. A prospect's attempts: the iterations that scheduled one
    of its scenarios, or in which it failed (evaluation scenarios are not in the schedule)."""
    scenario_prospect = {f.scenario_id: f.prospect_id for f in failures if f.scenario_id and f.prospect_id}
    stuck: list[StuckPattern] = []
    for pid, fs in per_prospect.items():
        attempts = {f.iteration for f in fs}
        attempts |= {it for it, sids in scheduled.items() if any(scenario_prospect.get(s) == pid for s in sids)}
        failing: dict[FailureCategory, set[int]] = defaultdict(set)
        for f in fs:
            for c in f.categories:
                failing[c].add(f.iteration)
        stuck.extend(_stuck_runs(pid, sorted(attempts), failing))
    return sorted(stuck, key=lambda s: (-s.length, s.prospect_id, _RANK[s.category]))


def _add_examples(report: RunFailureReport, failures: Sequence[Failure]) -> None:
    """A few examples (lowest reward first) and the agent's behaviour per primary category."""
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


# --------------------------------------------------------------------------- across runs


def _rank(category: FailureCategory | None) -> int:
    """A category's place in priority order (an item without a category sorts last)."""
    return len(_RANK) if category is None else _RANK[category]


def _consistent(failed: set[str], seen: set[str]) -> bool:
    return len(failed) >= 2 and len(failed) >= CONSISTENT_SHARE * len(seen) - 1e-9


def cross_run_report(
    loaded: Mapping[str, Sequence[Failure]],
    scheduled: Mapping[str, set[str]],
    usage_per_run: Mapping[str, dict[str, float]],
) -> CrossRunReport:
    """Patterns across runs; `loaded` maps run ids, oldest first, to their failures, `scheduled`
    to the scenarios they trained on, `usage_per_run` to their LLM usage (runs that have one)."""
    report = CrossRunReport(run_ids=list(loaded), llm_usage_per_run=dict(usage_per_run))
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
        for sid in scheduled.get(run_id, set()):
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
    _add_consistency(report, prospect_seen, prospect_failed, category_failed, pair_failed)
    report.trends = _trends(report)
    return report


def _add_consistency(
    report: CrossRunReport,
    prospect_seen: Mapping[str, set[str]],
    prospect_failed: Mapping[str, set[str]],
    category_failed: Mapping[FailureCategory, set[str]],
    pair_failed: Mapping[tuple[str, FailureCategory], set[str]],
) -> None:
    """Prospects, categories and pairs failing in >= CONSISTENT_SHARE of the runs they appear in."""
    order = report.run_ids.index
    report.consistent_prospects = sorted(
        (
            CrossRunItem(prospect_id=p, failed_runs=len(r), seen_runs=len(prospect_seen[p]), runs=sorted(r, key=order))
            for p, r in prospect_failed.items()
            if _consistent(r, prospect_seen[p])
        ),
        key=lambda i: (-i.share, -i.failed_runs, i.prospect_id),
    )
    report.consistent_categories = sorted(
        (
            CrossRunItem(category=c, failed_runs=len(r), seen_runs=len(report.run_ids), runs=sorted(r, key=order))
            for c, r in category_failed.items()
            if _consistent(r, set(report.run_ids))
        ),
        key=lambda i: (-i.share, _rank(i.category)),
    )
    report.consistent_pairs = sorted(
        (
            CrossRunItem(
                prospect_id=p,
                category=c,
                failed_runs=len(r),
                seen_runs=len(prospect_seen[p]),
                runs=sorted(r, key=order),
            )
            for (p, c), r in pair_failed.items()
            if _consistent(r, prospect_seen[p])
        ),
        key=lambda i: (-i.share, -i.failed_runs, i.prospect_id, _rank(i.category)),
    )


def _trends(report: CrossRunReport) -> list[CategoryTrend]:
    """Each category's share of a run's failures, oldest run first, and where it is heading."""
    trends = []
    for category in report.counts_by_category:
        shares = [report.category_shares[r].get(category, 0.0) for r in report.run_ids]
        change = shares[-1] - shares[0] if len(shares) >= 2 else 0.0
        direction = "flat" if abs(change) < 0.05 else ("rising" if change > 0 else "falling")
        trends.append(CategoryTrend(category=category, shares=shares, change=change, direction=direction))
    return trends

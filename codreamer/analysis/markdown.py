"""The failure reports as Markdown: summary, distributions, prospects, patterns, examples,
recommendations, LLM usage and what the judge said."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codreamer.analysis.behaviour import behaviour_lines
from codreamer.analysis.categories import sort_categories
from codreamer.analysis.failures import FAILURES_FILE
from codreamer.analysis.report import CrossRunReport, JudgeAnalysis, RunFailureReport
from codreamer.analysis.rules import CONSISTENT_SHARE, STUCK_MIN_ATTEMPTS, recommendation
from codreamer.markdown import table
from codreamer.usage import KINDS

__all__ = ["NO_JUDGE_LINE", "generate_improvement_report"]

NO_JUDGE_LINE = "rule-based analysis only (no LLM judge configured)"


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
    return lines + table(["category", "root cause", "suggestion", "confidence"], rows) + [""]


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
    lines += table(["kind", *_USAGE_HEADER], rows)
    without = int(usage.get("llm/calls_without_usage", 0))
    if without:
        lines.append("")
        lines.append(f"{without} call(s) reported no token usage: their tokens and cost are not counted.")
    return lines + [""]


def _run_markdown(report: RunFailureReport) -> str:
    lines = [
        f"# Failure report: run `{report.run_id}`",
        "",
        f"Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC.",
        "",
    ]
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
    lines += behaviour_lines(report.behaviour)
    lines.append("")
    if not report.total_failures:
        lines += ["No failures recorded for this run.", ""]

    lines += ["## Failures by category", "", "Primary category of each failure (first by priority).", ""]
    total = report.total_failures or 1
    lines += table(
        ["category", "failures", "share", "failures with it (any)"],
        [
            (c.value, n, f"{n / total:.0%}", report.any_category_counts.get(c, n))
            for c, n in report.counts_by_category.items()
        ],
    )
    lines.append("")

    if report.by_iteration:
        cats = list(report.counts_by_category)
        lines += ["## Categories by iteration", ""]
        lines += table(
            ["iteration", *[c.value for c in cats], "total"],
            [(it, *[cs.get(c, 0) for c in cats], sum(cs.values())) for it, cs in report.by_iteration.items()],
        )
        lines.append("")

    lines += ["## Most failing prospects", ""]
    if report.top_prospects:
        lines += table(
            ["prospect", "failures", "top category", "iterations"],
            [
                (p.prospect_id, p.failures, p.top_category.value, ", ".join(map(str, p.iterations)))
                for p in report.top_prospects
            ],
        )
    else:
        lines.append("None.")
    lines.append("")

    lines += [
        "## Stuck-at patterns",
        "",
        f"Same prospect, same category, >= {STUCK_MIN_ATTEMPTS} consecutive attempts.",
        "",
    ]
    if report.stuck:
        lines += table(
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
                lines.append(
                    f"- iteration {e.iteration}, prospect {e.prospect_id or '-'} ({e.source}{reward}): `{e.excerpt}`"
                )
            lines.append("")

    lines += ["## Recommendations", ""]
    if report.counts_by_category:
        for category, n in report.counts_by_category.items():
            lines.append(
                f"- **{category.value}** ({n}): {recommendation(category, report.category_stats.get(category))}"
            )
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
    lines = [
        f"# Cross-run failure report: last {n_runs} run(s)",
        "",
        f"Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC.",
        "",
    ]
    lines += ["## Runs", "", "Oldest first.", ""]
    lines += table(
        ["run", "failures", "top category"],
        [
            (r, report.failures_per_run.get(r, 0), next(iter(report.category_counts_per_run.get(r) or ()), "-"))
            for r in report.run_ids
        ],
    )
    lines.append("")
    if report.left_out:
        lines += ["Only finished iterations are counted. Left out:", ""]
        lines += [f"- {run}: {why}" for run, why in report.left_out.items()]
        lines.append("")
    total = report.total_failures or 1
    lines += ["## Failures by category", "", "Primary category of each failure, all runs.", ""]
    lines += table(
        ["category", "failures", "share"],
        [(c.value, n, f"{n / total:.0%}") for c, n in report.counts_by_category.items()],
    )
    lines.append("")

    share = f"{CONSISTENT_SHARE:.0%}"
    lines += [
        "## Consistently failing prospects",
        "",
        f"Failing in >= {share} of the runs they appear in (at least 2).",
        "",
    ]
    lines += (
        table(
            ["prospect", "failed runs", "runs seen", "share"],
            [(i.prospect_id, i.failed_runs, i.seen_runs, f"{i.share:.0%}") for i in report.consistent_prospects],
        )
        if report.consistent_prospects
        else ["None."]
    )
    lines += ["", "## Consistently failing categories", ""]
    lines += (
        table(
            ["category", "failed runs", "runs", "share"],
            [
                (i.category.value, i.failed_runs, i.seen_runs, f"{i.share:.0%}")
                for i in report.consistent_categories
                if i.category
            ],
        )
        if report.consistent_categories
        else ["None."]
    )
    lines += ["", "## Consistent prospect x category pairs", ""]
    lines += (
        table(
            ["prospect", "category", "failed runs", "runs seen"],
            [
                (i.prospect_id, i.category.value, i.failed_runs, i.seen_runs)
                for i in report.consistent_pairs[:20]
                if i.category
            ],
        )
        if report.consistent_pairs
        else ["None."]
    )
    lines += ["", "## Category share trends", "", "Share of each run's failures, oldest run first.", ""]
    lines += (
        table(
            ["category", *report.run_ids, "change", "trend"],
            [
                (t.category.value, *[f"{s:.0%}" for s in t.shares], f"{t.change:+.0%}", t.direction)
                for t in report.trends
            ],
        )
        if report.trends
        else ["None."]
    )
    lines += ["", "## Recommendations", ""]
    focus = [i.category for i in report.consistent_categories if i.category] or list(report.counts_by_category)[:3]
    if focus:
        for category in sort_categories(focus):
            lines.append(
                f"- **{category.value}** ({report.counts_by_category.get(category, 0)} over all runs): {recommendation(category)}"
            )
        for t in report.trends:
            if t.direction == "rising":
                lines.append(
                    f"- **{t.category.value}** is rising ({t.change:+.0%} of failures from the first to the last "
                    "run): check what changed between those runs."
                )
    else:
        lines.append("Nothing to recommend.")
    lines.append("")
    lines += ["## LLM usage", ""]
    if report.llm_usage_per_run:
        lines += ["Cumulative per run (last iteration record of each).", ""]
        lines += table(["run", *_USAGE_HEADER], [_usage_row(r, u, "llm") for r, u in report.llm_usage_per_run.items()])
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

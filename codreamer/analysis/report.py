"""The failure reports: what the rules (and the judge) found, as data the Markdown is rendered from.

`RunFailureReport` describes one run, `CrossRunReport` the last runs; both carry a
`JudgeAnalysis` (what the optional LLM judge said, or why it said nothing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from codreamer.analysis.categories import FailureCategory

__all__ = [
    "CategoryStats",
    "CategoryTrend",
    "CrossRunItem",
    "CrossRunReport",
    "FailureExample",
    "JudgeAnalysis",
    "JudgeFinding",
    "JudgeResponse",
    "ProspectFailures",
    "Report",
    "RunFailureReport",
    "StuckPattern",
]


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
    any_category_counts: dict[FailureCategory, int] = Field(
        default_factory=dict, description="Every category a failure has."
    )
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
    behaviour: dict[str, float] = Field(
        default_factory=dict, description="Tool use and auto-finalisation rates (`analysis.behaviour`)."
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
    llm_usage_per_run: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Runs that recorded usage."
    )
    left_out: dict[str, str] = Field(
        default_factory=dict,
        description="Runs left out, or with failures of unfinished iterations left out, and why.",
    )
    judge: JudgeAnalysis = Field(default_factory=JudgeAnalysis)

    @property
    def total_failures(self) -> int:
        return sum(self.failures_per_run.values())


Report = TypeVar("Report", RunFailureReport, CrossRunReport)

"""What the agent did over a run, from its iteration records: tool use and auto-finalisation.

The loop records per iteration `train/behaviour/<rate>` (training rollouts) and
`eval/behaviour/<rate>` (held-out rollouts; `codreamer.pipeline.evaluation.behaviour_rates`):
`looked_up` (called a lookup tool before writing), `self_finalized` / `auto_finalized` (called
`finalize_email` itself / never did, the email salvaged from its text), `tool_calls` (mean per
episode). A rate of 1.0 for auto-finalisation means the agent never submitted an email
itself: its rewards then grade salvaged text, not the task, and the reports flag it.

Used by the failure report (`codreamer.analysis.rules`) and the run report (`codreamer.reports`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BEHAVIOUR_RATES", "behaviour_lines", "behaviour_summary"]

BEHAVIOUR_RATES = ("looked_up", "auto_finalized", "self_finalized", "tool_calls")
ALWAYS = 1.0 - 1e-9


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def behaviour_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`train/<rate>` weighted by each iteration's trajectories, and `eval/<rate>` of the latest
    iteration that has one; rates absent from every record are left out."""
    out: dict[str, float] = {}
    for rate in BEHAVIOUR_RATES:
        weighted = [
            (value, _number(r.get("train/trajectories")) or 1.0)
            for r in records
            if (value := _number(r.get(f"train/behaviour/{rate}"))) is not None
        ]
        if weighted:
            out[f"train/{rate}"] = sum(v * w for v, w in weighted) / sum(w for _, w in weighted)
        latest = next(
            (v for r in reversed(records) if (v := _number(r.get(f"eval/behaviour/{rate}"))) is not None), None
        )
        if latest is not None:
            out[f"eval/{rate}"] = latest
    if "train/auto_finalized" not in out:  # older records: the rollout-health rate only
        rates = [v for r in records if (v := _number(r.get("train/auto_finalized_rate"))) is not None]
        if rates:
            out["train/auto_finalized"] = sum(rates) / len(rates)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def behaviour_lines(summary: Mapping[str, float]) -> list[str]:
    """Markdown bullet lines: tool use and auto-finalisation (training, latest held-out), and a
    warning line when every rollout of a split was auto-finalised. Empty without any rate."""
    lines = []
    for split, label in (("train", "training rollouts"), ("eval", "held-out rollouts (latest)")):
        looked, auto = summary.get(f"{split}/looked_up"), summary.get(f"{split}/auto_finalized")
        calls = summary.get(f"{split}/tool_calls")
        if looked is None and auto is None and calls is None:
            continue
        mean_calls = "" if calls is None else f", {calls:.2f} tool calls per episode"
        lines.append(f"- {label}: tool use (looked up) {_pct(looked)}{mean_calls}; auto-finalised {_pct(auto)}")
    flagged = [s for s in ("train", "eval") if (summary.get(f"{s}/auto_finalized") or 0.0) >= ALWAYS]
    if flagged:
        lines.append(
            "- **WARNING: auto-finalisation rate 1.0** ("
            + ", ".join("training" if s == "train" else "held-out" for s in flagged)
            + "): the agent never called finalize_email; every email was salvaged from its text, so "
            "rewards grade salvage, not the task (raise --max-tokens / --max-turns, warm-start, or a larger model)."
        )
    return lines

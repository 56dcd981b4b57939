"""Run reports: a Markdown summary and a reward-curve PNG in the run directory.

Everything is read back from what the run wrote (`run.json`, `iterations.jsonl`,
`evals/step_NNNN.json`), so a report can be written at the end of a run, or later by
`codreamer report RUN_ID`, and says only what was recorded. `run_summary` is the one-line
view used by `codreamer runs`.

On the reward curve the x axis is the policy step that produced the samples: the training
rollouts of the iteration recorded at step k were sampled from the policy of step k-1,
while its held-out evaluation ran after the update, at step k; an evaluation before
training (`--eval-before-train`) sits at step 0, the base model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from codreamer.analysis.behaviour import behaviour_lines, behaviour_summary
from codreamer.checkpoints import best_checkpoint, heldout_scores
from codreamer.markdown import table as _table
from codreamer.pipeline.evaluation import TOTAL, EvalSummary, compare_evaluations, load_evaluations
from codreamer.pipeline.history import read_history
from codreamer.redaction import is_secret_name
from codreamer.runs import ITERATIONS_FILE, RUN_FILE
from codreamer.storage import write_atomic

__all__ = ["CURVE_FILE", "REPORT_FILE", "RunData", "load_run", "run_summary", "write_run_report"]

REPORT_FILE = "report.md"
#: Written by `codreamer.pipeline.warm_start` (read here as plain JSON: reports import no ART).
WARM_START_FILE = "warm_start.json"
CURVE_FILE = "reward_curve.png"
#: Metrics that are not reward parts: a duplicate of the total and a 0/1 flag.
_NOT_PLOTTED = {"reward/total", "reward/renormalized"}


@dataclass
class RunData:
    """What a run wrote, read back once."""

    directory: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    skipped: int
    evals: list[EvalSummary] = field(default_factory=list)
    warm_start: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or self.directory.name)

    @property
    def base(self) -> EvalSummary | None:
        return next((e for e in self.evals if e.step == 0), None)


def load_run(run_dir: Path) -> RunData:
    """Read run.json (missing or unreadable: empty), the history and the stored evaluations."""
    directory = Path(run_dir)
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        logger.warning("unreadable {} in {}: {}", RUN_FILE, directory, exc)
    records, skipped = read_history(directory / ITERATIONS_FILE)
    records = sorted(records, key=lambda r: _num(r.get("step")) or 0.0)
    return RunData(directory, meta, records, skipped, load_evaluations(directory), _read_warm_start(directory))


def _read_warm_start(directory: Path) -> dict[str, Any]:
    """`warm_start.json` as a plain dict (empty when the run had no warm start or it is unreadable)."""
    try:
        payload = json.loads((directory / WARM_START_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _num(value: Any) -> float | None:
    """A finite number, or None (history stores NaN as null; bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    number = _num(value)
    if number is None:
        return "-"
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def _ci(low: Any, high: Any) -> str:
    return "" if _num(low) is None or _num(high) is None else f" [{_fmt(low)}, {_fmt(high)}]"


# ------------------------------------------------------------------------------ summary
def _best(scores: dict[int, float]) -> tuple[int | None, float | None]:
    if not scores:
        return None, None
    score, step = max((score, step) for step, score in scores.items())
    return step, score


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Status, step, iterations and best held-out score of a run, for `codreamer runs`.

    best_step/best_score are over every evaluated step (step 0 is the base model);
    best_checkpoint is the best step that still has a checkpoint on disk.
    """
    return _summary(load_run(run_dir))


def _summary(data: RunData) -> dict[str, Any]:
    last = data.records[-1] if data.records else {}
    best_step, best_score = _best(heldout_scores(data.directory))
    on_disk = best_checkpoint(data.directory)
    return {
        "run_id": data.run_id,
        "kind": data.meta.get("kind"),
        "status": data.meta.get("status", "unknown"),
        "created_at": data.meta.get("created_at"),
        "updated_at": data.meta.get("updated_at"),
        "iterations": len(data.records),
        "step": int(last.get("step", 0) or 0),
        "best_step": best_step,
        "best_score": best_score,
        "best_checkpoint": None if on_disk is None else on_disk.step,
        "last_train_reward": _num(last.get("train/reward_mean")),
        "last_eval_reward": _num(last.get("eval/reward_mean")),
        "skipped_lines": data.skipped,
    }


# ------------------------------------------------------------------------------ markdown
def _public_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The run's settings without any whose name says it is a credential (run.json should hold none)."""
    settings = meta.get("settings") or {}
    return {k: v for k, v in sorted(settings.items()) if not is_secret_name(k)}


def _overview(data: RunData, summary: dict[str, Any]) -> list[str]:
    steps = [int(r["step"]) for r in data.records if "step" in r]
    span = f"{len(data.records)} (steps {min(steps)}-{max(steps)})" if steps else "0"
    best = "-" if summary["best_step"] is None else f"step {summary['best_step']}: {_fmt(summary['best_score'])}"
    rows = [
        ("status", summary["status"]),
        ("kind", summary["kind"] or "-"),
        ("created", summary["created_at"] or "-"),
        ("updated", summary["updated_at"] or "-"),
        ("iterations", span),
        ("best held-out reward", best),
        (
            "best checkpoint on disk",
            "-" if summary["best_checkpoint"] is None else f"step {summary['best_checkpoint']}",
        ),
    ]
    if data.skipped:
        rows.append(("unreadable history lines skipped", str(data.skipped)))
    behaviour = behaviour_lines(behaviour_summary(data.records))
    agent = ["Agent behaviour:", "", *behaviour, ""] if behaviour else []
    return [f"# Run {data.run_id}", "", *_table(("", ""), rows), "", *agent, f"![reward curve]({CURVE_FILE})", ""]


def _settings_section(data: RunData) -> list[str]:
    settings = _public_settings(data.meta)
    if not settings:
        return ["## Settings", "", "run.json records no settings.", ""]
    rows = [(f"`{k}`", f"`{json.dumps(v, default=str)}`") for k, v in settings.items()]
    return ["## Settings", "", *_table(("setting", "value"), rows), ""]


def _iterations_section(data: RunData) -> list[str]:
    if not data.records:
        return ["## Iterations", "", "No iteration was recorded.", ""]
    rows = []
    for r in data.records:
        total_time = sum(v for k, v in r.items() if k.startswith("time/") and _num(v) is not None)
        mean, low, high, delta = _eval_columns(data, r)
        rows.append(
            (
                str(r.get("iteration", "-")),
                str(r.get("step", "-")),
                f"{_fmt(r.get('train/reward_mean'))} ± {_fmt(r.get('train/reward_std'))}",
                _fmt(mean) + _ci(low, high),
                _fmt(delta, signed=True),
                _rate(r.get("train/behaviour/self_finalized")),
                _rate(r.get("train/behaviour/looked_up")),
                _fmt(r.get("train/exceptions"), 0),
                _fmt(total_time, 1),
            )
        )
    header = (
        "iter", "step", "train reward (mean ± std)", "held-out reward [95% CI]", "Δ base",
        "train self-finalised", "train looked up", "train exceptions", "time (s)",
    )  # fmt: skip
    return ["## Iterations", "", *_table(header, rows), ""]


def _delayed_credit_section(data: RunData) -> list[str]:
    """Outcomes that arrived for earlier iterations and the groups they put back into training
    (`replay/*` of each record); nothing when the run had no online outcomes at all."""
    if not any(_num(r.get("replay/outcomes_received")) for r in data.records):
        return []
    rows = [
        (
            str(r.get("iteration", "-")),
            _fmt(r.get("replay/outcomes_received"), 0),
            _fmt(r.get("replay/outcome_delay_iterations_mean"), 1),
            f"{_fmt(r.get('replay/groups'), 0)} / {_fmt(r.get('replay/trajectories'), 0)}",
            _fmt(r.get("replay/reward_change_mean"), signed=True),
            _fmt(r.get("replay/window_events"), 0),
            _fmt(r.get("replay/outcomes_unknown"), 0),
        )
        for r in data.records
    ]
    header = (
        "iter", "outcomes received", "mean delay (iterations)", "groups / trajectories replayed",
        "reward change", "no-reply (window)", "unknown ids",
    )  # fmt: skip
    source = _public_settings(data.meta).get("outcomes")
    note = (
        "Outcomes from the seeded ProspectSimulator (simulated, not real data)."
        if source == "simulator"
        else "Outcomes from the event log (ingest / webhook)."
    )
    return ["## Delayed credit", "", *_table(header, rows), "", note, ""]


def _eval_columns(data: RunData, r: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """Held-out mean, CI and delta vs base of a record: from the history, else the stored evaluation."""
    mean, low, high, delta = (
        r.get(k) for k in ("eval/reward_mean", "eval/reward_ci_low", "eval/reward_ci_high", "eval/delta_base")
    )
    stored = next((e for e in data.evals if e.step == r.get("step")), None)
    if stored is not None and stored.reward is not None:
        if _num(mean) is None:
            mean, low, high = stored.reward.mean, stored.reward.ci_low, stored.reward.ci_high
        base = data.base.reward if data.base is not None else None
        if _num(delta) is None and base is not None and (known := _num(mean)) is not None:
            delta = known - base.mean
    return mean, low, high, delta


def _eval_sections(data: RunData) -> list[str]:
    if not data.evals:
        return ["## Held-out evaluation", "", "No held-out evaluation was stored for this run.", ""]
    latest, base = data.evals[-1], data.base
    lines = ["## Held-out evaluation", ""]
    lines.append(
        f"Latest: step {latest.step}, {latest.n} rollouts, {latest.exceptions} failed; "
        f"{int(latest.confidence * 100)}% percentile-bootstrap CIs over rollouts ({latest.bootstrap_samples} resamples)."
    )
    if base is None:
        lines.append("No base-model evaluation (step 0): run with `--eval-before-train` to compare against it.")
    lines.append("")
    header = ("part", "latest [95% CI]") + (("base (step 0)", "Δ base") if base and base is not latest else ())
    rows = []
    for name, stats in latest.parts.items():
        row: tuple[str, ...] = (f"`{name}`", _fmt(stats.mean) + _ci(stats.ci_low, stats.ci_high))
        if base and base is not latest:
            before = base.parts.get(name)
            row += (
                _fmt(before.mean if before else None),
                _fmt(stats.mean - before.mean if before else None, signed=True),
            )
        rows.append(row)
    lines += [*_table(header, rows), ""]
    lines += _progress_section(data) + _prospect_section(latest, base) + _before_after_section(latest, base)
    return lines


def _progress_section(data: RunData) -> list[str]:
    rows = []
    for index, current in enumerate(data.evals):
        previous = data.evals[index - 1] if index else None
        cmp = compare_evaluations(current, previous, data.base if data.base is not current else None)
        paired = cmp["base"]["delta_ci"]
        total = current.reward
        rates = current.behaviour
        rows.append(
            (
                str(current.step),
                _policy_label(data, current.step),
                "-" if total is None else _fmt(total.mean) + _ci(total.ci_low, total.ci_high),
                _fmt(cmp["delta_prev"], signed=True),
                _fmt(cmp["delta_base"], signed=True),
                "-" if paired is None else f"[{_fmt(paired[0], signed=True)}, {_fmt(paired[1], signed=True)}]",
                {True: "yes", False: "no", None: "-"}[cmp["ci_overlap_base"]],
                _rate(rates.get("looked_up")),
                _rate(rates.get("self_finalized")),
                _rate(rates.get("auto_finalized")),
            )
        )
    header = (
        "step", "policy", "reward [95% CI]", "Δ prev", "Δ base", "paired Δ base 95% CI", "CI overlaps base",
        "looked up", "self-finalised", "auto-finalised",
    )  # fmt: skip
    note = (
        "Paired: the same held-out samples (same seeds) compared rollout by rollout. Looked up: the agent "
        "called a lookup tool before its email; self-finalised: it called finalize_email itself; "
        "auto-finalised: it never did, and the email was salvaged from its text."
    )
    return ["### Over the run", "", *_table(header, rows), "", note, ""]


def _rate(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.0%}"


def _policy_label(data: RunData, step: int) -> str:
    """What the policy at `step` is: the base model, the warm start (SFT on demonstrations), or RL."""
    if step == 0:
        return "base model"
    warm = data.warm_start.get("step")
    if warm is not None and step == warm:
        return "warm start (SFT)"
    return "RL" if warm is None else f"warm start + RL ({step - int(warm)} steps)"


def _cell(text: str, limit: int = 900) -> str:
    """An email as one Markdown table cell: clipped, line breaks as <br>, pipes escaped."""
    clipped = text if len(text) <= limit else text[:limit] + " …"
    return clipped.replace("\r", "").replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def _before_after_section(latest: EvalSummary, base: EvalSummary | None, count: int = 3) -> list[str]:
    """The base model's and the final policy's email for the same held-out prospects and seeds."""
    if base is None or base is latest:
        return []
    lines = [f"### Before and after: base model (step 0) vs step {latest.step}", ""]
    lines.append("The same held-out prospects, the first sample of each (same seed in both evaluations).")
    lines.append("")
    for pid in sorted(set(latest.prospects) & set(base.prospects))[:count]:
        before, after = base.prospects[pid].emails, latest.prospects[pid].emails
        if not before or not after:
            continue
        b, a = before[0], after[0]
        flag = {True: " (auto-finalised)", False: ""}
        lines += [
            f"**{pid}**",
            "",
            f"| | base model (step 0) | step {latest.step} |",
            "|---|---|---|",
            f"| reward | {_fmt(b['reward'])}{flag[bool(b['auto_finalized'])]} "
            f"| {_fmt(a['reward'])}{flag[bool(a['auto_finalized'])]} |",
            f"| subject | {_cell(str(b['subject']), 200)} | {_cell(str(a['subject']), 200)} |",
            f"| body | {_cell(str(b['body']))} | {_cell(str(a['body']))} |",
            "",
        ]
    return lines


def _prospect_section(latest: EvalSummary, base: EvalSummary | None) -> list[str]:
    rows = []
    for pid, result in sorted(latest.prospects.items()):
        before = base.prospects.get(pid) if base is not None and base is not latest else None
        delta = None
        if before is not None and result.mean_reward is not None and before.mean_reward is not None:
            delta = result.mean_reward - before.mean_reward
        samples = ", ".join(_fmt(r, 2) for r in result.rewards)
        rows.append(
            (pid, str(result.n), str(result.exceptions), _fmt(result.mean_reward), _fmt(delta, signed=True), samples)
        )
    header = ("prospect", "n", "failed", "mean reward", "Δ base", "sample rewards")
    return [f"### Per prospect (step {latest.step})", "", *_table(header, rows), ""]


def _timings_section(data: RunData) -> list[str]:
    keys = sorted({k for r in data.records for k in r if k.startswith("time/")})
    if not keys:
        return []
    rows = []
    for key in keys:
        values = [v for r in data.records if (v := _num(r.get(key))) is not None]
        stage = key.removeprefix("time/").removesuffix("_s")
        rows.append((stage, _fmt(sum(values) / len(values), 1) if values else "-", _fmt(sum(values), 1)))
    rss = [v for r in data.records if (v := _num(r.get("peak_rss_mb"))) is not None]
    lines = ["## Timings", "", *_table(("stage", "mean per iteration (s)", "total (s)"), rows), ""]
    return lines + ([f"Peak RSS: {max(rss):.0f} MB.", ""] if rss else [])


def _llm_section(data: RunData) -> list[str]:
    """`llm/*` figures are cumulative over the run (codreamer.usage): the last record holds the
    run's totals, and the difference of the last two records the latest iteration's share."""
    keys = sorted({k for r in data.records for k in r if k.startswith("llm/")})
    if not keys:
        return []
    rows = []
    for key in keys:
        values = [v for r in data.records if (v := _num(r.get(key))) is not None]
        if not values:
            continue
        increment = values[-1] - values[-2] if len(values) > 1 else values[-1]
        latest = "-" if key.endswith("_mean") else _fmt(increment, 4)  # a mean has no per-iteration share
        rows.append((f"`{key}`", _fmt(values[-1], 4), latest))
    note = "Cumulative over the run; the last column is the latest iteration's share."
    return ["## LLM usage", "", *_table(("metric", "run total", "latest iteration"), rows), "", note, ""]


def render_markdown(data: RunData) -> str:
    summary = _summary(data)
    sections = [
        _overview(data, summary),
        _iterations_section(data),
        _delayed_credit_section(data),
        _eval_sections(data),
        _timings_section(data),
        _llm_section(data),
        _settings_section(data),
    ]
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


# ------------------------------------------------------------------------------ chart
def _parts_to_plot(data: RunData) -> list[str]:
    names = {
        k.removeprefix("train/") for r in data.records for k in r if k.startswith(("train/rubric/", "train/reward/"))
    }
    names |= {name for e in data.evals for name in e.parts}
    names |= {
        k.removeprefix("eval/") for r in data.records for k in r if k.startswith(("eval/rubric/", "eval/reward/"))
    }
    names = {n for n in names if not n.endswith(("_ci_low", "_ci_high"))} - _NOT_PLOTTED - {TOTAL}
    return [TOTAL, *sorted(names)]


def _train_series(data: RunData, part: str) -> tuple[list[float], list[float], list[float]]:
    key = "train/reward_mean" if part == TOTAL else f"train/{part}"
    xs, means, stds = [], [], []
    for r in data.records:
        mean, step = _num(r.get(key)), _num(r.get("step"))
        if mean is not None and step is not None:
            xs.append(step - 1)
            means.append(mean)
            stds.append((_num(r.get("train/reward_std")) or 0.0) if part == TOTAL else float("nan"))
    return xs, means, stds


def _eval_series(data: RunData, part: str) -> list[tuple[float, float, float, float]]:
    """(step, mean, ci_low, ci_high) from stored evaluations, else from the history records."""
    points: dict[float, tuple[float, float, float, float]] = {}
    key = "eval/reward_mean" if part == TOTAL else f"eval/{part}"
    low_key, high_key = (
        ("eval/reward_ci_low", "eval/reward_ci_high") if part == TOTAL else (f"{key}_ci_low", f"{key}_ci_high")
    )
    for r in data.records:
        mean, step = _num(r.get(key)), _num(r.get("step"))
        if mean is not None and step is not None:
            low, high = _num(r.get(low_key)), _num(r.get(high_key))
            points[step] = (step, mean, mean if low is None else low, mean if high is None else high)
    for e in data.evals:
        stats = e.parts.get(part)
        if stats is not None:
            low = stats.mean if stats.ci_low is None else stats.ci_low
            high = stats.mean if stats.ci_high is None else stats.ci_high
            points[float(e.step)] = (float(e.step), stats.mean, low, high)
    return [points[s] for s in sorted(points)]


def _plot_panel(ax: Any, data: RunData, part: str) -> bool:
    from matplotlib.ticker import MaxNLocator

    xs, means, stds = _train_series(data, part)
    drew = False
    if xs:
        ax.plot(xs, means, marker="o", color="tab:blue", label="train (mean)")
        if part == TOTAL:
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, low, high, color="tab:blue", alpha=0.2, label="train ± std")
        drew = True
    points = _eval_series(data, part)
    if points:
        steps, emeans, lows, highs = (list(v) for v in zip(*points, strict=True))
        ax.plot(steps, emeans, marker="s", color="tab:orange", label="held-out (mean)")
        ax.fill_between(steps, lows, highs, color="tab:orange", alpha=0.25, label="held-out 95% CI")
        if len(steps) == 1:
            ax.errorbar(
                steps, emeans, yerr=[[emeans[0] - lows[0]], [highs[0] - emeans[0]]], color="tab:orange", capsize=4
            )
        drew = True
    ax.set_title("total reward" if part == TOTAL else part, fontsize="medium")
    ax.set_xlabel("policy step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return drew


def plot_reward_curve(data: RunData, path: Path) -> Path:
    """Train mean ± std and held-out mean with its CI band: the total, then one panel per part."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = _parts_to_plot(data)
    ncols = min(3, len(parts))
    nrows = math.ceil(len(parts) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, part in zip(axes, parts, strict=False):  # more axes than parts: the rest are hidden
        if not _plot_panel(ax, data, part):
            ax.text(0.5, 0.5, "nothing recorded yet", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(parts) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize="small", loc="best")
    fig.suptitle(f"Reward curve: {data.run_id}")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# ------------------------------------------------------------------------------ writing
def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `reward_curve.png` into the run directory; return their paths."""
    data = load_run(run_dir)
    markdown = data.directory / REPORT_FILE
    write_atomic(markdown, lambda tmp: tmp.write_text(render_markdown(data), encoding="utf-8"))
    curve = plot_reward_curve(data, data.directory / CURVE_FILE)
    logger.info("report of run {}: {} and {}", data.run_id, markdown, curve)
    return markdown, curve

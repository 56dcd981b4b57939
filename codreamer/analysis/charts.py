"""Charts of failure reports (matplotlib, Agg canvas: no display, no global backend switch)."""

from __future__ import annotations

from pathlib import Path

from codreamer.analysis.categories import PRIORITY, FailureCategory
from codreamer.analysis.report import CrossRunReport, RunFailureReport

__all__ = ["category_color", "plot_categories_over_iterations"]


def category_color(category: FailureCategory) -> tuple[float, float, float, float]:
    """A fixed colour per category, the same in every chart."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return cmap(PRIORITY.index(category) % cmap.N)


def plot_categories_over_iterations(report: RunFailureReport | CrossRunReport, path: Path) -> Path:
    """Stacked bars of failures per (primary) category: per iteration of a run, or per run of a
    cross-run report. Writes a PNG to `path` and returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(report, RunFailureReport):
        labels = [str(it) for it in report.iterations]
        series = [report.by_iteration.get(it, {}) for it in report.iterations]
        title, xlabel = f"Failures by category per iteration: {report.run_id}", "iteration"
    else:
        labels = list(report.run_ids)
        series = [report.category_counts_per_run.get(r, {}) for r in report.run_ids]
        title, xlabel = f"Failures by category across the last {len(labels)} run(s)", "run (oldest first)"
    categories = [c for c in PRIORITY if any(counts.get(c, 0) for counts in series)]

    fig = Figure(figsize=(max(6.0, 0.6 * len(labels) + 4.0), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(labels)))
    bottoms = [0] * len(labels)
    for category in categories:
        heights = [counts.get(category, 0) for counts in series]
        ax.bar(positions, heights, bottom=bottoms, label=category.value, color=category_color(category), width=0.7)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(
        positions,
        labels,
        rotation=0 if isinstance(report, RunFailureReport) else 30,
        ha="center" if isinstance(report, RunFailureReport) else "right",
    )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("failures")
    if categories:
        ax.legend(title="category", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no failures recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

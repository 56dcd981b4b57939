"""The `codreamer` verbs besides `learn-loop` / `train`: one small model each.

A verb's fields are its own flags and positional arguments (pydantic-settings builds the
parser and `--help` from them); `run` does the work with the `Settings` read from the
environment and `.env` (`--runs-dir` before the verb overrides where runs are). Adding a verb
is one model with a `run` method and one line in `VERBS`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg

from codreamer.config import Settings


class Verb(BaseModel):
    """Base of a verb: the docstring's first line is its one-line help in `codreamer --help`."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str]

    def run(self, settings: Settings) -> int:
        raise NotImplementedError


def _find_run(settings: Settings, run_id: str) -> Path | None:
    """The run's directory, or None after printing "no run ... (recent runs: ...)" to stderr."""
    from codreamer.runs import find_run

    try:
        return find_run(settings, run_id)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return None


class Runs(Verb):
    """List runs with status, step, last rewards and best held-out score."""

    name = "runs"

    def run(self, settings: Settings) -> int:
        from codreamer.reports import run_summary
        from codreamer.runs import list_runs

        runs = list_runs(settings)
        if not runs:
            print(f"no runs under {settings.runs_dir}")
            return 0
        print(
            f"{'run id':<28} {'kind':<10} {'status':<11} {'iters':>5} {'step':>4} {'train':>6} {'eval':>6} {'best (step)':>12}"
        )
        for path in runs:
            summary = run_summary(path)
            best = "-" if summary.get("best_score") is None else f"{summary['best_score']:.3f} ({summary['best_step']})"
            print(
                f"{summary['run_id']:<28} {summary.get('kind') or '-':<10} {summary.get('status') or '-':<11} "
                f"{summary['iterations']:>5} {_num(summary.get('step'), 'd'):>4} {_num(summary.get('last_train_reward')):>6} "
                f"{_num(summary.get('last_eval_reward')):>6} {best:>12}"
            )
        return 0


def _num(value: object, fmt: str = ".3f") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


class Show(Verb):
    """Print one run's per-iteration history."""

    name = "show"
    run_id: CliPositionalArg[str] = Field(description="the run")

    def run(self, settings: Settings) -> int:
        from codreamer.pipeline.history import read_history
        from codreamer.runs import ITERATIONS_FILE, read_run_file

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        meta = read_run_file(path)  # RunFileError: one line naming the file
        records, skipped = read_history(path / ITERATIONS_FILE)
        print(f"run {meta.get('run_id', path.name)} ({meta.get('kind', '?')}, {meta.get('status', '?')}) in {path}")
        for record in records:
            evaluation = record.get("eval/reward_mean")
            print(
                f"  iter {record['iteration']:>3} step {record['step']:>3} reward {record['train/reward_mean']:.3f}"
                f" ±{record['train/reward_std']:.3f}" + ("" if evaluation is None else f" eval {evaluation:.3f}")
            )
        if skipped:
            print(f"  ({skipped} unreadable history lines skipped)")
        return 0


class Report(Verb):
    """Write a run's Markdown summary and reward-curve PNG into its directory."""

    name = "report"
    run_id: CliPositionalArg[str] = Field(description="the run")

    def run(self, settings: Settings) -> int:
        from codreamer.reports import write_run_report

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        report, chart = write_run_report(path)
        print(f"report: {report}")
        print(f"chart:  {chart}")
        return 0


class Trace(Verb):
    """Print the call tree of a run's iterations with timings."""

    name = "trace"
    run_id: CliPositionalArg[str] = Field(description="the run")
    iteration: int | None = Field(default=None, description="only this iteration (1-based)")

    def run(self, settings: Settings) -> int:
        from codreamer.local_trace import format_tree, read_trace

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        spans = read_trace(path)
        if not spans:
            print(f"no trace recorded in {path}")
            return 0

        def wanted(root: dict) -> bool:  # iterations are numbered from 1 everywhere
            return self.iteration is None or root["inputs"].get("iteration") == self.iteration

        print(format_tree(spans, wanted) or f"no iteration {self.iteration} in the trace")
        return 0


class Ingest(Verb):
    """Append online outcomes (opened/replied/...) from a JSONL or CSV export to the event log."""

    name = "ingest"
    file: CliPositionalArg[Path] = Field(description="a .jsonl or .csv file of outcome events")

    def run(self, settings: Settings) -> int:
        from codreamer.events.cli_commands import cmd_ingest

        return cmd_ingest(settings.resolved_events_path(), self.file)


class ServeEvents(Verb):
    """Receive outcome events over HTTP (timestamp + body HMAC-signed with CODREAMER_EVENTS_SECRET, 32+ bytes)."""

    name = "serve-events"
    host: str = Field(default="127.0.0.1", description="address to listen on (loopback only by default)")
    port: int = Field(default=8787, description="port")

    def run(self, settings: Settings) -> int:
        from codreamer.events.cli_commands import cmd_serve_events

        secret = settings.events_secret.get_secret_value() if settings.events_secret is not None else None
        return cmd_serve_events(
            settings.resolved_events_path(), secret, self.host, self.port, settings.events_tolerance_s
        )


class OutboxVerb(Verb):
    """Export the emails a run's training rollouts sent (trajectory id to echo back with outcomes)."""

    name = "outbox"
    run_id: CliPositionalArg[str] = Field(description="the run")
    since: str | None = Field(default=None, description="only emails sent at or after this ISO time (naive = UTC)")
    format: Literal["jsonl", "csv"] = Field(default="jsonl", description="jsonl or csv")
    output: Path | None = Field(default=None, description="write to this file; unset: stdout")

    def run(self, settings: Settings) -> int:
        from codreamer.events.cli_commands import cmd_outbox

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        return cmd_outbox(path, self.since, self.format, self.output)


class Analyze(Verb):
    """Write a failure report and category chart for a run (default: the latest) or the last N runs."""

    name = "analyze"
    run_id: CliPositionalArg[str | None] = Field(default=None, description="the run to analyse; unset: the most recent")
    last: int | None = Field(default=None, description="analyse patterns across the last N runs instead")

    def run(self, settings: Settings) -> int:
        from codreamer.analysis.commands import cmd_analyze
        from codreamer.analysis.judge import AnalyzerJudgeConfig
        from codreamer.runs import models_root
        from codreamer.usage import LLMPrices

        judge, prices = AnalyzerJudgeConfig.from_settings(settings), LLMPrices.from_settings(settings)
        return cmd_analyze(models_root(settings), self.run_id, self.last, judge, prices=prices)


class Export(Verb):
    """Write a run's checkpoint as a PEFT adapter folder, or a merged transformers model (--merged)."""

    name = "export"
    run_id: CliPositionalArg[str] = Field(description="the run")
    step: int | None = Field(default=None, ge=1, description="the step to export; unset: the latest on disk")
    merged: bool = Field(
        default=False, description="merge the adapter into the base model (a plain transformers folder)"
    )
    output: Path | None = Field(
        default=None, description="a folder that does not exist yet; unset: <run dir>/exports/step-NNNN[-merged]"
    )

    def run(self, settings: Settings) -> int:
        """Embedded-backend runs only: their checkpoints are LoRA adapters of the embedded base model."""
        from codreamer.backends.embedded.export import ExportError, export_checkpoint, latest_step

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        try:
            step = self.step if self.step is not None else latest_step(path)
            output = self.output or path / "exports" / f"step-{step:04d}{'-merged' if self.merged else ''}"
            result = export_checkpoint(path, output, step=step, merged=self.merged, cache_dir=settings.model_cache_dir)
        except ExportError as exc:
            print(f"codreamer export: {exc}", file=sys.stderr)
            return 2
        kind = "merged transformers model" if result.merged else "PEFT adapter"
        print(f"exported step {result.step} of {self.run_id} as a {kind}: {result.output}")
        return 0


class SyncTraces(Verb):
    """Upload a run's local trace.jsonl to Weave (same tree, names and timestamps); a second sync adds nothing."""

    name = "sync-traces"
    run_id: CliPositionalArg[str] = Field(description="the run")
    project: str | None = Field(
        default=None, description="Weave project (project or entity/project); unset: WEAVE_PROJECT"
    )

    def run(self, settings: Settings) -> int:
        from codreamer.tracking.sync import cmd_sync_traces

        path = _find_run(settings, self.run_id)
        if path is None:
            return 2
        return cmd_sync_traces(settings, path, path.name, self.project)


#: The verbs, in the order `codreamer --help` lists them (after `learn-loop` and `train`).
VERBS: dict[str, type[Verb]] = {
    verb.name: verb
    for verb in (Runs, Show, Report, Trace, SyncTraces, Ingest, ServeEvents, OutboxVerb, Analyze, Export)
}

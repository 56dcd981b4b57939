"""The failure collector: every failed attempt of a run, stored once, with its full text.

Storage, per run directory (`runs/<project>/models/<run_id>/`):

- ``failures.jsonl``: the table, one `Failure` per line (appended with
  `codreamer.pipeline.history.append_record`: one flock'd write per line). A failure is
  appended exactly once per `failure_id`: the ids already in the table are loaded when the
  collector opens and every later duplicate is skipped.
- ``failures/<scenario_id>/<iteration:04d>-<failure_id>.json``: each failed version as its own
  file, so one folder holds the lineage of every failed attempt at one scenario, in order.
  The file is written (atomically) before the table line, so a crash in between only
  leaves a file that the next, identical `add_failure` rewrites in place.

  Failures without a scenario (a training step that raised) go to ``failures/_<stage>/``.
  `FailureCollector.lineage(scenario_id)` reads one scenario's versions back, oldest first,
  so the last failed attempt at a scenario is the last item.

`failure_id` is stable: sha256 of run id, iteration, the failure's key (the trajectory id, or
the exception's group/index) and its source, so collecting the same groups twice records
nothing new. Sources: "exception" (a rollout or a training step raised), "output" (the
episode finished but the email broke a rule or scored low), "judge" (RULER could not score a
group: one failure per group, as one judge call failed), "outcome" (no reply within the
outcome window). `iteration` is the loop's iteration number as written in
`iterations.jsonl` (its "iteration" key), `step` the model's training step.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import art
from loguru import logger
from pydantic import BaseModel, Field, field_validator

from codreamer.analysis.categories import (
    FailureCategory,
    OutputThresholds,
    categorize_exception,
    categorize_output,
    exception_type_name,
    primary_category,
    sort_categories,
)
from codreamer.pipeline.history import append_record, read_history
from codreamer.runs import write_json_atomic

if TYPE_CHECKING:
    from codreamer.domain import Product, Scenario

__all__ = [
    "FAILURES_DIR",
    "FAILURES_FILE",
    "Failure",
    "FailureCollector",
    "FailureSource",
    "failure_id",
    "load_failures",
    "messages_as_json",
    "sha256_text",
]

FAILURES_FILE = "failures.jsonl"
FAILURES_DIR = "failures"

FailureSource = Literal["exception", "output", "judge", "outcome"]

_AGENT_STATE_KEYS = (
    "turns",
    "tool_calls",
    "invalid_tool_calls",
    "prospect_lookups",
    "company_lookups",
    "finish_reason",
    "auto_finalized",
    "auto_finalize_source",
)
_REWARD_PREFIXES = ("rubric/", "reward/", "ruler/")
_UNSAFE_PATH_RE = re.compile(r"[^A-Za-z0-9._-]+")


class Failure(BaseModel):
    """One failed attempt: what went in, what came out, why it failed."""

    failure_id: str
    run_id: str
    iteration: int
    step: int
    split: str = "train"
    scenario_id: str | None = None
    prospect_id: str | None = None
    trajectory_id: str | None = None
    input_hash: str
    output_hash: str
    input: list[Any] = Field(default_factory=list, description="The full message list (JSON-able).")
    output: str = Field(default="", description="Full email ('Subject: ...' + body) or the error text.")
    error_message: str | None = None
    agent_state: dict[str, Any] = Field(default_factory=dict)
    reward_parts: dict[str, float] = Field(default_factory=dict)
    reward: float | None = None
    category: FailureCategory
    categories: list[FailureCategory]
    source: FailureSource
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("categories")
    @classmethod
    def _ordered(cls, value: list[FailureCategory]) -> list[FailureCategory]:
        return sort_categories(value)

    def version_path(self, run_dir: Path) -> Path:
        """Where this failed version is stored as its own file (see the module docstring)."""
        return run_dir / FAILURES_DIR / self.lineage_folder / f"{self.iteration:04d}-{self.failure_id}.json"

    @property
    def lineage_folder(self) -> str:
        """The scenario's folder, or `_<stage>` (e.g. `_train`) for a failure without one."""
        if self.scenario_id:
            return _path_part(self.scenario_id)
        return "_" + _path_part(str(self.agent_state.get("stage") or self.source))


# --------------------------------------------------------------------------- helpers


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def failure_id(run_id: str, iteration: int, key: str, source: str) -> str:
    """Stable id: sha256 of run id, iteration, key (trajectory id / exception index) and source; 20 hex."""
    return sha256_text(_canonical_json([run_id, int(iteration), key, source]))[:20]


def _path_part(value: str | None) -> str:
    cleaned = _UNSAFE_PATH_RE.sub("_", value or "").strip("._")
    return cleaned[:120] or "_unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    return json.loads(json.dumps(value, default=str))


def messages_as_json(messages_and_choices: Iterable[Any]) -> list[dict[str, Any]]:
    """Messages and sampled `Choice`s as plain JSON dicts (a Choice becomes its assistant message)."""
    out: list[dict[str, Any]] = []
    for item in messages_and_choices:
        message = getattr(item, "message", None)
        if message is not None and hasattr(item, "finish_reason"):  # an openai Choice
            data = _jsonable(message)
            data.setdefault("role", "assistant")
            data["finish_reason"] = item.finish_reason
            out.append(data)
        else:
            data = _jsonable(item)
            out.append(data if isinstance(data, dict) else {"content": data})
    return out


def _initial_messages(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages before the first assistant turn: the scenario as the agent saw it."""
    first: list[Mapping[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" or role is None:
            break
        first.append({"role": role, "content": message.get("content")})
    return first


def _email_text(metadata: Mapping[str, Any]) -> str:
    subject = metadata.get("email_subject")
    body = metadata.get("email_body")
    if subject is None and body is None:
        return ""
    return f"Subject: {subject or ''}\n\n{body or ''}"


def _reward_parts(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if key.startswith(_REWARD_PREFIXES) and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _agent_state(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {key: metadata[key] for key in _AGENT_STATE_KEYS if key in metadata}


def _exception_fields(exc: Any) -> tuple[str, str, str]:
    """(type, message, traceback) of an `art` PydanticException, a BaseException or a mapping.

    The type is a dotted name (``openai.APITimeoutError``; builtins bare: ``TimeoutError``),
    the same whether the exception is live or went through ART's `str(type(exc))`.
    """
    if isinstance(exc, BaseException):
        import traceback

        tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ is not None else ""
        cls = type(exc)
        name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        return name, str(exc), tb
    if isinstance(exc, Mapping):
        raw = (str(exc.get("type", "Exception")), str(exc.get("message", "")), str(exc.get("traceback", "")))
    else:
        raw = (str(getattr(exc, "type", "Exception")), str(getattr(exc, "message", "")), str(getattr(exc, "traceback", "")))
    return exception_type_name(raw[0]) or "Exception", raw[1], raw[2]


def load_failures(run_dir: Path) -> tuple[list[Failure], int]:
    """The failures table of a run: (failures in file order, unreadable lines skipped)."""
    records, skipped = read_history(run_dir / FAILURES_FILE)
    failures: list[Failure] = []
    for record in records:
        try:
            failures.append(Failure.model_validate(record))
        except ValueError:
            skipped += 1
    return failures, skipped


# --------------------------------------------------------------------------- collector


class FailureCollector:
    """Records a run's failures into `failures.jsonl` and `failures/<scenario_id>/`."""

    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        low_reward_threshold: float = 0.4,
        *,
        thresholds: OutputThresholds | None = None,
        product: Product | None = None,
    ) -> None:
        """`product` (optional) lets a crashed rollout be stored with the prompt it would have
        started from, so its input and input hash match the scenario's other attempts."""
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.product = product
        self.thresholds = (thresholds or OutputThresholds()).model_copy(update={"low_reward": low_reward_threshold})
        records, skipped = read_history(self.table_path)
        if skipped:
            logger.warning("{}: {} unreadable line(s) skipped", self.table_path, skipped)
        self._ids: set[str] = {str(r["failure_id"]) for r in records if isinstance(r, dict) and "failure_id" in r}

    @property
    def low_reward_threshold(self) -> float:
        return self.thresholds.low_reward

    @property
    def table_path(self) -> Path:
        return self.run_dir / FAILURES_FILE

    @property
    def versions_dir(self) -> Path:
        return self.run_dir / FAILURES_DIR

    def __contains__(self, failure_id_: object) -> bool:
        return failure_id_ in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    # --- storing -----------------------------------------------------------------------

    def _store(self, failure: Failure) -> bool:
        """Write the version file, then the table line; False (nothing written) for a known id."""
        if failure.failure_id in self._ids:
            return False
        record = failure.model_dump(mode="json")
        write_json_atomic(failure.version_path(self.run_dir), record)
        append_record(self.table_path, record)
        self._ids.add(failure.failure_id)
        return True

    def _build(
        self,
        *,
        iteration: int,
        step: int,
        source: FailureSource,
        categories: Sequence[FailureCategory | str],
        key: str | None,
        split: str,
        scenario_id: str | None,
        prospect_id: str | None,
        trajectory_id: str | None,
        input: Sequence[Any] | None,
        output: str,
        error_message: str | None,
        agent_state: Mapping[str, Any] | None,
        reward_parts: Mapping[str, float] | None,
        reward: float | None,
        input_spec: Any = None,
    ) -> Failure:
        """`input_spec` (what `input_hash` hashes) defaults to the messages before the first
        assistant turn (the scenario as the agent saw it), else the scenario/prospect ids."""
        ordered = sort_categories(categories)
        messages = _jsonable(list(input or []))
        if input_spec is None:
            first = _initial_messages([m for m in messages if isinstance(m, Mapping)])
            input_spec = first or {"scenario_id": scenario_id, "prospect_id": prospect_id}
        key = key or trajectory_id or f"{scenario_id}:{sha256_text(output + (error_message or ''))[:16]}"
        return Failure(
            failure_id=failure_id(self.run_id, iteration, f"{split}:{key}", source),
            run_id=self.run_id,
            iteration=iteration,
            step=step,
            split=split,
            scenario_id=scenario_id,
            prospect_id=prospect_id,
            trajectory_id=trajectory_id,
            input_hash=sha256_text(_canonical_json(input_spec)),
            output_hash=sha256_text(output),
            input=messages,
            output=output,
            error_message=error_message,
            agent_state=dict(agent_state or {}),
            reward_parts=dict(reward_parts or {}),
            reward=reward,
            category=primary_category(ordered),
            categories=ordered,
            source=source,
        )

    # --- public API --------------------------------------------------------------------

    def add_failure(
        self,
        *,
        iteration: int,
        step: int,
        category: FailureCategory | str,
        source: FailureSource,
        categories: Sequence[FailureCategory | str] | None = None,
        key: str | None = None,
        split: str = "train",
        scenario_id: str | None = None,
        prospect_id: str | None = None,
        trajectory_id: str | None = None,
        input: Sequence[Any] | None = None,
        output: str = "",
        error_message: str | None = None,
        agent_state: Mapping[str, Any] | None = None,
        reward_parts: Mapping[str, float] | None = None,
        reward: float | None = None,
    ) -> Failure:
        """Record one failure from explicit fields; returns it (a known `failure_id` is not re-stored).

        `key` identifies the failure within (run, iteration, split, source); it defaults to the
        trajectory id, else the scenario id + a hash of output/error. `categories` defaults to
        `[category]`; the stored primary category is the first of both in priority order.
        """
        failure = self._build(
            iteration=iteration,
            step=step,
            source=source,
            categories=[category, *(categories or [])],
            key=key,
            split=split,
            scenario_id=scenario_id,
            prospect_id=prospect_id,
            trajectory_id=trajectory_id,
            input=input,
            output=output,
            error_message=error_message,
            agent_state=agent_state,
            reward_parts=reward_parts,
            reward=reward,
        )
        self._store(failure)
        return failure

    def add_exception(
        self,
        exc: BaseException | Any,
        *,
        iteration: int,
        step: int,
        stage: str = "rollout",
        key: str | None = None,
        split: str = "train",
        scenario_id: str | None = None,
        prospect_id: str | None = None,
        input: Sequence[Any] | None = None,
    ) -> Failure:
        """Record a raised exception (an exception object or art's PydanticException).

        The default key is (stage, scenario, error text): the same error raised twice for the
        same scenario in one iteration is one failure. Pass `key` to keep repeated attempts
        apart (e.g. `key=f"train:attempt{n}"` for each failed try of a training step).
        """
        type_name, message, tb = _exception_fields(exc)
        error = f"{type_name}: {message}"
        return self.add_failure(
            iteration=iteration,
            step=step,
            category=categorize_exception(type_name, message, stage=stage),
            source="judge" if stage == "judge" else "exception",
            key=key or f"{stage}:{scenario_id}:{sha256_text(error)[:16]}",
            split=split,
            scenario_id=scenario_id,
            prospect_id=prospect_id,
            input=input,
            output=f"{error}\n{tb}".rstrip(),
            error_message=error,
            agent_state={"stage": stage, "exception_type": type_name},
        )

    def add_no_reply(
        self,
        trajectory_id: str,
        prospect_id: str,
        *,
        iteration: int,
        step: int,
        scenario_id: str | None = None,
        split: str = "train",
        output: str = "",
        input: Sequence[Any] | None = None,
        reward: float | None = None,
        reward_parts: Mapping[str, float] | None = None,
        window_s: float | None = None,
        agent_state: Mapping[str, Any] | None = None,
    ) -> Failure:
        """Record that a sent email got no reply within the outcome window (source "outcome").

        `iteration` is the iteration the email was sent in (not the one that noticed the
        silence), so the same email is recorded once however often it is checked.
        """
        state = dict(agent_state or {})
        if window_s is not None:
            state["outcome_window_s"] = window_s
        return self.add_failure(
            iteration=iteration,
            step=step,
            category=FailureCategory.NO_REPLY,
            source="outcome",
            key=trajectory_id,
            split=split,
            scenario_id=scenario_id,
            prospect_id=prospect_id,
            trajectory_id=trajectory_id,
            input=input,
            output=output,
            error_message=None if window_s is None else f"no reply within {window_s:g}s",
            agent_state=state,
            reward=reward,
            reward_parts=reward_parts,
        )

    def collect_no_replies(
        self,
        groups: Sequence[art.TrajectoryGroup],
        outcomes: Mapping[str, Any],
        *,
        iteration: int,
        step: int,
        sent_at: datetime,
        window_s: float,
        now: datetime | None = None,
        split: str = "train",
    ) -> list[Failure]:
        """Record every email of `groups` without a reply once `window_s` has passed since `sent_at`.

        `outcomes` maps trajectory ids to what is known of their emails (the event log's
        `OutcomeSummary`, or anything with a `replied` attribute); an email with no outcome
        at all counts as unreplied. Before the window has passed nothing is recorded (call
        again later with the same `iteration`). Returns the failures newly stored.
        """
        now = now or datetime.now(UTC)
        if (now - sent_at).total_seconds() < window_s:
            return []
        added: list[Failure] = []
        for group in groups:
            gmeta = group.metadata or {}
            for trajectory in group.trajectories:
                meta = trajectory.metadata or {}
                tid = meta.get("trajectory_id")
                if tid is None or bool(getattr(outcomes.get(str(tid)), "replied", False)):
                    continue
                before = len(self)
                failure = self.add_no_reply(
                    str(tid),
                    str(meta.get("prospect_id", gmeta.get("prospect_id")) or ""),
                    iteration=iteration,
                    step=step,
                    scenario_id=meta.get("scenario_id", gmeta.get("scenario_id")),
                    split=split,
                    output=_email_text(meta),
                    input=messages_as_json(trajectory.messages_and_choices),
                    reward=float(trajectory.reward) if trajectory.reward is not None else None,
                    reward_parts=_reward_parts(trajectory.metrics or {}),
                    window_s=window_s,
                    agent_state=_agent_state(meta),
                )
                if len(self) > before:
                    added.append(failure)
        return added

    def _scenario_input(self, scenario: Scenario | None) -> list[Any] | None:
        """The prompt a rollout of `scenario` starts from (needs the product), else None."""
        if scenario is None or self.product is None:
            return None
        from codreamer.agent.prompts import initial_messages

        return list(initial_messages(scenario.prospect, self.product))

    def _exception_failures(
        self,
        group: art.TrajectoryGroup,
        group_index: int,
        scenario: Scenario | None,
        unique: Callable[[str], str],
        **common: Any,
    ) -> list[Failure]:
        from codreamer.agent.rollout import partial_episode  # the note's format lives with the rollout

        gmeta = group.metadata or {}
        g_scenario = gmeta.get("scenario_id")
        failures = []
        for exc_index, exc in enumerate(group.exceptions):
            type_name, message, tb = _exception_fields(exc)
            error = f"{type_name}: {message}"
            scenario_input = self._scenario_input(scenario)
            done_before = partial_episode(tb)
            if done_before:
                scenario_input = (scenario_input or []) + done_before  # the conversation up to the crash
            failures.append(
                self._build(
                    source="exception",
                    categories=[categorize_exception(type_name, message, stage="rollout")],
                    key=unique(f"exception:{group_index}:{g_scenario}:{exc_index}"),
                    scenario_id=g_scenario,
                    prospect_id=gmeta.get("prospect_id"),
                    trajectory_id=None,
                    input=scenario_input,
                    output=f"{error}\n{tb}".rstrip(),
                    error_message=error,
                    agent_state={"stage": "rollout", "exception_type": type_name},
                    reward_parts=None,
                    reward=None,
                    **common,
                )
            )
        return failures

    def _judge_failure(
        self, group: art.TrajectoryGroup, group_index: int, unique: Callable[[str], str], **common: Any
    ) -> Failure | None:
        """One "judge" failure for a group RULER could not score (one judge call failed)."""
        gmeta = group.metadata or {}
        flagged = [t for t in group.trajectories if (t.metrics or {}).get("ruler/judge_error")]
        error = gmeta.get("judge_error")
        if not flagged and error is None:
            return None
        members = flagged or list(group.trajectories)
        g_scenario = gmeta.get("scenario_id")
        emails = [
            {"trajectory_id": (t.metadata or {}).get("trajectory_id"), "email": _email_text(t.metadata or {})}
            for t in members
        ]
        error_text = str(error) if error is not None else "judge error (no message recorded)"
        rewards = [float(t.reward) for t in members if t.reward is not None]
        return self._build(
            source="judge",
            categories=[FailureCategory.JUDGE_ERROR],
            key=unique(f"judge:{group_index}:{g_scenario}"),
            scenario_id=g_scenario,
            prospect_id=gmeta.get("prospect_id"),
            trajectory_id=None,
            input=emails,
            input_spec=emails,
            output=error_text,
            error_message=error_text,
            agent_state={"stage": "judge", "group_size": len(group.trajectories)},
            reward_parts=None,
            reward=min(rewards) if rewards else None,
            **common,
        )

    def failures_for_groups(
        self,
        groups: Sequence[art.TrajectoryGroup],
        iteration: int,
        step: int,
        *,
        split: str = "train",
        scenarios: Sequence[Scenario] | None = None,
    ) -> list[Failure]:
        """The failures in `groups` (nothing stored): see `collect_groups`."""
        failures: list[Failure] = []
        seen_keys: dict[str, int] = {}
        by_id = {s.scenario_id: s for s in scenarios or ()}

        def unique(key: str) -> str:
            # identical trajectories (same messages, same id) in one call stay separate failures
            n = seen_keys.get(key, 0)
            seen_keys[key] = n + 1
            return key if n == 0 else f"{key}#{n}"

        common: dict[str, Any] = dict(iteration=iteration, step=step, split=split)
        for group_index, group in enumerate(groups):
            gmeta = group.metadata or {}
            scenario = by_id.get(str(gmeta.get("scenario_id")))
            failures += self._exception_failures(group, group_index, scenario, unique, **common)
            for member, trajectory in enumerate(group.trajectories):
                meta = trajectory.metadata or {}
                metrics = trajectory.metrics or {}
                tid = meta.get("trajectory_id")
                tid = str(tid) if tid is not None else None
                reward = float(trajectory.reward) if trajectory.reward is not None else None
                categories = categorize_output(metrics, meta, self.thresholds, reward=reward)
                if not categories:
                    continue
                failures.append(
                    self._build(
                        source="output",
                        categories=categories,
                        key=unique(f"output:{tid or f'{group_index}:{member}'}"),
                        scenario_id=meta.get("scenario_id", gmeta.get("scenario_id")),
                        prospect_id=meta.get("prospect_id", gmeta.get("prospect_id")),
                        trajectory_id=tid,
                        input=messages_as_json(trajectory.messages_and_choices),
                        output=_email_text(meta),
                        error_message=None,
                        agent_state=_agent_state(meta),
                        reward_parts=_reward_parts(metrics),
                        reward=reward,
                        **common,
                    )
                )
            judge = self._judge_failure(group, group_index, unique, **common)
            if judge is not None:
                failures.append(judge)
        return failures

    def collect_groups(
        self,
        groups: Sequence[art.TrajectoryGroup],
        iteration: int,
        step: int,
        *,
        split: str = "train",
        scenarios: Sequence[Scenario] | None = None,
    ) -> list[Failure]:
        """Record the failures of scored `groups`; returns those newly stored by this call.

        - each of a group's `exceptions` -> an "exception" failure (categorised by type/message;
          with `scenarios` and the collector's `product`, its input is the scenario's prompt);
        - each trajectory with an output category (`categorize_output`, which includes
          `low_reward` below the threshold and `auto_finalized`) -> an "output" failure;
        - each group RULER could not score (`metadata["judge_error"]` /
          `metrics["ruler/judge_error"]`) -> one "judge" failure holding the group's emails.

        Calling it again with the same groups stores nothing new.
        """
        found = self.failures_for_groups(groups, iteration, step, split=split, scenarios=scenarios)
        added = [f for f in found if self._store(f)]
        if added:
            logger.debug("recorded {} failure(s) for iteration {} ({})", len(added), iteration, split)
        return added

    def lineage(self, scenario_id: str) -> list[Failure]:
        """Every failed version of one scenario, oldest first (the last is the latest attempt)."""
        folder = self.versions_dir / _path_part(scenario_id)
        versions: list[Failure] = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                versions.append(Failure.model_validate_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                logger.warning("{}: unreadable failure version skipped ({})", path, type(exc).__name__)
        return sorted(versions, key=lambda f: (f.iteration, f.recorded_at, f.failure_id))

    # --- W&B sink ----------------------------------------------------------------------

    def log_to_wandb(self, run: Any | None = None) -> bool:
        """Log the failures table as a `wandb.Table` and a versioned artifact; False when no run.

        The artifact (`failures-<run_id>`, type "failures") holds `failures.jsonl` and every
        failed version under `failures/`; logging it again after more failures makes a new
        version. `run` defaults to the active `wandb.run`; without a run this is a no-op.
        Works in W&B offline mode (the run directory keeps both until `wandb sync`).
        """
        try:
            import wandb  # noqa: PLC0415 - optional, heavy
        except ImportError:
            return False
        run = run if run is not None else getattr(wandb, "run", None)
        if run is None:
            return False
        failures, _ = load_failures(self.run_dir)
        columns = [
            "failure_id", "iteration", "step", "split", "scenario_id", "prospect_id", "trajectory_id",
            "category", "categories", "source", "reward", "error_message", "output",
        ]  # fmt: skip
        rows = [
            [
                f.failure_id, f.iteration, f.step, f.split, f.scenario_id, f.prospect_id, f.trajectory_id,
                str(f.category), ",".join(map(str, f.categories)), f.source, f.reward, f.error_message, f.output,
            ]  # fmt: skip
            for f in failures
        ]
        table = wandb.Table(columns=columns, data=rows)
        run.log({"failures/table": table, "failures/count": len(rows)})
        artifact = wandb.Artifact(
            name=f"failures-{_path_part(self.run_id)}",
            type="failures",
            metadata={"run_id": self.run_id, "failures": len(rows)},
        )
        if self.table_path.is_file():
            artifact.add_file(str(self.table_path), name=FAILURES_FILE)
        if self.versions_dir.is_dir():
            artifact.add_dir(str(self.versions_dir), name=FAILURES_DIR)
        run.log_artifact(artifact)
        return True

"""The failure collector: every failed attempt of a run, recorded once, with its full text.

`FailureCollector` decides which failures a scored iteration holds and records them through
`FailureStore` (`codreamer.analysis.failures`: the table, the version files, the ids stored):

- each exception of a group (a crashed rollout) -> an "exception" failure;
- each trajectory whose output broke a rule or scored low -> an "output" failure;
- each group RULER could not score -> one "judge" failure (one judge call failed);
- each email without a reply within the outcome window -> an "outcome" failure;
- a raised exception outside a group (a training step) -> `add_exception`.

Failure ids are stable (`failure_id`), so collecting the same groups twice records nothing
new. The W&B table and artifact of the failures are `codreamer.analysis.wandb_log`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import art
from loguru import logger

from codreamer.analysis import fields
from codreamer.analysis.categories import (
    FailureCategory,
    OutputThresholds,
    categorize_exception,
    categorize_output,
    primary_category,
    sort_categories,
)
from codreamer.analysis.failures import (
    FAILURES_DIR,
    FAILURES_FILE,
    Failure,
    FailureSource,
    FailureStore,
    canonical_json,
    failure_id,
    load_failures,
    sha256_text,
)
from codreamer.analysis.fields import messages_as_json

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
        self.store = FailureStore(self.run_dir)

    @property
    def low_reward_threshold(self) -> float:
        return self.thresholds.low_reward

    @property
    def table_path(self) -> Path:
        return self.store.table_path

    @property
    def versions_dir(self) -> Path:
        return self.store.versions_dir

    def __contains__(self, failure_id_: object) -> bool:
        return failure_id_ in self.store

    def __len__(self) -> int:
        return len(self.store)

    # --- building ----------------------------------------------------------------------

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
        messages = fields.jsonable(list(input or []))
        if input_spec is None:
            first = fields.initial_messages([m for m in messages if isinstance(m, Mapping)])
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
            input_hash=sha256_text(canonical_json(input_spec)),
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
        self.store.store(failure)
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
        type_name, message, tb = fields.exception_fields(exc)
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
                    output=fields.email_text(meta),
                    input=messages_as_json(trajectory.messages_and_choices),
                    reward=float(trajectory.reward) if trajectory.reward is not None else None,
                    reward_parts=fields.reward_parts(trajectory.metrics or {}),
                    window_s=window_s,
                    agent_state=fields.agent_state(meta),
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
            type_name, message, tb = fields.exception_fields(exc)
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
            {"trajectory_id": (t.metadata or {}).get("trajectory_id"), "email": fields.email_text(t.metadata or {})}
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

        common: dict[str, Any] = {"iteration": iteration, "step": step, "split": split}
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
                        output=fields.email_text(meta),
                        error_message=None,
                        agent_state=fields.agent_state(meta),
                        reward_parts=fields.reward_parts(metrics),
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
        added = [f for f in found if self.store.store(f)]
        if added:
            logger.debug("recorded {} failure(s) for iteration {} ({})", len(added), iteration, split)
        return added

    def lineage(self, scenario_id: str) -> list[Failure]:
        """Every failed version of one scenario, oldest first (the last is the latest attempt)."""
        return self.store.lineage(scenario_id)

    def log_to_wandb(self, run: Any | None = None, step: int | None = None) -> bool:
        """Log the failures new since the last log to W&B at `step` (`codreamer.analysis.wandb_log`);
        False without a run."""
        from codreamer.analysis.wandb_log import log_failures  # W&B is heavy and optional

        return log_failures(self.run_dir, self.run_id, run, step)

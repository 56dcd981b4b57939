"""Retries, timeouts and resumable state, with fault injection (no model loaded).

The inference server is the scripted loopback server (`loopback.py`): it fails, stalls and
recovers on cue. Training is exercised through `grpo_update` with `FlakyBackend`, a TEST
DOUBLE of the backend's `train` that raises scripted errors.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import art
import httpx
import openai
import pytest
from loopback import Call, Delay, HTTPError, LoopbackOpenAI
from openai.types.chat.chat_completion import Choice

from codreamer.agent.rollout import RolloutConfig, rollout
from codreamer.analysis.collector import FailureCollector, load_failures
from codreamer.config import Settings
from codreamer.domain import Product, Scenario
from codreamer.pipeline.fanout import RolloutFailuresError
from codreamer.pipeline.run import ResumeConfigError, check_resume_settings, discard_uncommitted_checkpoints
from codreamer.pipeline.stages import RolloutPlan, generate_trajectories, grpo_update
from codreamer.pipeline.state import (
    STATE_FILE,
    RunState,
    RunStateError,
    changed_settings,
    config_hash,
    dump_groups,
    load_groups,
    load_state,
    save_state,
)
from codreamer.retry import RetryCounter, RetryPolicy, TransientError, counting_retries, is_transient

FINAL = {"subject": "Leipzig and audits", "body": "Hi Ana, congrats on Leipzig. FreightPilot cuts audits. Sam"}
FAST = {"inference_attempts": 3, "retry_initial_s": 0.0, "retry_max_s": 0.0}


@pytest.fixture(params=["openai", "direct"])
def client(request: pytest.FixtureRequest) -> str:
    """Every inference-retry test runs on both policy clients (`codreamer.agent.policy_client`)."""
    return request.param


@pytest.fixture
def product() -> Product:
    return Product(
        name="FreightPilot",
        one_liner="Automates carrier invoice audits for logistics teams.",
        value_props=["cuts audit time by 80%"],
        call_to_action="a 15-minute call next week",
        sender_name="Sam Lee",
        sender_title="Account Executive",
    )


@pytest.fixture
def scenario() -> Scenario:
    from codreamer.data import load_task_data

    return load_task_data(Settings().data_dir).train[0]


def make_model(server: LoopbackOpenAI) -> art.Model:
    return art.Model(
        name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
    )


# --- classification -------------------------------------------------------------------------


def _status_error(status: int, *, should_retry: str | None = None) -> openai.APIStatusError:
    headers = {"x-should-retry": should_retry} if should_retry else {}
    response = httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://x"))
    return openai.APIStatusError("boom", response=response, body=None)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (TransientError("busy"), True),
        (_status_error(429), True),
        (_status_error(503), True),
        (_status_error(503, should_retry="false"), False),
        (_status_error(400), False),
        (_status_error(401), False),
        (ValueError("bad batch"), False),
        (FileNotFoundError(2, "missing"), False),
        (KeyError("x"), False),
    ],
)
def test_only_transient_errors_are_retried(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


# --- inference retries ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rollout_recovers_from_server_errors_and_counts_the_retries(
    scenario: Scenario, product: Product, client: str
) -> None:
    script = [HTTPError(500), HTTPError(503), [Call("finalize_email", FINAL)]]
    counter = RetryCounter()
    async with LoopbackOpenAI(script) as server:
        with counting_retries(counter):
            traj = await rollout(
                make_model(server), scenario, product, RolloutConfig(max_turns=2, inference_client=client, **FAST)
            )
        assert len(server.requests) == 3
    assert traj.metadata["email_subject"] == FINAL["subject"]
    assert counter.as_metrics() == {"retries/inference": 2.0}


@pytest.mark.anyio
async def test_permanent_error_fails_fast(scenario: Scenario, product: Product, client: str) -> None:
    async with LoopbackOpenAI([HTTPError(400), [Call("finalize_email", FINAL)]]) as server:
        with pytest.raises(openai.BadRequestError):
            await rollout(
                make_model(server), scenario, product, RolloutConfig(max_turns=2, inference_client=client, **FAST)
            )
        assert len(server.requests) == 1


@pytest.mark.anyio
async def test_stalled_call_times_out_then_recovers(scenario: Scenario, product: Product, client: str) -> None:
    script = [Delay(3.0, then="late"), [Call("finalize_email", FINAL)]]
    config = RolloutConfig(max_turns=2, request_timeout_s=0.3, inference_client=client, **FAST)
    async with LoopbackOpenAI(script) as server:
        traj = await rollout(make_model(server), scenario, product, config)
        assert len(server.requests) == 2
    assert not traj.metadata["auto_finalized"]


@pytest.mark.anyio
async def test_retries_give_up_after_the_configured_attempts(scenario: Scenario, product: Product, client: str) -> None:
    async with LoopbackOpenAI([HTTPError(500)] * 5) as server:
        with pytest.raises(openai.InternalServerError):
            await rollout(
                make_model(server), scenario, product, RolloutConfig(max_turns=2, inference_client=client, **FAST)
            )
        assert len(server.requests) == 3


# --- rollout timeouts and max_exceptions ------------------------------------------------------


def _plan(product: Product, *, group_size: int, max_exceptions: float, rollout_timeout_s: float) -> RolloutPlan:
    config = RolloutConfig(max_turns=1, request_timeout_s=30, **FAST)
    return RolloutPlan(product, config, group_size, 4, max_exceptions, 0, rollout_timeout_s=rollout_timeout_s)


@pytest.mark.anyio
async def test_hung_rollout_is_cancelled_and_recorded(scenario: Scenario, product: Product, tmp_path: Path) -> None:
    script = [Delay(30.0, then="never"), [Call("finalize_email", FINAL)], [Call("finalize_email", FINAL)]]
    plan = _plan(product, group_size=3, max_exceptions=0.5, rollout_timeout_s=0.5)
    async with LoopbackOpenAI(script) as server:
        groups = await asyncio.wait_for(generate_trajectories(make_model(server), [scenario], plan, step=0), 10)
    assert len(groups[0].trajectories) == 2 and len(groups[0].exceptions) == 1
    assert "timed out after 0.5s" in groups[0].exceptions[0].message

    collector = FailureCollector(tmp_path, "r")
    collector.collect_groups(groups, iteration=1, step=0)
    failures, _ = load_failures(tmp_path)
    assert [str(f.category) for f in failures if f.source == "exception"] == ["timeout"]


@pytest.mark.anyio
async def test_too_many_failed_rollouts_give_up_the_stage(scenario: Scenario, product: Product) -> None:
    plan = _plan(product, group_size=2, max_exceptions=0, rollout_timeout_s=30)
    async with LoopbackOpenAI([HTTPError(400), [Call("finalize_email", FINAL)]]) as server:
        with pytest.raises(RolloutFailuresError, match="1 of 2 rollouts failed") as info:
            await generate_trajectories(make_model(server), [scenario], plan, step=0)
    assert len(info.value.groups[0].trajectories) == 1 and "BadRequestError" in info.value.groups[0].exceptions[0].type
    plan = _plan(product, group_size=2, max_exceptions=0.5, rollout_timeout_s=30)
    async with LoopbackOpenAI([HTTPError(400), [Call("finalize_email", FINAL)]]) as server:
        groups = await generate_trajectories(make_model(server), [scenario], plan, step=0)
    assert len(groups[0].exceptions) == 1


# --- training retries ---------------------------------------------------------------------------


class FlakyBackend:
    """TEST DOUBLE of a backend's `train`: raises the scripted errors, then succeeds."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def train(self, model: Any, groups: Any, *, learning_rate: float) -> art.TrainResult:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return art.TrainResult(step=1, metrics={"loss": 0.0})


@pytest.mark.anyio
async def test_training_step_retries_transient_errors() -> None:
    backend = FlakyBackend([TransientError("worker restarting"), ConnectionResetError()])
    counter = RetryCounter()
    with counting_retries(counter):
        result = await grpo_update(
            backend, None, [], learning_rate=1e-5, retry=RetryPolicy(attempts=3, initial_s=0, max_s=0)
        )
    assert result.step == 1 and backend.calls == 3
    assert counter.as_metrics() == {"retries/training": 2.0}


@pytest.mark.anyio
async def test_training_step_permanent_error_is_not_retried() -> None:
    backend = FlakyBackend([ValueError("advantages are NaN")])
    with pytest.raises(ValueError, match="NaN"):
        await grpo_update(backend, None, [], learning_rate=1e-5, retry=RetryPolicy(attempts=5, initial_s=0, max_s=0))
    assert backend.calls == 1


# --- state ----------------------------------------------------------------------------------------


def test_groups_survive_the_work_file_with_their_choices() -> None:
    choice = Choice.model_validate(
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "hi"},
            "logprobs": {"content": [{"token": "token_id:5", "logprob": -0.5, "bytes": None, "top_logprobs": []}]},
        }
    )
    traj = art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "x"}, choice],
        reward=0.5,
        metadata={"a": 1},
        metrics={"m": 1.0},
    )
    group = art.TrajectoryGroup([traj], metadata={"scenario_id": "s"}, exceptions=[ValueError("boom")])
    restored = load_groups(json.loads(json.dumps(dump_groups([group]))))[0]
    item = restored.trajectories[0].messages_and_choices[1]
    assert isinstance(item, Choice) and item.logprobs is not None and item.logprobs.content[0].logprob == -0.5
    assert restored.trajectories[0].reward == 0.5 and restored.trajectories[0].metrics == {"m": 1.0}
    assert restored.metadata == {"scenario_id": "s"} and restored.exceptions[0].message == "boom"


def test_state_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    state = RunState(run_id="r", iteration=2, stage="trained", step=3, seed=1, config_hash="abc", events_offset=10)
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left behind
    assert STATE_FILE != "state.json"  # ART's file in the same model directory
    assert state.reached("scored") and not state.reached("evaluated")


@pytest.mark.anyio
async def test_our_resume_state_and_arts_state_survive_each_other(tmp_path: Path) -> None:
    """ART's `model.log` re-writes its `state.json` (merge_state) between two of our stage writes."""
    model = art.TrainableModel(
        name="r", project="p", base_model="x", base_path=str(tmp_path), run_name="r", report_metrics=[]
    )
    directory = tmp_path / "p" / "models" / "r"
    state = RunState(run_id="r", iteration=0, stage="generated", step=0, seed=1, config_hash="abc")
    save_state(directory, state)
    await model.log(metrics={"train/loss": 1.0}, step=1)  # ART: read, deep-merge, plain open("w")
    arts = model.read_state()
    assert arts is not None and "_metrics_builder_state" in arts and "stage" not in arts
    assert load_state(directory) == state  # ART's write did not touch ours

    trained = state.model_copy(update={"stage": "trained", "step": 1})
    save_state(directory, trained)
    assert model.read_state() == arts  # our write did not erase ART's metrics-builder state
    assert load_state(directory) == trained
    await model.log(metrics={"train/loss": 0.5}, step=2)
    assert load_state(directory) == trained and "_metrics_builder_state" in (model.read_state() or {})


def test_a_state_left_in_arts_file_is_migrated_and_arts_keys_stay(tmp_path: Path) -> None:
    old = RunState(run_id="r", iteration=1, stage="scored", step=1, seed=0, config_hash="abc", events_offset=5)
    arts = {"_metrics_builder_state": {"cum_state": {"x": 1}, "unique_scenario_ids": []}}
    (tmp_path / "state.json").write_text(json.dumps({**old.model_dump(mode="json"), **arts}))
    assert load_state(tmp_path) == old
    assert json.loads((tmp_path / STATE_FILE).read_text()) == old.model_dump(mode="json")
    assert json.loads((tmp_path / "state.json").read_text()) == arts  # ART's part, where ART reads it
    assert load_state(tmp_path) == old  # idempotent

    only_ours = tmp_path / "only-ours"
    only_ours.mkdir()
    (only_ours / "state.json").write_text(old.model_dump_json())
    assert load_state(only_ours) == old and not (only_ours / "state.json").exists()

    arts_only = tmp_path / "arts-only"
    arts_only.mkdir()
    (arts_only / "state.json").write_text(json.dumps(arts))
    assert load_state(arts_only) is None and json.loads((arts_only / "state.json").read_text()) == arts


@pytest.mark.anyio
async def test_a_kill_during_arts_state_write_does_not_stop_the_resume(tmp_path: Path) -> None:
    """ART writes its state.json with a plain open("w"): a kill mid-write leaves it cut short."""
    model = art.TrainableModel(
        name="r", project="p", base_model="x", base_path=str(tmp_path), run_name="r", report_metrics=[]
    )
    directory = tmp_path / "p" / "models" / "r"
    state = RunState(run_id="r", iteration=0, stage="trained", step=1, seed=1, config_hash="abc")
    save_state(directory, state)
    await model.log(metrics={"train/loss": 1.0}, step=1)
    arts = (directory / "state.json").read_text()
    (directory / "state.json").write_text(arts[: len(arts) // 2])  # the kill

    assert load_state(directory) == state  # ours was never in that file
    assert not (directory / "state.json").exists()
    [aside] = directory.glob("state.json.broken-*")
    assert aside.read_text() == arts[: len(arts) // 2]  # kept, not deleted
    again = art.TrainableModel(
        name="r", project="p", base_model="x", base_path=str(tmp_path), run_name="r", report_metrics=[]
    )
    await again.log(metrics={"train/loss": 0.5}, step=2)  # ART's next write works
    assert "_metrics_builder_state" in (again.read_state() or {}) and load_state(directory) == state


@pytest.mark.parametrize("content", ["{not json", '{"run_id": "r", "iteration": -1}', "[]"])
def test_a_corrupt_state_file_is_one_clear_error_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(RunStateError) as caught:
        load_state(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / STATE_FILE) in message and "delete it" in message and "\n" not in message


def test_changed_training_settings_are_refused_unless_forced(tmp_path: Path) -> None:
    started = Settings(runs_dir=tmp_path, group_size=4, learning_rate=5e-5)
    (tmp_path / "run.json").write_text(json.dumps({"settings": started.model_dump(mode="json")}))
    # more iterations, other concurrency and timeouts: same training
    check_resume_settings(tmp_path, started.model_copy(update={"iterations": 9, "rollout_concurrency": 2}))
    changed = started.model_copy(update={"group_size": 8})
    assert changed_settings(started.model_dump(mode="json"), changed) == {"group_size": (4, 8)}
    with pytest.raises(ResumeConfigError, match="group_size: 4 -> 8"):
        check_resume_settings(tmp_path, changed)
    check_resume_settings(tmp_path, changed.model_copy(update={"force_resume": True}))
    assert config_hash(started) != config_hash(changed)


def test_a_trained_but_uncommitted_checkpoint_is_kept(tmp_path: Path) -> None:
    (tmp_path / "iterations.jsonl").write_text(json.dumps({"iteration": 1, "step": 1}) + "\n")
    for step in (1, 2, 3):
        (tmp_path / "checkpoints" / f"{step:04d}").mkdir(parents=True)
    trained = RunState(run_id="r", iteration=1, stage="trained", step=2, seed=0, config_hash="h")
    assert discard_uncommitted_checkpoints(tmp_path, trained) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0001", "0002"]
    scored = trained.model_copy(update={"stage": "scored", "step": 1})
    discard_uncommitted_checkpoints(tmp_path, scored)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0001"]

"""Trajectory groups hold rollouts of their own scenario only, with distinct seeds.

A GRPO group compares rollouts of ONE prompt; a group that holds another prospect's
rollouts trains on the wrong comparison and scores emails against the wrong facts. These
run several scenarios in one step, for training and for evaluation, against the scripted
loopback server (no model loaded).
"""

from __future__ import annotations

import art
import pytest
from loopback import Call, LoopbackOpenAI

from codreamer.agent.rollout import RolloutConfig
from codreamer.config import Settings
from codreamer.data import load_task_data
from codreamer.pipeline.evaluation import generate_eval_groups
from codreamer.pipeline.fanout import RolloutJob, fan_out_rollouts
from codreamer.pipeline.stages import RolloutPlan, generate_trajectories

FINAL = {"subject": "A quick idea", "body": "Hi there, a short note. Best, Sam"}
CONFIG = RolloutConfig(max_turns=1, request_timeout_s=30, inference_attempts=1, retry_initial_s=0.0, retry_max_s=0.0)


def _model(server: LoopbackOpenAI) -> art.Model:
    return art.Model(
        name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
    )


def _prospect_in_prompt(trajectory: art.Trajectory) -> str:
    """The prospect id the episode's user message names (what the policy actually saw)."""
    user = next(m for m in trajectory.messages_and_choices if isinstance(m, dict) and m.get("role") == "user")
    return user["content"].split("prospect_id ", 1)[1].split(")", 1)[0]


def _assert_groups_are_pure(groups: list[art.TrajectoryGroup], scenario_ids: list[str], size: int) -> None:
    assert [g.metadata["scenario_id"] for g in groups] == scenario_ids
    for group in groups:
        assert len(group.trajectories) == size and not group.exceptions
        for trajectory in group.trajectories:
            assert trajectory.metadata["scenario_id"] == group.metadata["scenario_id"]
            assert _prospect_in_prompt(trajectory) == group.metadata["prospect_id"]
        seeds = [t.metadata["seed"] for t in group.trajectories]
        assert len(set(seeds)) == size, f"seeds repeat inside a group: {seeds}"
    all_seeds = [t.metadata["seed"] for g in groups for t in g.trajectories]
    assert len(set(all_seeds)) == len(all_seeds), "two rollouts of the step share a seed"


@pytest.mark.anyio
@pytest.mark.parametrize("scenario_count", [2, 3])
async def test_every_training_group_holds_its_own_scenario(scenario_count: int) -> None:
    task = load_task_data(Settings().data_dir)
    scenarios = task.train[:scenario_count]
    plan = RolloutPlan(task.product, CONFIG, group_size=3, concurrency=4, max_exceptions=0, seed=7)
    async with LoopbackOpenAI([[Call("finalize_email", FINAL)]] * (3 * scenario_count)) as server:
        groups = await generate_trajectories(_model(server), scenarios, plan, step=2)
    _assert_groups_are_pure(groups, [s.scenario_id for s in scenarios], 3)


@pytest.mark.anyio
async def test_every_eval_group_holds_its_own_scenario() -> None:
    task = load_task_data(Settings().data_dir)
    scenarios = task.heldout[:3]
    async with LoopbackOpenAI([[Call("finalize_email", FINAL)]] * 6) as server:
        groups = await generate_eval_groups(
            _model(server), scenarios, product=task.product, config=CONFIG, samples=2, seed=3, step=0
        )
    _assert_groups_are_pure(groups, [s.scenario_id for s in scenarios], 2)
    assert all(sorted(t.metadata["sample_index"] for t in g.trajectories) == [0, 1] for g in groups)


@pytest.mark.anyio
async def test_a_group_of_two_scenarios_is_refused() -> None:
    task = load_task_data(Settings().data_dir)
    mixed = [RolloutJob(task.train[0], 1), RolloutJob(task.train[1], 2)]
    with pytest.raises(ValueError, match="one scenario"):
        await fan_out_rollouts(
            art.Model(name="t", project="t"),
            [mixed],
            product=task.product,
            config=CONFIG,
            step=0,
            concurrency=1,
            max_exceptions=0,
            rollout_timeout_s=5,
            pbar_desc="x",
        )

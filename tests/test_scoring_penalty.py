"""The auto-finalised penalty of `RewardScorer` (`codreamer.rewards.scoring`).

A rollout whose email was salvaged from the agent's text (it never called `finalize_email`)
gets its rubric total multiplied by `auto_finalize_factor` before the blend; the logged
metrics say so.
"""

from __future__ import annotations

import art
import pytest

from codreamer.domain import Company, Product, Prospect, Scenario
from codreamer.rewards.blend import RewardMixConfig
from codreamer.rewards.scoring import RewardScorer

pytestmark = pytest.mark.timeout(60)

PRODUCT = Product(
    name="Pipewise",
    one_liner="Pipewise logs every email, call and meeting into your CRM automatically.",
    value_props=["Reps stop updating the CRM by hand"],
    call_to_action="a 15-minute call next week",
    sender_name="Maya Lindqvist",
    sender_title="Account Executive, Pipewise",
)
PROSPECT = Prospect(
    prospect_id="p001",
    first_name="Grace",
    last_name="Schneider",
    email="grace.schneider@sentravasecurity.io",
    title="Chief Revenue Officer",
    seniority="c_level",
    persona="analytical",
    pain_points=["the board wants a forecast it can trust"],
    company=Company(
        name="Sentrava Security",
        industry="cybersecurity",
        employees=260,
        headquarters="Austin, TX",
        recent_news="opened a security operations centre in Berlin in March",
        tech_stack=["HubSpot"],
    ),
)
SCENARIO = Scenario(scenario_id="s-1", split="train", prospect=PROSPECT)
SUBJECT = "Your new Berlin operations centre"
BODY = """Hi Grace,

Congrats on opening the security operations centre in Berlin. With Sentrava Security growing \
that fast, I imagine the board wants a forecast it can trust.

Pipewise logs every email, call and meeting into HubSpot automatically, so your reps stop \
updating the CRM by hand and the forecast is built from real deal activity.

Would you be open to a 15-minute call next week?

Best,
Maya Lindqvist"""


def trajectory(tid: str, *, auto_finalized: bool) -> art.Trajectory:
    return art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "write"}, {"role": "assistant", "content": BODY}],
        reward=0.0,
        metadata={
            "trajectory_id": tid,
            "scenario_id": SCENARIO.scenario_id,
            "auto_finalized": auto_finalized,
            "email_subject": SUBJECT,
            "email_body": BODY,
        },
    )


async def score_pair(scorer: RewardScorer) -> tuple[art.Trajectory, art.Trajectory]:
    finalized, salvaged = trajectory("t-final", auto_finalized=False), trajectory("t-auto", auto_finalized=True)
    group = art.TrajectoryGroup([finalized, salvaged], metadata={"scenario_id": SCENARIO.scenario_id})
    await scorer.score([group], [SCENARIO], step=1, emails_sent=False)
    return finalized, salvaged


@pytest.mark.anyio
async def test_auto_finalized_email_gets_the_lower_reward_and_the_metrics_say_why() -> None:
    mix = RewardMixConfig(ruler_weight=0.0, rubric_weight=1.0, online_weight=0.0)
    finalized, salvaged = await score_pair(RewardScorer(PRODUCT, mix))

    # Same email, same rubric score: only the factor differs.
    total = finalized.metrics["rubric/total"]
    assert total > 0.8
    assert salvaged.metrics["rubric/total"] == total
    assert finalized.metrics["rubric/auto_finalize_factor"] == 1.0
    assert salvaged.metrics["rubric/auto_finalize_factor"] == 0.5
    assert finalized.metrics["rubric/total_penalized"] == pytest.approx(total)
    assert salvaged.metrics["rubric/total_penalized"] == pytest.approx(0.5 * total)

    # What the blend uses (and what is trained on) is the penalised value.
    assert finalized.metrics["reward/rubric"] == pytest.approx(total)
    assert salvaged.metrics["reward/rubric"] == pytest.approx(0.5 * total)
    assert salvaged.reward == pytest.approx(0.5 * total)
    assert finalized.reward == pytest.approx(total)
    assert salvaged.reward < finalized.reward


@pytest.mark.anyio
async def test_the_factor_is_configurable() -> None:
    mix = RewardMixConfig(ruler_weight=0.0, rubric_weight=1.0, online_weight=0.0)
    finalized, salvaged = await score_pair(RewardScorer(PRODUCT, mix, auto_finalize_factor=1.0))
    assert salvaged.reward == pytest.approx(finalized.reward)
    assert salvaged.metrics["rubric/auto_finalize_factor"] == 1.0

    scorer = RewardScorer(PRODUCT, mix, auto_finalize_factor=0.2)
    assert scorer.auto_finalize_factor == 0.2
    finalized, salvaged = await score_pair(scorer)
    assert salvaged.metrics["reward/rubric"] == pytest.approx(0.2 * finalized.metrics["rubric/total"])


def test_the_factor_must_be_a_fraction() -> None:
    mix = RewardMixConfig()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="auto_finalize_factor"):
            RewardScorer(PRODUCT, mix, auto_finalize_factor=bad)


@pytest.mark.anyio
async def test_only_emails_that_count_as_sent_get_a_simulated_outcome(tmp_path) -> None:
    """The outbox records an email only when it has a body; the simulator answers the same set,
    so no simulated outcome names a trajectory that is in no outbox."""
    from codreamer.events.log import EventLog
    from codreamer.rewards.simulator import ProspectSimulator

    events = EventLog(tmp_path / "events.jsonl")
    scorer = RewardScorer(PRODUCT, RewardMixConfig(), events=events, simulator=ProspectSimulator(0))
    sent, empty = trajectory("t-sent", auto_finalized=False), trajectory("t-empty", auto_finalized=True)
    empty.metadata["email_body"] = "  "
    group = art.TrajectoryGroup([sent, empty], metadata={"scenario_id": SCENARIO.scenario_id})
    await scorer.score([group], [SCENARIO], step=1, emails_sent=True)
    events.refresh()
    assert set(events.summaries(["t-sent", "t-empty"])) == {"t-sent"}

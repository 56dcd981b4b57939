"""The RULER judge wrapper (`codreamer.rewards.ruler`) against a scripted loopback judge."""

from __future__ import annotations

import json

import art
import pytest
from loguru import logger

from codreamer.rewards.ruler import GroupJudgement, JudgeConfig, apply_judgement, judge_group

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import Delay, HTTPError, LoopbackOpenAI
except ModuleNotFoundError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.loopback import Delay, HTTPError, LoopbackOpenAI

pytestmark = [
    pytest.mark.timeout(60),
    # litellm's own ModelResponse serialisation (not ours) warns on every judge answer
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]

SECRET = "sk-test-SECRET-9f8e7d6c5b4a"
SYSTEM = "You write short, personal cold emails for FreightPilot."
USER = "Write to Ana Kovac, VP Operations at Nordwind Logistics."
EMAILS = [
    "Hi Ana, congrats on Leipzig. FreightPilot cuts invoice audits by 80%. 15 minutes next week?",
    "Dear Sir/Madam, BUY NOW!!!",
    "Hi Ana, FreightPilot audits carrier invoices. Open to a call?",
]


@pytest.fixture
def log_lines() -> list[str]:
    lines: list[str] = []
    sink_id = logger.add(lambda message: lines.append(str(message)), level="DEBUG", format="{level} {message}")
    yield lines
    logger.remove(sink_id)


def make_group(n: int = 3) -> art.TrajectoryGroup:
    trajectories = [
        art.Trajectory(
            messages_and_choices=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER},
                {"role": "assistant", "content": EMAILS[i % len(EMAILS)]},
            ],
            reward=0.3,
            metadata={"prospect_id": "p007", "index": i},
            metrics={"rubric/total": 0.5 + i / 10},
        )
        for i in range(n)
    ]
    return art.TrajectoryGroup(trajectories, metadata={"scenario_id": "s-1"}, metrics={"group/size": n})


def judge_json(scores: list[float], ids: list[str] | None = None) -> str:
    ids = ids or [str(i) for i in range(1, len(scores) + 1)]
    return json.dumps(
        {
            "scores": [
                {"trajectory_id": tid, "explanation": f"trajectory {tid}", "score": s}
                for tid, s in zip(ids, scores, strict=True)
            ]
        }
    )


def make_judge(server: LoopbackOpenAI, **overrides: object) -> JudgeConfig:
    fields: dict[str, object] = {
        "model": "openai/judge",
        "base_url": server.base_url,
        "api_key": SECRET,
        "timeout_s": 5.0,
        "attempts": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    }
    fields.update(overrides)
    return JudgeConfig(**fields)


def assert_no_secret(judgement: GroupJudgement, log_lines: list[str]) -> None:
    assert SECRET not in judgement.model_dump_json()
    assert all(SECRET not in line for line in log_lines)


# --- success ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_good_json_scores_in_order_and_group_untouched(log_lines: list[str]) -> None:
    group = make_group(3)
    before = group.model_dump(mode="json")
    # ids deliberately out of order: scores must come back in trajectory order
    answer = judge_json([0.2, 0.9, 0.5], ids=["2", "1", "3"])
    async with LoopbackOpenAI([answer]) as server:
        judgement = await judge_group(group, make_judge(server))
        requests = server.requests

    assert judgement.judge_error is None
    assert judgement.scores == [0.9, 0.2, 0.5]
    assert judgement.attempts == 1
    assert judgement.latency_s > 0
    assert len(requests) == 1

    # what RULER sends: the judge model, a strict JSON schema, system rubric + user trajectories
    body = requests[0]
    assert body["model"] == "judge"
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert "scores" in schema["properties"]
    system, user = body["messages"]
    assert system["role"] == "system" and "Grading standards" in system["content"]
    assert user["role"] == "user" and "<context>" in user["content"]
    assert '<trajectory id="3">' in user["content"] and EMAILS[1] in user["content"]
    assert SECRET not in json.dumps(body)

    # judge_group never touches the caller's group
    assert group.model_dump(mode="json") == before

    apply_judgement(group, judgement)
    assert [t.metrics["ruler/score"] for t in group.trajectories] == [0.9, 0.2, 0.5]
    assert [t.reward for t in group.trajectories] == [0.3, 0.3, 0.3]
    assert [t.metadata for t in group.trajectories] == [{"prospect_id": "p007", "index": i} for i in range(3)]
    assert group.metadata == {"scenario_id": "s-1"}
    assert group.metrics == {"group/size": 3}
    assert all("ruler/judge_error" not in t.metrics for t in group.trajectories)
    assert all(t.metrics["rubric/total"] == pytest.approx(0.5 + i / 10) for i, t in enumerate(group.trajectories))
    assert_no_secret(judgement, log_lines)


@pytest.mark.anyio
async def test_custom_rubric_is_sent() -> None:
    async with LoopbackOpenAI([judge_json([1.0, 0.0])]) as server:
        judgement = await judge_group(make_group(2), make_judge(server, rubric="- Mention Leipzig."))
        system = server.requests[0]["messages"][0]["content"]
    assert judgement.scores == [1.0, 0.0]
    assert "- Mention Leipzig." in system


@pytest.mark.anyio
async def test_empty_group_needs_no_judge() -> None:
    async with LoopbackOpenAI([]) as server:
        judgement = await judge_group(art.TrajectoryGroup([]), make_judge(server))
        assert server.requests == []
    assert judgement.scores == [] and judgement.attempts == 0


# --- permanent errors: fail fast ----------------------------------------------------------------


@pytest.mark.anyio
async def test_malformed_json_fails_fast(log_lines: list[str]) -> None:
    group = make_group(3)
    async with LoopbackOpenAI(["{not json at all", judge_json([0.1, 0.2, 0.3])]) as server:
        judgement = await judge_group(group, make_judge(server))
        assert len(server.requests) == 1

    assert judgement.scores is None
    assert judgement.attempts == 1
    assert judgement.judge_error is not None
    assert judgement.judge_error.startswith("ValidationError: 1 validation error for Response")

    apply_judgement(group, judgement)
    assert all(t.metrics["ruler/judge_error"] == 1 for t in group.trajectories)
    assert all("ruler/score" not in t.metrics for t in group.trajectories)
    assert [t.reward for t in group.trajectories] == [0.3, 0.3, 0.3]  # never a zero reward
    assert group.metadata["judge_error"] == judgement.judge_error
    assert group.metadata["scenario_id"] == "s-1"
    assert_no_secret(judgement, log_lines)


@pytest.mark.anyio
async def test_wrong_number_of_scores_fails_without_our_retry() -> None:
    # ART itself re-asks the judge once on a structural error (2 HTTP requests), then raises.
    async with LoopbackOpenAI([judge_json([0.5, 0.5]), judge_json([0.5])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
        requests = server.requests

    assert judgement.scores is None
    assert judgement.attempts == 1
    assert judgement.judge_error == "ValueError: Expected 3 scores, but got 1"
    assert len(requests) == 2
    assert "expected 3" in requests[1]["messages"][-1]["content"]


@pytest.mark.anyio
async def test_wrong_number_then_right_is_repaired_by_art() -> None:
    async with LoopbackOpenAI([judge_json([0.5, 0.5]), judge_json([0.7, 0.1, 0.4])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
    assert judgement.scores == [0.7, 0.1, 0.4]
    assert judgement.attempts == 1


@pytest.mark.anyio
async def test_unauthorized_fails_fast_and_key_is_redacted(log_lines: list[str]) -> None:
    script = [HTTPError(401, f"Incorrect API key provided: {SECRET}", retryable=False), judge_json([0.1, 0.2, 0.3])]
    async with LoopbackOpenAI(script) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
        assert len(server.requests) == 1

    assert judgement.scores is None
    assert judgement.attempts == 1
    assert judgement.judge_error is not None and judgement.judge_error.startswith("AuthenticationError")
    assert "***" in judgement.judge_error
    assert_no_secret(judgement, log_lines)


@pytest.mark.anyio
async def test_bad_request_fails_fast() -> None:
    async with LoopbackOpenAI([HTTPError(400, "bad schema"), judge_json([0.1, 0.2, 0.3])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
        assert len(server.requests) == 1
    assert judgement.scores is None and judgement.attempts == 1
    assert judgement.judge_error is not None and judgement.judge_error.startswith("BadRequestError")


# --- transient errors: retried ------------------------------------------------------------------


@pytest.mark.anyio
async def test_500_then_good_retries_once(log_lines: list[str]) -> None:
    async with LoopbackOpenAI([HTTPError(500, f"boom {SECRET}"), judge_json([0.3, 0.6, 0.9])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
        assert len(server.requests) == 2  # litellm / the OpenAI SDK did not retry on their own

    assert judgement.judge_error is None
    assert judgement.scores == [0.3, 0.6, 0.9]
    assert judgement.attempts == 2
    retries = [line for line in log_lines if line.startswith("WARNING") and "retrying" in line]
    assert len(retries) == 1 and "attempt 1/3" in retries[0] and "InternalServerError" in retries[0]
    assert_no_secret(judgement, log_lines)


@pytest.mark.anyio
async def test_429_then_good_retries() -> None:
    async with LoopbackOpenAI([HTTPError(429, "slow down"), judge_json([0.4, 0.5, 0.6])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
    assert judgement.scores == [0.4, 0.5, 0.6] and judgement.attempts == 2


@pytest.mark.anyio
async def test_timeout_then_good_retries(log_lines: list[str]) -> None:
    script = [Delay(3.0, then=judge_json([0.0, 0.0, 0.0])), judge_json([0.8, 0.2, 0.5])]
    async with LoopbackOpenAI(script) as server:
        judgement = await judge_group(make_group(3), make_judge(server, timeout_s=0.3))
        assert len(server.requests) == 2

    assert judgement.judge_error is None
    assert judgement.scores == [0.8, 0.2, 0.5]
    assert judgement.attempts == 2
    assert judgement.latency_s < 3.0
    assert any("Timeout" in line and "retrying" in line for line in log_lines)


@pytest.mark.anyio
async def test_persistent_503_gives_judge_error_after_all_attempts(log_lines: list[str]) -> None:
    good = judge_json([0.1, 0.2, 0.3])
    async with LoopbackOpenAI([HTTPError(503, "overloaded")] * 4 + [good]) as server:
        judgement = await judge_group(make_group(3), make_judge(server, attempts=4))
        assert len(server.requests) == 4

    assert judgement.scores is None
    assert judgement.attempts == 4
    assert judgement.judge_error is not None and "ServiceUnavailableError" in judgement.judge_error
    assert sum("retrying" in line for line in log_lines) == 3
    assert_no_secret(judgement, log_lines)


@pytest.mark.anyio
async def test_connection_refused_is_transient() -> None:
    server = LoopbackOpenAI([])
    await server.start()
    base_url = server.base_url
    await server.stop()  # nothing listens on that port any more
    judge = JudgeConfig(
        model="openai/judge",
        base_url=base_url,
        api_key=SECRET,
        timeout_s=2,
        attempts=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
    )
    judgement = await judge_group(make_group(2), judge)
    assert judgement.scores is None and judgement.attempts == 2
    # litellm maps the OpenAI SDK's APIConnectionError ("Connection error.") to InternalServerError
    assert judgement.judge_error is not None and "Connection error" in judgement.judge_error


# --- config ----------------------------------------------------------------------------------


def test_config_budget_and_secret() -> None:
    judge = JudgeConfig(
        model="openai/x", api_key=SECRET, timeout_s=10, attempts=3, backoff_initial_s=1, backoff_max_s=20
    )
    # two retries: min(20, 1*2**0 + 1) + min(20, 1*2**1 + 1)
    assert judge.backoff_budget_s() == pytest.approx(5.0)
    assert judge.total_budget_s() >= 10 * 3 + 5.0
    assert SECRET not in repr(judge) and SECRET not in judge.model_dump_json()
    assert judge.litellm_params()["num_retries"] == 0
    with pytest.raises(ValueError, match="attempts"):
        JudgeConfig(model="openai/x", attempts=0)
    with pytest.raises(ValueError, match="frozen"):
        judge.timeout_s = 1  # frozen


def test_apply_judgement_without_error_text() -> None:
    group = make_group(2)
    apply_judgement(group, GroupJudgement(scores=[0.5], attempts=1))  # wrong length: treated as an error
    assert group.metadata["judge_error"] == "1 scores for 2 trajectories"
    assert all(t.metrics["ruler/judge_error"] == 1 for t in group.trajectories)


@pytest.mark.anyio
async def test_out_of_range_scores_are_clamped() -> None:
    async with LoopbackOpenAI([judge_json([1.5, -0.2, 0.4])]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
    assert judgement.scores == [1.0, 0.0, 0.4]


@pytest.mark.anyio
async def test_nan_score_is_a_judge_error() -> None:
    # ART's parser accepts a bare NaN in the judge's JSON
    answer = judge_json([0.1, 0.2, 0.3]).replace("0.2", "NaN")
    async with LoopbackOpenAI([answer]) as server:
        judgement = await judge_group(make_group(3), make_judge(server))
        assert len(server.requests) == 1
    assert judgement.scores is None and judgement.attempts == 1
    assert judgement.judge_error is not None and "non-finite" in judgement.judge_error

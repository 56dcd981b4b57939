"""LLM usage accounting (`codreamer.usage`) and its hooks in the rollout and the RULER judge."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import art
import pytest

from codreamer.agent.rollout import RolloutConfig
from codreamer.config import Settings
from codreamer.pipeline.history import append_record, read_history
from codreamer.usage import (
    KindPrices,
    LLMPrices,
    UsageLedger,
    current_ledger,
    record_llm_call,
    timed_llm_call,
    usage_tokens,
    using_ledger,
)

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import Call, HTTPError, LoopbackOpenAI
except ModuleNotFoundError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.loopback import Call, HTTPError, LoopbackOpenAI

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]


# --------------------------------------------------------------------------- accounting


def test_totals_overall_and_per_kind() -> None:
    ledger = UsageLedger()
    ledger.record("policy", 0.100, 100, 10, model="m")
    ledger.record("policy", 0.300, 200, 30, model="m", error=True)
    ledger.record("judge", 1.0, None, None)
    totals = ledger.totals()
    assert totals == {
        "llm/calls": 3,
        "llm/errors": 1,
        "llm/latency_ms": 1400.0,
        "llm/latency_ms_mean": pytest.approx(466.667, abs=1e-3),
        "llm/prompt_tokens": 300,
        "llm/completion_tokens": 40,
        "llm/calls_without_usage": 1,
        "llm/policy/calls": 2,
        "llm/policy/errors": 1,
        "llm/policy/latency_ms": 400.0,
        "llm/policy/latency_ms_mean": 200.0,
        "llm/policy/prompt_tokens": 300,
        "llm/policy/completion_tokens": 40,
        "llm/policy/calls_without_usage": 0,
        "llm/judge/calls": 1,
        "llm/judge/errors": 0,
        "llm/judge/latency_ms": 1000.0,
        "llm/judge/latency_ms_mean": 1000.0,
        "llm/judge/prompt_tokens": 0,
        "llm/judge/completion_tokens": 0,
        "llm/judge/calls_without_usage": 1,
    }
    assert not any("cost" in key for key in totals)
    assert ledger.calls_by_model() == {"policy:m": 2}


def test_empty_ledger_has_zero_totals_and_no_mean() -> None:
    totals = UsageLedger().totals()
    assert totals["llm/calls"] == 0 and "llm/latency_ms_mean" not in totals
    assert not any(key.count("/") == 2 for key in totals)


def test_cost_only_where_a_price_applies() -> None:
    prices = LLMPrices(
        policy=KindPrices(prompt_usd_per_mtok=0.5, completion_usd_per_mtok=2.0),
        judge=KindPrices(prompt_usd_per_mtok=1.0),
    )
    ledger = UsageLedger(prices)
    ledger.record("policy", 0.1, 1_000_000, 500_000)
    ledger.record("judge", 0.1, 2_000_000, 1_000_000)  # no completion price: only the prompt is billed
    ledger.record("analyzer", 0.1, 1_000, 1_000)  # no price at all
    ledger.record("policy", 0.1, None, None)  # unknown tokens cost nothing (not guessed)
    totals = ledger.totals()
    assert totals["llm/policy/cost_usd"] == pytest.approx(0.5 + 1.0)
    assert totals["llm/judge/cost_usd"] == pytest.approx(2.0)
    assert "llm/analyzer/cost_usd" not in totals
    assert totals["llm/cost_usd"] == pytest.approx(3.5)
    assert totals["llm/policy/calls_without_usage"] == 1
    assert "llm/cost_usd" not in UsageLedger().totals()


def test_settings_prices_view() -> None:
    settings = Settings(policy_price_usd_per_mtok_in=0.1, judge_price_usd_per_mtok_out=4.0)
    prices = LLMPrices.from_settings(settings)
    assert prices.policy == KindPrices(prompt_usd_per_mtok=0.1)
    assert prices.judge == KindPrices(completion_usd_per_mtok=4.0)
    assert prices.analyzer == prices.judge
    assert not LLMPrices.from_settings(Settings()).policy.priced


def test_restore_from_a_history_record(tmp_path: Path) -> None:
    prices = LLMPrices(policy=KindPrices(prompt_usd_per_mtok=1.0))
    ledger = UsageLedger(prices)
    ledger.record("policy", 0.2, 1000, 100)
    ledger.record("judge", 0.5, 50, 5, error=True)
    history = tmp_path / "iterations.jsonl"
    append_record(history, {"iteration": 1, "train/reward_mean": 0.4, "flag": True} | ledger.totals())
    record = read_history(history)[0][-1]

    resumed = UsageLedger.from_totals(record, prices)
    assert resumed.totals() == pytest.approx(ledger.totals())
    resumed.record("policy", 0.2, 1000, 100)
    ledger.record("policy", 0.2, 1000, 100)
    assert resumed.totals() == pytest.approx(ledger.totals())
    assert resumed.totals()["llm/policy/calls"] == 2 and resumed.totals()["llm/cost_usd"] == pytest.approx(0.002)
    assert UsageLedger.from_totals({"llm/policy/calls": True, "other": 3}).totals()["llm/calls"] == 0


def test_merge_adds_another_ledgers_calls() -> None:
    run = UsageLedger()
    run.record("policy", 0.1, 10, 1)
    other = UsageLedger(LLMPrices(analyzer=KindPrices(prompt_usd_per_mtok=1.0)))
    other.record("analyzer", 0.2, 1_000_000, 0, model="j")
    run.merge(other)
    totals = run.totals()
    assert totals["llm/calls"] == 2 and totals["llm/analyzer/prompt_tokens"] == 1_000_000
    assert totals["llm/analyzer/cost_usd"] == pytest.approx(1.0) and totals["llm/cost_usd"] == pytest.approx(1.0)
    assert run.calls_by_model() == {"analyzer:j": 1}


# --------------------------------------------------------------------------- the current ledger


def test_record_without_ledger_is_a_no_op_and_nesting_restores() -> None:
    assert current_ledger() is None
    record_llm_call("policy", 0.1, 1, 1)  # nothing to record into: no error
    outer, inner = UsageLedger(), UsageLedger()
    with using_ledger(outer):
        record_llm_call("policy", 0.1, 1, 1)
        with using_ledger(inner):
            record_llm_call("judge", 0.1, 1, 1)
        record_llm_call("policy", 0.1, 1, 1)
    assert current_ledger() is None
    assert outer.totals()["llm/policy/calls"] == 2 and "llm/judge/calls" not in outer.totals()
    assert inner.totals()["llm/judge/calls"] == 1 and inner.totals()["llm/calls"] == 1


def test_ledgers_are_isolated_between_tasks_and_shared_with_child_tasks() -> None:
    async def run(ledger: UsageLedger, n: int) -> None:
        with using_ledger(ledger):
            await asyncio.sleep(0)
            children = [asyncio.create_task(asyncio.to_thread(record_llm_call, "policy", 0.01, 1, 1)) for _ in range(n)]
            await asyncio.gather(*children)
            record_llm_call("policy", 0.01, 1, 1)

    async def main() -> tuple[UsageLedger, UsageLedger]:
        a, b = UsageLedger(), UsageLedger()
        await asyncio.gather(run(a, 3), run(b, 5))
        return a, b

    a, b = asyncio.run(main())
    assert a.totals()["llm/policy/calls"] == 4
    assert b.totals()["llm/policy/calls"] == 6


def test_timed_call_measures_sets_usage_and_counts_errors() -> None:
    ledger = UsageLedger()

    class Usage:
        prompt_tokens = 12
        completion_tokens = 3

    async def main() -> None:
        with using_ledger(ledger):
            async with timed_llm_call("policy", "m") as call:
                await asyncio.sleep(0.01)
                call.set_usage(Usage())
            with pytest.raises(RuntimeError), timed_llm_call("judge", "j"):
                raise RuntimeError("down")
            with timed_llm_call("analyzer") as call:
                call.set_usage(None)
                call.add_usage({"prompt_tokens": 5, "completion_tokens": 1})
                call.add_usage({"prompt_tokens": 5})

    asyncio.run(main())
    totals = ledger.totals()
    assert totals["llm/policy/calls"] == 1 and totals["llm/policy/prompt_tokens"] == 12
    assert totals["llm/policy/latency_ms"] >= 10.0
    assert totals["llm/judge/errors"] == 1 and totals["llm/judge/calls_without_usage"] == 1
    assert totals["llm/analyzer/prompt_tokens"] == 10 and totals["llm/analyzer/completion_tokens"] == 1
    assert usage_tokens(None) == (None, None)
    assert usage_tokens({"prompt_tokens": "x", "completion_tokens": 2}) == (None, 2)


# --------------------------------------------------------------------------- hooks


@pytest.mark.anyio
async def test_rollout_records_policy_calls_and_tokens() -> None:
    from codreamer.agent.rollout import rollout
    from codreamer.config import REPO_DATA_DIR
    from codreamer.data import load_task_data

    task = load_task_data(REPO_DATA_DIR)
    scenario = task.train[0]
    config = RolloutConfig(max_turns=3, max_tokens=16, request_timeout_s=10, inference_attempts=1, retry_initial_s=0)
    script = [[Call("lookup_company", {})], [Call("finalize_email", {"subject": "Hi there", "body": "Hello. Sam"})],
              HTTPError(400, "bad request", retryable=False)]  # fmt: skip
    ledger = UsageLedger(LLMPrices(policy=KindPrices(prompt_usd_per_mtok=1.0, completion_usd_per_mtok=1.0)))
    async with LoopbackOpenAI(script) as server:
        model = art.Model(
            name="t", project="t", inference_base_url=server.base_url, inference_api_key="x", inference_model_name="t"
        )
        with using_ledger(ledger):
            await rollout(model, scenario, task.product, config, step=0, seed=1)
            with pytest.raises(Exception, match="400"):
                await rollout(model, scenario, task.product, config, step=0, seed=2)
        requests = server.requests
    totals = ledger.totals()
    assert totals["llm/policy/calls"] == 3 and totals["llm/policy/errors"] == 1
    expected_prompt = sum(sum(len(str(m.get("content") or "").split()) for m in r["messages"]) for r in requests[:2])
    assert totals["llm/policy/prompt_tokens"] == expected_prompt  # what the server reported, summed
    assert totals["llm/policy/completion_tokens"] > 0
    assert totals["llm/policy/cost_usd"] == pytest.approx(
        (expected_prompt + totals["llm/policy/completion_tokens"]) / 1e6
    )
    assert ledger.calls_by_model() == {"policy:t": 3}


def judge_answer(n: int) -> str:
    return json.dumps(
        {"scores": [{"trajectory_id": str(i), "explanation": "ok", "score": 0.5} for i in range(1, n + 1)]}
    )


def judge_group_input() -> art.TrajectoryGroup:
    return art.TrajectoryGroup(
        [
            art.Trajectory(
                messages_and_choices=[
                    {"role": "user", "content": "write"},
                    {"role": "assistant", "content": f"email {i}"},
                ],
                reward=0.0,
            )
            for i in range(2)
        ]
    )


@pytest.mark.anyio
async def test_judge_group_records_each_attempt_with_tokens() -> None:
    from art.metrics import MetricsBuilder

    from codreamer.rewards.ruler import JudgeConfig, judge_group

    seen: list[str] = []

    class Outer(MetricsBuilder):
        def add_response_cost(self, source: str, response: Any, **kwargs: Any) -> float | None:
            seen.append(source)
            return None

    ledger = UsageLedger()
    async with LoopbackOpenAI([HTTPError(429, "slow down"), judge_answer(2)]) as server:
        judge = JudgeConfig(model="openai/judge", base_url=server.base_url, api_key="k", timeout_s=5, attempts=2,
                            backoff_initial_s=0.0, backoff_max_s=0.0)  # fmt: skip
        with using_ledger(ledger), Outer("train").activate_context():
            judgement = await judge_group(judge_group_input(), judge)
    assert judgement.ok and judgement.attempts == 2
    totals = ledger.totals()
    assert totals["llm/judge/calls"] == 2 and totals["llm/judge/errors"] == 1
    assert totals["llm/judge/prompt_tokens"] > 0 and totals["llm/judge/completion_tokens"] > 0
    assert totals["llm/judge/calls_without_usage"] == 1  # the 429 attempt got no response
    assert seen == ["judge/ruler"]  # ART's own cost hook still reached the builder that was active

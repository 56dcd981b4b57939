"""The agent episode (`codreamer.agent.rollout`) against a scripted loopback server."""

from __future__ import annotations

import json

import art
import openai
import pytest
from openai.types.chat.chat_completion import Choice

from codreamer.agent.prompts import NUDGE_MESSAGE, initial_messages
from codreamer.agent.rollout import (
    METADATA_KEYS,
    RolloutConfig,
    auto_finalize_email,
    clean_assistant_text,
    email_from_trajectory,
    rollout,
    trajectory_id,
)
from codreamer.agent.tools import TOOLS, execute_tool
from codreamer.domain import Company, Email, Product, Prospect, Scenario

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import Call, Delay, HTTPError, LoopbackOpenAI, Reply
except ModuleNotFoundError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.loopback import Call, Delay, HTTPError, LoopbackOpenAI, Reply

pytestmark = pytest.mark.timeout(60)

NEWS = "Opened a new fulfilment centre in Leipzig in May."


@pytest.fixture
def scenario() -> Scenario:
    company = Company(
        name="Nordwind Logistics",
        industry="logistics",
        employees=850,
        headquarters="Hamburg, Germany",
        recent_news=NEWS,
        tech_stack=["SAP", "Snowflake"],
    )
    prospect = Prospect(
        prospect_id="p007",
        first_name="Ana",
        last_name="Kovac",
        email="ana.kovac@nordwind.example.com",
        title="VP Operations",
        seniority="vp",
        persona="analytical",
        pain_points=["manual carrier invoicing", "late shipment visibility"],
        company=company,
    )
    return Scenario(scenario_id="s-test-1", split="train", prospect=prospect)


@pytest.fixture
def product() -> Product:
    return Product(
        name="FreightPilot",
        one_liner="Automates carrier invoice audits for logistics teams.",
        value_props=["cuts audit time by 80%", "catches overbilling"],
        call_to_action="a 15-minute call next week",
        sender_name="Sam Lee",
        sender_title="Account Executive",
    )


def make_model(server: LoopbackOpenAI) -> art.Model:
    return art.Model(
        name="test",
        project="test",
        inference_base_url=server.base_url,
        inference_api_key="x",
        inference_model_name="test",
    )


FINAL = {"subject": "Leipzig and invoice audits", "body": "Hi Ana, congrats on Leipzig. FreightPilot cuts audits. Sam"}


# --- the happy path -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_lookup_then_finalize(scenario: Scenario, product: Product) -> None:
    script = [[Call("lookup_company", {})], [Call("finalize_email", FINAL)]]
    config = RolloutConfig(max_turns=4, max_tokens=32, temperature=0.7, request_timeout_s=10)
    async with LoopbackOpenAI(script) as server:
        traj = await rollout(make_model(server), scenario, product, config, step=3, seed=11)
        requests = server.requests

    assert isinstance(traj, art.Trajectory)
    assert email_from_trajectory(traj) == Email(**FINAL)
    md = traj.metadata
    assert set(METADATA_KEYS) <= set(md)
    assert md["auto_finalized"] is False
    assert md["auto_finalize_source"] is None
    assert md["prospect_id"] == "p007"
    assert md["scenario_id"] == "s-test-1"
    assert md["step"] == 3
    assert md["seed"] == 11
    assert md["turns"] == 2
    assert md["tool_calls"] == 2
    assert md["invalid_tool_calls"] == 0
    assert md["company_lookups"] == 1 and md["prospect_lookups"] == 0
    assert md["email_subject"] == FINAL["subject"] and md["email_body"] == FINAL["body"]
    assert len(md["trajectory_id"]) == 16 and int(md["trajectory_id"], 16) >= 0
    assert md["trajectory_id"] == trajectory_id(traj.messages_and_choices)
    assert traj.reward == 0.0
    assert traj.tools == TOOLS

    items = traj.messages_and_choices
    assert [i["role"] for i in items[:2] if isinstance(i, dict)] == ["system", "user"]
    choices = [i for i in items if isinstance(i, Choice)]
    assert len(choices) == 2
    assert choices[0].logprobs is not None and choices[0].logprobs.content
    tool_msgs = [i for i in items if isinstance(i, dict) and i["role"] == "tool"]
    assert len(tool_msgs) == 2
    assert tool_msgs[0]["tool_call_id"] == choices[0].message.tool_calls[0].id
    company_facts = json.loads(tool_msgs[0]["content"])
    assert company_facts["recent_news"] == NEWS
    assert company_facts["name"] == "Nordwind Logistics"

    # the requests carry what the policy server needs
    assert len(requests) == 2
    first = requests[0]
    assert first["model"] == "test"
    assert first["logprobs"] is True
    assert first["max_completion_tokens"] == 32
    assert first["temperature"] == 0.7
    assert first["seed"] == 11
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup_prospect", "lookup_company", "finalize_email"]
    assert first["messages"] == initial_messages(scenario.prospect, product)
    user = first["messages"][1]["content"]
    assert "Ana Kovac" in user and "p007" in user and "Nordwind Logistics" in user
    assert product.one_liner in user
    assert NEWS not in json.dumps(first["messages"])  # facts only through tools
    second = requests[1]["messages"]
    assert second[2]["role"] == "assistant" and second[2]["tool_calls"][0]["function"]["name"] == "lookup_company"
    assert second[3]["role"] == "tool" and NEWS in second[3]["content"]


# --- auto-finalise ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_text_only_auto_finalizes(scenario: Scenario, product: Product) -> None:
    texts = ["Let me think.", "Still drafting.", "Hi Ana, congrats on the Leipzig centre. FreightPilot can help. Sam"]
    config = RolloutConfig(max_turns=3, max_tokens=32)
    async with LoopbackOpenAI(list(texts)) as server:
        traj = await rollout(make_model(server), scenario, product, config)
        requests = server.requests

    md = traj.metadata
    assert md["auto_finalized"] is True
    assert md["auto_finalize_source"] == "text"
    assert md["turns"] == 3 and md["tool_calls"] == 0 and md["invalid_tool_calls"] == 0
    email = email_from_trajectory(traj)
    assert email.body == texts[-1]
    assert email.subject == "Hi Ana, congrats on the Leipzig"
    assert traj.metrics["auto_finalized"] is True
    # a nudge after each text turn except the last
    nudges = [i for i in traj.messages_and_choices if isinstance(i, dict) and i.get("content") == NUDGE_MESSAGE]
    assert len(nudges) == 2
    assert requests[1]["messages"][-1] == {"role": "user", "content": NUDGE_MESSAGE}
    assert len(requests) == 3


@pytest.mark.anyio
async def test_auto_finalize_parses_subject_and_strips_markup(scenario: Scenario, product: Product) -> None:
    text = 'Subject: Leipzig + invoices\nHi Ana, quick idea for Leipzig.\n<tool_call>{"name": "lookup_company"'
    async with LoopbackOpenAI([text]) as server:
        traj = await rollout(make_model(server), scenario, product, RolloutConfig(max_turns=1))
    assert email_from_trajectory(traj) == Email(subject="Leipzig + invoices", body="Hi Ana, quick idea for Leipzig.")
    assert traj.metadata["auto_finalized"] is True


@pytest.mark.anyio
async def test_auto_finalize_salvages_truncated_finalize_args(scenario: Scenario, product: Product) -> None:
    truncated = '{"subject": "Leipzig", "body": "Hi Ana,\\nFreightPilot audits inv'
    script = [Reply(tool_calls=[Call("finalize_email", truncated)], finish_reason="length")]
    async with LoopbackOpenAI(script) as server:
        traj = await rollout(make_model(server), scenario, product, RolloutConfig(max_turns=1))
    md = traj.metadata
    assert md["auto_finalized"] is True and md["auto_finalize_source"] == "finalize_args"
    assert md["invalid_tool_calls"] == 1 and md["finish_reason"] == "length"
    assert email_from_trajectory(traj) == Email(subject="Leipzig", body="Hi Ana,\nFreightPilot audits inv")


def test_auto_finalize_without_any_text_is_empty() -> None:
    assert auto_finalize_email([{"role": "user", "content": "hi"}]) == (Email(subject="", body=""), "none")


def test_clean_assistant_text() -> None:
    assert clean_assistant_text("<|im_start|>assistant\nHello<|im_end|>") == "Hello"
    assert clean_assistant_text('Hi <tool_call>{"name": "x"}</tool_call> there') == "Hi there"
    assert clean_assistant_text('Body text\n{"name": "finalize_email", "arguments": {"subject": "a"') == "Body text"
    assert clean_assistant_text(None) == ""


# --- invalid tool calls -------------------------------------------------------------------


@pytest.mark.anyio
async def test_malformed_tool_arguments_are_counted(scenario: Scenario, product: Product) -> None:
    script = [
        [Call("lookup_company", "{not json")],
        [Call("send_email", {}), Call("finalize_email", {"subject": "only a subject"})],
        [Call("lookup_prospect", {"prospect_id": "p007"}), Call("finalize_email", FINAL)],
    ]
    async with LoopbackOpenAI(script) as server:
        traj = await rollout(make_model(server), scenario, product, RolloutConfig(max_turns=4))

    md = traj.metadata
    assert md["auto_finalized"] is False
    assert md["turns"] == 3
    assert md["tool_calls"] == 5
    assert md["invalid_tool_calls"] == 3
    assert md["prospect_lookups"] == 1
    assert email_from_trajectory(traj) == Email(**FINAL)
    tool_contents = [
        json.loads(i["content"]) for i in traj.messages_and_choices if isinstance(i, dict) and i["role"] == "tool"
    ]
    assert [("error" in c) for c in tool_contents] == [True, True, True, False, False]
    assert "not valid JSON" in tool_contents[0]["error"]
    assert "unknown tool" in tool_contents[1]["error"]
    assert "body" in tool_contents[2]["error"]
    assert tool_contents[3]["pain_points"] == ["manual carrier invoicing", "late shipment visibility"]


def test_execute_tool_never_raises(scenario: Scenario) -> None:
    cases = [
        ("nope", "{}"),
        ("lookup_company", "[1, 2]"),
        ("lookup_company", '{"prospect_id": "p999"}'),
        ("lookup_prospect", '{"prospect_id": 7}'),
        ("finalize_email", '{"subject": "x", "body": "   "}'),
        ("finalize_email", "{"),
        (None, None),
    ]
    for name, args in cases:
        result = execute_tool(name, args, scenario)  # type: ignore[arg-type]
        assert result.ok is False and result.email is None
        assert "error" in json.loads(result.content)
    ok = execute_tool("lookup_prospect", "", scenario)
    assert ok.ok and json.loads(ok.content)["title"] == "VP Operations"
    final = execute_tool("finalize_email", json.dumps(FINAL), scenario)
    assert final.ok and final.is_final and final.email == Email(**FINAL)


# --- errors propagate ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_error_propagates(scenario: Scenario, product: Product) -> None:
    async with LoopbackOpenAI([HTTPError(500)] * 3) as server:
        with pytest.raises(openai.InternalServerError):
            await rollout(
                make_model(server), scenario, product, RolloutConfig(max_turns=2, retry_initial_s=0, retry_max_s=0)
            )
        assert len(server.requests) == 3  # tried 3 times (inference_attempts), then raised


@pytest.mark.anyio
async def test_server_error_mid_episode_propagates(scenario: Scenario, product: Product) -> None:
    script = [[Call("lookup_company", {})], HTTPError(503, retryable=False)]
    async with LoopbackOpenAI(script) as server:
        with pytest.raises(openai.APIStatusError) as info:
            await rollout(make_model(server), scenario, product, RolloutConfig(max_turns=3))
    assert info.value.status_code == 503  # x-should-retry: false -> not retried


@pytest.mark.anyio
async def test_timeout_propagates(scenario: Scenario, product: Product) -> None:
    config = RolloutConfig(max_turns=2, request_timeout_s=0.2, retry_initial_s=0, retry_max_s=0)
    async with LoopbackOpenAI([Delay(2.0, then="late")] * 3) as server:
        with pytest.raises(openai.APITimeoutError):
            await rollout(make_model(server), scenario, product, config)


# --- trajectory id ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_trajectory_id_is_stable(scenario: Scenario, product: Product) -> None:
    def script() -> list:
        return [[Call("lookup_company", {})], [Call("finalize_email", FINAL)]]

    config = RolloutConfig(max_turns=3)
    ids = []
    for entries in (script(), script(), [[Call("lookup_prospect", {})], [Call("finalize_email", FINAL)]]):
        async with LoopbackOpenAI(entries) as server:
            traj = await rollout(make_model(server), scenario, product, config)
        ids.append(traj.metadata["trajectory_id"])
    # call ids differ between the two servers' answers, the id does not
    assert ids[0] == ids[1]
    assert ids[2] != ids[0]


def test_trajectory_id_function() -> None:
    a = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    b = [{"role": "system", "content": "s"}, {"role": "user", "content": "u2"}]
    with_call = a + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "r"},
    ]
    same_call_other_id = a + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "2", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "2", "content": "r"},
    ]
    assert trajectory_id(a) == trajectory_id([dict(m) for m in a])
    assert trajectory_id(a) != trajectory_id(b)
    assert trajectory_id(with_call) == trajectory_id(same_call_other_id)
    assert trajectory_id(with_call) != trajectory_id(a)
    assert len(trajectory_id([])) == 16


def test_request_messages_match_art_get_messages() -> None:
    from art.trajectories import get_messages

    from codreamer.agent.rollout import request_messages

    choice = Choice.model_validate(
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup_company", "arguments": "{}"}}
                ],
            },
        }
    )
    text = Choice.model_validate(
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}
    )
    items = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        choice,
        {"role": "tool", "tool_call_id": "c1", "content": "{}"},
        text,
        {"role": "user", "content": None},
    ]
    assert request_messages(items) == [dict(m) for m in get_messages(items)]

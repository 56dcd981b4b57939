"""Every LLM call the project makes is a node in the Weave tree, on every client, without secrets.

Checked with Weave's own client and HTTP binding against `RecordingWeaveServer` (a TEST
DOUBLE that records what the client sends: tests/weave_recorder.py), and the policy served
by `LoopbackOpenAI` (a scripted TEST server)."""

from __future__ import annotations

import json
from typing import Any

import art
import pytest

from codreamer.agent.policy_client import open_policy_client
from codreamer.analysis.judge import analyzer_completion
from codreamer.tracking.ops import llm_call_inputs

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import LoopbackOpenAI
    from weave_recorder import RecordingWeaveServer, weave_client
except ModuleNotFoundError:  # pragma: no cover
    from tests.loopback import LoopbackOpenAI
    from tests.weave_recorder import RecordingWeaveServer, weave_client

pytestmark = pytest.mark.timeout(120)
SECRET = "sk-test-secret-never-traced"
REQUEST = {"model": "t", "messages": [{"role": "user", "content": "hi " * 3000}], "max_completion_tokens": 8}


def _name(op_name: str) -> str:
    """`weave:///team/codreamer/op/chat_completion:<digest>` -> `chat_completion`."""
    return op_name.rsplit("/", 1)[-1].split(":", 1)[0]


@pytest.mark.anyio
async def test_policy_calls_of_both_clients_and_the_analyzer_call_are_weave_ops() -> None:
    import openai
    import weave

    @weave.op
    async def rollout_like() -> list[Any]:  # a parent, as `rollout` is in the loop
        model = art.Model(name="t", project="t", inference_base_url=server.base_url, inference_api_key=SECRET)
        model.inference_model_name = "t"
        answers = []
        for kind in ("direct", "openai"):
            async with open_policy_client(model, kind) as client:  # type: ignore[arg-type]
                answers.append(await client.complete(dict(REQUEST), timeout_s=10))
        judge = openai.AsyncOpenAI(base_url=server.base_url, api_key=SECRET, max_retries=0)
        answers.append(await analyzer_completion(judge, "t", [{"role": "user", "content": "why?"}], 16))
        await judge.close()
        return answers

    with RecordingWeaveServer() as recorder:
        async with LoopbackOpenAI(["one", "two", "three"]) as server:
            base_url = server.base_url
            with weave_client(recorder):
                answers = await rollout_like()
        starts, ends = recorder.calls()
    assert [a.choices[0].message.content for a in answers] == ["one", "two", "three"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for start in starts:
        by_name.setdefault(_name(start["op_name"]), []).append(start)
    [parent] = by_name["rollout_like"]
    policy = by_name["chat_completion"]
    [analyzer] = by_name["analyzer_completion"]
    assert len(policy) == 2 and all(c["parent_id"] == parent["id"] for c in [*policy, analyzer])
    assert {c["inputs"]["client"] for c in policy} == {"DirectPolicyClient", "OpenAIPolicyClient"}
    direct = next(c for c in policy if c["inputs"]["client"] == "DirectPolicyClient")
    assert direct["inputs"]["url"] == base_url.rstrip("/") + "/chat/completions"
    content = direct["inputs"]["request"]["messages"][0]["content"]
    assert len(content) < 4100 and content.endswith("chars>")  # compacted, not the whole prompt
    assert analyzer["inputs"]["client"] == "AsyncOpenAI" and analyzer["inputs"]["model"] == "t"
    ended = {e["id"]: e for e in ends}
    assert all(c["id"] in ended for c in [*policy, analyzer])
    output = ended[direct["id"]]["output"]
    assert output["choices"][0]["message"]["content"] == "one" and output["choices"][0]["logprobs"] == "<omitted>"
    sent = json.dumps(recorder.requests, default=str)
    assert SECRET not in sent  # the key reaches neither inputs nor outputs nor attributes


def test_llm_call_inputs_name_the_client_and_drop_it() -> None:
    class Client:
        url = "http://x/v1/chat/completions"
        api_key = SECRET

    shown = llm_call_inputs({"self": Client(), "request": {"api_key": SECRET, "logprobs": [1.0] * 99}, "timeout_s": 3})
    assert shown == {
        "request": {"api_key": "***", "logprobs": "<omitted>"},
        "timeout_s": 3,
        "client": "Client",
        "url": "http://x/v1/chat/completions",
    }

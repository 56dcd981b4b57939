"""The two policy clients (`codreamer.agent.policy_client`): same episodes, same errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import art
import openai
import pytest
from aiohttp import web

from codreamer.agent.policy_client import DirectPolicyClient, InvalidPolicyResponseError, open_policy_client
from codreamer.agent.rollout import RolloutConfig, rollout
from codreamer.config import Settings
from codreamer.domain import Company, Product, Prospect, Scenario
from codreamer.retry import is_transient

try:  # tests/ is a rootdir (no __init__.py): pytest puts it on sys.path
    from loopback import Call, Delay, HTTPError, LoopbackOpenAI
except ModuleNotFoundError:  # pragma: no cover
    from tests.loopback import Call, Delay, HTTPError, LoopbackOpenAI

pytestmark = pytest.mark.timeout(60)

FINAL = {"subject": "Leipzig and invoice audits", "body": "Hi Ana, congrats on Leipzig. FreightPilot cuts audits. Sam"}
REQUEST = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8}


@pytest.fixture
def scenario() -> Scenario:
    company = Company(
        name="Nordwind", industry="logistics", employees=850, headquarters="Hamburg", recent_news="Leipzig."
    )
    prospect = Prospect(
        prospect_id="p007", first_name="Ana", last_name="Kovac", email="ana@nordwind.example.com", title="VP Operations",
        seniority="vp", persona="analytical", pain_points=["manual invoicing"], company=company,
    )  # fmt: skip
    return Scenario(scenario_id="s-1", split="train", prospect=prospect)


@pytest.fixture
def product() -> Product:
    return Product(
        name="FreightPilot", one_liner="Automates carrier invoice audits.", value_props=["cuts audit time by 80%"],
        call_to_action="a 15-minute call next week", sender_name="Sam Lee", sender_title="Account Executive",
    )  # fmt: skip


def make_model(base_url: str, api_key: str = "sk-test-secret") -> art.Model:
    return art.Model(
        name="t", project="t", inference_base_url=base_url, inference_api_key=api_key, inference_model_name="t"
    )


@asynccontextmanager
async def answering(status: int, body: bytes, headers: dict[str, str] | None = None) -> AsyncIterator[str]:
    """A server whose /v1/chat/completions always answers `status` with `body`; yields its base URL."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


# --- same episodes ---------------------------------------------------------------------------


def without_call_ids(requests: list[dict]) -> list[dict]:
    """Request bodies with the tool-call ids (random per server answer) left out."""
    out = []
    for body in requests:
        messages = []
        for message in body["messages"]:
            message = {k: v for k, v in message.items() if k != "tool_call_id"}
            if "tool_calls" in message:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]
            messages.append(message)
        out.append({**body, "messages": messages})
    return out


@pytest.mark.anyio
async def test_both_clients_send_the_same_requests_and_build_the_same_trajectory(
    scenario: Scenario, product: Product
) -> None:
    script = [[Call("lookup_company", {})], "Subject: hello", [Call("finalize_email", FINAL)]]
    results = {}
    for kind in ("openai", "direct"):
        config = RolloutConfig(max_turns=4, temperature=0.7, inference_client=kind)
        async with LoopbackOpenAI(list(script)) as server:
            traj = await rollout(make_model(server.base_url), scenario, product, config, seed=7)
            results[kind] = (server.requests, traj)
    (openai_requests, openai_traj), (direct_requests, direct_traj) = results["openai"], results["direct"]
    assert without_call_ids(direct_requests) == without_call_ids(openai_requests)
    assert len(direct_requests) == 3 and direct_requests[0]["seed"] == 7
    assert direct_traj.metadata["trajectory_id"] == openai_traj.metadata["trajectory_id"]
    assert direct_traj.metadata["email_subject"] == FINAL["subject"]
    direct_choices = [c for c in direct_traj.messages_and_choices if not isinstance(c, dict)]
    openai_choices = [c for c in openai_traj.messages_and_choices if not isinstance(c, dict)]
    assert [type(c) for c in direct_choices] == [type(c) for c in openai_choices]
    # ids are random per answer; ART's wrapper adds its own `art_completion_tokens` to each choice
    strip_ids = {"message": {"tool_calls": {"__all__": {"id"}}}, "art_completion_tokens": True}
    assert [c.model_dump(exclude=strip_ids) for c in direct_choices] == [
        c.model_dump(exclude=strip_ids) for c in openai_choices
    ]
    assert direct_choices[0].logprobs is not None and direct_choices[0].logprobs.content


@pytest.mark.anyio
async def test_a_shared_client_serves_concurrent_rollouts(scenario: Scenario, product: Product) -> None:
    import asyncio

    config = RolloutConfig(max_turns=1, inference_client="direct")
    async with LoopbackOpenAI([Delay(0.2, then=[Call("finalize_email", FINAL)])] * 8) as server:
        model = make_model(server.base_url)
        async with open_policy_client(model, "direct", max_connections=8) as client:
            started = asyncio.get_running_loop().time()
            trajs = await asyncio.gather(*(rollout(model, scenario, product, config, client=client) for _ in range(8)))
            elapsed = asyncio.get_running_loop().time() - started
    assert [t.metadata["email_subject"] for t in trajs] == [FINAL["subject"]] * 8
    assert elapsed < 8 * 0.2  # concurrent, not one after another (a correctness check, not a timing goal)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_type", "transient"),
    [
        (400, openai.BadRequestError, False),
        (401, openai.AuthenticationError, False),
        (404, openai.NotFoundError, False),
        (429, openai.RateLimitError, True),
        (500, openai.InternalServerError, True),
        (503, openai.InternalServerError, True),
    ],
)
async def test_http_errors_become_the_sdk_exception_types(status: int, error_type: type, transient: bool) -> None:
    async with (
        LoopbackOpenAI([HTTPError(status, message="scripted trouble")]) as server,
        open_policy_client(make_model(server.base_url), "direct") as client,
    ):
        with pytest.raises(error_type) as caught:
            await client.complete(REQUEST, timeout_s=5)
    assert caught.value.status_code == status
    assert "scripted trouble" in str(caught.value)
    assert is_transient(caught.value) is transient


@pytest.mark.anyio
async def test_the_servers_no_retry_header_is_kept() -> None:
    async with (
        LoopbackOpenAI([HTTPError(503, retryable=False)]) as server,
        open_policy_client(make_model(server.base_url), "direct") as client,
    ):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.complete(REQUEST, timeout_s=5)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert not is_transient(caught.value)


@pytest.mark.anyio
async def test_timeout_and_refused_connection_are_transient_sdk_errors() -> None:
    async with (
        LoopbackOpenAI([Delay(2.0, then="late")]) as server,
        open_policy_client(make_model(server.base_url), "direct") as client,
    ):
        with pytest.raises(openai.APITimeoutError) as timed_out:
            await client.complete(REQUEST, timeout_s=0.2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        async with open_policy_client(make_model(f"http://127.0.0.1:{closed_port}/v1"), "direct") as client:
            with pytest.raises(openai.APIConnectionError) as refused:
                await client.complete(REQUEST, timeout_s=5)
    assert is_transient(timed_out.value) and is_transient(refused.value)
    assert not isinstance(refused.value, openai.APITimeoutError)


@pytest.mark.anyio
async def test_a_non_completion_answer_names_the_field_and_hides_the_key() -> None:
    async with (
        answering(200, b'{"id": "x", "object": "chat.completion", "created": 1, "model": "t"}') as url,
        open_policy_client(make_model(url), "direct") as client,
    ):
        with pytest.raises(InvalidPolicyResponseError, match=r"choices: Field required") as caught:
            await client.complete(REQUEST, timeout_s=5)
    assert not is_transient(caught.value)
    assert "sk-test-secret" not in str(caught.value)


@pytest.mark.anyio
async def test_a_non_json_error_page_is_kept_short() -> None:
    async with (
        answering(502, b"<html>" + b"x" * 5000 + b"</html>") as url,
        open_policy_client(make_model(url), "direct") as client,
    ):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.complete(REQUEST, timeout_s=5)
    assert len(str(caught.value)) < 700 and caught.value.status_code == 502


@pytest.mark.anyio
async def test_direct_client_needs_a_registered_model() -> None:
    model = art.Model(name="unregistered", project="t")
    with pytest.raises(ValueError, match=r"unregistered.*inference_base_url"):
        async with open_policy_client(model, "direct"):
            pass


def test_direct_client_sends_the_key_only_in_its_header() -> None:
    client = DirectPolicyClient.__new__(DirectPolicyClient)  # no session needed to check the error path
    client.url, client._api_key = "http://127.0.0.1:1/v1/chat/completions", "sk-test-secret"
    error = client._status_error(500, {}, b'{"error": {"message": "boom"}}')
    assert str(error) == "Error code: 500 - boom"
    assert "authorization" not in {k.lower() for k in error.request.headers}
    echoed = client._status_error(401, {}, b'{"error": {"message": "Incorrect API key provided: sk-test-secret"}}')
    assert "sk-test-secret" not in str(echoed) and str(echoed).endswith("provided: ***")


# --- which client a run uses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "setting", "resolved"),
    [
        ("embedded", "auto", "direct"),
        ("local", "auto", "openai"),
        ("serverless", "auto", "openai"),
        ("embedded", "openai", "openai"),
        ("local", "direct", "direct"),
    ],
)
def test_auto_picks_the_direct_client_only_for_the_embedded_backend(backend: str, setting: str, resolved: str) -> None:
    settings = Settings(backend=backend, inference_client=setting, wandb=False)
    assert RolloutConfig.from_settings(settings).inference_client == resolved

"""The embedded OpenAI-compatible endpoint (`server.py`) and its request batcher (`batcher.py`).

A real `PolicyServer` on loopback, answered by a tiny random Llama policy and queried with
the real `openai.AsyncOpenAI` client. The tokenizer is a character-level test double.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from codreamer.backends.embedded.batcher import SamplingBatcher
from codreamer.backends.embedded.chat_format import to_chatml_messages
from codreamer.backends.embedded.policy import GRPOConfig, Policy, Sample
from codreamer.backends.embedded.server import BadRequest, PolicyServer, parse_request

pytestmark = pytest.mark.timeout(60)

API_KEY = "test-key"
MODEL = "tiny-policy"
VOCAB = 64
PAD, EOS, IM_END, UNK = 0, 1, 2, 3


class FakeCharTokenizer:
    """Test double for the HF tokenizer: one token per character, ids 4..63, short prompts.

    It offers what `Policy` and `PolicyServer` use: the special ids, `convert_tokens_to_ids`,
    `apply_chat_template`, `decode` and `convert_ids_to_tokens`. Each message keeps only the
    last `KEEP` characters of its content so prompts stay far below the tiny model's context.
    """

    ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789 .,:{}"<>/_-ABCDEFGHIJKL'
    KEEP = 12
    eos_token_id = EOS
    pad_token_id = PAD

    def __init__(self) -> None:
        assert len(self.ALPHABET) == VOCAB - 4

    def convert_tokens_to_ids(self, token: str) -> int:
        return IM_END if token == "<|im_end|>" else UNK

    def encode(self, text: str) -> list[int]:
        return [4 + self.ALPHABET.index(c) if c in self.ALPHABET else UNK for c in text]

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int]:
        assert tokenize
        ids: list[int] = []
        for message in messages:
            ids += self.encode(f"{message['role'][0]}:{message['content'][-self.KEEP :]}") + [IM_END]
        if add_generation_prompt:
            ids += self.encode("a:")
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.ALPHABET[i - 4] if i >= 4 else ("" if skip_special_tokens else f"<{i}>") for i in ids)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.ALPHABET[i - 4] if i >= 4 else f"<{i}>" for i in ids]


TOKENIZER = FakeCharTokenizer()


def tiny_policy() -> Policy:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    policy = Policy(base, TOKENIZER, GRPOConfig(lora_rank=4, lora_alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter, so the served policy is the LoRA one
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return policy


class SampleSpy:
    """Wraps `policy.sample`, recording how many prompts each call carried."""

    def __init__(self, policy: Policy, fail_first: bool = False) -> None:
        self.real = policy.sample
        self.batch_sizes: list[int] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()

    def __call__(self, prompts: list[list[int]], *args: Any, **kwargs: Any) -> list[Sample]:
        with self._lock:
            self.batch_sizes.append(len(prompts))
            if self.fail_first and len(self.batch_sizes) == 1:
                raise RuntimeError("sampler exploded")
        return self.real(prompts, *args, **kwargs)


@pytest.fixture
def policy() -> Policy:
    return tiny_policy()


@asynccontextmanager
async def serve(
    policy: Policy, window_s: float = 0.01, max_batch: int = 16
) -> AsyncIterator[tuple[PolicyServer, openai.AsyncOpenAI]]:
    server = PolicyServer(
        SamplingBatcher(policy, max_batch=max_batch, window_s=window_s),
        TOKENIZER,  # type: ignore[arg-type]
        API_KEY,
        MODEL,
        max_context_tokens=128,
        default_max_tokens=8,
    )
    base_url = await server.start()
    client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=30)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


def messages_for(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You write emails."}, {"role": "user", "content": text}]


def rendered(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    return TOKENIZER.apply_chat_template(to_chatml_messages(messages, tools), add_generation_prompt=True)


# ---------------------------------------------------------------------- parse_request
GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "'messages'"),
        ({"messages": []}, "'messages'"),
        ({"messages": "hi"}, "'messages'"),
        ({"messages": [{"content": "no role"}]}, "'messages'"),
        ({**GOOD, "tools": {"name": "x"}}, "'tools'"),
        ({**GOOD, "max_tokens": "ten"}, "'max_tokens'"),
        ({**GOOD, "max_tokens": -3}, "'max_tokens'"),
        ({**GOOD, "max_tokens": 2.5}, "'max_tokens'"),
        ({**GOOD, "max_completion_tokens": -1}, "'max_tokens'"),
        ({**GOOD, "temperature": -0.1}, "'temperature'"),
        ({**GOOD, "temperature": "hot"}, "'temperature'"),
        ({**GOOD, "n": 65}, "'n'"),
        ({**GOOD, "n": -1}, "'n'"),
        ({**GOOD, "n": "2"}, "'n'"),
        ({**GOOD, "seed": 1.5}, "'seed'"),
        ({**GOOD, "seed": "7"}, "'seed'"),
    ],
)
def test_parse_request_names_the_bad_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        parse_request(body, default_max_tokens=8)


def test_parse_request_refuses_a_body_that_is_not_an_object() -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        parse_request([GOOD], default_max_tokens=8)


def test_parse_request_defaults() -> None:
    parsed = parse_request({**GOOD, "tools": []}, default_max_tokens=8)
    assert (parsed.max_tokens, parsed.temperature, parsed.n, parsed.seed) == (8, 1.0, 1, None)
    assert parsed.tools is None and parsed.tokens_as_ids is False
    assert parsed.messages == GOOD["messages"]


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_request({**GOOD, "max_completion_tokens": 5, "max_tokens": 9}, 8).max_tokens == 5
    assert parse_request({**GOOD, "max_tokens": 9}, 8).max_tokens == 9
    assert parse_request({**GOOD, "max_completion_tokens": None, "max_tokens": 9}, 8).max_tokens == 9
    parsed = parse_request({**GOOD, "temperature": 0, "n": 64, "seed": 3, "return_tokens_as_token_ids": True}, 8)
    assert (parsed.temperature, parsed.n, parsed.seed, parsed.tokens_as_ids) == (0.0, 64, 3, True)


def test_parse_request_refuses_zero_max_tokens() -> None:
    with pytest.raises(BadRequest, match="'max_tokens'"):
        parse_request({**GOOD, "max_tokens": 0}, default_max_tokens=8)


def test_parse_request_refuses_zero_n() -> None:
    with pytest.raises(BadRequest, match="'n'"):
        parse_request({**GOOD, "n": 0}, default_max_tokens=8)


# ------------------------------------------------------------------------- live server
@pytest.mark.anyio
async def test_chat_completion_carries_token_ids_and_logprobs(policy: Policy) -> None:
    messages = messages_for("Write to Ada.")
    prompt = rendered(messages)
    [expected] = policy.sample([prompt], max_new_tokens=6, temperature=0.0)
    async with serve(policy) as (server, client):
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=6, temperature=0, logprobs=True, n=2
        )
        assert server.requests_served == 1
    assert completion.model == MODEL and completion.object == "chat.completion"
    assert len(completion.choices) == 2
    for index, choice in enumerate(completion.choices):
        extra = choice.model_extra or {}
        assert choice.index == index
        assert extra["prompt_token_ids"] == prompt
        assert extra["token_ids"] == expected.token_ids
        assert choice.finish_reason == expected.finish_reason
        assert choice.message.role == "assistant"
        assert choice.message.content == TOKENIZER.decode(expected.token_ids, skip_special_tokens=True)
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert [t.token for t in choice.logprobs.content] == TOKENIZER.convert_ids_to_tokens(expected.token_ids)
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-5)
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 2 * len(expected.token_ids)


@pytest.mark.anyio
async def test_return_tokens_as_token_ids(policy: Policy) -> None:
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=messages_for("hello"),
            max_tokens=5,
            logprobs=True,
            seed=11,
            extra_body={"return_tokens_as_token_ids": True},
        )
    [choice] = completion.choices
    token_ids = (choice.model_extra or {})["token_ids"]
    assert token_ids and len(token_ids) <= 5
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [t.token for t in choice.logprobs.content] == [f"token_id:{t}" for t in token_ids]
    assert [t.bytes for t in choice.logprobs.content] == [list(f"token_id:{t}".encode()) for t in token_ids]


@pytest.mark.anyio
async def test_wrong_api_key_is_refused_with_401(policy: Policy) -> None:
    async with serve(policy) as (server, client):
        intruder = openai.AsyncOpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError) as caught:
                await intruder.chat.completions.create(model=MODEL, messages=messages_for("x"))
            with pytest.raises(openai.AuthenticationError):
                await intruder.models.list()
        finally:
            await intruder.close()
        assert caught.value.status_code == 401
        assert "invalid API key" in str(caught.value)
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        assert server.requests_served == 0


@pytest.mark.anyio
async def test_bad_requests_get_400_with_the_message(policy: Policy) -> None:
    async with serve(policy) as (server, client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=messages_for("x"), temperature=-1)
        assert caught.value.status_code == 400
        assert "field 'temperature' must be a number >= 0" in str(caught.value)

        with pytest.raises(openai.BadRequestError, match="exceeds the context of 128 tokens"):
            await client.chat.completions.create(model=MODEL, messages=messages_for("x"), max_tokens=200)

        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
            response = await http.post("/chat/completions", json={"model": MODEL, "messages": []})
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and "'messages'" in error["message"]
            response = await http.post(
                "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400
        assert server.requests_served == 0


@pytest.mark.anyio
async def test_tool_calls_in_the_sampled_text_come_back_as_openai_tool_calls(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '<tool_call>{"name": "send_email", "arguments": {"subject": "hi"}}</tool_call>'
    scripted = TOKENIZER.encode(text)
    assert TOKENIZER.decode(scripted) == text

    def sample(prompts: list[list[int]], *args: Any, **kwargs: Any) -> list[Sample]:
        return [Sample(scripted, [-0.5] * len(scripted), "stop") for _ in prompts]

    monkeypatch.setattr(policy, "sample", sample)
    tools = [
        {"type": "function", "function": {"name": "send_email", "parameters": {"type": "object", "properties": {}}}}
    ]
    messages = messages_for("Go")
    async with serve(policy) as (_, client):
        with_tools = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools)  # type: ignore[arg-type]
        without = await client.chat.completions.create(model=MODEL, messages=messages)
    [choice] = with_tools.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "send_email" and call.function.arguments == '{"subject": "hi"}'  # type: ignore[union-attr]
    assert (choice.model_extra or {})["prompt_token_ids"] == rendered(messages, tools)
    assert rendered(messages, tools) != rendered(messages)
    assert without.choices[0].message.content == text and not without.choices[0].message.tool_calls


@pytest.mark.anyio
async def test_concurrent_requests_are_batched_and_each_gets_its_own_choices(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald"]
    ns = [1, 2, 1, 2, 1, 2]
    prompts = [rendered(messages_for(t)) for t in texts]
    assert len({tuple(p) for p in prompts}) == len(prompts)
    expected = [policy.sample([p], max_new_tokens=5, temperature=0.0)[0] for p in prompts]
    spy = SampleSpy(policy)
    monkeypatch.setattr(policy, "sample", spy)
    async with serve(policy, window_s=0.25) as (server, client):
        completions = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL, messages=messages_for(t), max_tokens=5, temperature=0, logprobs=True, n=n
                )
                for t, n in zip(texts, ns, strict=True)
            )
        )
        assert server.requests_served == len(texts)
    assert len(spy.batch_sizes) < len(texts), spy.batch_sizes
    assert sum(spy.batch_sizes) == sum(ns)
    for completion, prompt, n, want in zip(completions, prompts, ns, expected, strict=True):
        assert len(completion.choices) == n
        assert [c.index for c in completion.choices] == list(range(n))
        for choice in completion.choices:
            extra = choice.model_extra or {}
            assert extra["prompt_token_ids"] == prompt
            assert extra["token_ids"] == want.token_ids
            assert choice.logprobs is not None and choice.logprobs.content is not None
            assert [t.logprob for t in choice.logprobs.content] == pytest.approx(want.logprobs, abs=1e-4)


@pytest.mark.anyio
async def test_a_failed_batch_gives_500_and_the_server_keeps_serving(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SampleSpy(policy, fail_first=True)
    monkeypatch.setattr(policy, "sample", spy)
    async with serve(policy) as (_, client):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=messages_for("x"), max_tokens=3)
        completion = await client.chat.completions.create(model=MODEL, messages=messages_for("x"), max_tokens=3)
    assert len(completion.choices) == 1 and len(spy.batch_sizes) == 2


@pytest.mark.anyio
async def test_batcher_keeps_requests_with_different_settings_apart(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SampleSpy(policy)
    monkeypatch.setattr(policy, "sample", spy)
    batcher = SamplingBatcher(policy, max_batch=4, window_s=0.2)
    batcher.start()
    try:
        results = await asyncio.gather(
            batcher.sample([5, 6], 1, 3, 0.0, None),
            batcher.sample([7, 8], 2, 3, 0.0, None),
            batcher.sample([9], 1, 4, 0.0, None),  # other max_new_tokens: its own batch
            batcher.sample([10, 11], 3, 3, 0.0, None),  # would overflow max_batch=4: deferred
        )
    finally:
        await batcher.stop()
    assert [len(r) for r in results] == [1, 2, 1, 3]
    assert sorted(spy.batch_sizes) == [1, 3, 3]
    assert len(results[2][0].token_ids) <= 4 and all(
        len(s.token_ids) <= 3 for r in (results[0], results[1], results[3]) for s in r
    )


@pytest.mark.parametrize(
    "body",
    [
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"description": "d"}}],
        },
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_1"}]}]},
    ],
    ids=["tool-without-name", "non-text-content", "tool-call-without-function"],
)
@pytest.mark.anyio
async def test_malformed_tools_or_messages_get_400_not_500(policy: Policy, body: dict[str, Any]) -> None:
    async with serve(policy) as (server, _):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
            response = await http.post("/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


class BlockingSpy:
    """Wraps `policy.sample`: records each call's prompts; the first call waits for `release`."""

    def __init__(self, policy: Policy) -> None:
        self.real = policy.sample
        self.calls: list[list[list[int]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, prompts: list[list[int]], *args: Any, **kwargs: Any) -> list[Sample]:
        self.calls.append([list(p) for p in prompts])
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(20), "never released"
        return self.real(prompts, *args, **kwargs)


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


@pytest.mark.anyio
async def test_a_request_whose_client_disconnected_is_not_generated_for(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is busy; a client gives up (times out, closes its connection) while its request
    waits in the queue: the sampler never sees that prompt, the next request is served."""
    spy = BlockingSpy(policy)
    monkeypatch.setattr(policy, "sample", spy)
    async with serve(policy) as (server, client):
        busy = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=messages_for("busy"), max_tokens=3, temperature=0)
        )
        try:
            await _until(spy.entered.is_set)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            body = {"model": MODEL, "messages": messages_for("abandoned"), "max_tokens": 3}
            async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=0.3) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post("/chat/completions", json=body)
            await _until(lambda: server.requests_abandoned == 1, timeout_s=5.0)
        finally:
            spy.release.set()
        assert len((await busy).choices) == 1
        later = await client.chat.completions.create(model=MODEL, messages=messages_for("later"), max_tokens=3)
        assert len(later.choices) == 1
    sampled = [prompt for call in spy.calls for prompt in call]
    assert rendered(messages_for("abandoned")) not in sampled
    assert sampled == [rendered(messages_for("busy")), rendered(messages_for("later"))]
    assert server.batcher.skipped == 1 and server.requests_served == 2


@pytest.mark.anyio
async def test_the_batcher_skips_cancelled_callers_before_sampling(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BlockingSpy(policy)
    monkeypatch.setattr(policy, "sample", spy)
    batcher = SamplingBatcher(policy, max_batch=8, window_s=0.01)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.sample([5, 6], 1, 3, 0.0, None))
        await _until(spy.entered.is_set)
        gone = [asyncio.create_task(batcher.sample([7, n], 1, 3, 0.0, None)) for n in range(8, 12)]
        kept = asyncio.create_task(batcher.sample([9, 9], 1, 3, 0.0, None))
        await asyncio.sleep(0.05)
        for task in gone:
            task.cancel()
        spy.release.set()
        assert len(await first) == 1 and len(await kept) == 1
    finally:
        await batcher.stop()
    assert [len(call) for call in spy.calls] == [1, 1] and spy.calls[1] == [[9, 9]]
    assert batcher.skipped == 4


# ------------------------------------------------------------------ endpoint fidelity (issue 17)
def _forced_policy(policy: Policy, monkeypatch: pytest.MonkeyPatch, script: list[int]) -> None:
    """Makes the sampler pick `script`'s tokens in order (then the end-of-turn token), so stop
    strings and the end-of-turn token can be tested on a random tiny model."""
    real_choose = Policy._choose
    position = {"n": 0}

    def scripted(logits, temperature, generators):  # type: ignore[no-untyped-def]
        chosen, _ = real_choose(logits, temperature, generators)
        token = script[position["n"]] if position["n"] < len(script) else IM_END
        position["n"] += 1
        chosen = torch.full_like(chosen, token)
        return chosen, torch.log_softmax(logits, dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)

    monkeypatch.setattr(policy, "_choose", scripted)


def _ids(text: str) -> list[int]:
    return TOKENIZER.encode(text)


@pytest.mark.anyio
async def test_the_end_of_turn_token_is_returned_with_its_logprob(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forced_policy(policy, monkeypatch, _ids("hi"))
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages_for("x"), max_tokens=8, logprobs=True
        )
    [choice] = completion.choices
    extra = choice.model_extra or {}
    assert extra["token_ids"] == [*_ids("hi"), IM_END] and choice.finish_reason == "stop"
    assert choice.logprobs is not None and len(choice.logprobs.content or []) == 3
    assert choice.message.content == "hi"  # the special token is not in the text
    assert completion.usage is not None and completion.usage.completion_tokens == 3


@pytest.mark.anyio
async def test_stop_strings_end_the_completion_and_are_cut_from_the_text(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forced_policy(policy, monkeypatch, _ids("ab.cdef"))
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages_for("x"), max_tokens=8, stop=[".", "zz"]
        )
    [choice] = completion.choices
    assert choice.message.content == "ab" and choice.finish_reason == "stop"
    assert (choice.model_extra or {})["token_ids"] == _ids("ab.")  # generation stopped at the stop string


@pytest.mark.anyio
async def test_top_logprobs_are_filled_and_sorted(policy: Policy) -> None:
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages_for("x"), max_tokens=4, logprobs=True, top_logprobs=3, temperature=0
        )
    [choice] = completion.choices
    assert choice.logprobs is not None and choice.logprobs.content
    for entry in choice.logprobs.content:
        values = [alt.logprob for alt in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and values[0] == pytest.approx(
            entry.logprob, abs=1e-5
        )  # greedy


@pytest.mark.anyio
async def test_streaming_is_a_clear_400_and_an_unknown_model_a_404(policy: Policy) -> None:
    async with serve(policy) as (server, client):
        with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
            await client.chat.completions.create(model=MODEL, messages=messages_for("x"), stream=True)
        with pytest.raises(openai.NotFoundError, match="not served here") as caught:
            await client.chat.completions.create(model="someone-else", messages=messages_for("x"))
        assert caught.value.status_code == 404
        assert server.requests_served == 0


@pytest.mark.anyio
async def test_every_choice_carries_policy_token_spans_that_art_accepts(policy: Policy) -> None:
    from art.preprocessing.policy_spans import (
        validate_complete_policy_token_spans,
        validate_complete_prompt_policy_token_spans,
    )

    policy.version = 3
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(model=MODEL, messages=messages_for("x"), max_tokens=5, n=2)
    for choice in completion.choices:
        extra = choice.model_extra or {}
        validate_complete_policy_token_spans(choice, completion_tokens=len(extra["token_ids"]))
        validate_complete_prompt_policy_token_spans(choice, prompt_tokens=len(extra["prompt_token_ids"]))
        assert {span["policy_version"] for span in extra["policy_token_spans"]} == {3}


@pytest.mark.anyio
async def test_prompt_logprobs_score_a_given_completion(policy: Policy) -> None:
    """The completion as the last message, no generation prompt: each prompt token's log-prob given the ones before."""
    messages = [*messages_for("x"), {"role": "assistant", "content": "hello"}]
    prompt = TOKENIZER.apply_chat_template(to_chatml_messages(messages, None), add_generation_prompt=False)
    policy._unmerge_lora()
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt])).logits[0].float()
    want = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)
    async with serve(policy) as (_, client):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=1,
            extra_body={"prompt_logprobs": 2, "add_generation_prompt": False},
        )
    scored = (completion.model_extra or {})["prompt_logprobs"]
    assert len(scored) == len(prompt) and scored[0] is None
    got = [entry[str(token)]["logprob"] for token, entry in zip(prompt[1:], scored[1:], strict=True)]
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert all(len(entry) >= 2 for entry in scored[1:])  # the token and the top 2 (one may be the token)


@pytest.mark.anyio
async def test_older_steps_are_served_by_name_at_step(policy: Policy) -> None:
    """`name@step` samples with that step's adapter; the plain name with the current weights."""
    old = policy.lora_state()
    greedy_old = policy.sample([rendered(messages_for("x"))], 5, 0.0)[0].token_ids
    policy._unmerge_lora()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    policy.version = 1
    greedy_new = policy.sample([rendered(messages_for("x"))], 5, 0.0)[0].token_ids
    assert greedy_new != greedy_old

    def resolve(name: str) -> int | None:
        if name == MODEL:
            return None
        if name == f"{MODEL}@0":
            return 0
        raise LookupError(f"model {name!r} is not served here")

    batcher = SamplingBatcher(policy, adapter_loader=lambda step: old)
    server = PolicyServer(
        batcher, TOKENIZER, API_KEY, MODEL, max_context_tokens=128, default_max_tokens=8, resolve=resolve
    )  # type: ignore[arg-type]
    client = openai.AsyncOpenAI(base_url=await server.start(), api_key=API_KEY, max_retries=0)
    try:
        at_0 = await client.chat.completions.create(
            model=f"{MODEL}@0", messages=messages_for("x"), max_tokens=5, temperature=0
        )
        latest = await client.chat.completions.create(
            model=MODEL, messages=messages_for("x"), max_tokens=5, temperature=0
        )
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=f"{MODEL}@7", messages=messages_for("x"))
    finally:
        await client.close()
        await server.stop()
    assert (at_0.choices[0].model_extra or {})["token_ids"] == greedy_old and at_0.model == f"{MODEL}@0"
    assert (latest.choices[0].model_extra or {})["token_ids"] == greedy_new
    assert (at_0.choices[0].model_extra or {})["policy_token_spans"][0]["policy_version"] == 0
    assert policy.sample([rendered(messages_for("x"))], 5, 0.0)[0].token_ids == greedy_new  # swapped back

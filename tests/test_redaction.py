"""`codreamer.redaction`: one list of credential names and one way to blank a secret out,
checked on the input each former copy of it handled (judge errors, analysis-judge reasons,
retry warnings, run-report settings, traced call inputs, W&B config names)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from loguru import logger
from pydantic import SecretStr

from codreamer.analysis.judge import AnalyzerJudgeConfig
from codreamer.analysis.judge import _redact as analysis_judge_redact
from codreamer.config import Settings
from codreamer.local_trace import TRACE_FILE, recording_to, traced
from codreamer.redaction import MASK, is_secret_name, redact
from codreamer.reports import _public_settings
from codreamer.retry import RetryPolicy, retrying
from codreamer.rewards.ruler import _describe as judge_error_text

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-REDACT-ME-0123456789"


def test_redact_blanks_every_given_secret_and_skips_empty_ones() -> None:
    text = f"401: bad key {KEY}; also {KEY[:-1]}x and {KEY}"
    assert redact(text, SecretStr(KEY)) == f"401: bad key {MASK}; also {KEY[:-1]}x and {MASK}"
    assert redact(text, KEY, None, "", SecretStr("")) == redact(text, SecretStr(KEY))
    assert redact(text) == text and redact(text, None) == text


def test_ruler_judge_errors_never_carry_the_key() -> None:
    exc = RuntimeError(f"litellm.AuthenticationError: AuthenticationError: Incorrect API key provided: {KEY}")
    text = judge_error_text(exc, SecretStr(KEY))
    assert KEY not in text and MASK in text and text.startswith("RuntimeError: Incorrect API key")


def test_analysis_judge_reasons_are_redacted_and_clipped() -> None:
    config = AnalyzerJudgeConfig(model="m", api_key=KEY)
    reason = analysis_judge_redact(f"AuthenticationError: {KEY} " + "x" * 500, config)
    assert KEY not in reason and reason.startswith(f"AuthenticationError: {MASK}") and len(reason) == 300
    assert analysis_judge_redact("plain", AnalyzerJudgeConfig(model="m")) == "plain"


def test_retry_warnings_never_carry_the_key() -> None:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING", format="{message}")
    response = httpx.Response(503, request=httpx.Request("POST", "http://judge"))
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        async for attempt in retrying(
            RetryPolicy(attempts=2, initial_s=0, max_s=0), "judge", secrets=(SecretStr(KEY),)
        ):
            with attempt:
                calls += 1
                if calls == 1:
                    raise openai.APIStatusError(f"overloaded for key {KEY}", response=response, body=None)
                return "ok"
        raise AssertionError("unreachable")

    try:
        assert asyncio.run(flaky()) == "ok"
    finally:
        logger.remove(sink)
    assert calls == 2 and len(lines) == 1
    assert KEY not in lines[0] and MASK in lines[0] and "attempt 1/2" in lines[0]


def test_run_reports_drop_secret_settings() -> None:
    settings = {"judge_api_key": KEY, "events_secret": KEY, "wandb_api_key": KEY, "hf_token": KEY,
                "max_tokens": 48, "prompt_tokens": 1, "learning_rate": 5e-5}  # fmt: skip
    assert _public_settings({"settings": settings}) == {"learning_rate": 5e-5, "max_tokens": 48, "prompt_tokens": 1}


def test_traced_call_inputs_named_as_secrets_are_masked(tmp_path: Path) -> None:
    @traced
    def call(prompt: str, api_key: str, headers: dict[str, str], max_tokens: int) -> str:
        return "done"

    with recording_to(tmp_path):
        call("hello", KEY, {"Authorization": f"Bearer {KEY}", "accept": "json"}, 48)
    raw = (tmp_path / TRACE_FILE).read_text(encoding="utf-8")
    assert KEY not in raw
    inputs = json.loads(raw)["inputs"]
    assert inputs["api_key"] == MASK and inputs["max_tokens"] == 48 and inputs["prompt"] == "hello"


def test_every_credential_setting_is_a_secret_name_and_no_other() -> None:
    """The W&B config and the run reports filter `Settings` fields by this one predicate."""
    secret = sorted(name for name in Settings.model_fields if is_secret_name(name))
    assert secret == ["events_secret", "judge_api_key", "wandb_api_key"]
    for name in Settings.model_fields:
        if is_secret_name(name):
            continue
        annotation = str(Settings.model_fields[name].annotation)
        assert "SecretStr" not in annotation, f"{name} holds a secret but its name does not say so"


@pytest.mark.parametrize(
    "name",
    ["api_key", "apikey", "judge_api_key", "WANDB_API_KEY", "events_secret", "secret_path", "auth_token", "hf_token",
     "password", "passwd", "authorization", "credentials", "aws_credential_file", "key", "token"],
)  # fmt: skip
def test_credential_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    ["max_tokens", "prompt_tokens", "completion_tokens", "token_ids", "tokenizer", "keep_last", "monkey", "keys"],
)
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)

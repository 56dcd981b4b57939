"""The warm start: TemplateDemoWriter demonstrations, their SFT tokens, and ART's train_sft on the embedded backend."""

from __future__ import annotations

import json
from pathlib import Path

import art
import pytest

from codreamer.agent.demonstrations import TemplateDemoWriter
from codreamer.agent.tools import FINALIZE_EMAIL, LOOKUP_COMPANY, LOOKUP_PROSPECT
from codreamer.backends.embedded.chat_format import to_chatml_messages
from codreamer.backends.embedded.sft import SFTDataError, sft_sequence
from codreamer.config import REPO_DATA_DIR, Settings
from codreamer.data import load_task_data
from codreamer.domain import Email
from codreamer.pipeline.warm_start import demonstrations, load_warm_start
from codreamer.rewards.rubric import score_email

TASK = load_task_data(REPO_DATA_DIR)


def _calls(message: dict) -> list[str]:
    return [call["function"]["name"] for call in message.get("tool_calls") or []]


def test_a_demonstration_looks_up_then_finalises_with_the_real_tool_results() -> None:
    scenario = TASK.train[3]
    demo = TemplateDemoWriter(TASK.product, seed=1).episode(scenario)
    messages = demo.messages_and_choices
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert [_calls(m) for m in assistant] == [[LOOKUP_PROSPECT, LOOKUP_COMPANY], [FINALIZE_EMAIL]]
    tool_texts = " ".join(m["content"] for m in messages if m["role"] == "tool")
    assert scenario.prospect.company.recent_news in tool_texts and scenario.prospect.pain_points[0] in tool_texts
    email = json.loads(assistant[-1]["tool_calls"][0]["function"]["arguments"])
    assert email["body"].startswith(f"Hi {scenario.prospect.first_name}") or email["body"].startswith("Hello")


@pytest.mark.parametrize("scenario", TASK.train[:12], ids=lambda s: s.scenario_id)
def test_demonstration_emails_are_good_emails_for_their_own_prospect_only(scenario) -> None:
    writer = TemplateDemoWriter(TASK.product, seed=0)
    demo = writer.episode(scenario)
    arguments = demo.messages_and_choices[-2]["tool_calls"][0]["function"]["arguments"]
    email = Email(**json.loads(arguments))
    assert score_email(email, scenario.prospect, TASK.product).total >= 0.8
    other = TASK.train[(TASK.train.index(scenario) + 1) % len(TASK.train)].prospect
    assert score_email(email, other, TASK.product).total <= 0.15


def test_demonstrations_are_seeded_and_cover_the_training_prospects() -> None:
    first = demonstrations(TASK.product, TASK.train, 40, seed=5)
    again = demonstrations(TASK.product, TASK.train, 40, seed=5)
    other = demonstrations(TASK.product, TASK.train, 40, seed=6)
    assert [d.messages_and_choices for d in first] == [d.messages_and_choices for d in again]
    assert [d.messages_and_choices for d in first] != [d.messages_and_choices for d in other]
    assert len(first) == 40 and {d.metadata["scenario_id"] for d in first} == {s.scenario_id for s in TASK.train}


def test_held_out_prospects_are_never_demonstrated() -> None:
    with pytest.raises(ValueError, match="training scenarios only"):
        TemplateDemoWriter(TASK.product).episodes([*TASK.train[:2], TASK.heldout[0]])


def test_an_unreadable_warm_start_file_counts_as_not_done(tmp_path: Path) -> None:
    assert load_warm_start(tmp_path) is None
    (tmp_path / "warm_start.json").write_text("{not json")
    assert load_warm_start(tmp_path) is None


# --- SFT tokens (the real SmolLM2 tokenizer and chat template) ------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from codreamer.backends.embedded.weights import load_embedded_model

    return load_embedded_model(Settings().model_cache_dir)[1]


def _render(tokenizer, messages: list, tools) -> list[int]:
    """What the embedded server renders as the prompt of the next turn."""
    ids = tokenizer.apply_chat_template(to_chatml_messages(messages, tools), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_sft_trains_exactly_the_assistant_turns_with_their_end_of_turn_token(tokenizer) -> None:
    demo = TemplateDemoWriter(TASK.product).episode(TASK.train[0])
    items = demo.messages_and_choices
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequence = sft_sequence(items, demo.tools, tokenizer, end)
    tokens = sequence.prompt_ids + sequence.completion_ids
    spans = [*sequence.prompt_spans, (len(sequence.prompt_ids), len(tokens))]
    assert len(spans) == 2
    # The last turn is trained on top of exactly the prompt the server renders for it.
    assert sequence.prompt_ids == _render(tokenizer, items[:-2], demo.tools)
    first_start, _ = spans[0]
    assert tokens[:first_start] == _render(tokenizer, items[:2], demo.tools)
    for (start, stop), message in zip(spans, [items[2], items[-2]], strict=True):
        text = tokenizer.decode(tokens[start:stop])
        assert text.endswith("<|im_end|>") and tokens[stop - 1] == end
        assert text.count("<tool_call>") == len(message["tool_calls"]) and "<|im_start|>" not in text
    last = sft_sequence(items, demo.tools, tokenizer, end, assistant_turns="last")
    assert last.prompt_spans == () and last.completion_ids == sequence.completion_ids


@pytest.mark.slow
def test_sft_refuses_a_conversation_without_assistant_turns(tokenizer) -> None:
    demo = TemplateDemoWriter(TASK.product).episode(TASK.train[0])
    with pytest.raises(SFTDataError, match="no assistant turn"):
        sft_sequence(
            demo.messages_and_choices[:2], demo.tools, tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>")
        )


@pytest.mark.slow
@pytest.mark.anyio
async def test_train_sft_through_arts_api_lowers_the_demo_loss_and_checkpoints(tmp_path: Path) -> None:
    from codreamer.backends.factory import create_backend

    settings = Settings(runs_dir=tmp_path, wandb=False, torch_threads=2)
    backend = create_backend(settings)
    model = art.TrainableModel(
        name="sft",
        project="p",
        run_name="sft",
        base_model=settings.base_model,
        base_path=str(tmp_path),
        report_metrics=[],
    )
    await model.register(backend)
    demos = demonstrations(TASK.product, TASK.train, 2, seed=0)
    config = art.types.TrainSFTConfig(learning_rate=1e-3, batch_size=1)
    try:
        losses = [m["loss/train"] async for m in backend._train_sft(model, demos * 3, config)]
        assert len(losses) == 6 and losses[-1] < losses[0]
        assert await model.get_step() == 1
        await model.train_sft(demos, config)  # ART's public path: one more step
        assert await model.get_step() == 2
        assert (tmp_path / "p" / "models" / "sft" / "checkpoints" / "0002" / "adapter_model.safetensors").is_file()
    finally:
        await backend.close()

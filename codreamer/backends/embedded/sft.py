"""Supervised fine-tuning data for the embedded backend: trajectories -> training sequences.

ART's `model.train_sft(trajectories, config)` hands the backend whole conversations
(messages with tool calls, tool results). The embedded backend renders them exactly as its
server renders a prompt (`chat_format.to_chatml_messages` + the tokenizer's chat template),
so what the policy learns to write is what it will later be asked to continue. Each
assistant turn's tokens, INCLUDING its end-of-turn token, are the trained span: the policy
learns to stop after a tool call. A whole conversation is one `TrainSequence` (earlier
assistant turns are `prompt_spans` of the last turn's sequence), trained with advantage 1,
which makes the policy-gradient loss the mean negative log-likelihood of the trained tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from openai.types.chat.chat_completion import Choice

from codreamer.backends.embedded.chat_format import to_chatml_messages
from codreamer.backends.embedded.policy import TrainSequence

__all__ = ["SFTDataError", "sft_sequence"]


class SFTDataError(ValueError):
    """A trajectory cannot be turned into SFT tokens (no assistant turn, unrenderable)."""


def _message(item: Any) -> dict[str, Any]:
    """A plain chat message from a trajectory item (a message dict or a sampled Choice)."""
    if isinstance(item, Choice):
        message: dict[str, Any] = {"role": "assistant", "content": item.message.content or ""}
        if item.message.tool_calls:
            message["tool_calls"] = [call.model_dump(mode="json") for call in item.message.tool_calls]
        return message
    if isinstance(item, Mapping):
        return dict(item)
    raise SFTDataError(f"unsupported trajectory item of type {type(item).__name__}")


def _ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sft_sequence(
    items: Sequence[Any],
    tools: Sequence[Mapping[str, Any]] | None,
    tokenizer: Any,
    end_of_turn_id: int,
    *,
    assistant_turns: Literal["all", "last"] = "all",
) -> TrainSequence:
    """One training sequence for a conversation; trains its assistant turns (all or the last).

    Raises SFTDataError when the conversation has no assistant turn, or when the chat
    template does not render a conversation as the concatenation of its turns (then the
    spans could not be located exactly, and training on guessed spans would be wrong).
    """
    flat = to_chatml_messages([_message(item) for item in items], tools)
    assistant = [index for index, message in enumerate(flat) if message["role"] == "assistant"]
    if not assistant:
        raise SFTDataError("the trajectory has no assistant turn to learn from")
    full = _ids(tokenizer, flat, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index in assistant:
        start = len(_ids(tokenizer, flat[:index], generation_prompt=True))
        through = _ids(tokenizer, flat[: index + 1], generation_prompt=False)
        if full[: len(through)] != through or through[:start] != full[:start]:
            raise SFTDataError("the chat template does not render this conversation turn by turn")
        ends = [pos for pos in range(start, len(through)) if through[pos] == end_of_turn_id]
        if not ends:
            raise SFTDataError("an assistant turn has no end-of-turn token")
        spans.append((start, ends[0] + 1))  # the end-of-turn token is trained: the policy learns to stop
    if assistant_turns == "last":
        spans = spans[-1:]
    last_start, last_end = spans[-1]
    return TrainSequence(full[:last_start], full[last_start:last_end], 1.0, tuple(spans[:-1]))

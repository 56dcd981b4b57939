"""OpenAI messages/tools <-> ChatML text (`codreamer.backends.embedded.chat_format`)."""

from __future__ import annotations

import json
import re

from openai.types.chat import ChatCompletionMessageFunctionToolCall

from codreamer.backends.embedded.chat_format import TOOLS_PREAMBLE, parse_completion, to_chatml_messages

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_prospect",
            "description": "Facts about the prospect.",
            "parameters": {"type": "object", "properties": {"prospect_id": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send the final email.",
            "parameters": {
                "type": "object",
                "properties": {"subject": {"type": "string"}, "body": {"type": "string"}},
            },
        },
    },
]

CALL_ID_RE = re.compile(r"^call_[0-9a-f]{12}$")


# ------------------------------------------------------------------------------- rendering
def test_tools_are_appended_to_an_existing_system_message() -> None:
    flat = to_chatml_messages(
        [{"role": "system", "content": "You write emails."}, {"role": "user", "content": "Go."}], TOOLS
    )
    assert [m["role"] for m in flat] == ["system", "user"]
    system = flat[0]["content"]
    assert system.startswith("You write emails.\n\n" + TOOLS_PREAMBLE)
    assert "- lookup_prospect(prospect_id: string): Facts about the prospect." in system
    assert "- send_email(subject: string, body: string): Send the final email." in system
    assert flat[1] == {"role": "user", "content": "Go."}


def test_tools_get_a_system_message_when_there_is_none() -> None:
    flat = to_chatml_messages([{"role": "user", "content": "Go."}], TOOLS)
    assert [m["role"] for m in flat] == ["system", "user"]
    assert flat[0]["content"].startswith(TOOLS_PREAMBLE)
    assert "lookup_prospect" in flat[0]["content"] and "send_email" in flat[0]["content"]


def test_no_tools_leaves_the_messages_alone() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert to_chatml_messages(messages, None) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
    ]


def test_assistant_tool_calls_in_dict_form_render_as_tool_call_blocks() -> None:
    message = {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_prospect", "arguments": '{"prospect_id": "p001"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "send_email", "arguments": "not json"}},
        ],
    }
    [flat] = to_chatml_messages([message], None)
    assert flat["role"] == "assistant"
    lines = flat["content"].split("\n")
    assert lines[0] == "Let me look."
    blocks = [re.fullmatch(r"<tool_call>(.*)</tool_call>", line) for line in lines[1:]]
    assert all(blocks) and len(blocks) == 2
    assert json.loads(blocks[0].group(1)) == {"name": "lookup_prospect", "arguments": {"prospect_id": "p001"}}
    # Arguments that are not JSON are kept verbatim (as a JSON string).
    assert json.loads(blocks[1].group(1)) == {"name": "send_email", "arguments": "not json"}


def test_assistant_tool_calls_as_openai_objects_render_the_same() -> None:
    call = ChatCompletionMessageFunctionToolCall.model_validate(
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "lookup_prospect", "arguments": '{"prospect_id": "p002"}'},
        }
    )
    [flat] = to_chatml_messages([{"role": "assistant", "content": None, "tool_calls": [call]}], None)
    assert flat == {
        "role": "assistant",
        "content": '<tool_call>{"name": "lookup_prospect", "arguments": {"prospect_id": "p002"}}</tool_call>',
    }


def test_tool_results_become_user_tool_response_messages() -> None:
    flat = to_chatml_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"name": "Ada"}'},
        ],
        None,
    )
    assert flat == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": '<tool_response>{"name": "Ada"}</tool_response>'},
    ]


# --------------------------------------------------------------------------------- parsing
def test_plain_text_has_no_tool_calls() -> None:
    parsed = parse_completion("Hello Ada, quick question.", tools_offered=True)
    assert parsed.content == "Hello Ada, quick question."
    assert parsed.tool_calls == []


def test_one_tool_call_is_parsed_and_removed_from_content() -> None:
    text = 'Checking.\n<tool_call>{"name": "lookup_prospect", "arguments": {"prospect_id": "p001"}}</tool_call>'
    parsed = parse_completion(text, tools_offered=True)
    assert parsed.content == "Checking."
    [call] = parsed.tool_calls
    assert CALL_ID_RE.match(call["id"])
    assert call["type"] == "function"
    assert call["function"]["name"] == "lookup_prospect"
    assert json.loads(call["function"]["arguments"]) == {"prospect_id": "p001"}


def test_two_tool_calls_in_order_with_distinct_ids() -> None:
    text = (
        '<tool_call>{"name": "lookup_prospect", "arguments": {"prospect_id": "p001"}}</tool_call>\n'
        '<tool_call> {"name": "send_email", "arguments": {"subject": "Hi", "body": "B"}} </tool_call>'
    )
    parsed = parse_completion(text, tools_offered=True)
    assert parsed.content is None
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["lookup_prospect", "send_email"]
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {"subject": "Hi", "body": "B"}
    assert parsed.tool_calls[0]["id"] != parsed.tool_calls[1]["id"]


def test_string_arguments_are_passed_through() -> None:
    text = '<tool_call>{"name": "send_email", "arguments": "{\\"subject\\": \\"S\\"}"}</tool_call>'
    [call] = parse_completion(text, tools_offered=True).tool_calls
    assert call["function"]["arguments"] == '{"subject": "S"}'


def test_malformed_json_with_a_readable_name_is_kept_with_raw_arguments() -> None:
    raw = '{"name": "send_email", "arguments": {"subject": "Hi", body: oops}}'
    parsed = parse_completion(f"<tool_call>{raw}</tool_call>", tools_offered=True)
    [call] = parsed.tool_calls
    assert call["function"] == {"name": "send_email", "arguments": raw}
    assert parsed.content is None


def test_malformed_json_without_a_name_is_dropped() -> None:
    parsed = parse_completion("<tool_call>{not even close</tool_call> bye", tools_offered=True)
    assert parsed.tool_calls == []
    assert parsed.content == "bye"


def test_unterminated_block_cut_off_by_max_tokens_is_still_a_call() -> None:
    text = 'Sure.\n<tool_call>{"name": "send_email", "arguments": {"subject": "Quick q'
    parsed = parse_completion(text, tools_offered=True)
    assert parsed.content == "Sure."
    [call] = parsed.tool_calls
    assert call["function"]["name"] == "send_email"
    assert call["function"]["arguments"] == '{"name": "send_email", "arguments": {"subject": "Quick q'


def test_unterminated_but_complete_json_parses_normally() -> None:
    text = '<tool_call>{"name": "lookup_prospect", "arguments": {"prospect_id": "p003"}}'
    [call] = parse_completion(text, tools_offered=True).tool_calls
    assert json.loads(call["function"]["arguments"]) == {"prospect_id": "p003"}


def test_tool_call_text_is_not_parsed_when_no_tools_were_offered() -> None:
    text = '<tool_call>{"name": "send_email", "arguments": {}}</tool_call>'
    parsed = parse_completion(text, tools_offered=False)
    assert parsed.content == text
    assert parsed.tool_calls == []


def test_rendered_calls_parse_back_to_the_same_calls() -> None:
    """The server renders earlier calls and parses new ones with the same rules."""
    original = [
        {
            "id": "a",
            "type": "function",
            "function": {"name": "lookup_prospect", "arguments": '{"prospect_id": "p001"}'},
        },
        {
            "id": "b",
            "type": "function",
            "function": {"name": "send_email", "arguments": '{"subject": "S", "body": "B"}'},
        },
    ]
    [flat] = to_chatml_messages([{"role": "assistant", "content": "", "tool_calls": original}], None)
    parsed = parse_completion(flat["content"], tools_offered=True)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in original
    ]

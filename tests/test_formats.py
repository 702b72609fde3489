"""Every input layout -> the canonical conversation, and every way a record can be refused."""

from __future__ import annotations

import json

import pytest

from pipeline import schema
from pipeline.config import FieldMapping
from pipeline.formats import RecordError, to_conversation


def roles(messages):
    return [m["role"] for m in messages]


def reason_of(record, **kwargs) -> str:
    with pytest.raises(RecordError) as caught:
        to_conversation(record, **kwargs)
    assert caught.value.detail and caught.value.detail[0].isalpha()
    return caught.value.reason


# --- Alpaca ----------------------------------------------------------------------------------
def test_alpaca_joins_instruction_and_input_and_keeps_system():
    messages, tools = to_conversation(
        {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit", "system": "Be brief."}
    )
    assert tools is None
    assert roles(messages) == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Translate to French.\nGood night"
    assert messages[2]["content"] == "Bonne nuit"
    assert messages[0]["content"] == "Be brief."


def test_alpaca_history_becomes_earlier_turns_and_empty_input_is_ignored():
    messages, _ = to_conversation(
        {"instruction": "那它的缺点呢？", "input": "", "output": "续航短。", "history": [["电动车好吗？", "运行安静。"]]}
    )
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "电动车好吗？"),
        ("assistant", "运行安静。"),
        ("user", "那它的缺点呢？"),
        ("assistant", "续航短。"),
    ]


def test_alpaca_empty_system_is_dropped():
    messages, _ = to_conversation({"instruction": "Hi", "input": "", "output": "Hello", "system": ""})
    assert roles(messages) == ["user", "assistant"]


# --- ShareGPT --------------------------------------------------------------------------------
def test_sharegpt_function_call_and_observation_become_tool_turns():
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 18}'},
            {"from": "gpt", "value": "18 degrees."},
        ],
        "tools": '[{"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {}}}]',
    }
    messages, tools = to_conversation(record)
    assert roles(messages) == ["user", "assistant", "tool", "assistant"]
    call = messages[1]
    assert call["content"] == ""
    assert json.loads(call["tool_calls"]) == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert messages[2]["content"] == '{"temp": 18}'
    assert messages[2]["name"] == "get_weather"
    # bare tool schemas are wrapped the way chat templates expect them
    assert json.loads(tools) == [
        {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {}}}}
    ]


def test_sharegpt_tools_given_as_a_list_equal_tools_given_as_text():
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    tool = {"name": "f", "parameters": {}}
    as_list = to_conversation({"conversations": turns, "tools": [tool]})
    as_text = to_conversation({"conversations": turns, "tools": json.dumps([tool])})
    assert as_list == as_text
    assert json.loads(as_list[1])[0]["function"]["name"] == "f"


def test_sharegpt_record_level_system_is_prepended():
    messages, _ = to_conversation(
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}], "system": "你是助手。"}
    )
    assert [(m["role"], m["content"]) for m in messages][0] == ("system", "你是助手。")


# --- OpenAI messages -------------------------------------------------------------------------
def test_openai_content_parts_tool_calls_and_tool_role():
    record = {
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Find books"}, {"type": "text", "text": "by Le Guin"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "Le Guin"}'}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '["Earthsea"]'},
            {"role": "assistant", "content": [{"type": "text", "text": "Earthsea."}]},
        ],
        "tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}],
    }
    messages, tools = to_conversation(record)
    assert roles(messages) == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == "Find books\nby Le Guin"
    assert messages[2]["content"] == ""
    # arguments given as JSON text are parsed to an object; the call id survives
    assert json.loads(messages[2]["tool_calls"]) == [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": {"q": "Le Guin"}}}
    ]
    assert messages[3]["name"] == "search"  # found through tool_call_id
    assert messages[4]["content"] == "Earthsea."
    assert json.loads(tools)[0]["function"]["name"] == "search"


def test_openai_train_false_is_kept_on_the_message():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "Title?"},
                {"role": "assistant", "content": "Draft.", "train": False},
                {"role": "user", "content": "Better?"},
                {"role": "assistant", "content": "Final title"},
            ]
        }
    )
    assert [m["train"] for m in messages] == [None, False, None, None]


def test_legacy_function_call_field_is_a_tool_call():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": None, "function_call": {"name": "calc", "arguments": '{"expr": "2+2"}'}},
                {"role": "function", "name": "calc", "content": "4"},
                {"role": "assistant", "content": "4"},
            ]
        }
    )
    assert roles(messages) == ["user", "assistant", "tool", "assistant"]
    assert json.loads(messages[1]["tool_calls"])[0]["function"] == {"name": "calc", "arguments": {"expr": "2+2"}}


@pytest.mark.parametrize("key", ["messages", "conversations", "conversation"])
def test_message_list_keys_people_use_give_the_same_conversation(key):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    messages, _ = to_conversation({key: turns})
    assert [(m["role"], m["content"]) for m in messages] == [("user", "Hi"), ("assistant", "Hello")]


# --- prompt / completion ---------------------------------------------------------------------
def test_prompt_completion_strings():
    messages, _ = to_conversation({"prompt": "2+2?", "completion": "4"})
    assert [(m["role"], m["content"]) for m in messages] == [("user", "2+2?"), ("assistant", "4")]


def test_prompt_completion_message_lists():
    messages, _ = to_conversation(
        {
            "prompt": [{"role": "system", "content": "Short."}, {"role": "user", "content": "Sky colour?"}],
            "completion": [{"role": "assistant", "content": "Blue."}],
        }
    )
    assert roles(messages) == ["system", "user", "assistant"]


def test_question_answer_pair():
    messages, _ = to_conversation({"question": "Q", "answer": "A"})
    assert [(m["role"], m["content"]) for m in messages] == [("user", "Q"), ("assistant", "A")]


# --- custom mapping --------------------------------------------------------------------------
MAPPING = FieldMapping(
    messages="dialog", role_key="speaker", content_key="text", roles={"customer": "user", "agent": "assistant"}, system="meta.persona"
)


def test_mapping_renames_columns_and_roles_and_reads_dotted_paths():
    record = {
        "meta": {"persona": "Travel agent."},
        "dialog": [{"speaker": "customer", "text": "Kyoto?"}, {"speaker": "agent", "text": "Three days."}],
    }
    messages, _ = to_conversation(record, MAPPING)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Travel agent."),
        ("user", "Kyoto?"),
        ("assistant", "Three days."),
    ]


def test_mapping_flat_prompt_response_columns():
    mapping = FieldMapping(prompt="q", response="a")
    messages, _ = to_conversation({"q": "Why?", "a": "Because."}, mapping)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "Why?"), ("assistant", "Because.")]


def test_mapping_rejects_unmapped_speaker_and_lets_other_layouts_through():
    bad = {"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "bot9", "text": "Yo"}]}
    assert reason_of(bad, mapping=MAPPING) == "unknown_role"
    # a record without the mapping's column is still auto-detected
    messages, _ = to_conversation({"instruction": "Hi", "output": "Hello"}, MAPPING)
    assert roles(messages) == ["user", "assistant"]


# --- turn order normalisation ----------------------------------------------------------------
def test_consecutive_user_turns_are_merged_unless_configured_to_reject():
    record = {"messages": [
        {"role": "user", "content": "I have a question."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]}
    messages, _ = to_conversation(record)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "I have a question.\n\nWhy is the sky blue?"),
        ("assistant", "Rayleigh scattering."),
    ]
    assert reason_of(record, merge_consecutive=False) == "bad_turn_order"


def test_assistant_turns_with_different_train_flags_are_not_merged():
    record = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "draft", "train": False},
        {"role": "assistant", "content": "final"},
    ]}
    assert reason_of(record) == "bad_turn_order"


def test_same_conversation_in_any_layout_has_the_same_id():
    layouts = [
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Hi", "completion": "Hello"},
    ]
    ids = {schema.conversation_id(*to_conversation(record)) for record in layouts}
    assert len(ids) == 1


# --- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record, reason",
    [
        (["not", "an", "object"], "not_an_object"),
        ("text", "not_an_object"),
        (None, "not_an_object"),
        ({"title": "notes", "body": "..."}, "unknown_format"),
        ({"text": "plain pretraining text"}, "unknown_format"),
        ({"instruction": "Hi", "output": 42}, "wrong_type"),
        ({"instruction": ["Hi"], "output": "Hello"}, "wrong_type"),
        ({"messages": "user: hi"}, "wrong_type"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "cat"}]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "x", "train": "yes"}, {"role": "assistant", "content": "y"}]}, "wrong_type"),
        ({"messages": [{"content": "no role"}]}, "wrong_type"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f(x)"}]}, "wrong_type"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "not json"}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "..."}, {"role": "assistant", "content": "yo"}]}, "unknown_role"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "no_assistant_turn"),
        ({"instruction": "Write a poem."}, "no_assistant_turn"),
        ({"prompt": "Hi", "completion": None}, "no_assistant_turn"),
        ({"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "bad_turn_order"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "yo"}]}, "bad_turn_order"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "system", "content": "late"}, {"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]}, "bad_turn_order"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "unanswered"}]}, "bad_turn_order"),
        ({"instruction": "Describe blue.", "output": ""}, "empty_response"),
        ({"prompt": "2+2?", "completion": " \n\t"}, "empty_response"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]}, "empty_response"),
    ],
)
def test_bad_records_are_refused_with_their_reason(record, reason):
    assert reason_of(record) == reason


def test_assistant_tool_call_with_empty_content_is_not_an_empty_response():
    messages, _ = to_conversation({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
    ]})
    assert messages[-1]["tool_calls"] is not None

"""Every input layout -> the canonical conversation, and every way a record can be refused."""

from __future__ import annotations

import json
import random

import pytest

from pipeline import schema
from pipeline.config import FieldMapping
from pipeline.formats import to_conversation
from pipeline.stage import Drop
from tests.support.inputs import openai_record


def roles(messages):
    return [m["role"] for m in messages]


def reason_of(record, **kwargs) -> str:
    with pytest.raises(Drop) as caught:
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
    assert json.loads(call["tool_calls"]) == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[2]["content"] == '{"temp": 18}'
    assert messages[2]["name"] == "get_weather"
    # bare tool schemas are wrapped the way chat templates expect them
    assert json.loads(tools) == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {}}},
        }
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
def test_a_developer_message_is_the_system_prompt():
    """OpenAI's chat format names the system prompt "developer" since o1 (gpt-oss's harmony too)."""
    developer = to_conversation(openai_record(("developer", "Answer in French."), ("user", "Hi"), ("assistant", "Salut"), tools=None))
    system = to_conversation(openai_record(("system", "Answer in French."), ("user", "Hi"), ("assistant", "Salut"), tools=None))
    assert developer == system
    assert roles(developer[0]) == ["system", "user", "assistant"]


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
    record = openai_record(("user", "I have a question."), ("user", "Why is the sky blue?"), ("assistant", "Rayleigh scattering."))
    messages, _ = to_conversation(record)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "I have a question.\n\nWhy is the sky blue?"),
        ("assistant", "Rayleigh scattering."),
    ]
    assert reason_of(record, merge_consecutive=False) == "bad_turn_order"


def test_assistant_turns_with_different_train_flags_are_not_merged():
    record = openai_record(("user", "Hi"), {"role": "assistant", "content": "draft", "train": False}, ("assistant", "final"))
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
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "assistant", "content": "cat"},
                ]
            },
            "wrong_type",
        ),
        ({"messages": [{"role": "user", "content": "x", "train": "yes"}, {"role": "assistant", "content": "y"}]}, "wrong_type"),
        ({"messages": [{"content": "no role"}]}, "wrong_type"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f(x)"}]}, "wrong_type"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "not json"}, "wrong_type"),
        (openai_record(("user", "hi"), ("narrator", "..."), ("assistant", "yo")), "unknown_role"),
        (openai_record(("system", "s"), ("user", "hi")), "no_assistant_turn"),
        ({"instruction": "Write a poem."}, "no_assistant_turn"),
        ({"prompt": "Hi", "completion": None}, "no_assistant_turn"),
        (openai_record(("assistant", "Hello!"), ("user", "hi"), ("assistant", "yo")), "bad_turn_order"),
        (openai_record(("user", "hi"), ("tool", "{}"), ("assistant", "yo")), "bad_turn_order"),
        (openai_record(("user", "hi"), ("assistant", "yo"), ("system", "late"), ("user", "?"), ("assistant", "!")), "bad_turn_order"),
        (openai_record(("user", "hi"), ("assistant", "yo"), ("user", "unanswered")), "bad_turn_order"),
        ({"instruction": "Describe blue.", "output": ""}, "empty_response"),
        ({"prompt": "2+2?", "completion": " \n\t"}, "empty_response"),
        (openai_record(("user", "hi"), ("assistant", ""), ("user", "?"), ("assistant", "ok")), "empty_response"),
    ],
)
def test_bad_records_are_refused_with_their_reason(record, reason):
    assert reason_of(record) == reason


def test_assistant_tool_call_with_empty_content_is_not_an_empty_response():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
            ]
        }
    )
    assert messages[-1]["tool_calls"] is not None


# --- ids -------------------------------------------------------------------------------------
# Computed with the code as it was before messages had reasoning: these ids must never change.
ID_SAMPLE_TOOLS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "It is 18°C in Paris.", "train": False},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "tools": [{"name": "weather", "description": "d", "parameters": {"type": "object"}}],
}
ID_SAMPLE_TOOLS_ID = "d1cc81078c81253cfe26a658487898f2"
ID_SAMPLE_ALPACA_ID = "a90b7e9fe2815ccad3fd6c07967817b7"


def test_ids_of_conversations_without_reasoning_are_unchanged():
    assert schema.conversation_id(*to_conversation(ID_SAMPLE_TOOLS)) == ID_SAMPLE_TOOLS_ID
    assert schema.conversation_id(*to_conversation({"instruction": "Say hi", "output": "hi"})) == ID_SAMPLE_ALPACA_ID
    # Built by hand, with reasoning absent, null or empty: the same id.
    for reasoning in ({}, {"reasoning": None}, {"reasoning": ""}):
        messages = [schema.make_message("user", "Say hi"), {**schema.make_message("assistant", "hi"), **reasoning}]
        assert schema.conversation_id(messages) == ID_SAMPLE_ALPACA_ID
    old_shape = [
        {"role": "user", "content": "Say hi", "name": None, "tool_calls": None, "train": None},
        {"role": "assistant", "content": "hi", "name": None, "tool_calls": None, "train": None},
    ]
    assert schema.conversation_id(old_shape) == ID_SAMPLE_ALPACA_ID


def test_reasoning_changes_the_id():
    plain = [schema.make_message("user", "Say hi"), schema.make_message("assistant", "hi")]
    thought = [schema.make_message("user", "Say hi"), schema.make_message("assistant", "hi", reasoning="Greet back.")]
    other = [schema.make_message("user", "Say hi"), schema.make_message("assistant", "hi", reasoning="Be polite.")]
    assert len({schema.conversation_id(m) for m in (plain, thought, other)}) == 3


def test_messages_for_template_passes_reasoning_as_reasoning_content():
    messages = [
        schema.make_message("user", "2+2?"),
        schema.make_message("assistant", "4", reasoning="Two and two make four."),
        schema.make_message("user", "3+3?"),
        {**schema.make_message("assistant", "6"), "reasoning": ""},
    ]
    out = schema.messages_for_template(messages)
    assert out[1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}
    assert all("reasoning_content" not in m for m in (out[0], out[2], out[3]))
    assert schema.make_message("assistant", "x", reasoning="")["reasoning"] is None
    assert list(schema.MESSAGE_TYPE)[-1].name == "reasoning"


def test_messages_for_template_gives_each_tool_result_the_id_of_the_call_it_answers():
    """The canonical messages keep no tool_call_id (ingest names each result after its call's
    tool): a template that writes it (Mistral v0.3, Kimi K2) gets back the id of the first call
    not yet answered that calls the tool the result names, so results answered out of order get
    their own calls' ids. Calls go out name first, as OpenAI writes them (stored sorted)."""
    calls = [
        {"id": "call_0001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_0002", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},  # no id
    ]
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "Weather and time in Paris, weather in Rome?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_0002", "content": "14:00"},
                {"role": "tool", "tool_call_id": "call_0001", "content": "18 C"},
                {"role": "tool", "name": "get_weather", "content": "21 C"},
                {"role": "assistant", "content": "18 C at 14:00 in Paris, 21 C in Rome."},
            ]
        }
    )
    assert all("tool_call_id" not in m for m in messages)  # not a canonical field
    out = schema.messages_for_template(messages)
    assert [m.get("tool_call_id") for m in out] == [None, None, "call_0002", "call_0001", None, None]
    assert [list(call) for call in out[1]["tool_calls"]] == [["id", "type", "function"]] * 2 + [["type", "function"]]
    assert all(list(call["function"]) == ["name", "arguments"] for call in out[1]["tool_calls"])
    # a result after a turn that called nothing answers no call (ingest refuses such rows anyway)
    stray = schema.messages_for_template([*messages, schema.make_message("tool", "a result no call asked for")])
    assert "tool_call_id" not in stray[-1]


# --- reasoning -------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_field_on_an_assistant_message(key):
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", key: "Two and two make four."},
            ]
        }
    )
    assert messages[-1]["content"] == "4"
    assert messages[-1]["reasoning"] == "Two and two make four."
    assert messages[0]["reasoning"] is None


def test_reasoning_content_is_preferred_and_null_or_empty_means_none():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "2+2?", "reasoning_content": None},
                {"role": "assistant", "content": "4", "reasoning_content": "from the API", "reasoning": "other"},
                {"role": "user", "content": "3+3?", "reasoning_content": ""},
                {"role": "assistant", "content": "6", "reasoning_content": "", "reasoning": None},
            ]
        }
    )
    assert [m["reasoning"] for m in messages] == [None, "from the API", None, None]


def test_sharegpt_reasoning_field():
    messages, _ = to_conversation(
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4", "reasoning_content": "Add."},
            ]
        }
    )
    assert (messages[-1]["content"], messages[-1]["reasoning"]) == ("4", "Add.")


def test_llamafactory_parts_give_reasoning_text_and_tool_calls():
    record = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "value": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "value": "Weather in Paris"}, {"type": "text", "value": "and Rome?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "value": "Two cities: two calls."},
                    {"type": "tool_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
                    {"type": "tool_call", "value": json.dumps({"name": "weather", "arguments": '{"city": "Rome"}'})},
                ],
            },
            {"role": "tool", "content": [{"type": "text", "value": "18C"}]},
            {"role": "tool", "content": [{"type": "text", "value": "25C"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "value": "Compare."},
                    {"type": "reasoning", "value": "Rome is warmer."},
                    {"type": "text", "value": "Paris 18C, Rome 25C."},
                ],
            },
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]),
    }
    messages, tools = to_conversation(record)
    assert roles(messages) == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert messages[0]["content"] == "Use tools."
    assert messages[1]["content"] == "Weather in Paris\nand Rome?"
    call_turn, answer = messages[2], messages[5]
    assert call_turn["content"] == "" and call_turn["reasoning"] == "Two cities: two calls."
    assert json.loads(call_turn["tool_calls"]) == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
    ]
    assert answer["content"] == "Paris 18C, Rome 25C." and answer["reasoning"] == "Compare.\nRome is warmer."
    assert [m["content"] for m in messages[3:5]] == ["18C", "25C"]
    assert json.loads(tools)[0]["function"]["name"] == "weather"


def test_openai_style_reasoning_part_with_text_key():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "reasoning", "text": "Greet."}, {"type": "text", "text": "Hello"}]},
            ]
        }
    )
    assert (messages[-1]["content"], messages[-1]["reasoning"]) == ("Hello", "Greet.")


@pytest.mark.parametrize("weight, train", [(0, False), (0.0, False), (1, True), (1.0, True), (None, None)])
def test_loss_weight_maps_to_train(weight, train):
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": "Hello"}], "loss_weight": weight},
            ]
        }
    )
    assert [m["train"] for m in messages] == [False, train]


@pytest.mark.parametrize("weight", [0.5, 2, -1, True, "1"])
def test_other_loss_weights_are_wrong_type_with_a_clear_message(weight):
    with pytest.raises(Drop) as caught:
        to_conversation(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello", "loss_weight": weight},
                ]
            }
        )
    assert caught.value.reason == "wrong_type"
    assert f"'loss_weight' {weight!r}" in caught.value.detail
    assert "only 0 (not trained) or 1 (trained)" in caught.value.detail


@pytest.mark.parametrize(
    "content, reasoning, rest",
    [
        ("<think>\nAdd them.\n</think>\n\n4", "Add them.", "4"),
        ("<think>Add them.</think>4", "Add them.", "4"),
        ("<think>\n\nline 1\n\nline 2\n\n</think>\n\n  4\n", "line 1\n\nline 2", "  4\n"),
        ("<think>\n\n</think>\n\n4", None, "4"),  # Qwen3's empty block in non-thinking mode
        ("<think>unfinished thought, 4", None, "<think>unfinished thought, 4"),  # never closed: content
        (" <think>x</think>4", None, " <think>x</think>4"),  # not at the very start
        ("4 <think>x</think>", None, "4 <think>x</think>"),
    ],
)
def test_inline_think_block_at_the_start_of_an_assistant_message(content, reasoning, rest):
    messages, _ = to_conversation({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": content}]})
    assert (messages[-1]["reasoning"], messages[-1]["content"]) == (reasoning, rest)


def test_inline_think_block_in_every_layout_and_never_in_user_text():
    layouts = [
        {"instruction": "2+2?", "output": "<think>\nAdd.\n</think>\n\n4"},
        {"prompt": "2+2?", "completion": "<think>Add.</think>\n4"},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>Add.</think>4"}]},
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": [{"type": "text", "value": "<think>Add.</think>4"}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>Add.</think>4", "reasoning_content": "Add."},
            ]
        },
    ]
    results = [to_conversation(record) for record in layouts]
    assert all((m[-1]["reasoning"], m[-1]["content"]) == ("Add.", "4") for m, _ in results)
    assert len({schema.conversation_id(*r) for r in results}) == 1
    messages, _ = to_conversation(
        {"messages": [{"role": "user", "content": "<think>mine</think>2+2?"}, {"role": "assistant", "content": "4"}]}
    )
    assert (messages[0]["content"], messages[0]["reasoning"]) == ("<think>mine</think>2+2?", None)


def test_mapping_reads_reasoning_parts_and_inline_think():
    mapping = FieldMapping(messages="dialog", role_key="speaker", content_key="text", roles={"q": "user", "a": "assistant"})
    messages, _ = to_conversation(
        {
            "dialog": [
                {"speaker": "q", "text": "2+2?"},
                {"speaker": "a", "text": [{"type": "reasoning", "value": "Add."}, {"type": "text", "value": "4"}]},
                {"speaker": "q", "text": "3+3?"},
                {"speaker": "a", "text": "<think>Add again.</think>6"},
            ]
        },
        mapping,
    )
    assert [(m["reasoning"], m["content"]) for m in messages[1::2]] == [("Add.", "4"), ("Add again.", "6")]


@pytest.mark.parametrize(
    "record, words",
    [
        (
            {"messages": [{"role": "user", "content": "Hi", "reasoning_content": "I wonder"}, {"role": "assistant", "content": "Hello"}]},
            "user message but carries reasoning",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "s", "reasoning": "x"},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "system message but carries reasoning",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "reasoning", "value": "x"}, {"type": "text", "value": "Hi"}]},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "user message but has a 'reasoning' content part",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello", "reasoning_content": {"text": "x"}},
                ]
            },
            "'reasoning_content' of type object",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {
                        "role": "assistant",
                        "content": [{"type": "reasoning", "value": "a"}, {"type": "text", "value": "b"}],
                        "reasoning_content": "c",
                    },
                ]
            },
            "they differ",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"},
                ]
            },
            "different <think> block",
        ),
    ],
)
def test_misplaced_or_conflicting_reasoning_is_wrong_type(record, words):
    with pytest.raises(Drop) as caught:
        to_conversation(record)
    assert caught.value.reason == "wrong_type"
    assert words in caught.value.detail


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant", "content": "", "reasoning_content": "Hmm."},
        {"role": "assistant", "content": None, "reasoning_content": "Hmm."},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Hmm."}]},
        {"role": "assistant", "content": "<think>Hmm.</think>\n\n"},
    ],
)
def test_an_assistant_turn_with_only_reasoning_is_an_empty_response(assistant):
    with pytest.raises(Drop) as caught:
        to_conversation({"messages": [{"role": "user", "content": "Hi"}, assistant]})
    assert caught.value.reason == "empty_response"
    assert "apart from its reasoning" in caught.value.detail


def test_reasoning_then_tool_call_is_an_answer():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "reasoning", "value": "Call w."},
                        {"type": "tool_call", "value": '{"name": "w", "arguments": {}}'},
                    ],
                },
            ]
        }
    )
    assert messages[-1]["reasoning"] == "Call w." and json.loads(messages[-1]["tool_calls"])[0]["function"]["name"] == "w"


def test_merging_consecutive_assistant_turns_keeps_the_first_turns_reasoning():
    messages, _ = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
                {"role": "assistant", "content": "How can I help?"},
            ]
        }
    )
    assert len(messages) == 2
    assert (messages[1]["reasoning"], messages[1]["content"]) == ("Greet.", "Hello.\n\nHow can I help?")


@pytest.mark.parametrize("first_reasoning", [None, "Greet."])
def test_an_assistant_turn_with_reasoning_is_never_merged_into_the_previous_one(first_reasoning):
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": first_reasoning},
            {"role": "assistant", "content": "How can I help?", "reasoning_content": "Offer help."},
        ]
    }
    assert reason_of(record) == "bad_turn_order"


# --- content parts: what is refused, and why --------------------------------------------------
@pytest.mark.parametrize(
    "part, words",
    [
        ({"type": "image_url", "image_url": {"url": "x"}}, "content part of type 'image_url', which sftkit does not take"),
        ({"type": "input_audio", "input_audio": {}}, "content part of type 'input_audio'"),
        ({"type": "text"}, "'text' content part whose 'text'/'value' is null, not text"),
        ({"type": "text", "value": 5}, "'text' content part whose 'text'/'value' is number, not text"),
        (7, "content part that is a number"),
    ],
)
def test_refused_content_parts_are_named_truthfully(part, words):
    with pytest.raises(Drop) as caught:
        to_conversation({"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]})
    detail = caught.value.detail
    assert caught.value.reason == "wrong_type"
    assert words in detail
    assert "only text parts can be trained" not in detail
    if "which sftkit does not take" in detail:
        assert "accepted part types are 'text', and on assistant messages 'reasoning' and 'tool_call'" in detail


@pytest.mark.parametrize(
    "message, words",
    [
        ({"role": "tool", "content": [{"type": "tool_call", "value": '{"name": "w"}'}]}, "tool message but has a 'tool_call' content part"),
        ({"role": "assistant", "content": [{"type": "tool_call", "value": "w(1)"}]}, "tool_call content part (part 0) that is not JSON"),
        ({"role": "assistant", "content": [{"type": "tool_call", "value": '{"arguments": {}}'}]}, "tool call without a function name"),
        (
            {
                "role": "assistant",
                "content": [{"type": "tool_call", "value": '{"name": "w"}'}],
                "tool_calls": [{"type": "function", "function": {"name": "w"}}],
            },
            "both in 'tool_calls' and in tool_call content parts",
        ),
    ],
)
def test_bad_tool_call_parts_are_wrong_type(message, words):
    record = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
            message,
            {"role": "assistant", "content": "done"},
        ]
    }
    if message["role"] == "assistant":
        record["messages"] = [{"role": "user", "content": "weather?"}, message]
    with pytest.raises(Drop) as caught:
        to_conversation(record)
    assert caught.value.reason == "wrong_type"
    assert words in caught.value.detail


# --- real LLaMA-Factory data -----------------------------------------------------------------
def _real_records(real_data_dir, name):
    path = real_data_dir / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_real_llamafactory_v1_demo_converts_every_record_with_loss_weights(real_data_dir):
    records = _real_records(real_data_dir, "v1_sft_demo.jsonl")
    assert len(records) == 500
    for record in records:
        messages, tools = to_conversation(record)
        assert tools is None
        assert [m["role"] for m in messages] == [m["role"] for m in record["messages"]]
        for original, message in zip(record["messages"], messages):
            assert message["train"] is (original["loss_weight"] == 1)
            assert message["content"] == "\n".join(p["value"] for p in original["content"])
            assert message["reasoning"] is None
    assert {m["train"] for r in records for m in to_conversation(r)[0]} == {True, False}


def test_real_reasoning_tool_use_demo_keeps_reasoning_and_tool_calls(real_data_dir):
    records = _real_records(real_data_dir, "reason_tool_use_demo_50.jsonl")
    assert len(records) == 50
    seen_reasoning = seen_calls = 0
    for record in records:
        messages, tools = to_conversation(record)
        assert [m["role"] for m in messages] == [m["role"] for m in record["messages"]]
        assert (json.loads(tools) if tools else []) == json.loads(record["tools"])  # "[]" means no tools
        for original, message in zip(record["messages"], messages):
            parts = original["content"]
            want_reasoning = "\n".join(p["value"] for p in parts if p["type"] == "reasoning") or None
            want_calls = [json.loads(p["value"]) for p in parts if p["type"] == "tool_call"]
            assert message["reasoning"] == want_reasoning
            assert message["content"] == "\n".join(p["value"] for p in parts if p["type"] == "text")
            got_calls = json.loads(message["tool_calls"]) if message["tool_calls"] else []
            assert [c["function"] for c in got_calls] == want_calls
            seen_reasoning += want_reasoning is not None
            seen_calls += len(want_calls)
            if message["role"] == "assistant":
                assert message["reasoning"]  # every assistant turn of this file reasons first
    assert seen_reasoning == 112 and seen_calls == 68


def test_the_ids_json_is_the_json_module_s_text_for_every_character():
    # Ids hash orjson's bytes, which must be json.dumps(ensure_ascii=False, separators=(",", ":"))
    # in UTF-8 to the byte, or every id (and the split and dedup decisions made from it) changes.
    def reference(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    every = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(every), 4096):
        value = [[["user", "".join(every[start : start + 4096]), None, None, True]], None]
        assert schema._compact_json(value) == reference(value)
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(0x80), 0xA0, 0x2028, 0x2029, 0xFEFF, 0x4E2D, 0x1F642, 0xFFFF, 0x10FFFF]]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        value = [[["assistant", text, rng.choice([None, text]), text[::-1], rng.choice([None, True, False])]], rng.choice([None, text])]
        assert schema._compact_json(value) == reference(value)
    # a lone surrogate still fails as json fails: ingest files the record as invalid_utf8
    with pytest.raises(UnicodeEncodeError):
        schema.conversation_id([schema.make_message("user", "\ud800"), schema.make_message("assistant", "x")])

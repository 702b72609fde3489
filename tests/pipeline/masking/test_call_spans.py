"""A calling turn with no words is trained from exactly where the model starts writing its call.

Such a turn's trained text has no content to anchor the span check on, only the call's name, its
arguments and the end token. The check also holds what stands before the first call's name to the
text the template writes there (probed once per template: ``call_leads``), so a span that starts a
token early (taking in the prompt) or late (missing ``<tool_call>``) is refused as
``mask_unverifiable``, for the official templates of real models and both tokenizer kinds.
"""

from __future__ import annotations

import pytest

from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.masking.locate import prompt_opens_think
from pipeline.masking.verify import span_matches
from pipeline.templates import Template, render, resolve_template
from tests.chat_templates.models import conversation
from tests.pipeline.test_real_templates import maskers

CALL = {"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}}


def _calling_span(masker: Masker, messages: list[dict], tools: str | None = None) -> tuple[list[int], int, int, dict]:
    """(ids, first and end token of the first calling turn's trained run, the turn's message)."""
    result = masker.encode(messages, tools)
    assert isinstance(result, Encoded), result
    ids, trained = result.input_ids.tolist(), (result.labels != schema.IGNORE_INDEX).tolist()
    start = trained.index(True)
    end = start
    while end < len(trained) and trained[end]:
        end += 1
    message = next(m for m in schema.messages_for_template(messages) if m.get("tool_calls"))
    return ids, start, end, message


def _decode(masker: Masker, ids: list[int]) -> str:
    return masker.tokenizer.decode(ids, skip_special_tokens=False)


def _one_more_word(masker: Masker, ids: list[int], start: int, end: int, step: int) -> int:
    """The span's start moved by ``step`` tokens until it takes in (or leaves out) some non-space text."""
    moved = start
    while True:
        moved += step
        taken = ids[moved:start] if step < 0 else ids[start:moved]
        if _decode(masker, taken).strip():
            return moved


def _opens_think(masker: Masker, messages: list[dict]) -> bool:
    """Whether the generation prompt before the first calling turn ends inside a think block it opened."""
    plain = schema.messages_for_template(messages)
    calling = next(i for i, m in enumerate(plain) if m.get("tool_calls"))
    prompt = render(masker.template, masker.variables, plain[:calling], add_generation_prompt=True)[0]
    return prompt_opens_think(prompt)


def _assert_only_the_exact_span_passes(masker: Masker, ids, start, end, message, opened: bool) -> None:
    end_token = next(t for t in masker.end_tokens if _decode(masker, ids[start:end]).rstrip().endswith(masker.as_decoded(t)))

    def passes(first: int) -> bool:
        return span_matches(
            _decode(masker, ids[first:end]),
            message,
            end_token,
            masker.as_decoded,
            masker.turn_markup,
            masker.call_leads[(True, False)],  # the first calling turn, no question after it
            opened,
        )

    assert masker.call_leads, "the template's calling-turn lead was not found"
    assert passes(start)
    assert not passes(_one_more_word(masker, ids, start, end, -1)), "a span taking in prompt text passed"
    assert not passes(_one_more_word(masker, ids, start, end, +1)), "a span missing the call's opening passed"


@pytest.mark.parametrize("name", ["qwen3", "qwen35", "deepseek_r1", "llama31", "gpt_oss"])
def test_official_templates_refuse_a_calling_span_one_word_off(name, bpe_tokenizer):
    locate, _ = maskers(name, bpe_tokenizer)
    messages, tools = conversation("tool_call_json_args" if name == "deepseek_r1" else "tool_call")
    row = to_conversation({"messages": messages, "tools": tools})
    _assert_only_the_exact_span_passes(locate, *_calling_span(locate, *row), _opens_think(locate, row[0]))


@pytest.mark.parametrize("name", ["mistral", "chatml"])
def test_builtin_templates_refuse_a_calling_span_one_word_off(name, mistral_tokenizer):
    masker = Masker(mistral_tokenizer, resolve_template(mistral_tokenizer, TemplateConfig(name=name)), max_length=512)
    messages = [
        schema.make_message("user", "Find me a recipe with rice."),
        schema.make_message("assistant", "", tool_calls=[CALL]),
        schema.make_message("tool", '{"recipes": ["fried rice"]}'),
        schema.make_message("assistant", "Try fried rice."),
    ]
    _assert_only_the_exact_span_passes(masker, *_calling_span(masker, messages), _opens_think(masker, messages))


def test_leads_are_what_each_model_writes_before_a_call_name(bpe_tokenizer):
    """Keyed by (the conversation's first calling turn, a user question follows). Qwen3 adds its
    empty think block to the last turn and to turns with reasoning after the last question; Qwen3.5
    closes the think block its prompt opened after the last question only; DeepSeek-R1 opens its
    call block once a conversation, so a later calling turn starts at its second marker."""
    names = ("qwen3", "qwen35", "deepseek_r1", "llama31", "gpt_oss")
    leads = {name: maskers(name, bpe_tokenizer)[0].call_leads for name in names}
    assert set(leads["qwen3"]) == {(first, asked) for first in (True, False) for asked in (True, False)}
    thinks, plain = '<think></think><tool_call>{"name":"', '<tool_call>{"name":"'
    for (first, asked), qwen3 in leads["qwen3"].items():
        assert qwen3 == ({plain} if asked else {thinks, plain})
        assert leads["qwen35"][first, asked] == {"<tool_call><function=" if asked else "</think><tool_call><function="}
        assert leads["llama31"][first, asked] == {'{"name":"'}
        assert leads["deepseek_r1"][first, asked] == {
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>" if first else "<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        }
        assert "to=functions." in leads["gpt_oss"][first, asked]


def test_a_template_writing_arguments_before_the_name_keeps_its_calling_turns(bpe_tokenizer):
    """What stands before the name is then the row's own arguments: no lead is probed, and the
    turn is checked for its names and end token as before."""
    source = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{%- for call in m.tool_calls or [] %}"
        "{{ '{\"arguments\": ' + call.function.arguments | tojson + ', \"name\": \"' + call.function.name + '\"}' }}"
        "{%- endfor %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    masker = Masker(bpe_tokenizer, Template("arguments-first", source), max_length=512, span_method="locate")
    assert masker.call_leads is None
    messages = [
        schema.make_message("user", "Find me a recipe with rice."),
        schema.make_message("assistant", "", tool_calls=[CALL]),
        schema.make_message("tool", '{"recipes": ["fried rice"]}'),
        schema.make_message("assistant", "Try fried rice."),
    ]
    ids, start, end, _ = _calling_span(masker, messages)
    assert _decode(masker, ids[start:end]).startswith('{"arguments"')


@pytest.mark.parametrize("name", ["qwen3", "qwen35", "llama31", "deepseek_r1"])
def test_a_calling_span_running_on_into_the_next_turn_is_refused(name, bpe_tokenizer):
    """Its end token stands at its end, but also before: the span took in the tool's result."""
    locate, _ = maskers(name, bpe_tokenizer)
    messages, tools = conversation("tool_call_json_args" if name == "deepseek_r1" else "tool_call")
    row = to_conversation({"messages": messages, "tools": tools})
    ids, start, end, message = _calling_span(locate, *row)
    end_token = next(t for t in locate.end_tokens if _decode(locate, ids[start:end]).rstrip().endswith(t))
    further = next(i for i in range(end + 1, len(ids) + 1) if _decode(locate, ids[end:i]).rstrip().endswith(end_token))
    assert "18" in _decode(locate, ids[end:further])  # the tool's result
    check = (locate.as_decoded, locate.turn_markup, locate.call_leads[(True, False)], _opens_think(locate, row[0]))
    assert span_matches(_decode(locate, ids[start:end]), message, end_token, *check)
    assert not span_matches(_decode(locate, ids[start:further]), message, end_token, *check)


def test_reasoning_the_template_drops_may_read_like_the_call(bpe_tokenizer):
    """Qwen3 drops the reasoning of turns before the last question; that it reads "weather", a word
    of the call's name, does not make the turn's span fail (it is looked for, not assumed)."""
    locate, _ = maskers("qwen3", bpe_tokenizer)
    call = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    for reasoning in ("weather", "Paris", "tool_call"):
        record = {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [call]},
                {"role": "tool", "content": "18", "tool_call_id": "c0"},
                {"role": "assistant", "content": "18 C."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You're welcome."},
            ]
        }
        assert isinstance(locate.encode(*to_conversation(record)), Encoded), reasoning


def test_two_calls_to_one_tool_must_both_be_in_the_span(bpe_tokenizer):
    locate, _ = maskers("qwen3", bpe_tokenizer)
    paris, rome = ({"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in ("Paris", "Rome"))
    message = {"role": "assistant", "content": "", "tool_calls": [paris, rome]}
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
    both = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' + one
    check = (locate.as_decoded, locate.turn_markup, locate.call_leads[(True, False)])
    assert span_matches(both, message, "<|im_end|>", *check)
    assert not span_matches(one, message, "<|im_end|>", *check)


def test_call_names_are_compared_as_the_decoder_spells_them():
    """SentencePiece decoders turn "▁" into a space, in a tool's name too."""
    from pipeline.masking.verify import metaspace

    message = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get▁weather"}}]}
    decoded = '[TOOL_CALLS] [{"name": "get weather", "arguments": {}}]</s>'
    assert span_matches(decoded, message, "</s>", metaspace, frozenset(), frozenset({'[TOOL_CALLS][{"name":"'}))

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
from pipeline.masking.verify import span_matches
from pipeline.templates import Template, resolve_template
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


def _assert_only_the_exact_span_passes(masker: Masker, ids, start, end, message) -> None:
    end_token = next(t for t in masker.end_tokens if _decode(masker, ids[start:end]).rstrip().endswith(masker.as_decoded(t)))

    def passes(first: int) -> bool:
        return span_matches(
            _decode(masker, ids[first:end]), message, end_token, masker.as_decoded, masker.turn_markup, masker.call_leads[True]
        )

    assert masker.call_leads, "the template's calling-turn lead was not found"
    assert passes(start)
    assert not passes(_one_more_word(masker, ids, start, end, -1)), "a span taking in prompt text passed"
    assert not passes(_one_more_word(masker, ids, start, end, +1)), "a span missing the call's opening passed"


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1", "llama31", "gpt_oss"])
def test_official_templates_refuse_a_calling_span_one_word_off(name, bpe_tokenizer):
    locate, _ = maskers(name, bpe_tokenizer)
    messages, tools = conversation("tool_call_json_args" if name == "deepseek_r1" else "tool_call")
    row = to_conversation({"messages": messages, "tools": tools})
    _assert_only_the_exact_span_passes(locate, *_calling_span(locate, *row))


@pytest.mark.parametrize("name", ["mistral", "chatml"])
def test_builtin_templates_refuse_a_calling_span_one_word_off(name, mistral_tokenizer):
    masker = Masker(mistral_tokenizer, resolve_template(mistral_tokenizer, TemplateConfig(name=name)), max_length=512)
    messages = [
        schema.make_message("user", "Find me a recipe with rice."),
        schema.make_message("assistant", "", tool_calls=[CALL]),
        schema.make_message("tool", '{"recipes": ["fried rice"]}'),
        schema.make_message("assistant", "Try fried rice."),
    ]
    _assert_only_the_exact_span_passes(masker, *_calling_span(masker, messages))


def test_leads_are_what_each_model_writes_before_a_call_name(bpe_tokenizer):
    """Qwen3 adds its empty think block to the last turn only; DeepSeek-R1 opens its call block
    once a conversation, so a later calling turn starts at its second marker."""
    leads = {name: maskers(name, bpe_tokenizer)[0].call_leads for name in ("qwen3", "deepseek_r1", "llama31", "gpt_oss")}
    for first in (True, False):
        assert leads["qwen3"][first] == {'<tool_call>{"name":"', '<think></think><tool_call>{"name":"'}
        assert leads["llama31"][first] == {'{"name":"'}
        assert "to=functions." in leads["gpt_oss"][first]
    assert leads["deepseek_r1"] == {
        True: {"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"},
        False: {"<｜tool▁call▁begin｜>function<｜tool▁sep｜>"},
    }


def test_a_template_writing_arguments_before_the_name_keeps_its_calling_turns(bpe_tokenizer):
    """What stands before the name is then the row's own arguments: no lead is probed, and the
    turn is checked for its names and end token as before."""
    source = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{%- for call in m.tool_calls or [] %}{{ call.function | tojson }}{%- endfor %}<|im_end|>\n{%- endfor %}"
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


@pytest.mark.parametrize("name", ["qwen3", "llama31", "deepseek_r1"])
def test_a_calling_span_running_on_into_the_next_turn_is_refused(name, bpe_tokenizer):
    """Its end token stands at its end, but also before: the span took in the tool's result."""
    locate, _ = maskers(name, bpe_tokenizer)
    messages, tools = conversation("tool_call_json_args" if name == "deepseek_r1" else "tool_call")
    ids, start, end, message = _calling_span(locate, *to_conversation({"messages": messages, "tools": tools}))
    end_token = next(t for t in locate.end_tokens if _decode(locate, ids[start:end]).rstrip().endswith(t))
    further = next(i for i in range(end + 1, len(ids) + 1) if _decode(locate, ids[end:i]).rstrip().endswith(end_token))
    assert "18" in _decode(locate, ids[end:further])  # the tool's result
    check = (locate.as_decoded, locate.turn_markup, locate.call_leads[True])
    assert span_matches(_decode(locate, ids[start:end]), message, end_token, *check)
    assert not span_matches(_decode(locate, ids[start:further]), message, end_token, *check)

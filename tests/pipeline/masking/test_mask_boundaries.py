"""No trained token may carry template text: tokens that straddle a turn's boundary are refused.

SentencePiece and BPE can merge the last character of a template header with the first of a
response (Mistral's tokenizer has a token "][" for "[/INST][..."). Training that token would
teach the model prompt text; such a row must be rejected as mask_unverifiable, never written.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.masking import Encoded, Masker
from pipeline.stage import Drop
from pipeline.templates import resolve_template
from tests.support.masks import trained_runs

# A Mistral-like template with no space between "[/INST]" and the response.
NO_SPACE_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}{{- '[INST] ' + m.content + ' [/INST]' }}"
    "{%- else %}{%- generation %}{{- m.content + eos_token }}{%- endgeneration %}{%- endif %}{%- endfor %}"
)


def test_straddling_token_at_response_start_is_rejected(tmp_path, mistral_tokenizer):
    jinja = tmp_path / "nospace.jinja"
    jinja.write_text(NO_SPACE_TEMPLATE)
    template = resolve_template(mistral_tokenizer, TemplateConfig(jinja_file=jinja))
    messages = [
        schema.make_message("user", "List three numbers."),
        schema.make_message("assistant", "[1, 2, 3]"),
    ]
    ids = mistral_tokenizer.encode("[/INST][1", add_special_tokens=False)
    assert "][" in mistral_tokenizer.convert_ids_to_tokens(ids)  # the merge this test is about
    result = Masker(mistral_tokenizer, template, max_length=256).encode(messages)
    assert isinstance(result, Drop)
    assert result.reason == "mask_unverifiable"
    assert "straddles" in result.detail


def test_mistral_tool_call_turns_train_exactly_the_call(mistral_tokenizer):
    template = resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    call = [{"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}}]
    messages = [
        schema.make_message("user", "Find me a recipe with rice."),
        schema.make_message("assistant", "", tool_calls=call),
        schema.make_message("tool", json.dumps({"recipes": ["fried rice"]})),
        schema.make_message("assistant", "Try fried rice."),
    ]
    result = Masker(mistral_tokenizer, template, max_length=512).encode(messages)
    assert isinstance(result, Encoded)
    spans = [s.strip() for s in trained_runs(mistral_tokenizer, result.input_ids, result.labels)]
    assert spans[0].startswith("[TOOL_CALLS]") and spans[0].endswith("</s>")
    assert "search_recipes" in spans[0]
    assert spans[1] == "Try fried rice.</s>"
    assert np.count_nonzero(result.labels != schema.IGNORE_INDEX) == result.num_trainable


def test_real_tool_call_data_never_trains_template_text(real_data_dir, mistral_tokenizer):
    from pipeline.formats import to_conversation

    records = json.loads((real_data_dir / "glaive_toolcall_en_demo.json").read_text())[:60]
    template = resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    masker = Masker(mistral_tokenizer, template, max_length=4096)
    rows = [to_conversation(r) for r in records]
    results = masker.encode_batch(rows)
    kept = [r for r in results if isinstance(r, Encoded)]
    assert len(kept) >= 55
    for (messages, _tools), result in zip(rows, results):
        if not isinstance(result, Encoded):
            continue
        assistant = [m for m in messages if m["role"] == "assistant"]
        spans = [s.strip() for s in trained_runs(mistral_tokenizer, result.input_ids, result.labels)]
        assert len(spans) == len(assistant)
        for span, message in zip(spans, assistant):
            expected_start = message["content"].strip()[:10] if message["content"].strip() else "[TOOL_CALLS]"
            assert span.startswith(expected_start), (span[:40], expected_start)
            assert span.endswith("</s>")


def test_a_span_taking_in_the_think_tag_its_prompt_opened_is_refused(bpe_tokenizer):
    """Qwen3.5's generation prompt ends with "<think>\\n": the model writes the reasoning and the
    block's close, never "<think>" (Qwen3's prompt stops before it, and there the tag is trained)."""
    from pipeline.formats import to_conversation
    from pipeline.masking.verify import span_matches
    from tests.chat_templates.models import conversation
    from tests.pipeline.test_real_templates import maskers

    for name, opened in (("qwen35", True), ("qwen3", False)):
        locate, _ = maskers(name, bpe_tokenizer)
        messages, tools = conversation("reasoning")
        prompt = locate.tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<think>\n") is opened
        result = locate.encode(*to_conversation({"messages": messages, "tools": tools}))
        assert isinstance(result, Encoded)
        ids, trained = result.input_ids.tolist(), (result.labels != schema.IGNORE_INDEX).tolist()
        end = max(i for i, t in enumerate(trained) if t) + 1  # the last turn's trained run
        start = end
        while trained[start - 1]:
            start -= 1
        span = locate.tokenizer.decode(ids[start:end], skip_special_tokens=False)
        assert span.strip().startswith("<think>") is not opened  # Qwen3 trains the tag, Qwen3.5 does not
        message = {"role": "assistant", "content": "169", "reasoning_content": "13 * 13 = 169."}
        check = (locate.as_decoded, locate.turn_markup, None, opened)
        assert span_matches(span, message, "<|im_end|>", *check)
        if opened:
            taken_in = locate.tokenizer.decode(ids[start - 2 : end], skip_special_tokens=False)
            assert taken_in.strip().startswith("<think>")
            assert not span_matches(taken_in, message, "<|im_end|>", *check)

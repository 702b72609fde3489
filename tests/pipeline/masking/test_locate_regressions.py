"""Faults found by an adversarial review of the turn locator, per_turn rows and role policies.

Each test is a case that once kept a wrong mask or a wrong row (or rejected a good one); a
rejection with a reason is always acceptable where a mask cannot be told, a different mask never.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.stage import Drop
from pipeline.templates import BUILTIN_TEMPLATES, Template
from pipeline.tokenize import encode_table
from tests.chat_templates.models import template_text, tokenizer_for


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer):
    return bpe_tokenizer


def _table(conversations):
    rows = []
    for index, record in enumerate(conversations):
        messages, tools = to_conversation(record)
        rows.append(
            {
                "id": schema.conversation_id(messages, tools),
                "source": "in.jsonl",
                "source_index": index,
                "messages": messages,
                "tools": tools,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA)


def _trained(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


# 1. per_turn + DeepSeek-R1: the reasoning is silently dropped when its text happens to occur in the
#    answer (`reasoning not in generated` is a substring test), leaving an unclosed "<think>\n" block.
def test_deepseek_per_turn_keeps_reasoning_that_also_occurs_in_the_answer(bpe):
    tokenizer = tokenizer_for("deepseek_r1", bpe)
    masker = Masker(
        tokenizer, Template("deepseek_r1", template_text("deepseek_r1")), max_length=4096, span_method="locate", reasoning="per_turn"
    )
    record = {
        "messages": [
            {"role": "user", "content": "What is 12 * 12?"},
            {"role": "assistant", "reasoning_content": "144", "content": "12 * 12 = 144"},
        ]
    }
    kept, rejected, _ = encode_table(masker, _table([record]))
    assert rejected.num_rows == 0
    row = kept.to_pylist()[0]
    text = _trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS])
    # what DeepSeek-R1 writes at inference after "<｜Assistant｜><think>\n" (as for any other reasoning)
    assert text == "144\n</think>\n\n12 * 12 = 144<｜end▁of▁sentence｜>", text


# 2. template.system: merge cannot help a template that silently drops system messages: the row is
#    refused as template_unsupported_role before the merge that would make it renderable.
def test_merge_folds_system_for_a_template_that_drops_system_messages(bpe):
    source = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    tokenizer = tokenizer_for("phi3", bpe)
    masker = Masker(tokenizer, Template("no-system", source), max_length=512, span_method="locate", system="merge")
    result = masker.encode(
        *to_conversation(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
    )
    assert isinstance(result, Encoded), result
    assert "Be brief.\n\nhi" in tokenizer.decode(result.input_ids.tolist())


def _qwen3(bpe, **kwargs):
    tokenizer = tokenizer_for("qwen3", bpe)
    template = Template("qwen3", template_text("qwen3"), variables=(("enable_thinking", True),))
    return tokenizer, Masker(tokenizer, template, span_method="locate", **{"max_length": 4096, **kwargs})


# 3. per_turn + train_on last_assistant disagrees with the same policy without per_turn about the
#    per-message train flags: a last turn marked train: false makes per_turn train an EARLIER turn
#    (template: nothing is trained, no_trainable_tokens), and an earlier turn marked train: true is
#    trained by template but not by per_turn.
def test_per_turn_last_assistant_honours_train_flags_like_template(bpe):
    last_false = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "train": False},
        ]
    }
    tokenizer, template = _qwen3(bpe, train_on="last_assistant")
    _, per_turn = _qwen3(bpe, train_on="last_assistant", reasoning="per_turn")
    assert isinstance(template.encode(*to_conversation(last_false)), Drop)  # nothing to train
    kept, _, _ = encode_table(per_turn, _table([last_false]))
    trained = [_trained(tokenizer, r[schema.INPUT_IDS], r[schema.LABELS]) for r in kept.to_pylist()]
    assert not any("a1" in t for t in trained), trained


def test_per_turn_last_assistant_trains_an_explicit_train_true_turn(bpe):
    true_first = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "train": True},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    tokenizer, template = _qwen3(bpe, train_on="last_assistant")
    _, per_turn = _qwen3(bpe, train_on="last_assistant", reasoning="per_turn")
    assert "a1" in _trained(tokenizer, *(lambda e: (e.input_ids, e.labels))(template.encode(*to_conversation(true_first))))
    kept, _, _ = encode_table(per_turn, _table([true_first]))
    trained = [_trained(tokenizer, r[schema.INPUT_IDS], r[schema.LABELS]) for r in kept.to_pylist()]
    assert any("a1" in t for t in trained), trained


# 4. per_turn: a record none of whose turns is kept is filed once, but its rejected row's raw holds
#    only the FIRST turn's prefix of the conversation (turn None, so it reads as the whole record).
def test_per_turn_rejected_record_keeps_its_whole_conversation(bpe):
    record = {
        "messages": [
            {"role": "user", "content": "q1 " * 40},
            {"role": "assistant", "content": "a1 " * 40},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    _, per_turn = _qwen3(bpe, max_length=32, reasoning="per_turn")
    kept, rejected, figures = encode_table(per_turn, _table([record]))
    assert kept.num_rows == 0 and rejected.num_rows == 1
    raw = json.loads(rejected.column(schema.RAW).to_pylist()[0])
    assert len(raw["messages"]) == 4, raw["messages"]


# 5. WRONG MASK KEPT. locate takes the first end-of-turn marker after the turn's text, searching the
#    tool calls the template renders as fixed text. When the marker is not a control token of the
#    tokenizer (a built-in template on a tokenizer without its markers: resolve_template only warns),
#    data text in the tool-call arguments is not hidden, and the turn "ends" inside the arguments.
#    The verification passes (body ends with the marker, the call's name is in it): the rest of the
#    call and the real end marker are left untrained.
@pytest.mark.parametrize("span_method", ["locate", "prefix"])
def test_end_marker_text_in_tool_arguments_does_not_end_the_turn(bpe, span_method):
    assert "<|eot_id|>" not in bpe.get_vocab()  # the bundled BPE has no Llama-3 markers
    record = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"q": "a <|eot_id|> b"}}}],
            },
            {"role": "tool", "content": "18C"},
            {"role": "assistant", "content": "18C"},
        ]
    }
    template = Template("llama3", BUILTIN_TEMPLATES["llama3"], end_token="<|eot_id|>")
    located = Masker(bpe, template, max_length=4096, span_method=span_method).encode(*to_conversation(record))
    tagged = Masker(bpe, template, max_length=4096, span_method="generation").encode(*to_conversation(record))
    assert isinstance(tagged, Encoded)
    if isinstance(located, Encoded):  # a rejection would be acceptable; a different mask is not
        assert located.labels.tolist() == tagged.labels.tolist(), _trained(bpe, located.input_ids, located.labels)


def test_deepseek_per_turn_closes_the_think_block_of_a_turn_without_reasoning(bpe):
    """The prompt opens "<think>\\n"; a turn with no reasoning closes the block empty, as the model does."""
    tokenizer = tokenizer_for("deepseek_r1", bpe)
    masker = Masker(
        tokenizer, Template("deepseek_r1", template_text("deepseek_r1")), max_length=4096, span_method="locate", reasoning="per_turn"
    )
    kept, _, _ = encode_table(
        masker, _table([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    )
    row = kept.to_pylist()[0]
    assert tokenizer.decode(row[schema.INPUT_IDS]).endswith("<｜Assistant｜><think>\n\n</think>\n\nHello!<｜end▁of▁sentence｜>")
    assert _trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) == "\n</think>\n\nHello!<｜end▁of▁sentence｜>"

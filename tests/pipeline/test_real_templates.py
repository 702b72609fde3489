"""Masks for the official chat templates of real models, located without generation tags.

The test of the product: each of six official templates (tests/chat_templates/, each naming the
model it comes from) is run without ``{% generation %}`` blocks, so sftkit must locate every
assistant turn itself, and its masks must equal those of a generation-tagged twin of the same
template, token for token, on the sample data, the public real data and the fixtures'
conversations (tools, reasoning in its own field and inline), with the bundled byte-level BPE
and the real Mistral SentencePiece tokenizer. No row may be rejected as ``mask_unverifiable``.
"""

from __future__ import annotations

import pytest

from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.stage import Drop
from pipeline.templates import Template
from tests.chat_templates.models import CONVERSATIONS, TEMPLATES, conversation, template_text, tokenizer_for
from tests.support.conversations import conversations as rows_of

NAMES = list(TEMPLATES)


def fixture_rows(name: str) -> list[tuple[list[dict], str | None]]:
    entry = TEMPLATES[name]
    rows = []
    for conv in entry["conversations"] + entry["raises"]:
        messages, tools = conversation(conv)
        rows.append(to_conversation({"messages": messages, "tools": tools}))
    return rows


def maskers(name: str, base_tokenizer, **policy) -> tuple[Masker, Masker]:
    """(sftkit locating turns in the official template, the same template with generation tags)."""
    entry = TEMPLATES[name]
    tokenizer = tokenizer_for(name, base_tokenizer)
    variables = tuple(sorted(entry["variables"].items()))
    official = Template(name, template_text(name), variables=variables)
    twin = Template(f"{name}-twin", template_text(name, twin=True), variables=variables)
    assert not official.has_generation_tags and twin.has_generation_tags
    # Gemma refuses system prompts: fold them into the first user turn, as its model card says.
    system = "merge" if name == "gemma" else "keep"
    locate = Masker(tokenizer, official, max_length=8192, span_method="locate", system=system, **policy)
    tagged = Masker(tokenizer, twin, max_length=8192, span_method="generation", system=system, **policy)
    return locate, tagged


def compare(locate: Masker, tagged: Masker, rows) -> dict[str, int]:
    """Encode ``rows`` both ways; every difference fails. Returns counts of the outcomes."""
    counts: dict[str, int] = {}
    located, reference = locate.encode_batch(rows), tagged.encode_batch(rows)
    for row, got, want in zip(rows, located, reference):
        if isinstance(got, Drop):
            assert got.reason != "mask_unverifiable", (got.detail, row)
        if isinstance(want, Encoded):
            assert isinstance(got, Encoded), (got, row)
            assert got.input_ids.tolist() == want.input_ids.tolist(), row
            assert got.labels.tolist() == want.labels.tolist(), row
            assert got.render_mismatch == want.render_mismatch, row
            key = "kept"
        else:
            assert isinstance(got, Drop) and got.reason == want.reason, (got, want, row)
            key = want.reason
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_fixture_conversations_bpe(name, bpe_tokenizer):
    counts = compare(*maskers(name, bpe_tokenizer), fixture_rows(name))
    assert counts.get("kept", 0) >= len(TEMPLATES[name]["conversations"])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_conversations_sentencepiece(name, mistral_tokenizer):
    counts = compare(*maskers(name, mistral_tokenizer), fixture_rows(name))
    assert counts.get("kept", 0) >= len(TEMPLATES[name]["conversations"])


@pytest.mark.parametrize("name", NAMES)
def test_sample_data(name, bpe_tokenizer, samples_dir):
    rows = rows_of(sorted((samples_dir / "inputs").glob("*.*")))
    assert len(rows) > 40
    counts = compare(*maskers(name, bpe_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


@pytest.mark.parametrize("name", NAMES)
def test_real_data_bpe(name, bpe_tokenizer, real_data_dir):
    rows = rows_of(sorted(real_data_dir.glob("*.json*")))
    counts = compare(*maskers(name, bpe_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1", "mistral"])
def test_real_data_sentencepiece(name, mistral_tokenizer, real_data_dir):
    rows = rows_of(sorted(real_data_dir.glob("*.json*")))[::3]  # every third: SentencePiece is slower
    counts = compare(*maskers(name, mistral_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


def test_reasoning_is_trained_where_the_template_renders_it(bpe_tokenizer):
    """Qwen3 keeps the last turn's reasoning and drops earlier turns' (before the last query)."""
    locate, _ = maskers("qwen3", bpe_tokenizer)
    messages, tools = to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]})
    result = locate.encode(messages, tools)
    tokenizer = locate.tokenizer
    trained = tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100])
    assert "13 * 13 = 169." in trained and "12 * 12 = 144." not in trained
    assert trained.count("<|im_end|>") == 2


def test_a_template_that_changes_the_text_is_refused_not_mislabelled(bpe_tokenizer):
    """A template that rewrites content (here: upper-cases it) cannot be located: rejected, never guessed."""
    source = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{{- m.content | upper }}{%- else %}{{- m.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    masker = Masker(bpe_tokenizer, Template("upper", source), max_length=512, span_method="locate")
    result = masker.encode(
        *to_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]})
    )
    assert isinstance(result, Drop) and result.reason == "mask_unverifiable"


def test_qwen3_without_thinking_trains_the_think_block_a_turn_brings(bpe_tokenizer):
    """enable_thinking false: the prompt holds an empty think block; a turn with reasoning renders a
    full one there. It is trained from "<think>" on and flagged as rendered unlike inference."""
    tokenizer = tokenizer_for("qwen3", bpe_tokenizer)
    template = Template("qwen3", template_text("qwen3"), variables=(("enable_thinking", False),))
    masker = Masker(tokenizer, template, max_length=4096, span_method="locate")
    result = masker.encode(*to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]}))
    assert isinstance(result, Encoded), result
    trained = tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100])
    assert trained.endswith("<think>\n13 * 13 = 169.\n</think>\n\n169<|im_end|>")
    assert result.render_mismatch
    plain = masker.encode(*to_conversation({"messages": CONVERSATIONS["multi_turn"]["messages"]}))
    assert isinstance(plain, Encoded) and not plain.render_mismatch  # the empty block is the prompt's

"""The piece-table path gives exactly what the offset-mapping path gives, for SentencePiece tokenizers.

Mistral's and Llama-2's tokenizers (Metaspace, byte fallback) are encoded without offsets; the
character offsets and the decoded trained spans are rebuilt from the tokens' bytes. A user relies
on that being invisible: the same ids, labels, drops and render-vs-inference flags as when the
tokenizer's own offsets and decoder served every row. Everything here compares the two paths on
the real Mistral-7B tokenizer, over texts where the rebuilding could go wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import TemplateConfig
from pipeline.masking import Encoded, Masker
from pipeline.schema import make_message as msg
from pipeline.stage import Drop
from pipeline.templates import Template, resolve_template
from tests.support.conversations import conversations

# Boundary spaces, runs of spaces and newlines, characters the vocabulary lacks (spelled as
# byte-fallback tokens: "𠀀", "ǅ", "晴", the emoji), a "▁" of the text's own, control-token text.
TRICKY = [
    [msg("user", "Hi"), msg("assistant", "  two leading spaces and two trailing  ")],
    [msg("user", " spaced prompt "), msg("assistant", "\n\nnewlines first\n")],
    [msg("user", "今天天气怎么样？"), msg("assistant", "今天晴朗 ☀️，适合散步 🚶\u200d♀️。")],
    [msg("user", "Rare: 𠀀"), msg("assistant", "𠀀 ǅ 𝔘")],
    [msg("user", "ǅ"), msg("assistant", "ends in a byte-fallback character ǅ")],
    [msg("user", "literal \u2581 here"), msg("assistant", "and \u2581 here")],
    [msg("user", "Say </s> and [INST]"), msg("assistant", "</s> [INST] [/INST] <s>")],
    [msg("system", "Be brief."), msg("user", "One?"), msg("assistant", "1"), msg("user", "Two?"), msg("assistant", " 2 ")],
]

# A template with no BOS (the text starts with plain text: the pre-tokenizer prepends a "▁") and
# no end token (a turn ending in a byte-fallback character ends inside that character's tokens).
BARE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- generation %}{{ m.content }}{%- endgeneration %}"
    "{%- else %}{{ m.role + ': ' + m.content + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)


def maskers(tokenizer, template: Template, **options) -> tuple[Masker, Masker]:
    """(the Masker as it runs, one whose rows all go the offset-mapping path)."""
    fast = Masker(tokenizer, template, max_length=options.pop("max_length", 4096), **options)
    slow = Masker(tokenizer, template, max_length=fast.max_length, **options)
    slow.token_pieces = None
    return fast, slow


def outcome(result):
    if isinstance(result, Drop):
        return ("drop", result.reason, result.detail)
    return (result.input_ids.tolist(), result.labels.tolist(), result.truncated, result.truncated_tokens, result.render_mismatch)


def offset_rows(masker: Masker) -> list[str]:
    """Records the texts the Masker encodes with offsets (the rows the piece table does not serve)."""
    seen: list[str] = []
    encode = masker._encode

    def recording(rows, *, offsets):
        if offsets:
            seen.extend(row.text for row in rows)
        return encode(rows, offsets=offsets)

    masker._encode = recording
    return seen


def test_the_piece_table_is_built_for_sentencepiece_tokenizers_only(mistral_tokenizer, bpe_tokenizer):
    mistral = Masker(mistral_tokenizer, resolve_template(mistral_tokenizer, TemplateConfig(name="mistral")), max_length=64)
    assert mistral.token_pieces is not None and mistral.token_bytes is None
    bundled = Masker(bpe_tokenizer, resolve_template(bpe_tokenizer, TemplateConfig()), max_length=64)
    assert bundled.token_pieces is None and bundled.token_bytes is not None


@pytest.mark.parametrize("name", ["mistral", "alpaca", "chatml"])
@pytest.mark.parametrize("options", [{}, {"train_on": "last_assistant"}, {"max_length": 24, "truncate": True}, {"strict_render": True}])
def test_both_paths_agree_on_tricky_texts(mistral_tokenizer, name, options):
    fast, slow = maskers(mistral_tokenizer, resolve_template(mistral_tokenizer, TemplateConfig(name=name)), **options)
    by_offsets = offset_rows(fast)
    rows = [(messages, None) for messages in TRICKY]
    got, want = fast.encode_batch(rows), slow.encode_batch(rows)
    assert [outcome(r) for r in got] == [outcome(r) for r in want]
    # only the text with a "▁" of its own needs the offsets; "</s>" as text needs no special road
    assert by_offsets == [t for t in by_offsets if "\u2581" in t] and len(by_offsets) <= 1
    if not options:
        assert sum(isinstance(r, Encoded) for r in got) >= 6


def test_a_text_the_pre_tokenizer_prefixes_and_a_turn_ending_inside_a_character(mistral_tokenizer):
    fast, slow = maskers(mistral_tokenizer, Template("bare", BARE))
    by_offsets = offset_rows(fast)
    rows = [(messages, None) for messages in TRICKY if not any("\u2581" in m["content"] for m in messages)]
    got, want = fast.encode_batch(rows), slow.encode_batch(rows)
    assert [outcome(r) for r in got] == [outcome(r) for r in want]
    assert by_offsets == []
    # The offsets put the whole of a last character spelled in byte tokens on its first token:
    # the trained span ends inside the character, decodes to "\ufffd" and is refused on both paths.
    cut = got[4]
    assert isinstance(cut, Drop) and cut.reason == "mask_unverifiable"
    assert isinstance(got[0], Encoded)


def test_both_paths_agree_on_the_real_data(mistral_tokenizer, real_data_dir, samples_dir):
    rows = conversations(sorted(Path(real_data_dir).glob("*.json*")))
    rows += conversations(sorted(p for p in (samples_dir / "inputs").iterdir() if p.is_file()))
    assert len(rows) > 1000
    for options in ({}, {"train_on": "all"}, {"reasoning": "per_turn", "strict_render": True}):
        fast, slow = maskers(mistral_tokenizer, resolve_template(mistral_tokenizer, TemplateConfig(name="mistral")), **options)
        got, want = fast.encode_batch(rows), slow.encode_batch(rows)
        assert [outcome(r) for r in got] == [outcome(r) for r in want], options


# A space outside the response: after three of the prompt's own it makes a run the tokenizer
# spells as one "▁▁▁▁" token, where the generation prompt alone ends "▁▁▁" (flagged).
SPACED = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ ' ' }}{%- generation %}{{ m.content }}{%- endgeneration %}"
    "{%- else %}{{ m.content }}{%- endif %}{%- endfor %}"
)
SPACED_ROWS = [
    [msg("user", "tell me   "), msg("assistant", "x")],  # flagged
    [msg("user", "Hello"), msg("assistant", "there")],
    [msg("user", "a  b c   "), msg("assistant", "d")],  # flagged
    [msg("user", "nospace"), msg("assistant", "s")],  # no space to cut at: the whole prompt is encoded
    [msg("user", "a b"), msg("assistant", "c"), msg("user", " and then   "), msg("assistant", "d")],  # flagged
    [msg("user", "a b  "), msg("assistant", "c"), msg("user", " and then"), msg("assistant", "d")],
]


def test_the_render_check_encodes_the_prompt_from_its_last_cutting_space(mistral_tokenizer):
    """No Mistral piece holds a "▁" after another character, so such a space cuts the
    tokenization, and only the prompt's text from its last one is encoded again (Mistral's
    "[INST] … [/INST]" is text: without the cut every user message was encoded twice). The flags
    are those of encoding the whole prompt, and what tokenizing the generation prompt shows."""
    template = Template("spaced", SPACED)
    fast = Masker(mistral_tokenizer, template, max_length=4096)
    assert fast.token_pieces is not None and fast.token_pieces.space_cuts
    whole = Masker(mistral_tokenizer, template, max_length=4096)
    whole.token_pieces.space_cuts = False
    got = [outcome(r) for r in fast.encode_batch([(row, None) for row in SPACED_ROWS])]
    assert got == [outcome(r) for r in whole.encode_batch([(row, None) for row in SPACED_ROWS])]
    flags = []
    for row, result in zip(SPACED_ROWS, got):
        prompt = "".join(m["content"] if m["role"] == "user" else " " + m["content"] for m in row[:-1])
        want = mistral_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert result[4] == (result[0][: len(want)] != want), row
        flags.append(result[4])
    assert flags == [True, False, True, False, True, False]
    assert "nospace" in fast._prompt_tail_ids  # nothing to cut at
    assert not any(len(text) > 12 for text in fast._prompt_tail_ids)  # " then  ", not the prompt


# Fragments the cut must survive: runs of spaces, a space before and after punctuation and
# newlines, characters the vocabulary lacks (byte-fallback), a "▁" of the text's own, tabs.
FRAGMENTS = ["the", "re", " ", "  ", "   ", "\n", "\t", ".", "[/INST]", "晴", "𠀀", "ǅ", "\u2581", "a", "Ok", "?", "🚶", "x y"]


@pytest.mark.parametrize("name", ["spaced", "mistral"])
def test_the_cut_flags_what_the_whole_prompt_flags_on_random_text(mistral_tokenizer, name):
    """Random prompts and responses built from fragments where a cut could go wrong: the rows
    the Masker keeps, their ids, labels and render-mismatch flags are those of encoding the whole
    prompt again."""
    import random

    rng = random.Random(7)
    template = Template("spaced", SPACED) if name == "spaced" else resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    fast = Masker(mistral_tokenizer, template, max_length=4096)
    whole = Masker(mistral_tokenizer, template, max_length=4096)
    whole.token_pieces.space_cuts = False

    def text() -> str:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8)))

    rows = []
    for _ in range(400):
        turns = rng.choice([1, 1, 2])
        rows.append(([m for _ in range(turns) for m in (msg("user", text()), msg("assistant", text()))], None))
    got = [outcome(r) for r in fast.encode_batch(rows)]
    assert got == [outcome(r) for r in whole.encode_batch(rows)]
    kept = [g for g in got if g[0] != "drop"]
    assert len(kept) > 100 and any(g[4] for g in kept) == (name == "spaced")  # some flagged where the template can be

"""The byte-table path gives exactly what the offset-mapping path gives, and is taken only where it can.

Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen style, and the bundled one) have a fixed byte
string per token, so the Masker encodes them without offsets and finds token boundaries from
cumulative byte lengths. Everything here compares that path with the offset-mapping path (the
tokenizer's own character offsets and decoder) and with ``apply_chat_template``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.masking import Encoded, Masker
from pipeline.schema import make_message as msg
from pipeline.schema import messages_for_template
from pipeline.stage import Drop
from pipeline.templates import resolve_template
from pipeline.tokenizers import load_tokenizer
from tests.support.conversations import conversations


def masker(tokenizer, *, byte_table: bool = True, **kwargs) -> Masker:
    template = resolve_template(tokenizer, TemplateConfig(name=kwargs.pop("template", "auto")))
    built = Masker(tokenizer, template, max_length=kwargs.pop("max_length", 4096), **kwargs)
    if not byte_table:
        built.token_bytes = None  # the offset-mapping path for every row
    return built


def same(left, right) -> bool:
    if type(left) is not type(right):
        return False
    if isinstance(left, Drop):
        return left == right
    return (
        left.input_ids.tolist() == right.input_ids.tolist()
        and left.labels.tolist() == right.labels.tolist()
        and left.truncated == right.truncated
    )


def edited_tokenizer(tmp_path: Path, source: Path, edit):
    folder = tmp_path / "edited-tokenizer"
    shutil.copytree(source, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return load_tokenizer(str(folder))


def test_the_table_is_built_for_byte_level_tokenizers_only(bpe_tokenizer, mistral_tokenizer):
    assert masker(bpe_tokenizer).token_bytes is not None
    # SentencePiece (Metaspace, byte fallback): token bytes are not the text's bytes
    assert masker(mistral_tokenizer, template="mistral").token_bytes is None


def test_an_added_token_that_strips_whitespace_rules_the_table_out(tmp_path, bpe_tokenizer_path):
    def lstrip_im_end(data):
        for token in data["added_tokens"]:
            if token["content"] == "<|im_end|>":
                token["lstrip"] = True

    tokenizer = edited_tokenizer(tmp_path, bpe_tokenizer_path, lstrip_im_end)
    assert masker(tokenizer).token_bytes is None


def test_both_paths_agree_on_every_sample_conversation(bpe_tokenizer, samples_dir):
    rows = conversations(sorted(p for p in (samples_dir / "inputs").iterdir() if p.is_file()))
    assert len(rows) > 50
    for options in ({}, {"train_on": "last_assistant"}, {"max_length": 96, "truncate": True}):
        fast = masker(bpe_tokenizer, **options).encode_batch(rows)
        slow = masker(bpe_tokenizer, byte_table=False, **options).encode_batch(rows)
        assert all(same(f, s) for f, s in zip(fast, slow)), options
        assert sum(isinstance(f, Encoded) for f in fast) > 40


def test_both_paths_agree_on_the_real_data(bpe_tokenizer, real_data_dir):
    rows = conversations(sorted(real_data_dir.glob("*.json")))
    fast = masker(bpe_tokenizer).encode_batch(rows)
    slow = masker(bpe_tokenizer, byte_table=False).encode_batch(rows)
    assert len(rows) > 1000
    assert all(same(f, s) for f, s in zip(fast, slow))


def test_a_row_the_table_does_not_give_back_goes_the_offset_mapping_path(bpe_tokenizer):
    # The table's bytes for one token are made wrong (same length, so every boundary still
    # adds up): the whole-row byte check must catch it and send the row the offset-mapping path,
    # so the result stays the true one instead of a mask built on wrong bytes.
    messages = [msg("user", "Say hello."), msg("assistant", "Hello there, friend.")]
    truth = masker(bpe_tokenizer, byte_table=False).encode(messages)
    assert isinstance(truth, Encoded)
    broken = masker(bpe_tokenizer)
    table = broken.token_bytes
    token = int(truth.input_ids[truth.labels != schema.IGNORE_INDEX][0])
    table.flat = table.flat.copy()
    table.flat[table.starts[token]] ^= 0x20
    result = broken.encode(messages)
    assert same(result, truth)


def test_rows_the_normalizer_would_change_go_the_offset_mapping_path(tmp_path, bpe_tokenizer_path):
    tokenizer = edited_tokenizer(tmp_path, bpe_tokenizer_path, lambda data: data.update(normalizer={"type": "NFC"}))
    fast = masker(tokenizer)
    assert fast.token_bytes is not None and fast.token_bytes.normalizer == "NFC"
    composed = [msg("user", "Order?"), msg("assistant", "Caf\u00e9 au lait.")]
    assert fast.token_bytes.covers("Caf\u00e9") and not fast.token_bytes.covers("Cafe\u0301")
    result = fast.encode(composed)
    assert isinstance(result, Encoded)
    reference = tokenizer.apply_chat_template(
        messages_for_template(composed), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert result.input_ids.tolist() == reference["input_ids"]
    mask = np.array(reference["assistant_masks"], dtype=bool)
    assert result.labels.tolist() == np.where(mask, reference["input_ids"], schema.IGNORE_INDEX).tolist()
    # A decomposed "é" is normalized before tokenizing, so the ids do not spell the raw text;
    # the row goes the offset-mapping path, whose decoder gives the composed text back: unverifiable.
    decomposed = [msg("user", "Order?"), msg("assistant", "Cafe\u0301 au lait.")]
    assert same(fast.encode(decomposed), masker(tokenizer, byte_table=False).encode(decomposed))


@pytest.mark.parametrize("content", ["今天晴朗 ☀️，适合散步 🚶‍♀️。", "tabs\tand\nnewlines  ", "<|im_end|> inside"])
def test_multibyte_and_control_text_agree_with_apply_chat_template(bpe_tokenizer, content):
    messages = [msg("user", "Go."), msg("assistant", content)]
    fast = masker(bpe_tokenizer).encode(messages)
    assert same(fast, masker(bpe_tokenizer, byte_table=False).encode(messages))
    assert isinstance(fast, Encoded)
    trained = fast.input_ids[fast.labels != schema.IGNORE_INDEX].tolist()
    assert bpe_tokenizer.decode(trained) == content + "<|im_end|>"  # the ChatML template writes content verbatim

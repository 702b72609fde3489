"""The seed's API: SFTDataset over JSONL in any layout, and marker-based create_sft_labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import SFTDataset, create_sft_labels
from pipeline.config import SFTConfig
from pipeline.masking import Encoded
from pipeline.schema import make_message
from pipeline.tokenize import build_masker
from tests.support.inputs import sharegpt_record

ALPACA = [
    {"instruction": "请写一首关于春天的诗", "input": "", "output": "春风拂面，万物复苏。🌸"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
SHAREGPT = sharegpt_record(("human", "Who are you?"), ("gpt", "A model."), ("human", "Bye!"), ("gpt", "Bye."))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tokenizer, item):
    ids = item["input_ids"][item["labels"] != -100]
    return tokenizer.decode(ids.tolist())


def test_items_are_long_tensors_with_the_prompt_masked(tmp_path, bpe_tokenizer):
    ds = SFTDataset(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), bpe_tokenizer, max_length=512)
    assert len(ds) == 2 and ds.rejected == []
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    for value in item.values():
        assert value.dtype == torch.long and value.shape == item["input_ids"].shape
    assert bool((item["attention_mask"] == 1).all())
    assert trained_text(bpe_tokenizer, item) == "春风拂面，万物复苏。🌸<|im_end|>"
    assert trained_text(bpe_tokenizer, ds[1]) == "5<|im_end|>"
    assert item["labels"][0] == -100


def test_items_equal_the_shard_rows_of_the_same_conversation(tmp_path, bpe_tokenizer):
    ds = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT]), bpe_tokenizer, max_length=2048)
    masker = build_masker(bpe_tokenizer, SFTConfig())
    shard_row = masker.encode(
        [
            make_message("user", "Who are you?"),
            make_message("assistant", "A model."),
            make_message("user", "Bye!"),
            make_message("assistant", "Bye."),
        ]
    )
    assert isinstance(shard_row, Encoded)
    assert ds[0]["input_ids"].tolist() == shard_row.input_ids.tolist()
    assert ds[0]["labels"].tolist() == shard_row.labels.tolist()


def test_a_tokenizer_without_a_chat_template_gets_the_alpaca_layout_and_one_bos(tmp_path, mistral_tokenizer):
    ds = SFTDataset(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), mistral_tokenizer)
    assert ds.template.name == "alpaca"
    ids = ds[1]["input_ids"]
    assert int((ids == mistral_tokenizer.bos_token_id).sum()) == 1 and ids[0] == mistral_tokenizer.bos_token_id
    assert "### Instruction:\nAdd the numbers.\n2 and 3" in mistral_tokenizer.decode(ids.tolist())
    assert trained_text(mistral_tokenizer, ds[1]) == "5</s>"


def test_unusable_records_are_listed_not_dropped_silently(tmp_path, bpe_tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps(ALPACA[0], ensure_ascii=False) + "\n{broken json\n" + json.dumps({"text": "no layout"}) + "\n",
        encoding="utf-8",
    )
    with caplog.at_level("WARNING"):
        ds = SFTDataset(path, bpe_tokenizer)
    assert len(ds) == 1
    assert [index for index, _, _ in ds.rejected] == [1, 2]
    assert "2 of 3 records not used" in caplog.text


def test_max_length_truncates_long_responses(tmp_path, bpe_tokenizer):
    record = {"instruction": "Count.", "output": "one two three four five six " * 40}
    ds = SFTDataset(write_jsonl(tmp_path / "long.jsonl", [record]), bpe_tokenizer, max_length=64)
    assert len(ds[0]["input_ids"]) <= 64
    assert int((ds[0]["labels"] != -100).sum()) > 0


# --- create_sft_labels ---------------------------------------------------------------------------
MISTRAL_CHAT = "[INST] 请写诗 [/INST] 春风拂面</s>[INST] Again? [/INST] Sure.</s>"


def test_create_sft_labels_masks_each_instruction_through_the_marker(mistral_tokenizer):
    ids = mistral_tokenizer(MISTRAL_CHAT)["input_ids"]  # with its BOS
    labels = create_sft_labels(ids, mistral_tokenizer, "[/INST]")
    assert isinstance(labels, list) and len(labels) == len(ids)
    trained = [i for i, label in zip(ids, labels) if label != -100]
    runs = mistral_tokenizer.decode(trained)
    assert runs == "春风拂面</s> Sure.</s>"
    assert all(label in (-100, i) for i, label in zip(ids, labels))


ALPACA_TEXT = "### Instruction:\nHello\n\n### Response:\nok</s>"


def test_the_marker_is_found_although_it_splits_differently_in_context(mistral_tokenizer):
    alone = mistral_tokenizer("### Response:", add_special_tokens=False)["input_ids"]
    ids = mistral_tokenizer(ALPACA_TEXT)["input_ids"]
    # alone the marker starts with "▁###"; after a newline it is "###": the alone form never occurs
    assert not any(ids[i : i + len(alone)] == alone for i in range(len(ids)))
    labels = create_sft_labels(ids, mistral_tokenizer, "### Response:")
    assert mistral_tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]) == "\nok</s>"


def test_marker_search_works_on_ids_that_do_not_re_encode_the_same(mistral_tokenizer):
    # "Hello" spelled letter by letter: decoding and re-encoding gives other ids, so the marker
    # is found by its tokenizations in context instead of through offsets.
    ids = mistral_tokenizer(ALPACA_TEXT)["input_ids"]
    hello = mistral_tokenizer.convert_tokens_to_ids("Hello")
    position = ids.index(hello)
    letters = mistral_tokenizer.convert_tokens_to_ids(["H", "e", "l", "l", "o"])
    ids = ids[:position] + letters + ids[position + 1 :]
    assert mistral_tokenizer(mistral_tokenizer.decode(ids, skip_special_tokens=True))["input_ids"] != ids
    labels = create_sft_labels(ids, mistral_tokenizer, "### Response:\n")
    assert mistral_tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]) == "ok</s>"


def test_tensors_and_batches_keep_their_kind(bpe_tokenizer):
    texts = ["### Instruction:\nHi\n\n### Response:\nHello<|im_end|>", "### Instruction:\nYo\n\n### Response:\nYes<|im_end|>"]
    batch = bpe_tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    labels = create_sft_labels(batch, bpe_tokenizer, "### Response:\n")
    assert isinstance(labels, torch.Tensor) and labels.shape == batch.shape and labels.dtype == batch.dtype
    for row_ids, row_labels in zip(batch, labels):
        kept = row_ids[row_labels != -100].tolist()
        assert bpe_tokenizer.decode(kept) in ("Hello<|im_end|>", "Yes<|im_end|>")
    as_numpy = create_sft_labels(np.array(batch[0]), bpe_tokenizer, "### Response:\n")
    assert isinstance(as_numpy, np.ndarray)


def test_a_missing_marker_is_a_clear_error(bpe_tokenizer):
    ids = bpe_tokenizer("just some text", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"'### Response:' does not occur in input_ids"):
        create_sft_labels(ids, bpe_tokenizer, "### Response:")

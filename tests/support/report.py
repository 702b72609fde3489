"""A realistic prepared dataset folder, built directly with pyarrow, for the report/inspect tests.

It follows the contract exactly (``pipeline.schema`` layouts, ``pipeline.manifest`` manifest):
conversations rendered with the bundled tokenizer's ChatML template, labels = input_ids on the
assistant tokens (``{% generation %}`` mask) and -100 elsewhere, shards per split, rejected rows
from several stages, and a manifest with two versions of history. The lead's end-to-end test on
real ``sftkit prepare`` output complements it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import schema
from pipeline.fsutil import sha256_file, write_parquet_atomic
from pipeline.manifest import write_manifest
from pipeline.tokenizers import tokenizer_fingerprint

USER_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia?",
    "请用一句话解释什么是机器学习。",
    "Translate 'good morning' into French and Spanish.",
    "List three prime numbers greater than 50.",
    "Summarise the plot of Hamlet briefly.",
    "如何用 Python 读取一个 JSON 文件？",
]
ASSISTANT_REPLIES = [
    "Sunlight scatters off air molecules, and blue light scatters the most. So we see blue everywhere.",
    "Cold rain on the roof\nred leaves drift in grey puddles\nthe year exhales slow",
    "The capital of Australia is Canberra.",
    "机器学习是让计算机从数据中学习规律并做出预测的方法。",
    "French: « Bonjour ». Spanish: «Buenos días».",
    "53, 59 and 61.",
    "Prince Hamlet avenges his father's murder by his uncle Claudius; nearly everyone dies.",
    "使用 json 模块：\n```python\nimport json\nwith open('a.json') as f:\n    data = json.load(f)\n```",
]


@dataclass
class FixtureDataset:
    """What the fixture wrote, so tests can compare the report against ground truth."""

    path: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> shard rows in order
    rejected: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for split in schema.SPLITS for r in self.rows.get(split, [])]


def conversation(index: int) -> list[dict[str, Any]]:
    """A deterministic conversation: some single-turn, some with a system prompt, some multi-turn."""
    k = index % len(USER_PROMPTS)
    messages = []
    if index % 3 == 0:
        messages.append(schema.make_message("system", "You are a concise, helpful assistant."))
    messages.append(schema.make_message("user", f"{USER_PROMPTS[k]} (#{index})"))
    messages.append(schema.make_message("assistant", ASSISTANT_REPLIES[k] * (1 + index % 4)))
    if index % 5 == 0:
        messages.append(schema.make_message("user", "Thanks! Can you say that more briefly?"))
        messages.append(schema.make_message("assistant", ASSISTANT_REPLIES[k][:40]))
    return messages


def shard_row(tokenizer, messages: list[dict[str, Any]], source: str, source_index: int) -> dict[str, Any]:
    rendered = tokenizer.apply_chat_template(
        schema.messages_for_template(messages),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids = list(rendered["input_ids"])
    labels = [tok if trained else schema.IGNORE_INDEX for tok, trained in zip(input_ids, rendered["assistant_masks"])]
    return {
        schema.ID: schema.conversation_id(messages),
        schema.SOURCE: source,
        schema.SOURCE_INDEX: source_index,
        schema.MESSAGES: messages,
        schema.TOOLS: None,
        schema.INPUT_IDS: input_ids,
        schema.LABELS: labels,
        schema.LENGTH: len(input_ids),
        schema.NUM_TRAINABLE: sum(1 for label in labels if label != schema.IGNORE_INDEX),
    }


def rejected_row(source: str, source_index: int, stage: str, reason: str, detail: str, raw: str, **extra) -> dict:
    return {
        schema.SOURCE: source,
        schema.SOURCE_INDEX: source_index,
        schema.STAGE: stage,
        schema.REASON: reason,
        schema.DETAIL: detail,
        schema.ID: extra.get("id"),
        schema.DUPLICATE_OF: extra.get("duplicate_of"),
        schema.SIMILARITY: extra.get("similarity"),
        schema.RAW: schema.cut_raw(raw),
    }


def build_dataset(
    root: Path,
    tokenizer,
    tokenizer_path: str | Path,
    *,
    rows_per_source: int = 24,
    sources: tuple[str, ...] = ("alpaca_en.jsonl", "chat_zh.parquet"),
    rows_per_shard: int = 20,
) -> FixtureDataset:
    """Write a prepared dataset folder under ``root`` and return what it holds."""
    root = Path(root)
    fixture = FixtureDataset(path=root, rows={split: [] for split in schema.SPLITS})
    index = 0
    for source in sources:
        for source_index in range(rows_per_source):
            row = shard_row(tokenizer, conversation(index), source, source_index * 2)
            # Every 6th row goes to validation, as a stand-in for the split by id.
            fixture.rows["val" if index % 6 == 5 else "train"].append(row)
            index += 1

    rejected = []
    first_id = fixture.rows["train"][0][schema.ID] if fixture.rows["train"] else None
    for source in sources:
        rejected += [
            rejected_row(source, 1, "ingest", "invalid_json", "line 2: Expecting ',' delimiter", '{"instruction": "hi" "output"'),
            rejected_row(
                source,
                3,
                "quality",
                "empty_response",
                "assistant reply is empty",
                json.dumps({"messages": [{"role": "user", "content": "Say something"}, {"role": "assistant", "content": "  "}]}),
            ),
            rejected_row(
                source,
                5,
                "quality",
                "refusal",
                "matched phrase 'as an AI language model'",
                json.dumps({"messages": [{"role": "assistant", "content": "As an AI language model, I cannot help. " * 40}]}),
            ),
            rejected_row(
                source, 7, "dedup", "near_duplicate", "Jaccard 0.91 with a kept row", "{}", duplicate_of=first_id, similarity=0.91
            ),
        ]
    rejected.append(
        rejected_row(
            sources[0],
            9,
            "quality",
            "refusal",
            "matched phrase '作为一个人工智能语言模型'",
            json.dumps({"messages": [{"role": "assistant", "content": "作为一个人工智能语言模型，我不能回答。"}]}, ensure_ascii=False),
        )
    )
    fixture.rejected = rejected

    fingerprint = tokenizer_fingerprint(tokenizer)
    metadata = {
        schema.META_TOKENIZER_NAME: str(tokenizer_path).encode(),
        schema.META_TOKENIZER_FINGERPRINT: fingerprint.encode(),
        schema.META_TEMPLATE_NAME: b"chatml",
        schema.META_TEMPLATE_FINGERPRINT: b"fixture",
        schema.META_FORMAT_VERSION: schema.FORMAT_VERSION.encode(),
    }
    shard_entries = []
    for split in schema.SPLITS:
        rows = fixture.rows[split]
        for shard_index, start in enumerate(range(0, len(rows), rows_per_shard)):
            chunk = rows[start : start + rows_per_shard]
            relative = f"shards/{schema.shard_file_name(split, shard_index)}"
            table = pa.Table.from_pylist(chunk, schema=schema.SHARD_SCHEMA)
            write_parquet_atomic(table, root / relative, metadata={**metadata, schema.META_SPLIT: split.encode()})
            shard_entries.append(
                {
                    "path": relative,
                    "split": split,
                    "rows": len(chunk),
                    "tokens": sum(r[schema.LENGTH] for r in chunk),
                    "trainable_tokens": sum(r[schema.NUM_TRAINABLE] for r in chunk),
                    "sha256": sha256_file(root / relative),
                }
            )

    rejected_entries = []
    by_stage: dict[str, list[dict]] = {}
    for row in rejected:
        by_stage.setdefault(row[schema.STAGE], []).append(row)
    counts: dict[str, dict[str, int]] = {}
    for stage, rows in by_stage.items():
        relative = f"rejected/{stage}-00000.parquet"
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema.REJECTED_SCHEMA), root / relative)
        rejected_entries.append({"path": relative, "rows": len(rows)})
        for row in rows:
            counts.setdefault(stage, {}).setdefault(row[schema.REASON], 0)
            counts[stage][row[schema.REASON]] += 1

    kept = sum(len(rows) for rows in fixture.rows.values())
    read = kept + len(rejected)
    manifest = {
        "version": 2,
        "created_at": "2026-11-28T23:00:00+00:00",
        "tokenizer": {"name": str(tokenizer_path), "fingerprint": fingerprint},
        "template": {"name": "chatml", "fingerprint": "fixture"},
        "config": {},
        "inputs": [{"source": s, "sha256": "0" * 64, "records": rows_per_source + 5} for s in sources],
        "shards": shard_entries,
        "rejected": rejected_entries,
        "counts": {"read": read, "kept": kept, "rejected": counts},
        "stages": [{"name": s, "seconds": 0.1, "records_in": read, "records_out": read} for s in schema.STAGES],
        "history": [
            {"version": 1, "created_at": "2026-11-27T08:00:00+00:00", "read": read - 10, "kept": kept - 8, "shards_added": 2},
            {"version": 2, "created_at": "2026-11-28T23:00:00+00:00", "read": read, "kept": kept, "shards_added": 1},
        ],
    }
    write_manifest(root, manifest)
    fixture.manifest = manifest
    return fixture


def one_line(text: str) -> str:
    """Error messages wrapped by the terminal width, as one line."""
    return " ".join(text.split())

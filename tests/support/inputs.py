"""Small realistic input files for end-to-end prepare/flow tests, written on the fly, and the
records they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

TOPICS = [
    ("Explain why the sky is blue.", "Sunlight is scattered by air molecules, and blue light is scattered the most."),
    ("Give three tips for staying healthy.", "Eat vegetables, exercise regularly, and sleep at least seven hours."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("Translate 'good morning' into French.", "Good morning in French is 'Bonjour'."),
    ("Write a haiku about autumn.", "Red leaves drift and fall\nthe cold wind carries them home\nthe branches are bare"),
    ("请写一句关于春天的诗。", "春风拂面，万物复苏，桃花笑红了山坡。"),
    ("中国的首都是哪里？", "中国的首都是北京，它有三千多年的建城史。"),
    ("How many days are in a leap year?", "A leap year has 366 days, one more than a common year."),
    ("Sort 5, 2, 9, 1 in ascending order.", "In ascending order: 1, 2, 5, 9."),
    ("What does a learning rate control?", "It sets the size of each optimisation step; too large a value makes training unstable."),
]


def alpaca_records(offset: int = 0, count: int = 10) -> list[dict]:
    out = []
    for i in range(count):
        prompt, answer = TOPICS[(i + offset) % len(TOPICS)]
        out.append({"instruction": f"{prompt} (case {i + offset})", "input": "", "output": f"{answer} Case {i + offset} done."})
    return out


def sharegpt_records(offset: int = 0, count: int = 6) -> list[dict]:
    out = []
    for i in range(count):
        p1, a1 = TOPICS[(i + offset) % len(TOPICS)]
        p2, a2 = TOPICS[(i + offset + 3) % len(TOPICS)]
        out.append(
            {
                "conversations": [
                    {"from": "system", "value": "You are a concise assistant."},
                    {"from": "human", "value": f"{p1} [{i + offset}]"},
                    {"from": "gpt", "value": a1},
                    {"from": "human", "value": p2},
                    {"from": "gpt", "value": f"{a2} ({i + offset})"},
                ]
            }
        )
    return out


def openai_record(*turns, **fields) -> dict:
    """An OpenAI-style record, ``{"messages": [...], **fields}``, from (role, content) pairs; a dict is
    taken as a ready-made message."""
    return {"messages": [turn if isinstance(turn, dict) else {"role": turn[0], "content": turn[1]} for turn in turns], **fields}


def sharegpt_record(*turns, **fields) -> dict:
    """A ShareGPT record, ``{"conversations": [...], **fields}``, from (from, value) pairs."""
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns], **fields}


def write_jsonl(path: Path, records: list, bad_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(bad_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def make_inputs(folder: Path) -> list[Path]:
    """Two input files with a few bad records and an exact duplicate across them."""
    folder.mkdir(parents=True, exist_ok=True)
    first = write_json(folder / "alpaca.json", alpaca_records(0, 12))
    dup = alpaca_records(0, 1)[0]
    second = write_jsonl(
        folder / "chat.jsonl",
        sharegpt_records(0, 6) + [dup],
        bad_lines=["{not json", json.dumps({"conversations": [{"from": "gpt", "value": "assistant first"}]})],
    )
    return [first, second]


def shard_rows(data_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((data_dir / "shards").glob("*.parquet")):
        rows.extend(pq.read_table(path, columns=["id", "source", "source_index", "input_ids", "labels"]).to_pylist())
    return sorted(rows, key=lambda r: r["id"])


def shard_bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data_dir / "shards").glob("*.parquet"))}

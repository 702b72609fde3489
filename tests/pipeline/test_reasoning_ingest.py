"""LLaMA-Factory files with reasoning through the real ingest stage: Parquet keeps ``reasoning``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import IngestConfig, SFTConfig
from pipeline.ingest import ingest_file


def run(path: Path, out: Path):
    kept, rejected = out / f"{path.name}.kept.parquet", out / f"{path.name}.rejected.parquet"
    stats = ingest_file(path, kept, rejected, SFTConfig(ingest=IngestConfig()), source=path.name)
    rejected_rows = pq.read_table(rejected).to_pylist() if rejected.exists() else []
    return stats, pq.read_table(kept), rejected_rows


@pytest.mark.parametrize(
    "name, count, reasoning, calls", [("v1_sft_demo.jsonl", 500, 0, 0), ("reason_tool_use_demo_50.jsonl", 50, 112, 68)]
)
def test_llamafactory_files_ingest_without_a_rejection(real_data_dir, tmp_path, name, count, reasoning, calls):
    path = real_data_dir / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    stats, kept, rejected = run(path, tmp_path)
    assert rejected == []
    assert stats.records_in == stats.records_out == kept.num_rows == count
    assert kept.schema.equals(schema.CONVERSATION_SCHEMA, check_metadata=False)
    rows = kept.to_pylist()
    messages = [m for row in rows for m in row[schema.MESSAGES]]
    assert sum(1 for m in messages if m["reasoning"]) == reasoning
    assert all(m["role"] == "assistant" for m in messages if m["reasoning"])
    assert sum(len(json.loads(m["tool_calls"])) for m in messages if m["tool_calls"]) == calls
    for row in rows:
        assert row[schema.ID] == schema.conversation_id(row[schema.MESSAGES], row[schema.TOOLS])
    if name == "v1_sft_demo.jsonl":
        assert {(m["role"], m["train"]) for m in messages} == {("user", False), ("assistant", True)}

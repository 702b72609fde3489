"""The ingest stage end to end: real files in, canonical Parquet and quarantine out, nothing lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import IngestConfig, SFTConfig
from pipeline.ingest import InputError, expand_inputs, ingest_file


def run(path: Path, out: Path, config: IngestConfig | None = None, source: str | None = None):
    kept, rejected = out / f"{path.name}.kept.parquet", out / f"{path.name}.rejected.parquet"
    stats = ingest_file(path, kept, rejected, SFTConfig(ingest=config or IngestConfig()), source=source or path.name)
    kept_rows = pq.read_table(kept).to_pylist()
    rejected_rows = pq.read_table(rejected).to_pylist() if rejected.exists() else []
    return stats, kept_rows, rejected_rows


# --- real data -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, count, roles_seen",
    [
        ("alpaca_en_demo.json", 999, {"user", "assistant"}),
        ("glaive_toolcall_en_demo.json", 300, {"user", "assistant", "tool"}),
        ("dummy_conversation.json", 500, {"user", "assistant"}),
    ],
)
def test_real_files_convert_every_record(real_data_dir, tmp_path, name, count, roles_seen):
    stats, kept, rejected = run(real_data_dir / name, tmp_path)
    assert rejected == []
    assert stats.records_in == stats.records_out == len(kept) == count
    assert [row[schema.SOURCE_INDEX] for row in kept] == list(range(count))
    assert {m["role"] for row in kept for m in row[schema.MESSAGES]} == roles_seen
    assert pq.read_schema(tmp_path / f"{name}.kept.parquet").equals(schema.CONVERSATION_SCHEMA, check_metadata=False)


def test_real_tool_call_file_keeps_calls_and_tools(real_data_dir, tmp_path):
    _, kept, _ = run(real_data_dir / "glaive_toolcall_en_demo.json", tmp_path)
    original = json.loads((real_data_dir / "glaive_toolcall_en_demo.json").read_text())
    calls = [m for row in kept for m in row[schema.MESSAGES] if m["tool_calls"]]
    assert len(calls) == sum(t["from"] == "function_call" for r in original for t in r["conversations"])
    first_call = json.loads(calls[0]["tool_calls"])[0]["function"]
    assert first_call == json.loads(next(t["value"] for t in original[0]["conversations"] if t["from"] == "function_call"))
    with_tools = [row for row in kept if row[schema.TOOLS]]
    assert len(with_tools) == sum(bool(json.loads(r["tools"])) for r in original)  # "[]" means no tools
    assert all(json.loads(row[schema.TOOLS])[0]["type"] == "function" for row in with_tools)


def test_real_alpaca_ids_are_the_content_hash(real_data_dir, tmp_path):
    _, kept, _ = run(real_data_dir / "alpaca_en_demo.json", tmp_path)
    for row in kept[:50]:
        assert row[schema.ID] == schema.conversation_id(row[schema.MESSAGES], row[schema.TOOLS])


# --- sample inputs ---------------------------------------------------------------------------
EXPECTED_SAMPLE_REJECTS = {
    "alpaca_mixed.json": {"empty_response": 2, "wrong_type": 1, "no_assistant_turn": 1, "unknown_format": 1, "not_an_object": 1},
    "sharegpt_tools.jsonl": {
        "invalid_utf8": 1,
        "invalid_json": 1,
        "not_an_object": 1,
        "unknown_role": 1,
        "bad_turn_order": 2,
        "wrong_type": 1,
        "no_assistant_turn": 1,
    },
    "openai_messages.jsonl.gz": {"empty_response": 1, "no_assistant_turn": 1, "unknown_role": 1, "wrong_type": 2},
    "chat_zh.jsonl.zst": {"bad_turn_order": 1, "empty_response": 1},
    "prompt_completion.parquet": {"empty_response": 1, "no_assistant_turn": 1},
    "trl_prompt_completion": {"empty_response": 1},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLE_REJECTS))
def test_sample_inputs_keep_the_good_and_quarantine_the_bad(samples_dir, tmp_path, name):
    path = samples_dir / "inputs" / name
    stats, kept, rejected = run(path, tmp_path, source=str(path))
    stats.check_conservation()
    assert dict(stats.rejected) == EXPECTED_SAMPLE_REJECTS[name]
    assert len(kept) >= 5
    assert stats.records_in == len(kept) + len(rejected)
    # each record is in exactly one of the two outputs, under its own index
    indices = sorted(r[schema.SOURCE_INDEX] for r in kept + rejected)
    assert indices == list(range(stats.records_in))
    for row in rejected:
        assert row[schema.STAGE] == "ingest" and row[schema.SOURCE] == str(path)
        assert row[schema.DETAIL] and row[schema.RAW]


def test_samples_hold_english_chinese_tool_calls_and_duplicates(samples_dir, tmp_path):
    kept = []
    for path in expand_inputs([str(samples_dir / "inputs" / "*")]):
        kept += run(path, tmp_path)[1]
    text = " ".join(m["content"] for row in kept for m in row[schema.MESSAGES])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "the" in text
    assert any(m["tool_calls"] for row in kept for m in row[schema.MESSAGES])
    assert any(len(row[schema.MESSAGES]) > 3 for row in kept)
    ids = [row[schema.ID] for row in kept]
    assert len(ids) - len(set(ids)) >= 3  # exact duplicates, also across files, for the dedup stage


def test_custom_mapping_sample_with_its_yaml(samples_dir, tmp_path):
    config = SFTConfig.from_yaml(samples_dir / "custom_mapping.yaml").ingest
    stats, kept, rejected = run(samples_dir / "custom_mapping.jsonl", tmp_path, config)
    assert (stats.records_out, dict(stats.rejected)) == (3, {"unknown_role": 1})
    assert [m["role"] for m in kept[0][schema.MESSAGES]] == ["system", "user", "assistant"]
    # without the mapping nothing in that file is recognised
    stats, kept, _ = run(samples_dir / "custom_mapping.jsonl", tmp_path / "plain")
    assert stats.records_out == 0 and dict(stats.rejected) == {"unknown_format": 4}


# --- invariants and file safety --------------------------------------------------------------
def test_invalid_utf8_line_is_rejected_and_the_rest_of_the_file_goes_on(tmp_path):
    good = json.dumps({"prompt": "Hi", "completion": "Hello"}).encode()
    escaped_surrogate = b'{"prompt": "\\ud800", "completion": "x"}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good, b'{"prompt": "\xff\xfe", "completion": "x"}', escaped_surrogate, good]) + b"\n")
    stats, kept, rejected = run(path, tmp_path, IngestConfig(batch_size=1))
    assert [r[schema.SOURCE_INDEX] for r in kept] == [0, 3]
    assert [(r[schema.SOURCE_INDEX], r[schema.REASON]) for r in rejected] == [(1, "invalid_utf8"), (2, "invalid_utf8")]


def test_conservation_holds_across_batches(tmp_path):
    lines = []
    for i in range(103):
        if i % 10 == 3:
            lines.append("{not json")
        elif i % 10 == 7:
            lines.append(json.dumps({"prompt": f"q{i}", "completion": ""}))
        else:
            lines.append(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}))
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats, kept, rejected = run(path, tmp_path, IngestConfig(batch_size=8))
    assert stats.records_in == 103
    assert stats.records_out == len(kept) == 103 - 20
    assert dict(stats.rejected) == {"invalid_json": 10, "empty_response": 10}
    assert [r[schema.SOURCE_INDEX] for r in kept] == [i for i in range(103) if i % 10 not in (3, 7)]


def test_all_rejected_still_writes_an_empty_kept_file_and_stale_quarantine_is_removed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n[]\n")
    stats, kept, rejected = run(path, tmp_path)
    assert kept == [] and len(rejected) == 2
    assert pq.read_schema(tmp_path / "bad.jsonl.kept.parquet").equals(schema.CONVERSATION_SCHEMA, check_metadata=False)
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    stats, kept, rejected = run(path, tmp_path)
    assert len(kept) == 1 and rejected == []
    assert not (tmp_path / "bad.jsonl.rejected.parquet").exists()


def test_a_file_that_breaks_midway_leaves_no_file_under_a_final_name(tmp_path):
    line = json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n" + "{bad\n"
    data = gzip.compress((line * 20_000).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="cut.jsonl.gz"):
        ingest_file(path, out / "kept.parquet", out / "rejected.parquet", SFTConfig(ingest=IngestConfig(batch_size=100)), source=path.name)
    assert list(out.iterdir()) == []  # neither final files nor temporaries


# --- expand_inputs ---------------------------------------------------------------------------
def test_expand_inputs_globs_files_and_folders_sorted_and_deduplicated(samples_dir):
    inputs = samples_dir / "inputs"
    paths = expand_inputs(
        [str(inputs / "*.jsonl*"), str(inputs / "alpaca_mixed.json"), str(inputs / "*"), str(inputs / "trl_prompt_completion")]
    )
    assert [p.name for p in paths] == sorted(p.name for p in inputs.iterdir())
    assert paths == sorted(paths, key=str)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: str(d / "missing.jsonl"), "does not exist"),
        (lambda d: str(d / "*.jsonl"), "matches no files"),
        (lambda d: (d / "table.csv").write_text("a,b\n") and str(d / "table.csv"), "not a supported input"),
        (lambda d: str(d), "not a datasets save_to_disk folder"),
    ],
)
def test_expand_inputs_names_the_path_it_cannot_use(tmp_path, make, words):
    pattern = make(tmp_path)
    with pytest.raises(InputError, match=words) as caught:
        expand_inputs([pattern])
    assert pattern in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_parquet_written_from_mixed_layouts_is_read_row_by_row(tmp_path):
    # A file exported from mixed inputs (e.g. by datasets or pandas) carries every layout's
    # columns on every row, null where unused; each row must still be read by its own layout.
    import pyarrow as pa

    rows = [
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
        {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Capital of France?", "completion": "Paris"},
    ]
    columns = sorted({key for row in rows for key in row})
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    assert table.column("instruction").null_count == 3 and table.column("conversations").null_count == 2
    pq.write_table(table, tmp_path / "mixed.parquet")
    stats, kept, rejected = run(tmp_path / "mixed.parquet", tmp_path)
    assert rejected == []
    assert [[m["content"] for m in row[schema.MESSAGES]] for row in kept] == [
        ["Say hi", "Hi"],
        ["你好", "你好！"],
        ["2+2?", "4"],
        ["Capital of France?", "Paris"],
    ]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_run_s_work_file_codec_carries_through_dedup_and_quality_with_the_same_rows(tmp_path, compression):
    """A run writes its canonical chunks uncompressed (work files, read back three times); dedup
    and quality write their kept rows in their input's codec. The rows are the same either way."""
    from pipeline.dedup import dedup_stage
    from pipeline.fsutil import compression_of
    from pipeline.quality import quality_stage
    from tests.support.inputs import alpaca_records, write_jsonl

    records = alpaca_records(count=12)
    records += [records[0], {"instruction": "Say nothing at all, please.", "input": "", "output": "..."}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    config = SFTConfig()
    chunk = tmp_path / "ingest.parquet"
    ingest_file(path, chunk, tmp_path / "ingest-rejected.parquet", config, compression=compression)
    deduped = tmp_path / "dedup.parquet"
    dedup_stage([chunk], [deduped], tmp_path / "dedup-rejected.parquet", config, index_dir=tmp_path / "index")
    kept = tmp_path / "quality.parquet"
    stats = quality_stage(deduped, kept, tmp_path / "quality-rejected.parquet", config)

    assert stats.records_in == 13 and stats.records_out == 12  # the exact copy and the "..." answer are gone
    assert [compression_of(p) for p in (chunk, deduped, kept)] == [compression] * 3
    assert compression_of(tmp_path / "dedup-rejected.parquet") == compression_of(tmp_path / "quality-rejected.parquet") == "zstd"
    rows = pq.read_table(kept).to_pylist()
    assert [r[schema.SOURCE_INDEX] for r in rows] == list(range(12))

"""Faults a single record, or a compressed file, can bring, and what sftkit does about each.

A malformed record costs one row in rejected/ with a reason, never the run or the records after
it: a value nested 100,000 levels deep (``too_deeply_nested``), a record of 50 MB
(``record_too_large``, refused on its length before it is parsed). A compressed file that
expands without end (a decompression bomb) stops the run at ``ingest.max_expanded_bytes`` with
one sentence naming the file, having decompressed no more than that, and reports its progress
while it is read.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import readers
from pipeline.config import IngestConfig, SFTConfig
from pipeline.ingest import ingest_file
from pipeline.readers import InputError, iter_records

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_COLOR": "1",
    "COLUMNS": "400",
}
DEEP = "[" * 100_000 + "]" * 100_000
LINE = (json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n").encode()


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question number {i}: what is {i} plus {i}? Please explain the steps."},
            {"role": "assistant", "content": f"Adding {i} to itself gives {2 * i}, because doubling a number is adding it once more."},
        ]
    }


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``sftkit ARGS`` in a fresh process."""
    command = [sys.executable, "-m", "flows.cli", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# Peak RSS is the child's own, from ``wait4``; but Linux counts in it the memory of the process
# it was forked from (the high-water mark is carried over exec), and the pytest process can be
# large by now. So a small launcher, freshly started, forks the command and measures it.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=sys.stdout, stderr=subprocess.STDOUT)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(f'\\n@@ {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss * 1024}')\n"
)


def peak_rss_of(command: list[str], timeout: float = 300) -> tuple[int, str, int]:
    """Run ``command``; its exit status, its output and its own peak RSS in bytes."""
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    output, _, tail = result.stdout.rpartition("\n@@ ")
    code, rss = map(int, tail.split())
    return code, output + result.stderr, rss


def rejected_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "rejected").glob("*.parquet")):
        rows += pq.read_table(path, columns=["stage", "reason", "detail", "source_index", "raw"]).to_pylist()
    return rows


def conserved(manifest: dict) -> bool:
    counts = manifest["counts"]
    rejected = sum(n for stage in counts["rejected"].values() for n in stage.values())
    return counts["read"] == counts["kept"] + rejected


# --- nesting ----------------------------------------------------------------------------------
def test_a_line_nested_100000_deep_is_one_rejection_and_the_records_after_it_are_kept(tmp_path, bpe_tokenizer_path):
    lines = [json.dumps(chat(i)) for i in range(3)] + ['{"messages": ' + DEEP + "}"] + [json.dumps(chat(i)) for i in range(3, 6)]
    path = tmp_path / "nested.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = run_cli("prepare", path, "--tokenizer", bpe_tokenizer_path, "--out", out, "--no-flow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 7 and conserved(manifest)
    assert manifest["counts"]["rejected"].get("ingest") == {"too_deeply_nested": 1}
    [row] = [r for r in rejected_rows(out) if r["stage"] == "ingest"]
    assert row["source_index"] == 3 and "ingest.max_nesting" in row["detail"] and "64 levels" in row["detail"]
    assert row["raw"].startswith('{"messages": [[[')  # the quarantine keeps its (cut) text
    assert manifest["counts"]["kept"] == 6


def test_nesting_just_past_the_limit_is_refused_and_just_within_it_kept(tmp_path):
    def nested(depth: int) -> dict:  # record 1, messages 2, message 3, tool_calls 4, call 5, function 6
        arguments: object = "x"
        for _ in range(depth - 6):
            arguments = {"a": arguments}
        call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
        return {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "a"},
            ]
        }

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(nested(d)) + "\n" for d in (20, 21)))
    got = list(iter_records(path, max_nesting=20))
    assert got[0].error is None
    assert got[1].error.reason == "too_deeply_nested"


@pytest.mark.parametrize("layout", ["array", "stream"])
def test_deep_nesting_inside_a_json_file_costs_only_that_element(tmp_path, layout):
    good = [chat(i) for i in range(4)]
    texts = [json.dumps(r) for r in good[:2]] + ['{"messages": ' + DEEP + ', "s": "a \\" ] } string"}'] + [json.dumps(r) for r in good[2:]]
    path = tmp_path / "a.json"
    path.write_text(
        "[" + ",\n".join(texts) + "]"
        if layout == "array"
        else "\n".join(json.dumps(json.loads(t), indent=1) if i != 2 else t for i, t in enumerate(texts))
    )
    got = list(iter_records(path))
    assert [r.index for r in got] == [0, 1, 2, 3, 4]
    assert [r.error.reason if r.error else None for r in got] == [None, None, "too_deeply_nested", None, None]
    assert [r.value for r in got if r.error is None] == good
    assert got[2].raw.startswith('{"messages": [[[')


def test_deep_nesting_in_parquet_records_costs_only_those_records(tmp_path):
    base = chat(0)["messages"]
    deep_call = [{"type": "function", "function": {"name": "f", "arguments": DEEP}}]
    rows = [
        {"messages": json.dumps(base), "tools": None, "nested": None},
        {"messages": json.dumps(base), "tools": DEEP, "nested": None},  # tool schemas given as JSON text
        {
            "messages": json.dumps(
                [
                    base[0],
                    {"role": "assistant", "content": "", "tool_calls": deep_call},
                    {"role": "tool", "content": "r"},
                    {"role": "assistant", "content": "a"},
                ]
            ),
            "tools": None,
            "nested": None,
        },
        {"messages": json.dumps(chat(1)["messages"]), "tools": None, "nested": [[[[[[1]]]]]]},  # a column nested past a low limit
        {"messages": json.dumps(chat(2)["messages"]), "tools": None, "nested": None},
    ]
    table = pa.table(
        {
            "messages": pa.array([json.loads(r["messages"]) for r in rows]),
            "tools": pa.array([r["tools"] for r in rows], pa.string()),
            "nested": pa.array([r["nested"] for r in rows], pa.list_(pa.list_(pa.list_(pa.list_(pa.list_(pa.list_(pa.int64()))))))),
        }
    )
    path = tmp_path / "deep.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    stats = ingest_file(
        path, out / "kept.parquet", out / "rejected.parquet", SFTConfig(ingest=IngestConfig(max_nesting=6)), source=path.name
    )
    assert stats.records_in == 5 and stats.records_out == 2
    assert stats.rejected == {"too_deeply_nested": 3}
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert [r["source_index"] for r in rejected] == [1, 2, 3]
    assert "field 'tools'" in rejected[0]["detail"] and "tool call arguments of message 1" in rejected[1]["detail"]


def test_the_default_nesting_limit_leaves_real_data_alone(real_data_dir):
    from pipeline.formats import to_conversation
    from pipeline.stage import Drop

    for path in sorted(real_data_dir.iterdir()):
        records = list(iter_records(path))
        assert records and not [r.index for r in records if r.error and r.error.reason == "too_deeply_nested"], path
        for record in records:
            try:
                to_conversation(record.value)
            except Drop as exc:
                assert exc.reason != "too_deeply_nested", (path, record.index)


# --- size -------------------------------------------------------------------------------------
def test_a_50_mb_record_is_refused_unparsed_in_bounded_memory(tmp_path, bpe_tokenizer_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps(chat(0)) + "\n")
        fh.write('{"messages": [{"role": "user", "content": "write a lot"}, {"role": "assistant", "content": "')
        fh.write("word " * (10 << 20))
        fh.write('"}]}\n')
        fh.write(json.dumps(chat(1)) + "\n")
    assert path.stat().st_size > 50 << 20
    out = tmp_path / "out"
    code, output, rss = peak_rss_of(
        [sys.executable, "-m", "flows.cli", "prepare", str(path), "--tokenizer", str(bpe_tokenizer_path), "--out", str(out), "--no-flow"]
    )
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 3 and manifest["counts"]["kept"] == 2 and conserved(manifest)
    [row] = rejected_rows(out)
    assert (row["stage"], row["reason"], row["source_index"]) == ("ingest", "record_too_large", 1)
    assert "not parsed" in row["detail"] and "ingest.max_record_bytes" in row["detail"]
    assert len(row["raw"]) <= 65_536
    # The same run without the huge line: the line itself may add only a little. (The absolute
    # peak, about 430 MB here, is mostly the libraries a run imports, and moves with them.)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(chat(0)) + "\n" + json.dumps(chat(1)) + "\n")
    code, output, baseline = peak_rss_of(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "prepare",
            str(small),
            "--tokenizer",
            str(bpe_tokenizer_path),
            "--out",
            str(tmp_path / "small-out"),
            "--no-flow",
        ]
    )
    assert code == 0, output
    assert rss - baseline < 64 << 20, f"peak RSS {rss >> 20} MiB with the 50 MB line, {baseline >> 20} MiB without"


def test_a_record_over_the_limit_is_never_parsed(tmp_path, monkeypatch):
    parsed: list[int] = []
    real = readers.loads_bounded
    monkeypatch.setattr(readers, "loads_bounded", lambda text, *a: parsed.append(len(text)) or real(text, *a))
    path = tmp_path / "a.jsonl"
    escaped = json.dumps({"prompt": "é" * 300_000, "completion": "ok"})  # 1.8 MB as \u00e9 escapes, 300 K characters decoded
    path.write_text(json.dumps(chat(0)) + "\n" + escaped + "\n" + json.dumps(chat(1)) + "\n")
    got = list(iter_records(path, max_record_bytes=1 << 20))
    assert [r.error.reason if r.error else None for r in got] == [None, "record_too_large", None]
    assert max(parsed) < 1000 and len(parsed) == 2


def test_an_oversized_element_of_a_json_array_costs_only_itself(tmp_path):
    records = [
        chat(0),
        {"prompt": "x" * 3_000_000, "completion": "y", "nested": [{"a": 'brackets ] } and a quote \\" [ { in a string'}]},
        chat(1),
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    got = list(iter_records(path, max_record_bytes=1 << 20))
    assert [r.error.reason if r.error else None for r in got] == [None, "record_too_large", None]
    assert got[2].value == chat(1) and got[2].index == 2
    assert len(got[1].raw_text()) <= 65_537


def test_a_columnar_record_holding_more_than_the_limit_is_too_large(tmp_path):
    rows = [{"prompt": "q0", "completion": "a0"}, {"prompt": "q1", "completion": "x" * (2 << 20)}, {"prompt": "q2", "completion": "a2"}]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = list(iter_records(path, max_record_bytes=1 << 20))
    assert [r.error.reason if r.error else None for r in got] == [None, "record_too_large", None]


# --- compressed inputs ------------------------------------------------------------------------
def gzip_bomb(path: Path, expanded: int) -> None:
    block = LINE * ((1 << 20) // len(LINE))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as fh:
        for _ in range(expanded // len(block)):
            fh.write(compressor.compress(block))
        fh.write(compressor.flush())


def zstd_bomb(path: Path, expanded: int, block: bytes) -> None:
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as writer:
        for _ in range(expanded // len(block)):
            writer.write(block)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_decompression_bomb_stops_at_the_limit_with_one_sentence(tmp_path, bpe_tokenizer_path, suffix):
    path = tmp_path / f"bomb.jsonl{suffix}"
    if suffix == ".gz":
        gzip_bomb(path, 200 << 20)
    else:
        zstd_bomb(path, 200 << 20, LINE * ((1 << 20) // len(LINE)))
    assert path.stat().st_size < 1 << 20
    limit = 10 << 20
    read = 0
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        for _ in iter_records(path, max_expanded_bytes=limit):
            read += len(LINE)
    assert time.monotonic() - started < 10
    assert read <= limit  # nothing past the limit was read
    message = str(caught.value)
    assert str(path) in message and "ingest.max_expanded_bytes" in message and "10.0 MiB" in message

    config = tmp_path / "limits.yaml"
    config.write_text(f"ingest:\n  max_expanded_bytes: {limit}\n")
    started = time.monotonic()
    result = run_cli("prepare", path, "--tokenizer", bpe_tokenizer_path, "--out", tmp_path / "out", "--config", config, "--no-flow")
    assert result.returncode != 0
    said = " ".join((result.stdout + result.stderr).split())
    assert "Traceback" not in said and path.name in said and "max_expanded_bytes" in said, said
    assert time.monotonic() - started < 60


def test_a_zstd_bomb_is_decompressed_a_buffer_at_a_time(tmp_path):
    # 1 GiB of zeros is a few dozen kilobytes of zstd: decompressing a read-size chunk at once
    # would hold the whole gigabyte in memory; it must stream through flat.
    path = tmp_path / "zeros.jsonl.zst"
    zstd_bomb(path, 1 << 30, bytes(1 << 20))
    script = "import sys; from pipeline.readers import iter_records\nprint([r.error.reason for r in iter_records(sys.argv[1])])\n"
    code, output, rss = peak_rss_of([sys.executable, "-c", script, str(path)], timeout=60)
    assert code == 0 and "['record_too_large']" in output, output  # one line of 1 GiB, skipped
    assert rss < 512 << 20, f"peak RSS {rss >> 20} MiB"  # holding the gigabyte would be twice that


def test_reading_a_compressed_file_reports_progress(tmp_path, caplog):
    path = tmp_path / "big.jsonl.gz"
    gzip_bomb(path, 8 << 20)
    seen = []
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="sftkit.ingest"):
        stats = ingest_file(
            path,
            out / "kept.parquet",
            out / "rejected.parquet",
            SFTConfig(),
            source=path.name,
            on_progress=lambda progress, records: seen.append((progress.bytes_read, progress.compressed_bytes, records, progress.done)),
            progress_interval_s=0.0,
        )
    assert stats.records_in == (8 << 20) // len(LINE) // ((1 << 20) // len(LINE)) * ((1 << 20) // len(LINE))
    assert len(seen) > 5 and seen[-1][3] and seen[-1][0] == stats.records_in * len(LINE)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and all(s[1] is not None for s in seen)
    assert seen[len(seen) // 2][2] > 0  # records counted along the way
    assert seen[-1][2] == stats.records_in  # the last report counts every record, written or not yet
    lines = [r.getMessage() for r in caplog.records if r.name == "sftkit.ingest"]
    assert len(lines) > 5 and "MiB read" in lines[0] and "compressed" in lines[0] and "records" in lines[0]
    assert 0 < readers.PROGRESS_INTERVAL_S <= 10  # by default, a line every few seconds

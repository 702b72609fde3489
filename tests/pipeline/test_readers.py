"""Input containers: every supported file kind streams its records in order, with their text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import readers
from pipeline.readers import InputError, container_of, iter_records

RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "Hi"},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def values(path: Path, **kwargs) -> list:
    return [r.value for r in iter_records(path, **kwargs)]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


@pytest.mark.parametrize(
    "name, write",
    [
        ("a.jsonl", lambda p: p.write_bytes(jsonl_bytes(RECORDS))),
        ("a.ndjson", lambda p: p.write_bytes(jsonl_bytes(RECORDS))),
        ("a.jsonl.gz", lambda p: p.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))),
        ("a.jsonl.zst", lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(RECORDS)))),
        ("a.json", lambda p: p.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")),
        ("compact.json", lambda p: p.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")),
        ("jsonl_inside.json", lambda p: p.write_bytes(jsonl_bytes(RECORDS))),
        ("pretty_stream.json", lambda p: p.write_text("\n".join(json.dumps(r, indent=2) for r in RECORDS))),
        ("a.json.gz", lambda p: p.write_bytes(gzip.compress(json.dumps(RECORDS).encode()))),
        ("bom.jsonl", lambda p: p.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(RECORDS))),
    ],
)
def test_every_text_container_yields_the_same_records(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    records = list(iter_records(path))
    assert [r.value for r in records] == RECORDS
    assert [r.index for r in records] == [0, 1, 2]
    assert all(r.error is None for r in records)


def test_parquet_and_dataset_folder_yield_rows_in_order(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet", row_group_size=3)
    assert values(tmp_path / "pc.parquet", batch_size=4) == rows

    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert values(tmp_path / "saved", batch_size=4) == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]), "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    got = list(iter_records(tmp_path / "saved_dict"))
    assert [r.index for r in got] == list(range(10))  # one numbering across splits, in split-name order
    assert [r.value for r in got] == rows[6:] + rows[:6]


def test_json_array_streams_across_buffer_boundaries(tmp_path, monkeypatch):
    # A tiny read size forces elements, strings, escapes, numbers and multi-byte characters to
    # be cut at buffer ends; every element must still come back whole and with its exact text.
    monkeypatch.setattr(readers, "CHUNK_CHARS", 7)
    records = [
        {"prompt": "长" * 40 + '\\u00e9 "quoted"', "completion": "x" * 50, "n": 123456789, "f": 1.5e10, "t": True, "z": None}
        for _ in range(5)
    ] + [1234567, "tail"]
    text = json.dumps(records, ensure_ascii=False, indent=1)
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    got = list(iter_records(tmp_path / "a.json"))
    assert [r.value for r in got] == records
    assert [json.loads(r.raw) for r in got] == records


def test_jsonl_counts_every_non_empty_line_and_goes_on_after_bad_lines(tmp_path):
    lines = [
        json.dumps(RECORDS[0]).encode(),
        b"",
        b"   ",
        b'{"broken": ',
        b'{"prompt": "caf\xe9", "completion": "ok"}',  # Latin-1 byte in a UTF-8 file
        b"[1, 2]",
        json.dumps(RECORDS[2]).encode(),
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    got = list(iter_records(tmp_path / "a.jsonl"))
    assert [r.index for r in got] == [0, 1, 2, 3, 4]
    assert [r.error.reason if r.error else None for r in got] == [None, "invalid_json", "invalid_utf8", None, None]
    assert got[1].raw == '{"broken":'
    assert "\ufffd" in got[2].raw_text()  # the bad byte is shown, not dropped
    assert got[3].value == [1, 2]  # valid JSON; format detection refuses it later
    assert got[4].value == RECORDS[2]


def test_invalid_utf8_inside_a_json_array_rejects_only_that_element(tmp_path):
    good = json.dumps(RECORDS[0]).encode()
    data = b"[" + good + b',\n{"prompt": "caf\xe9", "completion": "x"},\n' + good + b"]"
    (tmp_path / "a.json").write_bytes(data)
    got = list(iter_records(tmp_path / "a.json"))
    assert [r.error.reason if r.error else None for r in got] == [None, "invalid_utf8", None]
    assert got[2].value == RECORDS[0]
    assert got[1].raw_text().encode("utf-8")  # storable text


@pytest.mark.parametrize(
    "text, kept, reason",
    [
        ('[{"a": 1}, {"b": 2}', 2, "invalid_json"),  # truncated: no closing bracket
        ('[{"a": 1}, {"b": 2, }, {"c": 3}]', 1, "invalid_json"),  # broken element: the rest cannot be split
        ('[{"a": 1} {"b": 2}]', 1, "invalid_json"),  # missing comma
        ('[{"a": 1}] trailing', 1, "invalid_json"),  # text after the array
    ],
)
def test_broken_json_array_keeps_what_came_before_and_rejects_the_rest_once(tmp_path, text, kept, reason):
    (tmp_path / "a.json").write_text(text)
    got = list(iter_records(tmp_path / "a.json"))
    assert [r.error is None for r in got] == [True] * kept + [False]
    assert got[-1].error.reason == reason
    assert got[-1].index == kept


def test_oversized_line_is_rejected_and_the_next_line_still_read(tmp_path):
    big = json.dumps({"prompt": "x" * 5000, "completion": "y"})
    (tmp_path / "a.jsonl").write_text(big + "\n" + json.dumps(RECORDS[0]) + "\n")
    got = list(iter_records(tmp_path / "a.jsonl", max_record_bytes=1000))
    assert got[0].error.reason == "record_too_large"
    assert got[1].value == RECORDS[0] and got[1].index == 1


def test_empty_files_hold_no_records(tmp_path):
    for name in ("e.jsonl", "e.json"):
        (tmp_path / name).write_text("\n  \n")
        assert values(tmp_path / name) == []


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("data.csv", b"a,b\n1,2\n", "not a supported input"),
        ("notes.txt", b"hello", "not a supported input"),
        ("fake.parquet", b"not parquet at all", "not a Parquet file"),
        ("fake.jsonl.gz", b'{"a": 1}\n', "not gzip-compressed"),
        ("fake.jsonl.zst", b'{"a": 1}\n', "not zstd-compressed"),
        ("scalar.json", b'"just a string"', "neither a JSON array nor JSON objects"),
    ],
)
def test_unsupported_containers_raise_one_sentence_naming_the_file(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=words) as caught:
        list(iter_records(path))
    assert str(path) in str(caught.value)


def test_folder_that_is_not_a_saved_dataset_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="not a datasets save_to_disk folder"):
        container_of(tmp_path)


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstandard.ZstdCompressor().compress)])
def test_truncated_compressed_stream_is_an_input_error_not_a_quiet_end(tmp_path, suffix, compress):
    data = compress(jsonl_bytes(RECORDS * 2000))
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"cut.jsonl{suffix}"):
        list(iter_records(path))


def test_concatenated_zstd_frames_are_all_read(tmp_path):
    # what `zstd -T` / pzstd and appending writers produce
    compress = zstandard.ZstdCompressor().compress
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(compress(jsonl_bytes(RECORDS)) + compress(jsonl_bytes(RECORDS[::-1])))
    assert values(path) == RECORDS + RECORDS[::-1]

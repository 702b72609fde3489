"""fsutil's helpers that the stages build on: read-ahead of record batches, the work files' codec."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.fsutil import compression_of, read_ahead


def test_read_ahead_gives_every_item_in_order():
    assert list(read_ahead(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(read_ahead([])) == []


def test_read_ahead_raises_the_producer_s_error_where_it_happened():
    def items():
        yield from (1, 2)
        raise ValueError("batch 3 is damaged")

    got = []
    with pytest.raises(ValueError, match="batch 3 is damaged"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1, 2]


def test_leaving_early_stops_the_producer_a_few_items_ahead():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in read_ahead(items(), depth=2):
        if item == 5:
            break
    assert len(produced) <= 5 + 1 + 2
    assert not [t for t in threading.enumerate() if t.name.startswith("sftkit-read-ahead")]


def test_compression_of_names_the_codec_as_the_writer_takes_it(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    for codec in ("zstd", "none", "snappy"):
        pq.write_table(table, tmp_path / f"{codec}.parquet", compression=codec)
        assert compression_of(tmp_path / f"{codec}.parquet") == codec
    pq.ParquetWriter(tmp_path / "empty.parquet", table.schema, compression="none").close()  # no row group
    assert compression_of(tmp_path / "empty.parquet") == "zstd"
    assert compression_of(pq.read_metadata(tmp_path / "zstd.parquet")) == "zstd"  # from metadata already read

"""The tokenize stage and the shard writer: real Parquet in, contract shards out."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import SFTConfig, ShardConfig
from pipeline.fsutil import TMP_PREFIX, sha256_file
from pipeline.schema import make_message as msg
from pipeline.shards import ShardStream, read_tokenized, split_of, write_shards
from pipeline.tokenize import tokenize_stage


def conversation_rows(source: str, count: int, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "数据", "🙂", "tokens", "shard"]
    rows = []
    for index in range(count):
        messages = [
            msg("user", f"Question {index}: " + " ".join(rng.choices(words, k=rng.randint(3, 30)))),
            msg("assistant", f"Answer {index}: " + " ".join(rng.choices(words, k=rng.randint(3, 60)))),
        ]
        rows.append(
            {
                schema.ID: schema.conversation_id(messages),
                schema.SOURCE: source,
                schema.SOURCE_INDEX: index,
                schema.MESSAGES: messages,
                schema.TOOLS: None,
            }
        )
    return rows


def write_canonical(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return path


@pytest.fixture()
def canonical(tmp_path) -> Path:
    rows = conversation_rows("chat.jsonl", 60)
    # hard rows: one too long, one with nothing to train, one whose template render fails
    rows[5][schema.MESSAGES] = [msg("user", "long " * 3000), msg("assistant", "x")]
    rows[9][schema.MESSAGES] = [msg("user", "hi"), msg("assistant", "no", train=False)]
    rows[12][schema.MESSAGES] = [msg("user", "call"), msg("assistant", "", tool_calls="{not json")]
    return write_canonical(tmp_path / "canonical.parquet", rows)


def config(**tokenize) -> SFTConfig:
    cfg = SFTConfig()
    cfg.tokenize = cfg.tokenize.model_copy(update={"max_length": 512, "num_proc": 1, **tokenize})
    return cfg


def test_tokenize_stage_writes_contract_rows_and_rejects_with_reasons(tmp_path, canonical, bpe_tokenizer_path):
    out, rejected = tmp_path / "tok.arrow", tmp_path / "rejected" / "tok.parquet"
    stats = tokenize_stage(canonical, out, rejected, config(), tokenizer=str(bpe_tokenizer_path))
    stats.check_conservation()
    assert (stats.name, stats.records_in, stats.records_out) == ("tokenize", 60, 57)
    assert dict(stats.rejected) == {"too_long": 1, "no_trainable_tokens": 1, "template_error": 1}

    table = read_tokenized(out)
    assert table.schema.equals(schema.SHARD_SCHEMA)
    assert stats.extra["tokens"] == pa.compute.sum(table[schema.LENGTH]).as_py()
    assert stats.extra["trainable_tokens"] == pa.compute.sum(table[schema.NUM_TRAINABLE]).as_py()
    for row in table.to_pylist():
        assert len(row[schema.INPUT_IDS]) == len(row[schema.LABELS]) == row[schema.LENGTH] <= 512
        labels = np.array(row[schema.LABELS])
        assert row[schema.NUM_TRAINABLE] == int((labels != schema.IGNORE_INDEX).sum()) > 0
        trained = labels != schema.IGNORE_INDEX
        assert (labels[trained] == np.array(row[schema.INPUT_IDS])[trained]).all()

    quarantine = {r[schema.SOURCE_INDEX]: r for r in pq.read_table(rejected).to_pylist()}
    assert {i: (r[schema.STAGE], r[schema.REASON]) for i, r in quarantine.items()} == {
        5: ("tokenize", "too_long"),
        9: ("tokenize", "no_trainable_tokens"),
        12: ("template", "template_error"),
    }
    assert "long long" in quarantine[5][schema.RAW] and quarantine[5][schema.DETAIL]
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_tokenize_stage_output_does_not_depend_on_workers_or_batch_size(tmp_path, canonical, bpe_tokenizer_path, workers):
    single = tmp_path / "single.arrow"
    tokenize_stage(canonical, single, tmp_path / "r1.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    pooled = tmp_path / "pooled.arrow"
    stats = tokenize_stage(
        canonical, pooled, tmp_path / "r2.parquet", config(num_proc=3, batch_size=7, workers=workers), tokenizer=str(bpe_tokenizer_path)
    )
    assert stats.records_out == 57
    assert read_tokenized(single).equals(read_tokenized(pooled))
    assert pq.read_table(tmp_path / "r1.parquet").equals(pq.read_table(tmp_path / "r2.parquet"))


def test_tokenize_worker_processes_do_not_run_a_script_without_a_main_guard_again(tmp_path, canonical, bpe_tokenizer_path, repo_root):
    """``workers: processes`` from a user's plain script (top-level code, no main guard): the
    workers start as ``python -m pipeline.workers``, so the script runs once and finishes, where
    a multiprocessing spawn or forkserver pool would import it again in every worker and fail."""
    import subprocess
    import sys

    script = tmp_path / "my_refresh.py"
    script.write_text(
        "from pathlib import Path\n"
        "from pipeline.config import SFTConfig\n"
        "from pipeline.tokenize import tokenize_stage\n"
        "config = SFTConfig()\n"
        "config.tokenize.num_proc, config.tokenize.workers, config.tokenize.max_length = 2, 'processes', 512\n"
        "config.tokenize.batch_size = 7  # several batches: the workers start\n"
        f"here = Path({str(tmp_path)!r})\n"
        "with open(here / 'runs.txt', 'a') as log:\n"
        "    log.write('run\\n')\n"
        f"stats = tokenize_stage(here / 'canonical.parquet', here / 't.arrow', here / 'r.parquet', config, tokenizer={str(bpe_tokenizer_path)!r})\n"
        "print(stats.records_out)\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["57"]
    assert (tmp_path / "runs.txt").read_text() == "run\n"  # the script ran once
    single = tmp_path / "single.arrow"
    tokenize_stage(canonical, single, tmp_path / "r1.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    assert read_tokenized(single).equals(read_tokenized(tmp_path / "t.arrow"))


def test_tokenize_stage_on_an_empty_input_writes_an_empty_file(tmp_path, bpe_tokenizer_path):
    empty = write_canonical(tmp_path / "empty.parquet", [])
    stats = tokenize_stage(empty, tmp_path / "out.arrow", tmp_path / "rej.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    assert (stats.records_in, stats.records_out) == (0, 0)
    assert read_tokenized(tmp_path / "out.arrow").schema.equals(schema.SHARD_SCHEMA)
    assert not (tmp_path / "rej.parquet").exists()


def test_tokenize_stage_names_an_unreadable_input(tmp_path, bpe_tokenizer_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        tokenize_stage(bad, tmp_path / "o.arrow", tmp_path / "r.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    assert not (tmp_path / "o.arrow").exists()


@pytest.fixture()
def tokenized(tmp_path, bpe_tokenizer_path) -> list[Path]:
    paths = []
    for name, count, seed in (("a.jsonl", 130, 1), ("b.json", 75, 2)):
        canonical_path = write_canonical(tmp_path / f"{name}.canonical.parquet", conversation_rows(name, count, seed=seed))
        out = tmp_path / f"{name}.tok.arrow"
        tokenize_stage(canonical_path, out, tmp_path / f"{name}.rej.parquet", config(), tokenizer=str(bpe_tokenizer_path))
        paths.append(out)
    return paths


METADATA = {
    schema.META_TOKENIZER_NAME: b"bundled",
    schema.META_TOKENIZER_FINGERPRINT: b"tokfp",
    schema.META_TEMPLATE_NAME: b"auto",
    schema.META_TEMPLATE_FINGERPRINT: b"tplfp",
}


def test_shards_layout_entries_and_metadata(tmp_path, tokenized):
    shard_config = ShardConfig(val_fraction=0.2, target_rows=50)
    entries = write_shards(tokenized, tmp_path / "data", SFTConfig(shards=shard_config), metadata=METADATA).entries
    assert sum(e["rows"] for e in entries) == 205
    for entry in entries:
        path = tmp_path / "data" / entry["path"]
        assert entry["path"].startswith("shards/") and path.name.startswith(entry["split"] + "-")
        assert 0 < entry["rows"] <= 50
        assert entry["sha256"] == sha256_file(path)
        table = pq.read_table(path)
        assert table.num_rows == entry["rows"]
        assert entry["tokens"] == sum(table[schema.LENGTH].to_pylist())
        assert entry["trainable_tokens"] == sum(table[schema.NUM_TRAINABLE].to_pylist())
        metadata = pq.read_schema(path).metadata
        for key, value in METADATA.items():
            assert metadata[key] == value
        assert metadata[schema.META_SPLIT] == entry["split"].encode()
        assert {split_of(i, 0.2) for i in table[schema.ID].to_pylist()} == {entry["split"]}
    names = [e["path"] for e in entries if e["split"] == "train"]
    assert names == [f"shards/train-{i:05d}.parquet" for i in range(len(names))]
    assert 10 < sum(e["rows"] for e in entries if e["split"] == "val") < 80
    assert not list((tmp_path / "data").rglob(f"{TMP_PREFIX}*"))


def test_same_input_gives_byte_identical_shards_in_any_input_order(tmp_path, tokenized):
    shard_config = ShardConfig(val_fraction=0.1, target_rows=64)
    first = write_shards(tokenized, tmp_path / "one", SFTConfig(shards=shard_config), metadata=METADATA).entries
    second = write_shards(list(reversed(tokenized)), tmp_path / "two", SFTConfig(shards=shard_config), metadata=METADATA).entries
    assert [(e["path"], e["sha256"]) for e in first] == [(e["path"], e["sha256"]) for e in second]


def test_shard_bytes_do_not_depend_on_the_tokenize_batch_size(tmp_path, bpe_tokenizer_path):
    # The batch size decides how the tokenized rows are chunked in memory; the Parquet writer
    # cuts pages at chunk boundaries, so the shard writer must not let that reach the bytes.
    # (Row groups of a few MB, so that pages fill up and are cut: long rows, one row group.)
    rows = conversation_rows("c.jsonl", 240, seed=3)
    for row in rows:
        row[schema.MESSAGES][1]["content"] *= 40
    canonical_path = write_canonical(tmp_path / "c.parquet", rows)
    hashes = []
    for batch_size in (7, 1000):
        out = tmp_path / f"tok-{batch_size}.arrow"
        tokenize_stage(
            canonical_path,
            out,
            tmp_path / f"r-{batch_size}.parquet",
            config(batch_size=batch_size, max_length=32_768),
            tokenizer=str(bpe_tokenizer_path),
        )
        entries = write_shards(
            [out], tmp_path / f"data-{batch_size}", SFTConfig(shards=ShardConfig(val_fraction=0.1)), metadata=METADATA
        ).entries
        hashes.append([(e["path"], e["sha256"]) for e in entries])
    assert hashes[0] == hashes[1]


def test_a_truncated_work_file_is_named_not_half_read(tmp_path, tokenized):
    broken = tmp_path / "broken.arrow"
    data = tokenized[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a writer killed halfway (atomic_path never renames such a file)
    with pytest.raises(ValueError, match="broken.arrow"):
        read_tokenized(broken)


def test_threaded_tokenizing_leaves_tokenizers_parallelism_as_it_was(tmp_path, canonical, bpe_tokenizer_path, monkeypatch):
    for before in (None, "true"):
        if before is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
        stats = tokenize_stage(
            canonical,
            tmp_path / f"t-{before}.arrow",
            tmp_path / f"r-{before}.parquet",
            config(num_proc=2, batch_size=8, workers="threads"),
            tokenizer=str(bpe_tokenizer_path),
        )
        assert stats.records_out == 57
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before
    # Two stages side by side (Prefect's thread runner): the last one out restores the value.
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(
                tokenize_stage,
                canonical,
                tmp_path / f"p{i}.arrow",
                tmp_path / f"pr{i}.parquet",
                config(num_proc=2, batch_size=4 + i, workers="threads"),
                tokenizer=str(bpe_tokenizer_path),
            )
            for i in range(2)
        ]
        assert [run.result().records_out for run in runs] == [57, 57]
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "true"


def test_a_callers_own_gc_freeze_survives_the_stage(tmp_path, canonical, bpe_tokenizer_path):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        tokenize_stage(canonical, tmp_path / "t.arrow", tmp_path / "r.parquet", config(), tokenizer=str(bpe_tokenizer_path))
        # still frozen (a few frozen objects may have been freed meanwhile); unfreeze would give 0
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()
    tokenize_stage(canonical, tmp_path / "t2.arrow", tmp_path / "r2.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    assert gc.get_freeze_count() == 0  # and a stage leaves nothing frozen behind it


def test_gather_rows_refuses_rows_outside_the_table():
    from pipeline.fsutil import gather_rows

    table = pa.table({"x": list(range(10))})
    assert gather_rows(table, np.array([3, 4, 5, 9, 0])).column("x").to_pylist() == [3, 4, 5, 9, 0]
    with pytest.raises(IndexError):
        gather_rows(table, np.array([8, 9, 10]))


def test_split_is_by_id_not_position():
    ids = [f"{i:032x}" for i in range(4000)]
    val = {i for i in ids if split_of(i, 0.1) == "val"}
    assert 300 < len(val) < 500
    # the same id lands in the same split whatever else is in the run
    assert {i for i in reversed(ids[:500]) if split_of(i, 0.1) == "val"} == val & set(ids[:500])
    assert not any(split_of(i, 0.0) == "val" for i in ids)


def test_start_index_appends_after_existing_files(tmp_path, tokenized):
    shard_config = ShardConfig(val_fraction=0.1, target_rows=1000)
    entries = write_shards(
        tokenized[:1], tmp_path / "data", SFTConfig(shards=shard_config), metadata=METADATA, start_index={"train": 3, "val": 1}
    ).entries
    assert {e["path"] for e in entries} == {"shards/train-00003.parquet", "shards/val-00001.parquet"}


def test_shards_load_with_polars_and_datasets(tmp_path, tokenized):
    import datasets
    import polars as pl

    entries = write_shards(
        tokenized, tmp_path / "data", SFTConfig(shards=ShardConfig(val_fraction=0.1, target_rows=80)), metadata=METADATA
    ).entries
    total = sum(e["rows"] for e in entries)
    lazy = pl.scan_parquet(str(tmp_path / "data" / "shards" / "*.parquet"))
    frame = lazy.select(pl.col(schema.LENGTH).sum(), pl.len()).collect()
    assert frame.row(0) == (sum(e["tokens"] for e in entries), total)
    train = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "data" / "shards" / "train-*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert len(train) == sum(e["rows"] for e in entries if e["split"] == "train")
    row = train[0]
    assert len(row[schema.INPUT_IDS]) == len(row[schema.LABELS]) == row[schema.LENGTH]
    assert row[schema.MESSAGES][0]["role"] == "user"


def test_no_rows_no_files(tmp_path, bpe_tokenizer_path):
    empty = write_canonical(tmp_path / "empty.parquet", [])
    tokenize_stage(empty, tmp_path / "t.arrow", tmp_path / "r.parquet", config(), tokenizer=str(bpe_tokenizer_path))
    assert write_shards([tmp_path / "t.arrow"], tmp_path / "data", SFTConfig(shards=ShardConfig()), metadata=METADATA).entries == []


def test_real_data_end_to_end(tmp_path, real_data_dir, bpe_tokenizer_path):
    """The real instruction data (Alpaca, ShareGPT, Glaive tool calls) through ingest -> tokenize -> shards."""
    from pipeline.config import IngestConfig
    from pipeline.ingest import ingest_file

    tokenized_paths = []
    for path in sorted(real_data_dir.glob("*.json")):
        canonical_path = tmp_path / f"{path.stem}.canonical.parquet"
        ingest_file(path, canonical_path, tmp_path / f"{path.stem}.ingest-rej.parquet", SFTConfig(ingest=IngestConfig()), source=path.name)
        out, rejected = tmp_path / f"{path.stem}.tok.arrow", tmp_path / f"{path.stem}.rej.parquet"
        stats = tokenize_stage(canonical_path, out, rejected, config(max_length=4096), tokenizer=str(bpe_tokenizer_path))
        # real data must never hit an unverifiable mask or a template failure
        assert set(stats.rejected) <= {"too_long"}, json.dumps(stats.to_dict())
        tokenized_paths.append(out)
    entries = write_shards(tokenized_paths, tmp_path / "data", SFTConfig(shards=ShardConfig()), metadata=METADATA).entries
    assert sum(e["trainable_tokens"] for e in entries) > 0


def _write_ipc(path: Path, table: pa.Table, batch_rows: int | None = None) -> Path:
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    return path


def test_shard_bytes_do_not_depend_on_how_the_rows_are_cut_into_work_files(tmp_path, tokenized):
    # The writer streams the work files one at a time (its memory does not grow with the run),
    # and a file already in key order one record batch at a time; files of contiguous rows, files
    # in any order, files of small record batches, files whose own rows are out of order and files
    # whose rows interleave must all give the shards one sorted table gives. Records of several rows (one per trained turn) are never
    # split between two shard files, even where a file or a row group ends inside one.
    table = pa.concat_tables([read_tokenized(path) for path in tokenized])
    turns = table.filter(pa.compute.equal(pa.compute.bit_wise_and(table[schema.SOURCE_INDEX], 3), 0))
    turns = turns.set_column(turns.schema.get_field_index(schema.TURN), schema.TURN, pa.array([1] * turns.num_rows, pa.int32()))
    table = pa.concat_tables([table, turns.cast(table.schema)])
    order = pa.compute.sort_indices(table, [(schema.SOURCE, "ascending"), (schema.SOURCE_INDEX, "ascending"), (schema.TURN, "ascending")])
    table = table.take(order)
    n = table.num_rows
    layouts = {
        "one file": [table],
        "contiguous pieces, reversed": [table.slice(170, n - 170), table.slice(61, 109), table.slice(0, 61)],
        "interleaved rows": [table.take(list(range(0, n, 2))), table.take(list(range(1, n, 2)))],
        "small record batches": [table],
        "rows out of order in each file": [
            table.slice(0, 100).take(list(range(99, -1, -1))),
            table.slice(100).take(list(range(n - 101, -1, -1))),
        ],
    }
    shard_config = SFTConfig(shards=ShardConfig(val_fraction=0.2, target_rows=50, row_group_rows=16))
    written = {}
    for name, pieces in layouts.items():
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        batch_rows = 7 if name == "small record batches" else None  # records of several rows cross batches
        paths = [_write_ipc(tmp_path / f"{folder.name}-{i}.arrow", piece, batch_rows) for i, piece in enumerate(pieces)]
        result = write_shards(paths, folder, shard_config, metadata=METADATA)
        assert result.stats.records_in == result.stats.records_out == 205
        written[name] = [(e["path"], e["rows"], e["records"], e["sha256"]) for e in result.entries]
        seen: dict[tuple, str] = {}
        for entry in result.entries:
            shard = pq.read_table(folder / entry["path"])
            assert pq.ParquetFile(folder / entry["path"]).metadata.row_group(0).num_rows == min(16, entry["rows"])
            for key in zip(shard[schema.SOURCE].to_pylist(), shard[schema.SOURCE_INDEX].to_pylist()):
                assert seen.setdefault(key, entry["path"]) == entry["path"], f"record {key} split across files"
    assert written["contiguous pieces, reversed"] == written["one file"]
    assert written["interleaved rows"] == written["one file"]
    assert written["small record batches"] == written["one file"]
    assert written["rows out of order in each file"] == written["one file"]
    assert sum(rows for _, rows, _, _ in written["one file"]) == n

    # The same rows handed over as the tokenize steps make them (tables of 7 rows, records of
    # several rows crossing tables) give the same files, byte for byte, moved into place.
    folder = tmp_path / "streamed"
    stream = ShardStream(folder / ".work" / "stream", shard_config.shards, METADATA, {})
    for start in range(0, n, 7):
        stream.add(table.slice(start, 7))
    result = stream.finish(folder)
    assert stream.broken is None and result.stats.records_in == result.stats.records_out == 205
    assert [(e["path"], e["rows"], e["records"], e["sha256"]) for e in result.entries] == written["one file"]
    assert all(sha256_file(folder / e["path"]) == e["sha256"] for e in result.entries)
    assert not (folder / ".work" / "stream").exists()


def test_a_shard_stream_given_rows_out_of_key_order_stops_and_removes_its_files(tmp_path, tokenized):
    """The tokenize steps of a run may come in another order than their rows' keys (inputs listed
    in another order, a chunk made by an earlier run): the stream then says so and leaves nothing,
    and the shards step writes the files from the work files instead."""
    table = pa.concat_tables([read_tokenized(path) for path in tokenized])
    order = pa.compute.sort_indices(table, [(schema.SOURCE, "ascending"), (schema.SOURCE_INDEX, "ascending")])
    table = table.take(order)
    config = ShardConfig(val_fraction=0.2, target_rows=20, row_group_rows=8)
    for name, pieces in {
        "a later table starts before the last": [table.slice(100), table.slice(0, 100)],
        "a table's own rows out of order": [table.slice(0, 60), table.slice(60).take(list(range(table.num_rows - 61, -1, -1)))],
    }.items():
        staging = tmp_path / name.replace(" ", "-") / "stream"
        stream = ShardStream(staging, config, METADATA, {"train": 2})
        for piece in pieces:
            stream.add(piece)
        assert stream.broken == "rows came out of key order", name
        assert not staging.exists(), name  # files finished before it (several: 20 rows each) went too
        stream.add(table.slice(0, 10))  # a no-op now
        assert not staging.exists(), name


def test_a_shard_stream_that_fails_writing_stops_instead_of_raising(tmp_path, tokenized, monkeypatch):
    import pipeline.shards as shards

    real = shards.gather_rows
    calls = {"n": 0}

    def failing(table, rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(table, rows)

    monkeypatch.setattr(shards, "gather_rows", failing)
    staging = tmp_path / "stream"
    stream = ShardStream(staging, ShardConfig(target_rows=20, row_group_rows=8), METADATA, {})
    for path in tokenized:
        stream.add(read_tokenized(path))
    assert stream.broken == "writing failed: disk full" and not staging.exists()


def test_a_shard_writer_that_fails_halfway_leaves_no_file_that_looks_complete(tmp_path, tokenized, monkeypatch):
    import pipeline.shards as shards

    calls = {"n": 0}
    real = shards.gather_rows

    def failing(table, rows):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full")
        return real(table, rows)

    monkeypatch.setattr(shards, "gather_rows", failing)
    with pytest.raises(OSError, match="disk full"):
        write_shards(tokenized, tmp_path / "data", SFTConfig(shards=ShardConfig(target_rows=20, row_group_rows=8)), metadata=METADATA)
    written = sorted(p.name for p in (tmp_path / "data" / "shards").iterdir())
    assert written and not any(name.startswith(TMP_PREFIX) for name in written)
    for name in written:  # the files finished before the failure are whole
        assert pq.read_table(tmp_path / "data" / "shards" / name).num_rows > 0


def test_streaming_a_parquet_file_holds_a_batch_not_the_file(tmp_path):
    """open_parquet (what every stage streams its chunk through) keeps no more than a few row
    groups in Arrow memory, however long the file: pyarrow's pre-buffering reader held the
    whole file by its end, so a stage's memory grew with its chunk."""
    import numpy as np
    import pyarrow as pa

    from pipeline.fsutil import open_parquet

    rng = np.random.default_rng(0)
    path = tmp_path / "long.parquet"
    with pq.ParquetWriter(path, pa.schema([("values", pa.list_(pa.uint32()))]), compression="none") as writer:
        for _ in range(40):  # 40 row groups of 1,000 rows of 250 random uint32: about 40 MB
            values = rng.integers(0, 2**32, size=250_000, dtype=np.uint32)
            offsets = np.arange(0, 250_001, 250, dtype=np.int32)
            writer.write_table(pa.table({"values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}))
    size = path.stat().st_size
    baseline = pa.total_allocated_bytes()

    def most_held(source) -> int:
        held = 0
        for batch in source.iter_batches(batch_size=500):
            held = max(held, pa.total_allocated_bytes() - baseline)
            del batch
        return held

    assert most_held(open_parquet(path)) < size / 8  # pyarrow's default reader: more than half

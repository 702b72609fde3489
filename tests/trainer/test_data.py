"""ShardDataset: memory-mapped rows equal the Parquet rows, shards are verified, companions cached."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.manifest import read_manifest, write_manifest
from tests.support.training import corpus_dataset, corpus_rows, write_dataset
from trainer import ShardDataset
from trainer.batching import PlannedBatches, plan_packed
from trainer.companion import user_cache_root
from trainer.data import DatasetError


@pytest.fixture()
def dataset_dir(tmp_path, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path / "data", bpe_tokenizer, bpe_tokenizer_path, repeat=2, rows_per_shard=30)


def test_rows_match_the_parquet_shards_across_shards(dataset_dir, bpe_tokenizer):
    ds = ShardDataset(dataset_dir, "train", tokenizer=bpe_tokenizer)
    entries = [s for s in read_manifest(dataset_dir)["shards"] if s["split"] == "train"]
    assert len(entries) > 1, "the fixture should span several shards"
    expected = []
    for entry in entries:
        table = pq.read_table(dataset_dir / entry["path"], columns=["input_ids", "labels"])
        expected += list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))
    assert len(ds) == len(expected)
    assert ds.lengths.tolist() == [len(ids) for ids, _ in expected]
    for i in (0, 1, 29, 30, 31, len(ds) - 1, -1):
        row = ds[i]
        assert row["input_ids"].tolist() == expected[i][0]
        assert row["labels"].tolist() == expected[i][1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_companions_are_cached_by_shard_hash_and_reused(dataset_dir):
    ShardDataset(dataset_dir, "train")
    manifest = read_manifest(dataset_dir)
    cache = dataset_dir / ".cache" / "mmap"
    assert sorted(p.name for p in cache.iterdir()) == sorted(s["sha256"] for s in manifest["shards"] if s["split"] == "train")
    first = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    ShardDataset(dataset_dir, "train")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == first


def test_unwritable_dataset_folder_falls_back_to_the_user_cache(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path / "user-cache"))
    (dataset_dir / ".cache").write_text("not a folder")  # DIR/.cache cannot be created as a folder
    ds = ShardDataset(dataset_dir, "val")
    assert len(ds) > 0 and ds[0]["input_ids"].dtype == np.int32
    assert any(user_cache_root().iterdir())


def test_corrupted_shard_is_refused_with_its_name(dataset_dir):
    shard = dataset_dir / "shards" / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train-00001\.parquet is corrupted"):
        ShardDataset(dataset_dir, "train")
    ShardDataset(dataset_dir, "val")  # the other split is untouched and still opens


def test_missing_shard_is_refused_with_its_name(dataset_dir):
    (dataset_dir / "shards" / "val-00000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"val-00000\.parquet .* is missing"):
        ShardDataset(dataset_dir, "val")


def test_tokenizer_fingerprint_mismatch_is_refused(dataset_dir, bpe_tokenizer):
    manifest = read_manifest(dataset_dir)
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    write_manifest(dataset_dir, manifest)
    ShardDataset(dataset_dir, "train")  # without a tokenizer there is nothing to compare
    with pytest.raises(DatasetError, match="tokenizer mismatch"):
        ShardDataset(dataset_dir, "train", tokenizer=bpe_tokenizer)


def test_manifest_path_outside_the_dataset_is_refused(dataset_dir):
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../elsewhere.parquet"
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        ShardDataset(dataset_dir, "train")


def test_pickled_dataset_reopens_its_maps_and_dataloader_workers_agree(dataset_dir):
    ds = ShardDataset(dataset_dir, "train")
    ds[0]  # maps are open in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert all(s._maps is None for s in clone.shards)
    assert clone[5]["labels"].tolist() == ds[5]["labels"].tolist()

    plan = plan_packed(ds.lengths, np.arange(len(ds)), 512, rng=None)
    batches = PlannedBatches(ds, plan, pad_token_id=0)
    in_process = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0))
    in_workers = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    assert len(in_process) == len(in_workers) == len(plan)
    for a, b in zip(in_process, in_workers):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_empty_split_is_an_empty_dataset(tmp_path, bpe_tokenizer, bpe_tokenizer_path):
    rows = corpus_rows(bpe_tokenizer)[:5]
    data = write_dataset(tmp_path / "d", rows, [], tokenizer=bpe_tokenizer, tokenizer_name=bpe_tokenizer_path)
    assert len(ShardDataset(data, "val")) == 0
    assert len(ShardDataset(data, "train")) == 5

"""`sftkit prepare` as a user meets it: the summary table, and one clear sentence on bad paths."""

from __future__ import annotations

import glob

import polars as pl
from typer.testing import CliRunner

from flows.cli import app
from pipeline.manifest import read_manifest

runner = CliRunner()


def test_prepare_samples_prints_summary_and_conserves(tmp_path, samples_dir, bpe_tokenizer_path):
    out = tmp_path / "data"
    inputs = sorted(glob.glob(str(samples_dir / "inputs" / "*")))
    result = runner.invoke(
        app,
        [
            "prepare",
            *inputs,
            "--tokenizer",
            str(bpe_tokenizer_path),
            "--out",
            str(out),
            "--no-flow",
            "--config",
            str(samples_dir / "demo.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    counts = manifest["counts"]
    rejected = sum(n for reasons in counts["rejected"].values() for n in reasons.values())
    assert counts["read"] == counts["kept"] + rejected
    assert "read" in result.output and str(counts["read"]) in result.output
    assert "rejected: ingest / invalid_json" in result.output
    # every sample format contributed kept rows
    sources = set(inputs)
    kept_sources = set(pl.scan_parquet(str(out / "shards" / "*.parquet")).select("source").collect()["source"].to_list())
    assert kept_sources == sources


def test_prepare_missing_input_exits_2_naming_the_file(tmp_path, bpe_tokenizer_path):
    missing = tmp_path / "no-such-file.jsonl"
    result = runner.invoke(app, ["prepare", str(missing), "--tokenizer", str(bpe_tokenizer_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no-such-file.jsonl" in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_prepare_unsupported_container_exits_2(tmp_path, bpe_tokenizer_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    result = runner.invoke(app, ["prepare", str(bad), "--tokenizer", str(bpe_tokenizer_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "notes.txt" in result.output

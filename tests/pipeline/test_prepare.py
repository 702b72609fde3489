"""End-to-end prepare in one process: layout, conservation, incremental refresh, crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import outdir, schema
from pipeline.config import SFTConfig
from pipeline.dedup import load_index
from pipeline.manifest import read_manifest
from pipeline.steps import prepare
from tests.support.inputs import alpaca_records, make_inputs, shard_bytes, shard_rows, write_json, write_jsonl


def _config(**shards) -> SFTConfig:
    return SFTConfig.model_validate({"shards": {"val_fraction": 0.2, **shards}})


LONG_ANSWER_WORDS = (
    "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune orbit moon ring storm crater valley "
    "ocean ice dust gas rock metal heat cold light dark day night year season tilt axis pole core "
    "mantle crust magnetic field solar wind comet asteroid belt probe lander rover telescope"
).split()


def _rejected_rows(data_dir: Path) -> int:
    manifest = read_manifest(data_dir)
    return sum(pq.ParquetFile(data_dir / r["path"]).metadata.num_rows for r in manifest["rejected"])


def test_prepare_writes_contract_layout_and_conserves_records(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())

    assert (out / "manifest.json").is_file()
    shard_files = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert shard_files and all(name.startswith(("train-", "val-")) for name in shard_files)
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}

    # 12 alpaca + 6 sharegpt + 1 cross-file duplicate + 2 bad lines
    assert manifest["counts"]["read"] == 21
    kept = sum(s["rows"] for s in manifest["shards"])
    assert kept == manifest["counts"]["kept"]
    assert kept + _rejected_rows(out) == 21
    reasons = {(stage, reason) for stage, by in manifest["counts"]["rejected"].items() for reason in by}
    assert ("ingest", "invalid_json") in reasons
    assert ("ingest", "bad_turn_order") in reasons
    assert ("dedup", "exact_duplicate") in reasons
    assert [s["name"] for s in manifest["stages"]][:2] == ["ingest", "dedup"]
    if Path("/proc/self/clear_refs").exists():  # Linux: each stage's peak resident memory, a real figure
        assert all(10 * 2**20 < s["peak_rss_bytes"] < 64 * 2**30 for s in manifest["stages"])

    # Shards follow the contract and load with polars; labels line up with input_ids.
    frame = pl.scan_parquet(str(out / "shards" / "*.parquet")).collect()
    assert frame.height == kept
    assert set(frame.columns) >= {"id", "source", "source_index", "messages", "input_ids", "labels", "length", "num_trainable"}
    for row in frame.iter_rows(named=True):
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        assert row["num_trainable"] == sum(1 for label in row["labels"] if label != schema.IGNORE_INDEX) > 0
    meta = pq.read_schema(out / "shards" / shard_files[0]).metadata
    assert meta[schema.META_TOKENIZER_FINGERPRINT] == manifest["tokenizer"]["fingerprint"].encode()
    assert not (out / ".work").exists()


def test_unchanged_rerun_does_nothing_and_new_file_is_appended(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    before = shard_bytes(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    again = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    assert again["version"] == first["version"]
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes

    third = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    assert third["version"] == first["version"] + 1
    assert [i["source"] for i in third["inputs"]] == [str(p) for p in inputs]
    assert third["history"][-1]["read"] == 9  # only the new file was read
    after = shard_bytes(out)
    assert all(after[name] == data for name, data in before.items())  # old shards untouched
    assert len(after) > len(before)
    assert third["counts"]["read"] == third["counts"]["kept"] + _rejected_rows(out)
    # the exact duplicate in the new file was caught against the earlier run's kept rows
    assert third["counts"]["rejected"]["dedup"]["exact_duplicate"] == 1


def test_incremental_refresh_equals_full_rebuild(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    step = tmp_path / "step"
    prepare([str(inputs[0])], str(bpe_tokenizer_path), step, _config())
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), step, _config())
    full = tmp_path / "full"
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), full, _config())

    assert shard_rows(step) == shard_rows(full)
    assert read_manifest(step)["counts"]["rejected"] == read_manifest(full)["counts"]["rejected"]


def test_same_input_and_config_give_identical_shard_bytes(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), a, _config())
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), b, _config())
    assert shard_bytes(a) == shard_bytes(b)


def test_config_change_rebuilds_whole_dataset(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    rebuilt = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config(target_rows=3))
    assert rebuilt["history"][-1]["rebuild"] is True
    assert rebuilt["counts"]["read"] == first["counts"]["read"]  # not double counted
    assert len(rebuilt["shards"]) > len(first["shards"])
    assert all(s["rows"] <= 3 for s in rebuilt["shards"])
    listed = {s["path"] for s in rebuilt["shards"]}
    assert {f"shards/{p.name}" for p in (out / "shards").glob("*.parquet")} == listed


def test_missing_input_stops_with_one_clear_sentence(tmp_path, bpe_tokenizer_path):
    with pytest.raises(ValueError, match="nothing-here"):
        prepare([str(tmp_path / "nothing-here.jsonl")], str(bpe_tokenizer_path), tmp_path / "out")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["ingest", "tokenize"])
def test_killed_run_then_rerun_equals_clean_run(tmp_path, bpe_tokenizer_path, repo_root, kill_when):
    """kill -9 midway, run again: the same shards as a clean run, no partial file listed."""
    folder = tmp_path / "in"
    folder.mkdir()
    # Enough rows that the run takes a moment; several inputs so stages have several steps.
    inputs = [write_json(folder / f"part{i}.json", alpaca_records(i * 200, 200)) for i in range(4)]
    args = [str(p) for p in inputs] + ["--tokenizer", str(bpe_tokenizer_path), "--no-flow", "--val-fraction", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        _cli("prepare", *args, "--out", str(crashed)), cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    marker = crashed / ".work" / kill_when
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and any(marker.iterdir()):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "manifest.json").exists()

    clean = tmp_path / "clean"
    for out in (crashed, clean):  # the killed run again, and one never interrupted
        subprocess.run(
            _cli("prepare", *args, "--out", str(out)),
            cwd=repo_root,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    assert shard_bytes(crashed) == shard_bytes(clean)
    m_crashed, m_clean = read_manifest(crashed), read_manifest(clean)
    assert [s["sha256"] for s in m_crashed["shards"]] == [s["sha256"] for s in m_clean["shards"]]
    assert m_crashed["counts"] == m_clean["counts"]
    assert m_crashed["dedup_index"] == m_clean["dedup_index"]  # parts are named by their content
    leftovers = [p for p in crashed.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    json.loads((crashed / "manifest.json").read_text())


@pytest.mark.parametrize("tokenize_drops", [False, True], ids=["quality-drops", "quality-and-tokenize-drops"])
def test_dedup_index_remembers_only_rows_that_reached_the_shards(tmp_path, bpe_tokenizer_path, tokenize_drops):
    """A record dropped by quality or tokenize must not make its later, good near-copy a 'duplicate'."""
    folder = tmp_path / "in"
    folder.mkdir()
    refusal = {
        "instruction": "Tell me a joke about cats, please.",
        "input": "",
        "output": "As an AI language model, I cannot tell jokes about cats or anything else.",
    }
    records = alpaca_records(0, 5) + [refusal]
    if tokenize_drops:  # a well-formed answer past max_length: too_long at tokenize
        records.append(
            {
                "instruction": "List the planets with a note on each.",
                "input": "",
                "output": " ".join(random.Random(0).choices(LONG_ANSWER_WORDS, k=400)),
            }
        )
    first = write_json(folder / "first.json", records)
    out = tmp_path / "data"
    config = _config().model_copy(update={"tokenize": _config().tokenize.model_copy(update={"max_length": 256})})
    manifest = prepare([str(first)], str(bpe_tokenizer_path), out, config)
    assert manifest["counts"]["rejected"]["quality"]
    assert ("tokenize" in manifest["counts"]["rejected"]) == tokenize_drops
    indexed = set()
    for part in manifest["dedup_index"]:
        indexed |= set(load_index(out / "dedup_index", [part]).column("id").to_pylist())
    assert indexed == {row["id"] for row in shard_rows(out)}
    assert sorted(p.name for p in (out / "dedup_index").glob("part-*")) == sorted(manifest["dedup_index"])


def test_a_dedup_step_whose_kept_rows_are_gone_is_done_again(tmp_path, bpe_tokenizer_path, monkeypatch):
    """The dedup step leaves its index part to the end of the run (written from the signature
    files and which rows it kept); a rerun after a failure reuses the step only while those are
    still there, and the part holds what reached the shards either way."""
    from pipeline import steps

    first = write_json(tmp_path / "first.json", alpaca_records(0, 12) + alpaca_records(0, 3))
    out = tmp_path / "data"

    def fail(plan, upstream, stream_shards=False):
        raise RuntimeError("tokenizer gone")

    monkeypatch.setattr(steps, "run_tokenize", fail)
    with pytest.raises(RuntimeError, match="tokenizer gone"):
        prepare([str(first)], str(bpe_tokenizer_path), out, _config())
    monkeypatch.undo()
    kept_files = list((out / ".work" / "dedup").glob("*.kept.npy"))
    assert len(kept_files) == 1 and not list((out / "dedup_index").glob("part-*"))  # no part before the end
    kept_files[0].unlink()
    manifest = prepare([str(first)], str(bpe_tokenizer_path), out, _config())
    assert manifest["counts"]["rejected"]["dedup"] == {"exact_duplicate": 3}
    (part,) = manifest["dedup_index"]
    assert sorted(load_index(out / "dedup_index", [part]).column("id").to_pylist()) == sorted(row["id"] for row in shard_rows(out))


@pytest.mark.parametrize("target_rows", [50_000, 2], ids=["part beside one file", "part after many files"])
@pytest.mark.parametrize("failing", ["shard writer", "index part"])
def test_a_shards_step_failing_in_its_shards_or_its_index_part_raises_and_the_next_run_ends_clean(
    tmp_path, bpe_tokenizer_path, monkeypatch, failing, target_rows
):
    """The shards step writes the dedup index part, on a thread beside the shard files when they
    are fewer than the cores, else after them: a failure of either is raised (the other stops or
    finishes), nothing is published, and the next run's dataset holds exactly the parts its
    manifest lists, of the records in its shards."""
    from pipeline import shards
    from pipeline.dedup import index

    first = write_json(tmp_path / "first.json", alpaca_records(0, 12) + alpaca_records(0, 3))
    out = tmp_path / "data"

    def broken(*args, **kwargs):
        raise RuntimeError(f"{failing} broke")

    if failing == "shard writer":  # beside the tokenize step, then again in the shards step
        monkeypatch.setattr(shards, "_parquet_writer", broken)
    else:
        monkeypatch.setattr(index, "write_part_from", broken)
    with pytest.raises(RuntimeError, match=f"{failing} broke"):
        prepare([str(first)], str(bpe_tokenizer_path), out, _config(target_rows=target_rows))
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    manifest = prepare([str(first)], str(bpe_tokenizer_path), out, _config(target_rows=target_rows))
    assert (len(manifest["shards"]) > 2) == (target_rows == 2)
    (part,) = manifest["dedup_index"]
    assert sorted(p.name for p in (out / "dedup_index").iterdir()) == [part]
    assert sorted(load_index(out / "dedup_index", [part]).column("id").to_pylist()) == sorted(row["id"] for row in shard_rows(out))
    # its tokenize steps done before, the rerun's shards come from their work files: the same bytes
    prepare([str(first)], str(bpe_tokenizer_path), tmp_path / "fresh", _config(target_rows=target_rows))
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh")


def test_shard_files_written_beside_the_tokenize_steps_are_the_files_written_after_them(tmp_path, bpe_tokenizer_path, monkeypatch):
    """A run writes its shard files as its tokenize steps make the rows, in the process that runs
    them: a first build and a refresh give the same bytes as when the shards step writes them all
    from the steps' work files (as it does where the stream cannot serve: rows out of key order,
    tested in test_shards, or a tokenize step done by an earlier run, tested above)."""
    from pipeline import shards, steps

    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    more = str(write_json(tmp_path / "in" / "more.json", alpaca_records(50, 9)))
    config = _config(target_rows=4, row_group_rows=3)

    def build(out: Path, first: list[str]) -> list[list[tuple]]:
        manifests = [prepare(first, str(bpe_tokenizer_path), out, config), prepare([more], str(bpe_tokenizer_path), out, config)]
        return [[(e["path"], e["rows"], e["sha256"]) for e in manifest["shards"]] for manifest in manifests]

    with monkeypatch.context() as patch:  # the shards step writes every file
        patch.setattr(steps, "finish_shard_stream", lambda plan, keys: None)
        reference = build(tmp_path / "reference", inputs)
    assert len(reference[0]) > 3 and len(reference[1]) > len(reference[0])

    def unused(*args, **kwargs):
        raise AssertionError("the shards step wrote the files again")

    with monkeypatch.context() as patch:
        patch.setattr(shards, "write_shards", unused)
        assert build(tmp_path / "streamed", inputs) == reference
    assert shard_bytes(tmp_path / "streamed") == shard_bytes(tmp_path / "reference")
    assert not (tmp_path / "streamed" / ".work").exists()


def test_inputs_with_the_same_name_in_different_folders_stay_apart(tmp_path, bpe_tokenizer_path):
    first = write_json((tmp_path / "a").mkdir() or tmp_path / "a" / "data.json", alpaca_records(0, 4))
    second = write_json((tmp_path / "b").mkdir() or tmp_path / "b" / "data.json", alpaca_records(100, 4))
    out = tmp_path / "data"
    prepare([str(first), str(second)], str(bpe_tokenizer_path), out, _config())
    keys = [(row["source"], row["source_index"]) for row in shard_rows(out)]
    assert len(keys) == len(set(keys)) == 8
    assert {source for source, _ in keys} == {str(first), str(second)}


def test_speed_only_settings_neither_rebuild_nor_change_bytes(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    fast = SFTConfig.model_validate(
        {
            "shards": {"val_fraction": 0.2},
            "ingest": {"batch_size": 3},
            "dedup": {"partitions": 3},
            "tokenize": {"batch_size": 5, "num_proc": 1},
        }
    )
    assert fast.fingerprint() == _config().fingerprint()
    refreshed = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, fast)
    assert refreshed["history"][-1]["rebuild"] is False
    assert refreshed["version"] == first["version"] + 1

    reference = tmp_path / "reference"
    prepare([str(inputs[0])], str(bpe_tokenizer_path), reference, _config())
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), reference, _config())
    assert shard_bytes(out) == shard_bytes(reference)


def test_template_failures_are_counted_under_the_template_stage(tmp_path, bpe_tokenizer_path):
    folder = tmp_path / "in"
    folder.mkdir()
    records = alpaca_records(0, 3) + [{"instruction": "BOOM please", "input": "", "output": "fine"}]
    source = write_json(folder / "data.json", records)
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{%- for m in messages %}{%- if 'BOOM' in m.content %}{{ raise_exception('no BOOM here') }}{%- endif %}"
        "{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}{%- generation %}"
        "{{- m.content + '<|im_end|>' }}{%- endgeneration %}{%- else %}{{- m.content + '<|im_end|>' }}{%- endif %}"
        "{{- '\\n' }}{%- endfor %}"
    )
    config = SFTConfig.model_validate({"template": {"jinja_file": str(template)}, "quality": {"enabled": False}})
    out = tmp_path / "data"
    manifest = prepare([str(source)], str(bpe_tokenizer_path), out, config)
    rejected = pl.read_parquet([str(out / r["path"]) for r in manifest["rejected"]])
    stages = dict(zip(rejected["reason"].to_list(), rejected["stage"].to_list()))
    assert set(stages.values()) == {"template"}
    assert manifest["counts"]["rejected"] == {"template": {reason: 1 for reason in stages}}


def test_unchanged_rerun_removes_what_a_killed_run_left_behind(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    manifest = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    listed = shard_bytes(out)
    # what a run killed between writing its manifest and cleaning up leaves (sftkit enters a file
    # in the folder's journal before it creates it; it deletes only files the journal lists)
    (out / ".work" / "ingest").mkdir(parents=True)
    (out / ".work" / "ingest" / "x.parquet").write_bytes(b"partial")
    outdir.will_write(out / "shards" / "train-00099.parquet")
    (out / "shards" / "train-00099.parquet").write_bytes(b"not listed")
    (out / "shards" / ".tmp-abc-train-00100.parquet").write_bytes(b"half written")

    again = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    assert again["version"] == manifest["version"]
    assert not (out / ".work").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(listed)
    assert shard_bytes(out) == listed


def test_ingest_and_signatures_in_worker_processes_write_the_same_dataset(tmp_path, bpe_tokenizer_path, monkeypatch):
    import pipeline.steps as steps
    from pipeline.workers import WorkerPool

    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    write_json(tmp_path / "in" / "more.json", alpaca_records(offset=40, count=30))
    inputs.append(str(tmp_path / "in" / "more.json"))
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 1 << 60)  # in this process
    serial = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "serial", _config())
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 0)  # worker processes, whatever the size
    started = []
    real_init = WorkerPool.__init__
    monkeypatch.setattr(WorkerPool, "__init__", lambda self, *a: started.append(a[1]) or real_init(self, *a))
    parallel = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "parallel", _config())
    assert started == ["pipeline.steps:_run_in_worker"]
    assert shard_bytes(tmp_path / "parallel") == shard_bytes(tmp_path / "serial")
    assert parallel["counts"] == serial["counts"]
    rejected = {r["path"].split("/")[-1] for r in serial["rejected"]}
    assert rejected and rejected == {r["path"].split("/")[-1] for r in parallel["rejected"]}


def test_one_big_input_is_signed_while_it_is_ingested_to_the_same_dataset(tmp_path, bpe_tokenizer_path, monkeypatch):
    """One input on two or more cores: its dedup signatures are made by worker processes while
    ingest writes the chunk (issue 16, item 1), and the dataset is the one the serial road makes."""
    import os

    import pipeline.steps as steps
    from pipeline.workers import WorkerPool

    inputs = [str(make_inputs(tmp_path / "in")[1])]  # the JSON Lines file: a bad line, a duplicate
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 1 << 60)  # small: ingest, then signatures in the dedup step
    serial = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "serial", _config())
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 0)  # big, whatever the size
    started = []
    real_init = WorkerPool.__init__
    monkeypatch.setattr(WorkerPool, "__init__", lambda self, *a: started.append(a[1]) or real_init(self, *a))
    signed = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "signed", _config())
    if (os.cpu_count() or 1) > 1:
        assert "pipeline.dedup.lsh:_signatures_in_worker" in started
    assert shard_bytes(tmp_path / "signed") == shard_bytes(tmp_path / "serial")
    assert signed["counts"] == serial["counts"] and signed["counts"]["rejected"]


def test_one_big_inputs_signature_workers_filter_its_quality_to_the_same_dataset(tmp_path, bpe_tokenizer_path, monkeypatch):
    """One input on two or more cores: the worker processes that signed it while it was ingested
    go on as the quality stage's workers (switched to the filters), and no other set starts;
    the dataset is the one new workers, or none, make."""
    import os
    import random

    import pipeline.quality as quality
    import pipeline.steps as steps
    from pipeline.workers import WorkerPool

    rng = random.Random(11)
    words = ["river", "stone", "数据", "light", "garden", "über", "tokens", "quiet", "ember", "cloud"]
    records = [
        {"instruction": f"Question {i}?", "input": "", "output": " ".join(rng.choices(words, k=rng.randint(5, 60)))} for i in range(4500)
    ]
    records[7]["output"] = "As an AI language model, I cannot help with that."  # a quality rejection
    inputs = [str(write_jsonl(tmp_path / "in.jsonl", records))]
    monkeypatch.setattr(quality, "_BATCHES_FOR_WORKERS", 2)  # its two batches of 4,096 rows: in workers
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 1 << 60)  # small: ingest, then signatures in the dedup step
    serial = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "serial", _config())
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 0)  # big: signed while ingested
    started = []
    real_init = WorkerPool.__init__
    monkeypatch.setattr(WorkerPool, "__init__", lambda self, *a: started.append(a[1]) or real_init(self, *a))
    signed = prepare(inputs, str(bpe_tokenizer_path), tmp_path / "signed", _config())
    if (os.cpu_count() or 1) > 1:
        assert started == ["pipeline.dedup.lsh:_signatures_in_worker"]
    assert shard_bytes(tmp_path / "signed") == shard_bytes(tmp_path / "serial")
    assert signed["counts"] == serial["counts"] and signed["counts"]["rejected"]
    assert {r["path"].split("/")[-1] for r in signed["rejected"]} == {r["path"].split("/")[-1] for r in serial["rejected"]}


def test_a_step_run_in_a_worker_process_gives_what_it_gives_here(tmp_path, bpe_tokenizer_path):
    from pipeline import steps

    source = make_inputs(tmp_path / "in")[0]
    results = {}
    for name, size in (("here", 0), ("worker", 1 << 40)):  # the size decides where it runs
        plan = steps.plan_refresh([source], str(bpe_tokenizer_path), tmp_path / name, _config())
        steps.begin_run(plan)
        results[name] = steps.in_worker_process(steps.run_ingest, plan, plan.inputs[0], input_bytes=size)
    here, worker = results["here"], results["worker"]
    assert worker.stats.records_in == here.stats.records_in > 0
    assert (worker.stats.records_out, worker.stats.rejected) == (here.stats.records_out, here.stats.rejected)
    assert pq.read_table(worker.outputs[0]).equals(pq.read_table(here.outputs[0]))


@pytest.mark.skipif(sys.platform != "linux", reason="pyarrow's jemalloc pool: Linux wheels")
@pytest.mark.parametrize(("chosen", "expected"), [(None, "jemalloc"), ("system", "system")])
def test_the_cli_and_stage_workers_allocate_from_jemalloc_unless_the_user_chose_an_arrow_pool(repo_root, chosen, expected):
    """Importing ``flows`` (the CLI, the flows) makes jemalloc Arrow's pool before pyarrow loads
    (every stage's peak was 110-180 MiB lower than with pyarrow's mimalloc), the worker processes
    a stage starts get it too, and ARROW_DEFAULT_MEMORY_POOL, when the user set it, wins."""
    code = (
        "import flows\n"
        "import pyarrow as pa\n"
        "from pipeline.workers import WorkerPool\n"
        "with WorkerPool(None, 'pipeline.schema:messages_for_template', (), 1) as pool:\n"
        # an answer first: Popen returns once exec has closed the parent's pipe, before the new
        # program's environment is in place, and /proc/PID/environ is empty until it is
        "    assert list(pool.map([[]])) == [[]]\n"
        "    pid = pool._workers[0].pid\n"
        "    environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')\n"
        "worker = [v.split(b'=', 1)[1].decode() for v in environ if v.startswith(b'ARROW_DEFAULT_MEMORY_POOL=')]\n"
        "print(pa.default_memory_pool().backend_name, *worker)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected, expected]


@pytest.mark.skipif(sys.platform != "linux", reason="reads a worker's environment from /proc")
def test_a_library_caller_s_workers_get_jemalloc_too(repo_root):
    """Without the CLI (``pipeline`` alone), the worker processes still allocate from jemalloc."""
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc")
    code = (
        "import sys\n"
        "from pipeline.workers import WorkerPool\n"
        "with WorkerPool(None, 'pipeline.schema:messages_for_template', (), 1) as pool:\n"
        "    assert list(pool.map([[]])) == [[]]\n"  # an answer first (see the test above)
        "    environ = open(f'/proc/{pool._workers[0].pid}/environ', 'rb').read().split(b'\\0')\n"
        "print(*[v.decode() for v in environ if v.startswith(b'ARROW_DEFAULT_MEMORY_POOL=')], 'flows' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ARROW_DEFAULT_MEMORY_POOL=jemalloc", "False"]

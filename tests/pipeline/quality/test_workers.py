"""The quality stage's worker processes (pipeline.workers): the same output for any number of
workers, errors raised in the caller, and no re-run of a user's script in the workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import SFTConfig
from pipeline.quality import quality_stage
from pipeline.workers import WorkerError, WorkerPool


def write_conversations(path, count: int = 900, seed: int = 4):
    rng = random.Random(seed)
    words = ["river", "stone", "数据", "light", "garden", "über", "tokens", "quiet"]
    rows = []
    for i in range(count):
        reply = " ".join(rng.choices(words, k=rng.randint(5, 80)))
        if i % 9 == 0:
            reply += f" Write to me at person{i}@mail-host.net."  # redacted: a changed row
        if i % 13 == 0:
            reply = "As an AI language model, I cannot help with that."  # dropped: ai_disclaimer
        if i % 17 == 0:
            reply = ""  # dropped: empty response
        messages = [schema.make_message("user", f"Question {i}?"), schema.make_message("assistant", reply)]
        rows.append({"id": f"id{i}", "source": "s.jsonl", "source_index": i, "messages": messages, "tools": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return path


def run_quality(tmp_path, source, num_proc: int):
    config = SFTConfig()
    config.quality.num_proc = num_proc
    kept, rejected = tmp_path / f"kept-{num_proc}.parquet", tmp_path / f"rejected-{num_proc}.parquet"
    stats = quality_stage(source, kept, rejected, config, batch_size=100)  # 9 batches: workers start
    return stats, kept.read_bytes(), rejected.read_bytes()


def test_the_output_does_not_depend_on_the_number_of_workers(tmp_path):
    source = write_conversations(tmp_path / "in.parquet")
    one, *others = [run_quality(tmp_path, source, n) for n in (1, 2, 3)]
    stats = one[0]
    assert stats.records_in == 900 and stats.num_rejected > 80
    assert stats.extra["pii_redactions"] == 100 - len([i for i in range(0, 900, 9) if i % 13 == 0 or i % 17 == 0])
    for other in others:
        assert other[1] == one[1] and other[2] == one[2]  # kept and rejected files, byte for byte
        assert (other[0].records_out, other[0].rejected, other[0].extra["pii_redactions"]) == (
            stats.records_out,
            stats.rejected,
            stats.extra["pii_redactions"],
        )
        dropped = {name: (f["dropped"], f["reasons"]) for name, f in other[0].extra["filters"].items()}
        assert dropped == {name: (f["dropped"], f["reasons"]) for name, f in stats.extra["filters"].items()}


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path, repo_root):
    write_conversations(tmp_path / "in.parquet")
    script = tmp_path / "my_refresh.py"  # top-level code, no `if __name__ == "__main__":`
    script.write_text(
        "from pathlib import Path\n"
        "from pipeline.config import SFTConfig\n"
        "from pipeline.quality import quality_stage\n"
        "config = SFTConfig()\n"
        "config.quality.num_proc = 2\n"
        f"here = Path({str(tmp_path)!r})\n"
        "with open(here / 'runs.txt', 'a') as log:\n"
        "    log.write('run\\n')\n"
        "stats = quality_stage(here / 'in.parquet', here / 'k.parquet', here / 'r.parquet', config, batch_size=100)\n"
        "print(stats.records_in)\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["900"]
    assert (tmp_path / "runs.txt").read_text() == "run\n"  # the script ran once


class _ExitWhenUnpickled:
    def __reduce__(self):
        return (os._exit, (3,))


class _KilledWhenUnpickled:
    def __reduce__(self):
        return (signal.raise_signal, (signal.SIGKILL,))


def test_an_error_in_a_worker_is_raised_in_the_caller_and_a_dead_worker_is_named(tmp_path):
    config_json = SFTConfig().model_dump_json()
    with WorkerPool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (config_json, None), 2) as pool:
        with pytest.raises(TypeError, match="RecordBatch"):
            list(pool.map([("judge", "not a record batch")]))
    with WorkerPool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (config_json, None), 1) as pool:
        with pytest.raises(WorkerError, match="exit code 3"):
            list(pool.map([_ExitWhenUnpickled()]))
    with WorkerPool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (config_json, None), 1) as pool:
        with pytest.raises(WorkerError, match="killed by SIGKILL, which is what the out-of-memory killer sends"):
            list(pool.map([_KilledWhenUnpickled()]))


def test_a_worker_runs_only_sftkits_own_functions():
    with pytest.raises(ValueError, match="pipeline functions only"):
        WorkerPool("os:getcwd", "os:system", (), 1)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_dedups_verdicts_in_bulk_equal_the_one_record_answers(tmp_path, monkeypatch, num_proc):
    """Dedup's keep policy asks many records at once (Verdict.many), in worker processes when
    there are many: the answers, in order, are those of asking one record at a time."""
    import pipeline.quality as quality

    monkeypatch.setattr(quality, "_VERDICT_BATCH_ROWS", 64)
    monkeypatch.setattr(quality, "_VERDICT_ROWS_FOR_WORKERS", 100)  # 900 rows: workers start
    table = pq.read_table(write_conversations(tmp_path / "in.parquet"))
    config = SFTConfig()
    config.quality.num_proc = num_proc
    verdict = quality.Verdict(config, None)
    one_by_one = [verdict(record) for record in table.to_pylist()]
    assert 80 < one_by_one.count(False) < 300  # the disclaimers and empty replies, not the redactions
    tables = iter([table.slice(0, 250), table.slice(250, 1), table.slice(251)])
    assert verdict.many(tables, table.num_rows).tolist() == one_by_one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_workers_convert_with_arrow_without_importing_pandas(tmp_path):
    # pyarrow's first conversion imports pandas to recognise pandas objects: 0.2-0.3 CPU-s and
    # ~45 MiB in every worker of a run, for nothing (workers.arrow_without_pandas)
    from pipeline.dedup.lsh import _SIGNED_COLUMNS

    config = SFTConfig()
    table = pq.read_table(write_conversations(tmp_path / "in.parquet", count=300), columns=_SIGNED_COLUMNS)
    with WorkerPool(
        "pipeline.dedup.lsh:_init_worker", "pipeline.dedup.lsh:_signatures_in_worker", (config.dedup.model_dump_json(),), 2
    ) as pool:
        signed = list(pool.map(table.to_batches(max_chunksize=100)))
        assert sum(t.num_rows for t in signed) == 300  # pa.array and pa.table ran in each
        for pid in pool.pids:
            with open(f"/proc/{pid}/maps") as maps:
                assert "pandas" not in maps.read()


def test_a_process_that_keeps_pyarrow_off_pandas_still_converts_to_pandas_when_asked():
    script = (
        "import sys, pyarrow as pa\n"
        "from pipeline.workers import arrow_without_pandas\n"
        "arrow_without_pandas()\n"
        "pa.Table.from_pylist([{'a': 1}]); pa.array([1, 2])\n"
        "assert 'pandas' not in sys.modules\n"
        "frame = pa.table({'a': [1, 2]}).to_pandas()\n"
        "assert list(frame['a']) == [1, 2] and pa.Table.from_pandas(frame).column('a').to_pylist() == [1, 2]\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

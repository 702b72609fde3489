"""The shard writer's memory: anonymous (not file-backed) RSS while write_shards runs.

The tokenize stage's work files are uncompressed Arrow IPC, memory-mapped by write_shards, which
gathers one row group at a time; so its anonymous memory should not grow with the run. This
writes the same tokenized rows as a zstd-compressed IPC file too (decompressed whole when read)
and compares, on the real instruction data repeated to --conversations rows:

    .venv/bin/python -m bench.shard_memory [--conversations 20000]

Writes bench/results/shard_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import argument_parser, module_command, proc_status_bytes, run_child, write_results
from bench.prepare_vs_trl import TOKENIZER, load_conversations
from pipeline import schema
from pipeline.config import SFTConfig
from pipeline.shards import write_shards
from pipeline.tokenize import tokenize_stage


def rss_anon_mib() -> float:
    return proc_status_bytes("RssAnon").get("RssAnon", float("nan")) / 2**20


def measure(work_file: Path, out: Path, config: SFTConfig) -> dict:
    before, peak, done = rss_anon_mib(), [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.process_time()
    entries = write_shards([work_file], out, config, metadata={}).entries
    cpu = time.process_time() - started
    done.set()
    watcher.join()
    return {
        "work_file_mib": round(work_file.stat().st_size / 2**20, 1),
        "cpu_seconds": round(cpu, 3),
        "anon_rss_growth_mib": round(max(peak[0], rss_anon_mib()) - before, 1),
        "rows": sum(e["rows"] for e in entries),
    }


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--measure", nargs=2, metavar=("WORK_FILE", "OUT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        import pyarrow.compute  # noqa: F401  (imported before the baseline, as in a pipeline run)

        print(json.dumps(measure(Path(options.measure[0]), Path(options.measure[1]), SFTConfig())))
        return
    workdir = Path(tempfile.mkdtemp(prefix="sftkit-shard-memory-"))
    try:
        rows = load_conversations(options.conversations)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), workdir / "canonical.parquet")
        del rows
        config = SFTConfig()
        config.tokenize.max_length = 4096
        work = workdir / "tok.arrow"
        tokenize_stage(workdir / "canonical.parquet", work, workdir / "rejected.parquet", config, tokenizer=str(TOKENIZER))
        table = pa.ipc.open_file(pa.memory_map(str(work))).read_all()
        zstd = workdir / "tok-zstd.arrow"
        with pa.ipc.new_file(zstd, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)
        del table
        # Each in a fresh process: memory freed by one measurement would flatter the next.
        results = {
            name: run_child(module_command(__spec__.name, "--measure", path, workdir / name.split()[0]), what=name).last_json()
            for name, path in (("memory-mapped (what sftkit writes)", work), ("zstd-compressed IPC (read whole)", zstd))
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, figures in results.items():
        print(f"{name:>36}: {figures}")
    write_results("shard_memory", {"conversations": options.conversations, "results": results}, options.out)


if __name__ == "__main__":
    main()

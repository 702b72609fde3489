"""The shard writer's memory: anonymous (not file-backed) RSS while write_shards runs.

The tokenize stage's work files are uncompressed Arrow IPC, memory-mapped by write_shards, which
gathers one row group at a time; so its anonymous memory should not grow with the run. This
writes the same tokenized rows as a zstd-compressed IPC file too (decompressed whole when read)
and compares, on the real instruction data repeated to --conversations rows:

    .venv/bin/python bench/shard_memory.py [--conversations 20000]

Writes bench/results/shard_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import schema  # noqa: E402
from pipeline.config import SFTConfig  # noqa: E402
from pipeline.shards import write_shards  # noqa: E402
from pipeline.tokenize import tokenize_stage  # noqa: E402
from prepare_vs_trl import TOKENIZER, load_conversations  # noqa: E402


def rss_anon_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(work_file: Path, out: Path, config: SFTConfig) -> dict:
    before, peak, done = rss_anon_mib(), [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.process_time()
    entries = write_shards([work_file], out, config.shards, {})
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        tokenize_stage(workdir / "canonical.parquet", work, workdir / "rejected.parquet", str(TOKENIZER), config)
        table = pa.ipc.open_file(pa.memory_map(str(work))).read_all()
        zstd = workdir / "tok-zstd.arrow"
        with pa.ipc.new_file(zstd, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)
        del table
        # Each in a fresh process: memory freed by one measurement would flatter the next.
        results = {
            name: json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--measure", str(path), str(workdir / name.split()[0])],
                    check=True, capture_output=True, text=True,
                ).stdout.splitlines()[-1]
            )
            for name, path in (("memory-mapped (what sftkit writes)", work), ("zstd-compressed IPC (read whole)", zstd))
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, figures in results.items():
        print(f"{name:>36}: {figures}")
    out = REPO / "bench" / "results" / "shard_memory.json"
    out.write_text(json.dumps({"conversations": options.conversations, "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

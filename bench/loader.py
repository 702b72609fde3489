"""Data-loader benchmark: memory-mapped ShardDataset vs Parquet (pyarrow) vs datasets, and packing.

Builds one synthetic prepared dataset (realistic log-normal conversation lengths, random token
ids, prompt share masked) with the real shard writer, then on ONE core measures, side by side:

1. random-access rows/s and tokens/s: ``ShardDataset[i]`` (views, and views copied into a batch
   buffer) vs pyarrow reading the same rows from the Parquet shards (row-group reads with a
   one-group cache, which is what fits in bounded memory; and the whole table loaded into RAM
   first) vs ``datasets.Dataset.from_parquet(...).with_format("numpy")[i]`` (Arrow-backed);
2. RSS while reading the whole dataset in random order through the trainer's batch path, for a
   dataset several times larger than the process's own memory: the anonymous part (what the
   process holds) and the mapped page cache (clean, reclaimable, but counted in RSS) apart;
3. packing for 100k rows: best-fit decreasing (the trainer's planner) vs naive next-fit and vs
   length-grouped padding: share of real tokens and plan time.

Figures are from a warm page cache (the steady state of a training run). Results go to
``bench/results/loader.json``.

    .venv/bin/python -m bench.loader [--rows 300000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import REPO, argument_parser, module_command, print_table, proc_status_bytes, write_results
from pipeline import schema
from pipeline.config import SFTConfig, ShardConfig
from pipeline.manifest import now_iso, resolve_inside, shard_entries, write_manifest
from pipeline.shards import write_shards
from trainer.batching import PlannedBatches, best_fit_decreasing, plan_packed, plan_padded
from trainer.data import ShardDataset
from trainer.sampling import epoch_order

VOCAB = 32_000


def realistic_lengths(n: int, seed: int = 0, max_length: int = 4096) -> np.ndarray:
    """Log-normal SFT conversation lengths: median ~330 tokens, mean ~450, tail cut at max_length."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.8, sigma=0.8, size=n), 16, max_length).astype(np.int32)


def build_dataset(folder: Path, rows: int) -> Path:
    """A prepared dataset written by pipeline.shards.write_shards (zstd Parquet, ~20k rows/shard)."""
    rng = np.random.default_rng(1)
    lengths = realistic_lengths(rows)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    tokens = rng.integers(0, VOCAB, size=int(offsets[-1]), dtype=np.int32)
    labels = tokens.copy()
    prompt = (lengths * rng.uniform(0.2, 0.6, size=rows)).astype(np.int64)
    for start, n in zip(offsets[:-1].tolist(), prompt.tolist()):
        labels[start : start + n] = schema.IGNORE_INDEX
    return write_prepared(folder, tokens, labels, offsets, np.array(["synthetic.jsonl"] * rows), target_rows=20_000)


def write_prepared(
    folder: Path, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray, sources: np.ndarray, *, target_rows: int
) -> Path:
    """Rows ``tokens[offsets[i]:offsets[i+1]]`` (and their labels, from ``sources[i]``) as a prepared
    dataset folder: shards written by pipeline.shards.write_shards and a manifest."""
    rows = len(offsets) - 1
    lengths = np.diff(offsets).astype(np.int32)
    trainable = np.add.reduceat((labels != schema.IGNORE_INDEX).astype(np.int64), offsets[:-1]) if rows else lengths
    message = [schema.make_message("user", "synthetic"), schema.make_message("assistant", "row")]
    list_offsets = pa.array(offsets.astype(np.int32))
    table = pa.table(
        {
            schema.ID: pa.array([f"{i:032x}" for i in range(rows)]),
            schema.SOURCE: pa.array(sources),
            schema.SOURCE_INDEX: pa.array(np.arange(rows, dtype=np.int64)),
            schema.MESSAGES: pa.array([message] * rows, type=pa.list_(schema.MESSAGE_TYPE)),
            schema.TOOLS: pa.nulls(rows, pa.string()),
            schema.TURN: pa.nulls(rows, pa.int32()),
            schema.INPUT_IDS: pa.ListArray.from_arrays(list_offsets, pa.array(tokens)),
            schema.LABELS: pa.ListArray.from_arrays(list_offsets, pa.array(labels)),
            schema.LENGTH: pa.array(lengths),
            schema.NUM_TRAINABLE: pa.array(trainable.astype(np.int32)),
        },
        schema=schema.SHARD_SCHEMA,
    )
    staging = folder / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, staging / "rows.parquet")
    config = SFTConfig(shards=ShardConfig(val_fraction=0.0, target_rows=target_rows))
    entries = write_shards([staging / "rows.parquet"], folder, config, metadata={}).entries
    shutil.rmtree(staging)
    write_manifest(
        folder,
        {
            "version": 1,
            "created_at": now_iso(),
            "tokenizer": {"name": "synthetic", "fingerprint": None},
            "template": {"name": "synthetic", "fingerprint": None},
            "shards": entries,
            "counts": {"read": rows, "kept": rows, "rejected": {}},
            "stages": [],
        },
    )
    return folder


def rss_fields() -> dict[str, int]:
    return proc_status_bytes("VmRSS", "RssAnon", "RssFile")


def next_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """The naive packer the planner is measured against: rows in ``order``, a new bin whenever
    the next row does not fit in the current one."""
    bins: list[list[int]] = []
    fill = capacity + 1
    for row in np.asarray(order).tolist():
        size = int(lengths[row])
        if fill + size > capacity:
            bins.append([])
            fill = 0
        bins[-1].append(row)
        fill += size
    return bins


def timed_rows(get_row, indices: np.ndarray, budget_s: float, copy: bool) -> dict:
    """Rows/s and tokens/s reading ``indices`` in order until ``budget_s`` elapses."""
    buffer = np.empty(1 << 16, np.int32)
    tokens = rows = 0
    started = time.perf_counter()
    for i in indices.tolist():
        input_ids, labels = get_row(i)
        n = len(input_ids)
        if copy:
            buffer[:n] = input_ids
            buffer[:n] = labels
        tokens += n
        rows += 1
        if rows % 256 == 0 and time.perf_counter() - started > budget_s:
            break
    elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": rows / elapsed, "tokens_per_s": tokens / elapsed}


def parquet_row_reader(folder: Path):
    """Random rows from the Parquet shards with bounded memory: decode the row group holding the
    row (one group cached), the only way to index Parquet without loading it all."""
    manifest = json.loads((folder / "manifest.json").read_text())
    files, starts = [], []
    first = 0
    for entry in shard_entries(manifest, "train"):
        pf = pq.ParquetFile(resolve_inside(folder, entry["path"]))
        for group in range(pf.num_row_groups):
            files.append((pf, group))
            starts.append(first)
            first += pf.metadata.row_group(group).num_rows
    starts_arr = np.array(starts)
    cache: dict = {"key": None}

    def get_row(i: int):
        g = int(np.searchsorted(starts_arr, i, side="right") - 1)
        if cache["key"] != g:
            pf, group = files[g]
            table = pf.read_row_group(group, columns=[schema.INPUT_IDS, schema.LABELS])
            cache.update(key=g, ids=table.column(schema.INPUT_IDS).combine_chunks(), labels=table.column(schema.LABELS).combine_chunks())
        local = i - starts[g]
        return cache["ids"][local].values.to_numpy(), cache["labels"][local].values.to_numpy()

    return get_row


def in_memory_parquet_reader(folder: Path):
    """The whole split read into RAM with pyarrow, then rows sliced from the flat arrays."""
    manifest = json.loads((folder / "manifest.json").read_text())
    paths = [resolve_inside(folder, e["path"]) for e in shard_entries(manifest, "train")]
    table = pa.concat_tables(pq.read_table(p, columns=[schema.INPUT_IDS, schema.LABELS]) for p in paths)
    ids = table.column(schema.INPUT_IDS).combine_chunks()
    labels = table.column(schema.LABELS).combine_chunks()
    offsets = ids.offsets.to_numpy()
    flat_ids, flat_labels = ids.values.to_numpy(), labels.values.to_numpy()

    def get_row(i: int):
        return flat_ids[offsets[i] : offsets[i + 1]], flat_labels[offsets[i] : offsets[i + 1]]

    return get_row


def datasets_reader(folder: Path, cache_dir: Path):
    import datasets

    datasets.disable_progress_bars()
    manifest = json.loads((folder / "manifest.json").read_text())
    paths = [str(resolve_inside(folder, e["path"])) for e in shard_entries(manifest, "train")]
    ds = datasets.Dataset.from_parquet(paths, columns=[schema.INPUT_IDS, schema.LABELS], cache_dir=str(cache_dir))
    ds = ds.with_format("numpy")

    def get_row(i: int):
        row = ds[i]
        return row[schema.INPUT_IDS], row[schema.LABELS]

    return get_row


def bench_access(folder: Path, work: Path, budget_s: float) -> dict:
    ds = ShardDataset(folder, "train")
    indices = np.random.default_rng(2).integers(0, len(ds), size=2_000_000)
    results = {
        "mmap_views": timed_rows(ds.row, indices, budget_s, copy=False),
        "mmap_copied": timed_rows(ds.row, indices, budget_s, copy=True),
    }
    batches = PlannedBatches(ds, plan_packed(ds.lengths, epoch_order(len(ds), 0, 0), 8192, rng=None), pad_token_id=0)
    started, tokens, k = time.perf_counter(), 0, 0
    while time.perf_counter() - started < budget_s and k < len(batches):
        tokens += int(batches[k]["attention_mask"].sum())
        k += 1
    results["mmap_collated_8192_token_batches"] = {"batches": k, "tokens_per_s": tokens / (time.perf_counter() - started)}
    results["parquet_row_groups"] = timed_rows(parquet_row_reader(folder), indices, budget_s, copy=True)
    before = rss_fields()["VmRSS"]
    started = time.perf_counter()
    in_memory = in_memory_parquet_reader(folder)
    load_s = time.perf_counter() - started
    results["parquet_in_memory"] = timed_rows(in_memory, indices, budget_s, copy=True)
    results["parquet_in_memory"].update(load_seconds=round(load_s, 2), rss_growth_bytes=rss_fields()["VmRSS"] - before)
    del in_memory
    started = time.perf_counter()
    hf = datasets_reader(folder, work / "hf-cache")
    results["datasets_arrow"] = timed_rows(hf, indices, budget_s, copy=True)
    results["datasets_arrow"]["load_seconds"] = round(time.perf_counter() - started, 2)
    return results


def bench_rss(folder: Path) -> dict:
    """Read every row once in random order through the trainer's batch path; sample RSS."""
    ds = ShardDataset(folder, "train")
    plan = plan_packed(ds.lengths, epoch_order(len(ds), 5, 0), 8192, rng=np.random.default_rng(5))
    batches = PlannedBatches(ds, plan, pad_token_id=0)
    batches[0]  # warm-up: the first collate pages in torch's own code, which is not data
    start = rss_fields()
    peak = dict(start)
    started, tokens = time.perf_counter(), 0
    for k in range(1, len(batches)):
        tokens += int(batches[k]["attention_mask"].sum())
        if k % 32 == 0:
            now = rss_fields()
            peak = {key: max(peak[key], now[key]) for key in now}
    seconds = time.perf_counter() - started
    companion_bytes = sum((s.folder / f).stat().st_size for s in ds.shards for f in ("input_ids.i32", "labels.i32", "offsets.i64"))
    return {
        "companion_bytes": companion_bytes,
        "rss_start_bytes": start["VmRSS"],
        "rss_peak_growth_bytes": peak["VmRSS"] - start["VmRSS"],
        "rss_anon_peak_growth_bytes": peak["RssAnon"] - start["RssAnon"],
        "rss_file_peak_growth_bytes": peak["RssFile"] - start["RssFile"],
        "process_anon_bytes": peak["RssAnon"],
        "dataset_over_process_anon": companion_bytes / peak["RssAnon"],
        "tokens_per_s": tokens / seconds,
    }


def bench_packing(rows: int = 100_000) -> dict:
    lengths = realistic_lengths(rows, seed=3)
    order = epoch_order(rows, seed=0, epoch=0)
    out = {"rows": rows, "mean_length": float(lengths.mean()), "max_length": int(lengths.max())}
    for capacity in (4096, 8192, 16384):
        started = time.perf_counter()
        bfd = best_fit_decreasing(lengths, order, capacity)
        bfd_s = time.perf_counter() - started
        started = time.perf_counter()
        nf = next_fit(lengths, order, capacity)
        nf_s = time.perf_counter() - started
        started = time.perf_counter()
        padded = plan_padded(lengths, order, capacity, rng=np.random.default_rng(0))
        padded_s = time.perf_counter() - started
        total = int(lengths.sum())
        out[str(capacity)] = {
            "bfd_efficiency": total / (len(bfd) * capacity),
            "bfd_bins": len(bfd),
            "bfd_plan_seconds": bfd_s,
            "next_fit_efficiency": total / (len(nf) * capacity),
            "next_fit_bins": len(nf),
            "next_fit_plan_seconds": nf_s,
            "padded_efficiency": total / (len(padded) * capacity),
            "padded_batches": len(padded),
            "padded_plan_seconds": padded_s,
        }
    return out


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=300_000, help="rows in the synthetic dataset")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per access measurement")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:  # in a child process, so building leaves nothing behind in our RSS
        build_dataset(args.work / "data", args.rows)
        return
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    except (AttributeError, OSError):
        pass
    work = args.work or Path(tempfile.mkdtemp(prefix="sftkit-bench-loader-"))
    folder = work / "data"
    if not (folder / "manifest.json").exists():
        started = time.perf_counter()
        subprocess.run(module_command(__spec__.name, "--build-only", "--rows", args.rows, "--work", work), check=True, cwd=REPO)
        print(f"built {args.rows} rows in {time.perf_counter() - started:.1f}s at {folder}")
    started = time.perf_counter()
    ds = ShardDataset(folder, "train")
    open_s = time.perf_counter() - started
    parquet_bytes = sum(p.stat().st_size for p in (folder / "shards").glob("*.parquet"))
    print(
        f"first open (sha256 check + companion build): {open_s:.2f}s for {ds.num_tokens / 1e6:.1f}M tokens; "
        f"Parquet {parquet_bytes / 2**20:.0f} MiB"
    )
    started = time.perf_counter()
    ShardDataset(folder, "train")
    reopen_s = time.perf_counter() - started

    del ds
    rss = bench_rss(folder)  # first, before the peers below load data into this process
    results = {
        "dataset": {
            "rows": args.rows,
            "tokens": sum(e["tokens"] for e in json.loads((folder / "manifest.json").read_text())["shards"]),
            "parquet_bytes": parquet_bytes,
            "first_open_seconds": round(open_s, 2),
            "reopen_seconds": round(reopen_s, 2),
        },
        "rss": rss,
        "access_one_core": bench_access(folder, work, args.budget),
        "packing": bench_packing(),
    }
    access = results["access_one_core"]
    mmap_tps = access["mmap_copied"]["tokens_per_s"]
    print()
    print_table(
        ["random access, one core (warm page cache)", "rows/s", "Mtokens/s", "mmap is"],
        [
            [name, f"{figures['rows_per_s']:.0f}", f"{figures['tokens_per_s'] / 1e6:.2f}", f"{mmap_tps / figures['tokens_per_s']:.1f}x"]
            if "rows_per_s" in figures
            else [name, "", f"{figures['tokens_per_s'] / 1e6:.2f}", ""]
            for name, figures in access.items()
        ],
        indent=0,
    )
    print(
        f"  (pyarrow in-memory needs {access['parquet_in_memory']['rss_growth_bytes'] / 2**20:.0f} MiB RSS and "
        f"{access['parquet_in_memory']['load_seconds']}s to load; datasets {access['datasets_arrow']['load_seconds']}s to convert)"
    )
    rss = results["rss"]
    print("\nRSS reading every row once in random order (collated 8192-token batches)")
    print(
        f"  companion {rss['companion_bytes'] / 2**20:.0f} MiB = {rss['dataset_over_process_anon']:.1f}x the process's own "
        f"(anon) memory; RSS peak growth {rss['rss_peak_growth_bytes'] / 2**20:.1f} MiB: anon "
        f"{rss['rss_anon_peak_growth_bytes'] / 2**20:.1f} MiB, mapped page cache {rss['rss_file_peak_growth_bytes'] / 2**20:.1f} MiB; "
        f"{rss['tokens_per_s'] / 1e6:.1f}M tokens/s"
    )
    print(
        f"  (pyarrow in-memory random access instead grows anonymous RSS by "
        f"{access['parquet_in_memory']['rss_growth_bytes'] / 2**20:.0f} MiB for the same rows)"
    )
    packing = results["packing"]
    print(f"\npacking {packing['rows']} rows (mean {packing['mean_length']:.0f}, max {packing['max_length']} tokens)")
    for capacity in ("4096", "8192", "16384"):
        p = packing[capacity]
        print(
            f"  capacity {capacity:>5}: BFD {p['bfd_efficiency']:.4f} ({p['bfd_plan_seconds']:.2f}s)  "
            f"next-fit {p['next_fit_efficiency']:.4f} ({p['next_fit_plan_seconds']:.2f}s)  "
            f"padded+grouped {p['padded_efficiency']:.4f} ({p['padded_plan_seconds']:.2f}s)  "
            f"BFD uses {p['next_fit_bins'] / p['bfd_bins']:.3f}x fewer batches than next-fit"
        )
    print()
    write_results("loader", results, args.out, packages=["datasets"])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

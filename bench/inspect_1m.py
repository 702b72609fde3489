"""``sftkit inspect DIR`` on a 1M-row prepared dataset vs reading the whole shards.

    .venv/bin/python -m bench.inspect_1m [--rows 1000000] [--keep DIR] [--repeats 3]

1. Builds a prepared dataset folder with pyarrow (``pipeline.schema.SHARD_SCHEMA``, manifest via
   ``pipeline.manifest``): ``--rows`` rows in shards of 100k rows (2 % in ``val``), 5 sources,
   prompt and response lengths drawn log-normal (median 60 and 150 tokens, capped at 4096),
   Zipf-distributed token ids in a 32k vocabulary (so they compress like real tokens do),
   labels -100 on the prompt, and a short two-message conversation per row (real messages are
   longer, which would only slow the naive readers further). Rejected rows: 30k.
2. Times, each as a fresh subprocess (Python start-up and imports included), same data, same
   warm page cache:
   * ``sftkit inspect DIR`` (the summary: splits, sources, percentiles, rejected, history);
   * the naive peers computing the same figures: ``pandas.read_parquet`` of every shard (all
     columns, what a notebook does), and ``pyarrow.parquet.read_table`` of every shard (all
     columns) + ``pyarrow.compute``;
   * and, once each, ``sftkit inspect DIR --row 500000`` and ``--html``.
3. Checks that sftkit's figures equal the naive ones.

Writes bench/results/inspect.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench._common import REPO, argument_parser, run_child, two_message_conversations, write_results
from pipeline import schema
from pipeline.fsutil import sha256_file, write_parquet_atomic
from pipeline.manifest import write_manifest

ROWS_PER_SHARD = 100_000
VOCAB = 32_000
MAX_LENGTH = 4096
SOURCES = ["alpaca_gpt4.jsonl", "sharegpt_zh.jsonl.zst", "oasst2.parquet", "glaive_tools.json", "code_alpaca.jsonl"]
SOURCE_WEIGHTS = [0.35, 0.25, 0.2, 0.1, 0.1]

# The naive peer: what one writes without thinking about columns. Prints the same figures.
NAIVE_PANDAS = r"""
import json, sys, pandas as pd, numpy as np
shards = json.loads(sys.argv[1])
frames = []
for path, split in shards:
    df = pd.read_parquet(path)  # every column, as a notebook would
    df["split"] = split
    frames.append(df)
df = pd.concat(frames, ignore_index=True)
out = {
    "rows": int(len(df)),
    "splits": {s: [int(len(g)), int(g["length"].sum()), int(g["num_trainable"].sum())] for s, g in df.groupby("split")},
    "sources": {s: [int(len(g)), int(g["length"].sum()), int(g["num_trainable"].sum())] for s, g in df.groupby("source")},
    "p": [float(np.percentile(df["length"], q)) for q in (50, 90, 99)] + [int(df["length"].max())],
}
print(json.dumps(out))
"""

NAIVE_PYARROW = r"""
import json, sys, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
shards = json.loads(sys.argv[1])
tables = []
for path, split in shards:
    t = pq.read_table(path)  # every column
    tables.append(t.append_column("split", pa.array([split] * t.num_rows)))
t = pa.concat_tables(tables)
def agg(key):
    g = t.group_by(key).aggregate([("length", "count"), ("length", "sum"), ("num_trainable", "sum")]).to_pylist()
    return {r[key]: [r["length_count"], r["length_sum"], r["num_trainable_sum"]] for r in g}
q = pc.quantile(t["length"], q=[0.5, 0.9, 0.99], interpolation="linear").to_pylist()
print(json.dumps({"rows": t.num_rows, "splits": agg("split"), "sources": agg("source"),
                  "p": q + [pc.max(t["length"]).as_py()]}))
"""


def build(root: Path, rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    n_val = max(1, int(rows * 0.02))
    plan = [("train", rows - n_val), ("val", n_val)]
    global_index = 0
    for split, split_rows in plan:
        for shard_index, start in enumerate(range(0, split_rows, ROWS_PER_SHARD)):
            n = min(ROWS_PER_SHARD, split_rows - start)
            prompt = np.clip(rng.lognormal(np.log(60), 0.8, n), 8, None).astype(np.int64)
            response = np.clip(rng.lognormal(np.log(150), 0.9, n), 2, None).astype(np.int64)
            length = np.minimum(prompt + response, MAX_LENGTH)
            response = np.minimum(response, length - prompt.clip(max=MAX_LENGTH - 1))
            trainable = response
            offsets = np.zeros(n + 1, dtype=np.int32)
            np.cumsum(length, out=offsets[1:])
            total = int(offsets[-1])
            ids = (rng.zipf(1.3, total) % VOCAB).astype(np.int32)
            position = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1].astype(np.int64), length)
            untrained = np.repeat(length - trainable, length)
            labels = np.where(position < untrained, schema.IGNORE_INDEX, ids).astype(np.int32)
            index = np.arange(global_index, global_index + n)
            global_index += n
            source_codes = rng.choice(len(SOURCES), n, p=SOURCE_WEIGHTS)
            sources = pa.DictionaryArray.from_arrays(pa.array(source_codes, pa.int32()), pa.array(SOURCES)).cast(pa.string())
            user = pa.array([f"Synthetic instruction number {i}: please answer briefly." for i in index])
            reply = pa.array([f"Synthetic reply {i}." for i in index])
            contents = pa.concat_arrays([user, reply]).take(pa.array(np.stack([np.arange(n), np.arange(n) + n], 1).ravel()))
            table = pa.table(
                {
                    schema.ID: pa.array([f"{i:032x}" for i in index]),
                    schema.SOURCE: sources,
                    schema.SOURCE_INDEX: pa.array(index, pa.int64()),
                    schema.MESSAGES: two_message_conversations(contents),
                    schema.TOOLS: pa.nulls(n, pa.string()),
                    schema.TURN: pa.nulls(n, pa.int32()),
                    schema.INPUT_IDS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                    schema.LABELS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
                    schema.LENGTH: pa.array(length.astype(np.int32)),
                    schema.NUM_TRAINABLE: pa.array(trainable.astype(np.int32)),
                },
                schema=schema.SHARD_SCHEMA,
            )
            relative = f"shards/{schema.shard_file_name(split, shard_index)}"
            write_parquet_atomic(table, root / relative, metadata={schema.META_SPLIT: split.encode()})
            shards.append(
                {
                    "path": relative,
                    "split": split,
                    "rows": n,
                    "tokens": int(length.sum()),
                    "trainable_tokens": int(trainable.sum()),
                    "sha256": sha256_file(root / relative),
                }
            )
            print(f"  wrote {relative}: {n:,} rows, {total:,} tokens", flush=True)

    n_rejected = 30_000
    reasons = [
        ("dedup", "exact_duplicate"),
        ("dedup", "near_duplicate"),
        ("quality", "refusal"),
        ("quality", "too_long"),
        ("ingest", "invalid_json"),
    ]
    picks = rng.integers(0, len(reasons), n_rejected)
    rejected = pa.Table.from_pydict(
        {
            schema.SOURCE: [SOURCES[i % len(SOURCES)] for i in range(n_rejected)],
            schema.SOURCE_INDEX: list(range(n_rejected)),
            schema.STAGE: [reasons[p][0] for p in picks],
            schema.REASON: [reasons[p][1] for p in picks],
            schema.DETAIL: [f"synthetic {reasons[p][1]}" for p in picks],
            schema.ID: [None] * n_rejected,
            schema.DUPLICATE_OF: [None] * n_rejected,
            schema.SIMILARITY: [None] * n_rejected,
            schema.RAW: ['{"instruction": "synthetic", "output": "rejected record"}'] * n_rejected,
            schema.TURN: [None] * n_rejected,
        },
        schema=schema.REJECTED_SCHEMA,
    )
    write_parquet_atomic(rejected, root / "rejected" / "all-00000.parquet")
    counts: dict[str, dict[str, int]] = {}
    for p in picks:
        stage, reason = reasons[p]
        counts.setdefault(stage, {}).setdefault(reason, 0)
        counts[stage][reason] += 1
    manifest = {
        "version": 1,
        "created_at": "2026-11-28T00:00:00+00:00",
        "tokenizer": {"name": str(REPO / "data_samples" / "tokenizer"), "fingerprint": "synthetic"},
        "template": {"name": "chatml", "fingerprint": "synthetic"},
        "config": {},
        "shards": shards,
        "rejected": [{"path": "rejected/all-00000.parquet", "rows": n_rejected}],
        "counts": {"read": rows + n_rejected, "kept": rows, "rejected": counts},
        "stages": [],
        "history": [
            {"version": 1, "created_at": "2026-11-28T00:00:00+00:00", "read": rows + n_rejected, "kept": rows, "shards_added": len(shards)}
        ],
    }
    write_manifest(root, manifest)
    return manifest


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the dataset here and keep it")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="sftkit-inspect-bench-")) / "prepared"
    try:
        if not (root / "manifest.json").exists():
            print(f"building {args.rows:,} rows in {root} ...", flush=True)
            t = time.perf_counter()
            build(root, args.rows)
            print(f"  built in {time.perf_counter() - t:.1f}s", flush=True)
        manifest = json.loads((root / "manifest.json").read_text())
        disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        tokens = sum(s["tokens"] for s in manifest["shards"])
        shard_args = json.dumps([[str(root / s["path"]), s["split"]] for s in manifest["shards"]])
        sftkit = str(REPO / ".venv" / "bin" / "sftkit")
        env = {**os.environ, "COLUMNS": "120"}

        results: dict[str, dict] = {}

        def measure(name: str, cmd: list[str], repeats: int) -> str:
            times, rss, out = [], [], ""
            for _ in range(repeats):
                child = run_child(cmd, env=env)
                times.append(child.seconds)
                rss.append(child.peak_rss_bytes // 2**20)
                out = child.stdout
            results[name] = {
                "seconds_median": round(statistics.median(times), 3),
                "seconds_all": [round(s, 3) for s in times],
                "peak_rss_mib": max(rss),
            }
            print(
                f"{name:<34} median {statistics.median(times):7.2f}s  (runs {', '.join(f'{s:.2f}' for s in times)})  peak RSS {max(rss):,} MiB",
                flush=True,
            )
            return out

        measure("sftkit inspect DIR", [sftkit, "inspect", str(root)], args.repeats)
        naive_pandas = json.loads(measure("naive pandas.read_parquet", [sys.executable, "-c", NAIVE_PANDAS, shard_args], 1))
        naive_arrow = json.loads(measure("naive pyarrow read_table", [sys.executable, "-c", NAIVE_PYARROW, shard_args], 1))
        measure("sftkit inspect DIR --row 500000", [sftkit, "inspect", str(root), "--row", str(min(500_000, args.rows // 2))], 1)
        html_dir = Path(tempfile.mkdtemp(prefix="sftkit-inspect-html-"))
        measure("sftkit inspect DIR --html", [sftkit, "inspect", str(root), "--html", str(html_dir / "report.html")], 1)
        html_size = (html_dir / "report.html").stat().st_size
        shutil.rmtree(html_dir)

        from pipeline.report import summarize

        summary = summarize(root)
        ours = {
            "rows": summary.rows,
            "splits": {s["split"]: [s["rows"], s["tokens"], s["trainable_tokens"]] for s in summary.splits},
            "sources": {s["source"]: [s["rows"], s["tokens"], s["trainable_tokens"]] for s in summary.sources},
            "p": [summary.lengths["total"][f"p{q}"] for q in (50, 90, 99)] + [summary.lengths["total"]["max"]],
        }
        for naive in (naive_pandas, naive_arrow):
            assert ours["rows"] == naive["rows"] and ours["splits"] == naive["splits"] and ours["sources"] == naive["sources"]
            assert np.allclose(ours["p"], naive["p"]), (ours["p"], naive["p"])
        print("figures agree with both naive peers")

        base = results["sftkit inspect DIR"]["seconds_median"]
        for peer in ("naive pandas.read_parquet", "naive pyarrow read_table"):
            ratio = results[peer]["seconds_median"] / base
            results[peer]["slower_than_sftkit"] = round(ratio, 1)
            print(f"sftkit inspect is {ratio:.1f}x faster than {peer}")
        report = {
            "rows": args.rows,
            "tokens": tokens,
            "dataset_bytes_on_disk": disk,
            "shards": len(manifest["shards"]),
            "html_report_bytes": html_size,
            "results": results,
            "figures_agree": True,
        }
        print(f"dataset: {args.rows:,} rows, {tokens:,} tokens, {disk / 2**20:,.0f} MiB on disk")
        write_results("inspect", report, args.out, packages=["pandas"])
    finally:
        if args.keep is None:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()

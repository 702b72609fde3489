"""Training-mixture benchmark: planning a 1M-row, 20-group mixture, and the loader with vs without it.

Builds synthetic prepared datasets with the real shard writer, 20 sources of Zipf-like sizes:
1M rows of log-normal lengths around 100 tokens (short rows make any per-row overhead of the
mixture as visible as it can be) and 100k rows around 450 tokens (typical SFT conversations),
then on ONE core measures:

1. planning: ``load_mixture`` (spec + manifest + the shards' ``source``/``length``/
   ``num_trainable`` columns, matching 20 globs, budgets), one epoch's row order
   (``MixtureSampler.epoch_order``: 20 draws + the shuffle), and, apart, packing that epoch
   (the cost every run pays with or without a mixture); also with 2 groups on ``train_on: last``,
   which reads those groups' ``labels`` too;
2. where per-row trained counts come from: the Parquet ``num_trainable`` column (what
   ``load_mixture`` reads) vs counting non -100 labels in the memory-mapped companions;
3. random access on both datasets: rows/s of ``ShardDataset[i]`` over a shuffled permutation
   vs ``MixtureDataset[j]`` over the mixture's epoch order (the same number of rows), with plain
   groups and with loss weights (5 groups) + ``train_on: last`` (2 groups); and collated
   8192-token packed batches (what the DataLoader workers produce) both ways. Best of several
   rounds, alternating.

Results go to ``bench/results/mixture.json``.

    .venv/bin/python -m bench.mixture [--rows 1000000] [--work DIR]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # after OMP_NUM_THREADS
import pyarrow.parquet as pq
import yaml

from bench._common import argument_parser, best_of, print_table, write_results
from bench.loader import write_prepared
from pipeline import schema
from trainer.batching import PlannedBatches, plan_packed
from trainer.data import ShardDataset
from trainer.mixture import load_mixture
from trainer.sampling import EpochPlanner, epoch_order

GROUPS = 20
VOCAB = 32_000


def build_dataset(folder: Path, rows: int, log_mean: float) -> Path:
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(mean=log_mean, sigma=0.7, size=rows), 16, 4096).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    tokens = rng.integers(0, VOCAB, size=int(offsets[-1]), dtype=np.int32)
    labels = tokens.copy()
    # a prompt, a first answer, a second user turn, a last answer: two trained runs per row
    cuts = np.sort(rng.uniform(0.1, 0.9, size=(rows, 3)), axis=1) * lengths[:, None]
    cuts = cuts.astype(np.int64) + offsets[:-1, None]
    for start, (a, b, c) in zip(offsets[:-1].tolist(), cuts.tolist()):
        labels[start:a] = schema.IGNORE_INDEX
        labels[b:c] = schema.IGNORE_INDEX
    sizes = 1.0 / np.arange(1, GROUPS + 1) ** 0.8
    source_of = rng.choice(GROUPS, size=rows, p=sizes / sizes.sum())
    names = np.array([f"incoming/g{g:02d}_part.jsonl" for g in range(GROUPS)])
    return write_prepared(folder, tokens, labels, offsets, names[source_of], target_rows=50_000)


def write_spec(path: Path, folder: Path, *, last_groups: int = 0, loss_weights: bool = False) -> Path:
    rng = np.random.default_rng(7)
    groups = []
    for g in range(GROUPS):
        group = {"name": f"g{g:02d}", "sources": [f"*g{g:02d}_*"], "weight": round(float(rng.uniform(0.2, 1.0)), 3)}
        if g < last_groups:
            group["train_on"] = "last"
        if loss_weights and g % 4 == 1:
            group["loss_weight"] = 0.5
        groups.append(group)
    path.write_text(yaml.safe_dump({"seed": 0, "datasets": [str(folder)], "groups": groups}, sort_keys=False))
    return path


def bench_planning(spec: Path, last_spec: Path, rounds: int) -> dict:
    load_s = best_of(rounds, lambda: load_mixture(spec))
    mixture = load_mixture(spec)
    order_s = best_of(rounds, lambda: mixture.sampler().epoch_order(0))
    order = mixture.sampler().epoch_order(0)
    lengths = mixture.train.length[mixture.train.kept]
    pack_s = best_of(1, lambda: plan_packed(lengths, order, 8192, rng=np.random.default_rng(0)))
    last_load_s = best_of(rounds, lambda: load_mixture(last_spec))
    return {
        "rows": int(len(mixture.train.group)),
        "epoch_rows": int(len(order)),
        "load_mixture_s": load_s,
        "epoch_order_s": order_s,
        "planning_s": load_s + order_s,
        "packing_epoch_s": pack_s,
        "load_mixture_2_groups_train_on_last_s": last_load_s,
    }


def bench_trained_counts(folder: Path, rounds: int) -> dict:
    """num_trainable per row: the Parquet column vs counting the memory-mapped labels."""
    from trainer.companion import _map

    manifest = json.loads((folder / "manifest.json").read_text())
    paths = [folder / e["path"] for e in manifest["shards"] if e["split"] == "train"]

    def from_parquet():
        return np.concatenate([pq.read_table(p, columns=[schema.NUM_TRAINABLE]).column(0).to_numpy() for p in paths])

    ds = ShardDataset(folder, "train", verify=False)

    def from_mmap():
        counts = []
        for shard in ds.shards:
            labels = _map(shard.folder / "labels.i32", "<i4")
            offsets = _map(shard.folder / "offsets.i64", "<i8")
            counts.append(np.add.reduceat((labels != schema.IGNORE_INDEX).astype(np.int32), offsets[:-1]))
        return np.concatenate(counts)

    assert np.array_equal(from_parquet(), from_mmap())
    return {"parquet_column_s": best_of(rounds, from_parquet), "mmap_labels_s": best_of(rounds, from_mmap)}


def rows_per_s(get, indices: list[int], rounds: int) -> float:
    def run():
        for i in indices:
            get(i)

    return len(indices) / best_of(rounds, run)


def batches_tokens_per_s(dataset, plan, rounds: int) -> float:
    batches = PlannedBatches(dataset, plan, 0)
    tokens = sum(int(dataset.lengths[r]) for batch in plan for packed in batch for r in packed)

    def run():
        for k in range(len(batches)):
            batches[k]

    return tokens / best_of(rounds, run)


def bench_access(folder: Path, spec: Path, options_spec: Path, sample: int, rounds: int) -> dict:
    plain = ShardDataset(folder, "train", verify=False)
    results = {}
    for label, path in (("weights_only", spec), ("loss_weights_and_train_on_last", options_spec)):
        mixture = load_mixture(path)
        train, _ = mixture.datasets()
        order = train.epoch_order(0)[:sample].tolist()
        plain_order = epoch_order(len(plain), 0, 0)[:sample].tolist()
        # Alternate plain and mixture rounds so that both see the same machine state.
        plain_rate = mixture_rate = 0.0
        for _ in range(rounds):
            plain_rate = max(plain_rate, rows_per_s(plain.__getitem__, plain_order, 1))
            mixture_rate = max(mixture_rate, rows_per_s(train.__getitem__, order, 1))
        planner = EpochPlanner(train.lengths, 0, 8192, order=train.epoch_order)
        mixture_plan = planner.global_plan(0)[: sample // 100]
        plain_plan = EpochPlanner(plain.lengths, 0, 8192).global_plan(0)[: sample // 100]
        plain_batches = mixture_batches = 0.0
        for _ in range(rounds):
            plain_batches = max(plain_batches, batches_tokens_per_s(plain, plain_plan, 1))
            mixture_batches = max(mixture_batches, batches_tokens_per_s(train, mixture_plan, 1))
        results[label] = {
            "plain_rows_per_s": plain_rate,
            "mixture_rows_per_s": mixture_rate,
            "rows_ratio": mixture_rate / plain_rate,
            "plain_batch_tokens_per_s": plain_batches,
            "mixture_batch_tokens_per_s": mixture_batches,
            "batch_ratio": mixture_batches / plain_batches,
        }
    return results


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the planning dataset (~100 tokens each)")
    parser.add_argument("--access-rows", type=int, default=100_000, help="rows of the ~450-token dataset")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample", type=int, default=200_000, help="rows read per access round")
    parser.add_argument("--work", type=Path, default=None, help="keep the dataset here (reused when present)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sftkit-mixture-bench-"))
    folders = {}
    for name, rows, log_mean in (("short", args.rows, 4.4), ("typical", args.access_rows, 5.9)):
        folders[name] = work / f"data-{name}-{rows}"
        if not (folders[name] / "manifest.json").exists():
            started = time.perf_counter()
            build_dataset(folders[name], rows, log_mean)
            print(f"built {rows:,} rows in {time.perf_counter() - started:.1f} s: {folders[name]}")
    specs = {
        name: (
            write_spec(work / f"{name}.yaml", folder),
            write_spec(work / f"{name}-last.yaml", folder, last_groups=2),
            write_spec(work / f"{name}-options.yaml", folder, last_groups=2, loss_weights=True),
        )
        for name, folder in folders.items()
    }
    spec, last_spec, _ = specs["short"]
    results = {
        "rows": args.rows,
        "groups": GROUPS,
        "planning": bench_planning(spec, last_spec, args.rounds),
        "trained_counts": bench_trained_counts(folders["short"], args.rounds),
        "access_one_core": {
            name: bench_access(folders[name], specs[name][0], specs[name][2], args.sample, args.rounds) for name in folders
        },
    }
    planning, counts = results["planning"], results["trained_counts"]
    print(f"\nplanning {planning['rows']:,} rows, {GROUPS} groups (best of {args.rounds}, one core)")
    print(f"  load_mixture (narrow columns, globs, budgets)  {planning['load_mixture_s'] * 1000:8.0f} ms")
    print(f"  epoch order (20 draws + shuffle)                {planning['epoch_order_s'] * 1000:8.0f} ms")
    print(f"  = planning                                      {planning['planning_s'] * 1000:8.0f} ms")
    print(f"  with 2 groups train_on: last (reads labels)     {planning['load_mixture_2_groups_train_on_last_s'] * 1000:8.0f} ms (load)")
    print(f"  packing the epoch (same with or without a mix)  {planning['packing_epoch_s'] * 1000:8.0f} ms")
    print("per-row trained counts")
    print(f"  Parquet num_trainable column                    {counts['parquet_column_s'] * 1000:8.0f} ms")
    print(f"  counted from memory-mapped labels               {counts['mmap_labels_s'] * 1000:8.0f} ms")
    print_table(
        [f"random access, {args.sample:,} rows (best of {args.rounds})", "plain rows/s", "mixture rows/s", "ratio", "batch ratio"],
        [
            [
                f"{name} rows, {label}",
                f"{figures['plain_rows_per_s']:,.0f}",
                f"{figures['mixture_rows_per_s']:,.0f}",
                f"{figures['rows_ratio']:.2f}",
                f"{figures['batch_ratio']:.2f}",
            ]
            for name, by_spec in results["access_one_core"].items()
            for label, figures in by_spec.items()
        ],
        indent=0,
    )
    write_results("mixture", results, args.out)


if __name__ == "__main__":
    main()

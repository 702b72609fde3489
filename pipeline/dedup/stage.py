"""The dedup stage in one call, composed from the three mappable steps.

``compute_signatures`` per chunk -> ``candidate_pairs`` per band partition ->
``resolve_clusters`` once. A Prefect flow on a cluster maps the first two over chunks and
partitions (they only read and write files) and runs the third once; :func:`dedup_stage` runs the
same three in this process (``sftkit prepare --no-flow``, the library API, and a flow on one
machine's threads), the partitions on a thread per core: their work is numpy sorts and Parquet
reads, which release the GIL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import SFTConfig
from pipeline.dedup.cluster import WORK_PREFIX, DedupOutcome, resolve_clusters
from pipeline.dedup.lsh import candidate_pairs, compute_signatures
from pipeline.fsutil import atomic_path, compression_of, write_parquet_atomic
from pipeline.stage import StageRun


def dedup_stage(
    in_paths: list[Path],
    out_paths: list[Path],
    rejected_path: Path,
    config: SFTConfig,
    *,
    index_dir: Path,
    index_parts: Sequence[str] = (),
    is_good: Callable[[dict[str, Any]], bool] | None = None,
    signature_paths: list[Path] | None = None,
    edge_paths: list[Path] | None = None,
    link_unchanged: bool = False,
    kept_path: Path | None = None,
) -> DedupOutcome:
    """Remove exact then near duplicates among the chunks and against the records earlier runs
    kept (``index_parts`` of ``index_dir``: the manifest's ``dedup_index``); write each chunk's
    kept rows to its ``out_path`` and the removed ones to ``rejected_path``.

    ``is_good(record)`` says whether a record would pass the quality filters (and
    ``is_good.many(tables, count)``, where it has that, judges many at once): of a group of
    duplicates, a good one is kept. ``signature_paths`` (one per chunk) and ``edge_paths`` (one per
    partition) are where the intermediate files go; a file already there is reused, so a rerun
    after a crash redoes only what is missing (default: a temporary folder). The new index part
    the outcome names is written but not current until the manifest lists it. A chunk that keeps
    every row is copied to its output, or with ``link_unchanged`` (inputs nobody writes again,
    as a run's work files) hard-linked. With ``kept_path`` no part is written: which signature
    rows were kept goes there, for :func:`~pipeline.dedup.index.write_part_from` (the signature
    files must then outlive this call: pass ``signature_paths``).
    """
    in_paths, out_paths = [Path(p) for p in in_paths], [Path(p) for p in out_paths]
    if len(in_paths) != len(out_paths):
        raise ValueError(f"dedup needs one output per input chunk: {len(in_paths)} inputs, {len(out_paths)} outputs")
    dedup = config.dedup
    if kept_path is not None and signature_paths is None:
        raise ValueError("dedup_stage(kept_path=...) needs signature_paths: the index part is written later from them")
    if not dedup.enabled:
        with StageRun("dedup") as run:
            for in_path, out_path in zip(in_paths, out_paths):
                table = pq.read_table(in_path)
                write_parquet_atomic(table, out_path, compression=compression_of(in_path))
                run.count(table.num_rows, kept=table.num_rows)
        return DedupOutcome(run.stats, None)
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    # A killed run leaves its scratch folder behind; one run at a time owns index_dir.
    for stale in index_dir.glob(f"{WORK_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    partitions = range(dedup.partitions) if dedup.near else range(0)
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=index_dir) as scratch:
        signature_paths = signature_paths or [Path(scratch) / f"sig-{i:05d}.arrow" for i in range(len(in_paths))]
        edge_paths = edge_paths or [Path(scratch) / f"edges-{p:03d}.npy" for p in partitions]
        for in_path, sig_path in zip(in_paths, signature_paths):
            if not Path(sig_path).exists():
                compute_signatures(in_path, sig_path, dedup)
        missing = [(partition, edge_path) for partition, edge_path in zip(partitions, edge_paths) if not Path(edge_path).exists()]

        def make_edges(job: tuple[int, Path]) -> Path:
            return save_edges(candidate_pairs(signature_paths, job[0], dedup, index_dir, index_parts), job[1])

        with ThreadPoolExecutor(max(1, min(len(missing), os.cpu_count() or 1)), thread_name_prefix="sftkit-dedup") as threads:
            list(threads.map(make_edges, missing))  # (one partition's band columns per core in memory at a time)
        outcome = resolve_clusters(
            in_paths,
            signature_paths,
            edge_paths,
            out_paths,
            rejected_path,
            index_dir,
            dedup,
            is_good,
            index_parts,
            scratch_dir=scratch,
            link_unchanged=link_unchanged,
            kept_path=kept_path,
        )
    return outcome


def save_edges(edges: np.ndarray, path: str | os.PathLike) -> Path:
    """Store one partition's candidate pairs as ``.npy`` (for flows that pass paths between tasks)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, edges)
    return Path(path)

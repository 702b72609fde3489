"""The dedup stage in one call, composed from the three mappable steps.

``compute_signatures`` per chunk -> ``candidate_pairs`` per band partition ->
``resolve_clusters`` once. A scaled-out flow maps the first two over chunks and partitions
(they only read and write files) and runs the third once; :func:`dedup_stage` runs them in
process, one after the other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import DedupConfig
from pipeline.dedup.cluster import resolve_clusters
from pipeline.dedup.lsh import candidate_pairs, compute_signatures
from pipeline.fsutil import TMP_PREFIX, write_parquet_atomic
from pipeline.stage import StageStats, Timer

WORK_PREFIX = f"{TMP_PREFIX}dedup-"


def dedup_stage(
    in_paths: list[Path],
    out_paths: list[Path],
    rejected_path: Path,
    index_dir: Path,
    config: DedupConfig,
    is_good: Callable[[dict[str, Any]], bool] | None = None,
    *,
    index_parts: list[str] | None = None,
) -> StageStats:
    """Remove exact then near duplicates among the chunks and against the records earlier runs
    kept; write each chunk's kept rows to its ``out_path`` and the removed ones to
    ``rejected_path``.

    ``index_parts``: the committed index parts to dedup against (from the dataset manifest);
    None reads ``index_dir/current.json``. The part this run adds is written but not committed:
    its name is ``stats.extra["index_part"]`` and the list to commit once the run's outputs are
    in place is ``stats.extra["index_parts"]`` (see :mod:`pipeline.dedup.index`).
    """
    in_paths, out_paths = [Path(p) for p in in_paths], [Path(p) for p in out_paths]
    if len(in_paths) != len(out_paths):
        raise ValueError(f"dedup needs one output per input chunk: {len(in_paths)} inputs, {len(out_paths)} outputs")
    if not config.enabled:
        return _pass_through(in_paths, out_paths)
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    # A killed run leaves its signature folder behind; one run at a time owns index_dir.
    for stale in index_dir.glob(f"{WORK_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    timer = Timer()
    with timer, tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=index_dir) as work:
        sig_paths = [Path(work) / f"sig-{i:05d}.parquet" for i in range(len(in_paths))]
        for in_path, sig_path in zip(in_paths, sig_paths):
            compute_signatures(in_path, sig_path, config)
        edges = []
        if config.near:
            for partition in range(config.partitions):
                edges.append(candidate_pairs(sig_paths, partition, config, index_dir, index_parts))
        stats = resolve_clusters(
            in_paths, sig_paths, edges, out_paths, rejected_path, index_dir, config, is_good, index_parts
        )
    stats.seconds = timer.seconds
    return stats


def _pass_through(in_paths: list[Path], out_paths: list[Path]) -> StageStats:
    stats = StageStats("dedup", extra={"index_part": None})
    with Timer() as timer:
        for in_path, out_path in zip(in_paths, out_paths):
            table = pq.read_table(in_path)
            write_parquet_atomic(table, out_path)
            stats.records_in += table.num_rows
            stats.records_out += table.num_rows
    stats.seconds = timer.seconds
    return stats


def save_edges(edges: np.ndarray, path: str | os.PathLike) -> Path:
    """Store one partition's candidate pairs as ``.npy`` (for flows that pass paths between tasks)."""
    from pipeline.fsutil import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, edges)
    return Path(path)

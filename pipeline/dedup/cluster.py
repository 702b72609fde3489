"""The global reduce of dedup: verify candidate pairs, cluster them, pick who stays, write.

Owns the keep policy and every removal decision.

1. Exact duplicates first: rows whose normal form an earlier run kept are removed
   (``exact_duplicate`` of that record); the others group by normal form.
2. Candidate pairs (from :func:`pipeline.dedup.lsh.candidate_pairs`, one group of bands per
   partition) are verified by the exact Jaccard of their shingle sets (``verify_exact``,
   precise at the threshold), whether both records are new or one was kept by an earlier run
   (its shingle set is in the index; only the rows candidate pairs name are read). So a pair is
   judged the same way in one run or across refreshes. A pair against a record of a format-1
   index part (no shingle sets stored) falls back to the MinHash estimate and is counted
   (``pairs_judged_by_estimate``). Pairs below the threshold are dropped.
3. Connected components over the verified pairs (``scipy.sparse.csgraph``), exact-duplicate
   groups folded in: each component is a cluster.
4. Keep policy, deterministic: a cluster holding a record kept by an earlier run keeps only the
   old records (they are in shards already); otherwise it keeps the member that passes
   ``is_good`` (if given), then has the longest response, then comes first in
   ``(source, source_index)`` order, then has the smallest id.
5. Every other member is removed: ``exact_duplicate`` when its normal form equals the kept one,
   else ``near_duplicate``; ``duplicate_of`` = the kept record's id (the most similar old record
   when old ones win) and ``similarity`` = the estimated Jaccard to it (1.0 for exact). Through
   a chain A~B~C a removed member can be less similar to the kept one than the threshold;
   ``detail`` says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import schema
from pipeline.config import DedupConfig
from pipeline.dedup import index as dedup_index
from pipeline.dedup.lsh import RESPONSE_CHARS, SHINGLES, lsh_shape, read_uint64, run_params
from pipeline.dedup.minhash import estimated_jaccard
from pipeline.dedup.normalize import row_dicts
from pipeline.fsutil import write_parquet_atomic
from pipeline.stage import Drop, StageRun, StageStats, rejected_rows_from_table, write_rejected

log = logging.getLogger("sftkit.dedup")

EXACT, NEAR = "exact_duplicate", "near_duplicate"
EXACT_MARGIN = 0.2


class _Rows:
    """The new rows of this run across chunk files: global row <-> (file, local row)."""

    def __init__(self, sig_paths: list[Path]) -> None:
        self.sig_paths = sig_paths
        counts = [pq.read_metadata(p).num_rows for p in sig_paths]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def split(self, rows: np.ndarray):
        """Yield ``(file_index, global_rows, local_rows)`` for sorted global ``rows``."""
        for i in range(len(self.sig_paths)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            picked = rows[(rows >= lo) & (rows < hi)]
            if len(picked):
                yield i, picked, picked - lo

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([pq.read_table(p, columns=[name]).column(name).combine_chunks() for p in self.sig_paths])

    def signatures(self, rows: np.ndarray, num_perm: int) -> np.ndarray:
        out = np.empty((len(rows), num_perm), dtype=np.uint32)
        for i, picked, local in self.split(rows):
            sig = pq.read_table(self.sig_paths[i], columns=[dedup_index.SIGNATURE]).column(0).combine_chunks()
            values = sig.take(pa.array(local)).flatten().to_numpy().reshape(-1, num_perm)
            out[np.searchsorted(rows, picked)] = values
        return out


def _fixed_list_numpy(array: pa.Array, width: int) -> np.ndarray:
    return array.flatten().to_numpy().reshape(-1, width)


def _shingle_sets(rows: _Rows, nodes: np.ndarray) -> dict[int, np.ndarray]:
    """Sorted distinct shingle hashes of the given new rows, from their signature files."""
    sets: dict[int, np.ndarray] = {}
    for i, picked, local in rows.split(nodes):
        column = pq.read_table(rows.sig_paths[i], columns=[SHINGLES]).column(0).combine_chunks()
        sets.update(_list_sets(picked, column.take(pa.array(local))))
    return sets


def _index_shingle_sets(index_dir, index_parts, nodes: np.ndarray, num_new: int) -> dict[int, np.ndarray]:
    """The same for the given old nodes (sorted), read from the index rows they name; a node whose
    part stores no shingle sets (format 1) is left out."""
    if not len(nodes):
        return {}
    return _list_sets(nodes, dedup_index.index_rows(index_dir, index_parts, nodes - num_new, dedup_index.SHINGLES))


def _list_sets(nodes: np.ndarray, lists: pa.ListArray) -> dict[int, np.ndarray]:
    """``{node: its list as numpy}`` for the non-null entries of ``lists`` (one per node)."""
    lengths = pc.fill_null(lists.value_lengths(), 0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = lists.flatten().to_numpy()  # null entries contribute no values
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    return {int(node): values[lo:hi] for node, lo, hi, ok in zip(nodes, offsets[:-1], offsets[1:], valid) if ok}


def _set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class DedupOutcome(NamedTuple):
    """What the dedup stage did: its counts, and the index part it wrote for the records it kept
    (None when it kept nothing). The part is not current until the manifest lists it."""

    stats: StageStats
    index_part: str | None


def resolve_clusters(
    in_paths: list[str | os.PathLike],
    sig_paths: list[str | os.PathLike],
    edges: list[np.ndarray | str | os.PathLike],
    out_paths: list[str | os.PathLike],
    rejected_path: str | os.PathLike,
    index_dir: str | os.PathLike,
    config: DedupConfig,
    is_good: Callable[[dict[str, Any]], bool] | None = None,
    index_parts: Sequence[str] = (),
) -> DedupOutcome:
    """Decide, write the kept rows per chunk and the rejected rows, and write the new index part.

    ``edges``: the candidate pairs of every partition (arrays or ``.npy`` paths); ``index_parts``:
    the current index (the manifest's ``dedup_index``).
    """
    in_paths, sig_paths, out_paths = ([Path(p) for p in paths] for paths in (in_paths, sig_paths, out_paths))
    if not len(in_paths) == len(sig_paths) == len(out_paths):
        raise ValueError(
            f"dedup needs one signature file and one output per input chunk: {len(in_paths)} inputs, "
            f"{len(sig_paths)} signature files, {len(out_paths)} outputs"
        )
    with StageRun("dedup") as run:
        removed_by_file = _decide(in_paths, sig_paths, edges, index_dir, config, is_good, index_parts, run)
        part = _write_outputs(in_paths, sig_paths, out_paths, rejected_path, index_dir, config, removed_by_file)
    return DedupOutcome(run.stats, part)


@dataclass
class _Decisions:
    """Per new row: why it goes (0 kept, 1 exact, 2 near), whom it duplicates, how similar."""

    reason: np.ndarray
    dup_node: np.ndarray
    similarity: np.ndarray
    chained: np.ndarray

    @classmethod
    def keep_all(cls, num_rows: int) -> _Decisions:
        return cls(
            np.zeros(num_rows, dtype=np.int8),
            np.full(num_rows, -1, dtype=np.int64),
            np.zeros(num_rows, dtype=np.float64),
            np.zeros(num_rows, dtype=bool),
        )


@dataclass
class _Members:
    """What the keep policy looks at, for every new row (sources and ids as Arrow arrays)."""

    ids: pa.Array
    sources: pa.Array
    source_index: np.ndarray
    response: np.ndarray
    exact: np.ndarray

    def order_key(self, row: int, good: dict[int, bool]) -> tuple:
        return (
            0 if good.get(row, True) else 1,
            -self.response[row],
            self.sources[row].as_py(),
            self.source_index[row],
            self.ids[row].as_py(),
        )


def _decide(in_paths, sig_paths, edges, index_dir, config, is_good, index_parts, run: StageRun):
    rows = _Rows(sig_paths)
    for in_path, sig_path, count in zip(in_paths, sig_paths, np.diff(rows.offsets)):
        if pq.read_metadata(in_path).num_rows != count:
            raise ValueError(f"dedup signature file {sig_path} does not match its chunk {in_path} (row counts differ)")
    num_new = rows.total
    old = dedup_index.load_index(index_dir, index_parts, columns=[schema.ID, dedup_index.EXACT_HASH], params=run_params(config))
    old_exact = old.column(dedup_index.EXACT_HASH).to_numpy().astype(np.uint64)
    members = _Members(
        ids=rows.column(schema.ID).combine_chunks(),
        sources=rows.column(schema.SOURCE).combine_chunks(),
        source_index=read_uint64(sig_paths, schema.SOURCE_INDEX).astype(np.int64),
        response=read_uint64(sig_paths, RESPONSE_CHARS).astype(np.int64),
        exact=read_uint64(sig_paths, dedup_index.EXACT_HASH),
    )
    decisions = _Decisions.keep_all(num_new)

    # 1. exact duplicates of records kept before; exact groups within this run share a rep
    if config.exact:
        hit = _exact_in_index(members.exact, old_exact, decisions, num_new)
        _, first, inverse = np.unique(members.exact, return_index=True, return_inverse=True)
        rep_of = first[inverse.reshape(-1)]
    else:
        hit = np.zeros(num_new, dtype=bool)
        rep_of = np.arange(num_new)

    # 2. verify candidate pairs
    total = num_new + old.num_rows
    pairs = _load_pairs(edges, total)
    nodes = np.unique(pairs)
    node_sigs = _node_signatures(nodes, rows, index_dir, index_parts, config.num_perm)

    def signature(node) -> np.ndarray:
        return node_sigs[np.searchsorted(nodes, node)]

    estimate = estimated_jaccard(signature(pairs[:, 0]), signature(pairs[:, 1]))
    by_estimate = 0
    if config.verify:
        accepted, by_estimate = _verify(pairs, estimate, rows, config, index_dir, index_parts)
    else:
        accepted = pairs

    # 3. clusters, 4. keep policy
    groups = _clusters(accepted, rep_of, hit, num_new, total)
    good = _quality(groups, rows, in_paths, is_good) if is_good is not None else {}
    for new_members, old_members in groups:
        if old_members:
            for m in new_members:
                sims = estimated_jaccard(signature(rep_of[m]), signature(np.asarray(old_members)))
                best = int(np.argmax(sims))
                decisions.reason[m], decisions.dup_node[m], decisions.similarity[m] = 2, old_members[best], sims[best]
            continue
        winner = min((int(m) for m in new_members), key=lambda m: members.order_key(m, good))
        for m in new_members:
            if m == winner:
                continue
            decisions.dup_node[m] = winner
            if config.exact and members.exact[m] == members.exact[winner]:
                decisions.reason[m], decisions.similarity[m] = 1, 1.0
            else:
                sim = float(estimated_jaccard(signature(rep_of[m]), signature(rep_of[winner])))
                decisions.reason[m], decisions.similarity[m] = 2, sim
                decisions.chained[m] = sim < config.threshold

    # 5. the removed rows of each chunk, with their Drop
    old_ids = old.column(schema.ID).combine_chunks()
    removed_by_file = _drops(rows, decisions, members.ids, old_ids, config.threshold)
    reasons = np.bincount(decisions.reason, minlength=3)
    run.count(num_new, kept=int(reasons[0]), drops=[EXACT] * int(reasons[1]) + [NEAR] * int(reasons[2]))
    bands, rows_per_band = lsh_shape(config)
    run.stats.extra.update({"candidate_pairs": int(len(pairs)), "verified_pairs": int(len(accepted)), "lsh": f"{bands}x{rows_per_band}"})
    if by_estimate:
        run.stats.extra["pairs_judged_by_estimate"] = by_estimate
        log.warning(
            "dedup: %d candidate pairs near the threshold were judged by the MinHash estimate, as their earlier record's "
            "index part (written by an older sftkit) stores no shingle sets; prepare into a fresh folder for exact verification",
            by_estimate,
        )
    return removed_by_file


def _exact_in_index(new_exact: np.ndarray, old_exact: np.ndarray, decisions: _Decisions, num_new: int) -> np.ndarray:
    """Mark rows whose normal form an earlier run kept; returns that mask."""
    if not len(old_exact):
        return np.zeros(len(new_exact), dtype=bool)
    order = np.argsort(old_exact, kind="stable")
    pos = np.minimum(np.searchsorted(old_exact[order], new_exact), len(order) - 1)
    hit = old_exact[order][pos] == new_exact
    decisions.reason[hit] = 1
    decisions.dup_node[hit] = num_new + order[pos[hit]]
    decisions.similarity[hit] = 1.0
    return hit


def _load_pairs(edges, total: int) -> np.ndarray:
    """All partitions' candidate pairs, unique and sorted, as an ``(E, 2)`` array."""
    arrays = [np.load(e) if isinstance(e, (str, os.PathLike)) else np.asarray(e) for e in edges]
    arrays = [a.reshape(-1, 2).astype(np.int64) for a in arrays]
    if not arrays or not sum(len(a) for a in arrays):
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate([a[:, 0] * total + a[:, 1] for a in arrays]))
    return np.stack([codes // total, codes % total], axis=1)


def _verify(pairs: np.ndarray, estimate: np.ndarray, rows: _Rows, config: DedupConfig, index_dir, index_parts) -> tuple[np.ndarray, int]:
    """The pairs whose similarity reaches the threshold (see the module docstring), and how many
    pairs near it were judged by the estimate for want of an old record's shingle set."""
    similarity = estimate.copy()
    if not config.verify_exact:
        return pairs[similarity >= config.threshold], 0
    # Only pairs whose estimate is near the threshold need their exact Jaccard: the estimate's
    # standard deviation is <= 0.5 / sqrt(num_perm) (0.044 at 128), so one EXACT_MARGIN away it
    # decides the same way except with negligible probability. The rule depends on the pair
    # alone, not on which run its records came in.
    near = np.flatnonzero(np.abs(estimate - config.threshold) < EXACT_MARGIN)
    nodes = np.unique(pairs[near])
    sets = _shingle_sets(rows, nodes[nodes < rows.total])
    sets |= _index_shingle_sets(index_dir, index_parts, nodes[nodes >= rows.total], rows.total)
    by_estimate = 0
    for k in near:
        a, b = sets.get(int(pairs[k, 0])), sets.get(int(pairs[k, 1]))
        if a is None or b is None:
            by_estimate += 1
        else:
            similarity[k] = _set_jaccard(a, b)
    return pairs[similarity >= config.threshold], by_estimate


def _clusters(accepted: np.ndarray, rep_of: np.ndarray, hit: np.ndarray, num_new: int, total: int):
    """``[(new member rows, old member nodes)]`` of every cluster with more than one member:
    connected components over the verified pairs, each exact group riding on its rep."""
    label_of_node = np.full(total, -1, dtype=np.int64)
    if len(accepted):
        nodes = np.unique(accepted)
        a, b = np.searchsorted(nodes, accepted[:, 0]), np.searchsorted(nodes, accepted[:, 1])
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(nodes),) * 2)
        _, labels = connected_components(graph, directed=False)
        label_of_node[nodes] = labels
    live = np.flatnonzero(~hit)
    if not len(live):
        return []
    cluster = label_of_node[rep_of[live]]
    alone = cluster < 0
    cluster[alone] = int(label_of_node.max()) + 1 + rep_of[live][alone]  # exact group outside any component
    order = np.lexsort((live, cluster))
    live, cluster = live[order], cluster[order]
    bounds = np.flatnonzero(np.concatenate([[True], cluster[1:] != cluster[:-1], [True]]))
    old_by_label: dict[int, list[int]] = {}
    for node in np.flatnonzero(label_of_node[num_new:] >= 0) + num_new:
        old_by_label.setdefault(int(label_of_node[node]), []).append(int(node))
    groups = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        new_members = [int(m) for m in live[lo:hi]]
        old_members = old_by_label.get(int(cluster[lo]), [])
        if len(new_members) + len(old_members) > 1:
            groups.append((new_members, old_members))
    return groups


def _quality(groups, rows: _Rows, in_paths: list[Path], is_good) -> dict[int, bool]:
    """``is_good`` of every row that competes in a cluster without old members."""
    need = np.array(sorted(m for new_members, old in groups if not old for m in new_members), dtype=np.int64)
    good: dict[int, bool] = {}
    for i, picked, local in rows.split(need):
        table = pq.read_table(in_paths[i])
        for node, record in zip(picked, row_dicts(table, local).values()):
            good[int(node)] = bool(is_good(record))
    return good


def _drops(rows: _Rows, decisions: _Decisions, ids: pa.Array, old_ids: pa.Array, threshold: float):
    """``[(local row indices, Drops)]`` per chunk."""

    def kept_id(node: int) -> str:
        return ids[node].as_py() if node < rows.total else old_ids[node - rows.total].as_py()

    removed_by_file: list[tuple[np.ndarray, list[Drop]]] = []
    for i in range(len(rows.sig_paths)):
        lo, hi = rows.offsets[i], rows.offsets[i + 1]
        local = np.flatnonzero(decisions.reason[lo:hi])
        drops = []
        for r in local + lo:
            of = kept_id(int(decisions.dup_node[r]))
            if decisions.reason[r] == 1:
                drops.append(Drop(EXACT, f"same text as {of} after normalisation", of, 1.0))
                continue
            sim = float(decisions.similarity[r])
            note = f"; joined through a chain of pairs >= {threshold:g}" if decisions.chained[r] else ""
            drops.append(Drop(NEAR, f"near duplicate of {of} (estimated Jaccard {sim:.3f}{note})", of, sim))
        removed_by_file.append((local, drops))
    return removed_by_file


def _node_signatures(nodes: np.ndarray, rows: _Rows, index_dir, index_parts, num_perm: int) -> np.ndarray:
    out = np.empty((len(nodes), num_perm), dtype=np.uint32)
    new = nodes[nodes < rows.total]
    out[: len(new)] = rows.signatures(new, num_perm)
    old = nodes[nodes >= rows.total] - rows.total
    if len(old):
        values = dedup_index.index_rows(index_dir, index_parts, old, dedup_index.SIGNATURE)
        out[len(new) :] = _fixed_list_numpy(values, num_perm)
    return out


def _write_outputs(in_paths, sig_paths, out_paths, rejected_path, index_dir, config, removed_by_file) -> str | None:
    rejected = []
    writer = dedup_index.PartWriter(index_dir, run_params(config))
    try:
        for in_path, sig_path, out_path, (local, drops) in zip(in_paths, sig_paths, out_paths, removed_by_file):
            table = pq.read_table(in_path)
            keep = np.ones(table.num_rows, dtype=bool)
            keep[local] = False
            write_parquet_atomic(table.filter(pa.array(keep)), out_path)
            rejected.append(rejected_rows_from_table(table, local.tolist(), drops, "dedup"))
            del table
            sig = pq.read_table(sig_path, columns=writer.schema.names)
            writer.write(sig.filter(pa.array(keep)))
        all_rejected = pa.concat_tables(rejected) if rejected else schema.REJECTED_SCHEMA.empty_table()
        write_rejected(all_rejected, rejected_path)
        return writer.close()
    except BaseException:
        writer.abort()
        raise

"""The global reduce of dedup: verify candidate pairs, cluster them, pick who stays.

Owns the keep policy and every removal decision (written out by :mod:`~pipeline.dedup.outputs`).

1. Exact duplicates first: rows whose normal form an earlier run kept are removed
   (``exact_duplicate`` of that record); the others group by normal form.
2. Candidate pairs (from :func:`pipeline.dedup.lsh.candidate_pairs`, one group of bands per
   partition) are verified by the exact Jaccard of their shingle sets (``verify_exact``,
   precise at the threshold), whether both records are new or one was kept by an earlier run
   (its shingle set is in the index; only the rows candidate pairs name are read). So a pair is
   judged the same way in one run or across refreshes. A pair against a record of a format-1
   index part (no shingle sets stored) falls back to the MinHash estimate and is counted
   (``pairs_judged_by_estimate``). Pairs below the threshold are dropped.
3. Connected components over the verified pairs (:func:`components`), exact-duplicate
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

Every step works on whole arrays (pairs, nodes, clusters), never a Python object per pair,
record or cluster, and memory stays flat in the run's size: per new row a few numbers (about
50 bytes: normal-form hash, response length, source rank, the decision), per candidate pair
two node numbers and a similarity; the signatures and shingle sets of the nodes pairs name are
gathered into scratch files and read back block by block (:mod:`~pipeline.dedup.nodes`); the
quality verdict, the records and the outputs are read and written one row group at a time.
``is_good`` is asked lazily: of each cluster, the members in keep order until the first that
passes (most clusters: one question), which decides exactly as asking every member would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import DedupConfig
from pipeline.dedup import index as dedup_index
from pipeline.dedup.lsh import RESPONSE_CHARS, lsh_shape, ranges, run_params
from pipeline.dedup.nodes import NewRows, ShingleStore, SignatureStore
from pipeline.dedup.outputs import REMOVED_EXACT, REMOVED_NEAR, Decisions, write_outputs
from pipeline.fsutil import TMP_PREFIX
from pipeline.stage import StageRun, StageStats

log = logging.getLogger("sftkit.dedup")

EXACT_MARGIN = 0.2
WORK_PREFIX = f"{TMP_PREFIX}dedup-"  # scratch folders in the index folder; a killed run's are removed
_CROSS_PAIRS = 1 << 20  # (new member, old member) pairs estimated at once


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
    scratch_dir: str | os.PathLike | None = None,
    link_unchanged: bool = False,
    kept_path: str | os.PathLike | None = None,
) -> DedupOutcome:
    """Decide, write the kept rows per chunk and the rejected rows, and write the new index part.

    ``edges``: the candidate pairs of every partition (arrays or ``.npy`` paths); ``index_parts``:
    the current index (the manifest's ``dedup_index``); ``scratch_dir``: where the nodes' values
    are spilled (default: a temporary folder in ``index_dir``, removed at the end); with
    ``kept_path``, no part: which rows were kept goes there (see :func:`.outputs.write_outputs`).
    """
    in_paths, sig_paths, out_paths = ([Path(p) for p in paths] for paths in (in_paths, sig_paths, out_paths))
    if not len(in_paths) == len(sig_paths) == len(out_paths):
        raise ValueError(
            f"dedup needs one signature file and one output per input chunk: {len(in_paths)} inputs, "
            f"{len(sig_paths)} signature files, {len(out_paths)} outputs"
        )
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack, StageRun("dedup") as run:
        if scratch_dir is None:
            scratch_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=index_dir))
        rows = NewRows(sig_paths)
        decisions = _decide(in_paths, rows, edges, index_dir, config, is_good, index_parts, Path(scratch_dir), run)
        part = write_outputs(
            in_paths,
            rows,
            decisions,
            out_paths,
            rejected_path,
            index_dir,
            index_parts,
            config,
            run,
            link_unchanged,
            Path(kept_path) if kept_path else None,
        )
    return DedupOutcome(run.stats, part)


@dataclass
class _Groups:
    """The clusters of more than one record that hold a new row, as arrays (clusters numbered
    ``0 .. C-1``): their new members sorted by cluster then row, and their old members (nodes of
    the index) sorted by cluster then node, cluster ``c``'s at ``old_nodes[old_start[c]:old_start[c + 1]]``."""

    members: np.ndarray
    cluster: np.ndarray
    old_nodes: np.ndarray
    old_start: np.ndarray

    @property
    def old_count(self) -> np.ndarray:
        return np.diff(self.old_start)


def _decide(in_paths, rows: NewRows, edges, index_dir, config, is_good, index_parts, scratch: Path, run: StageRun) -> Decisions:
    for in_path, sig_path, count in zip(in_paths, rows.paths, np.diff(rows.offsets)):
        if pq.read_metadata(in_path).num_rows != count:
            raise ValueError(f"dedup signature file {sig_path} does not match its chunk {in_path} (row counts differ)")
    num_new = rows.total
    old = dedup_index.load_index(index_dir, index_parts, columns=[dedup_index.EXACT_HASH], params=run_params(config))
    old_exact = old.column(dedup_index.EXACT_HASH).to_numpy().astype(np.uint64)
    del old
    exact = rows.numbers(dedup_index.EXACT_HASH, np.uint64)
    decisions = Decisions.keep_all(num_new)

    # 1. exact duplicates of records kept before; exact groups within this run share a rep
    if config.exact:
        hit = _exact_in_index(exact, old_exact, decisions, num_new)
        _, first, inverse = np.unique(exact, return_index=True, return_inverse=True)
        rep_of = first[inverse.reshape(-1)]
    else:
        hit = np.zeros(num_new, dtype=bool)
        rep_of = np.arange(num_new)

    # 2. verify candidate pairs
    pairs = _load_pairs(edges, num_new + len(old_exact))
    signatures = SignatureStore(scratch / "signatures.u32", np.unique(pairs), rows, index_dir, index_parts, config.num_perm)
    by_estimate = 0
    if config.verify:
        accepted, by_estimate = _verify(pairs, signatures, rows, config, index_dir, index_parts, scratch)
    else:
        accepted = pairs

    # 3. clusters, 4. keep policy
    groups = _clusters(accepted, rep_of, hit, num_new)
    _lose_to_old(groups, rep_of, signatures, decisions)
    _keep_one_new(groups, rows, in_paths, exact, rep_of, is_good, signatures, config, decisions)

    bands, rows_per_band = lsh_shape(config)
    run.stats.extra.update({"candidate_pairs": int(len(pairs)), "verified_pairs": int(len(accepted)), "lsh": f"{bands}x{rows_per_band}"})
    if by_estimate:
        run.stats.extra["pairs_judged_by_estimate"] = by_estimate
        log.warning(
            "dedup: %d candidate pairs near the threshold were judged by the MinHash estimate, as their earlier record's "
            "index part (written by an older sftkit) stores no shingle sets; prepare into a fresh folder for exact verification",
            by_estimate,
        )
    return decisions


def _exact_in_index(new_exact: np.ndarray, old_exact: np.ndarray, decisions: Decisions, num_new: int) -> np.ndarray:
    """Mark rows whose normal form an earlier run kept; returns that mask."""
    if not len(old_exact):
        return np.zeros(len(new_exact), dtype=bool)
    order = np.argsort(old_exact, kind="stable")
    pos = np.minimum(np.searchsorted(old_exact[order], new_exact), len(order) - 1)
    hit = old_exact[order][pos] == new_exact
    decisions.reason[hit] = REMOVED_EXACT
    decisions.dup_node[hit] = num_new + order[pos[hit]]
    decisions.similarity[hit] = 1.0
    return hit


def _load_pairs(edges, total: int) -> np.ndarray:
    """All partitions' candidate pairs, unique and sorted, as an ``(E, 2)`` array (merged one
    partition at a time: a pair sharing bands of several partitions is in each of their lists)."""
    codes = np.empty(0, dtype=np.int64)
    for edge in edges:
        pairs = (np.load(edge) if isinstance(edge, (str, os.PathLike)) else np.asarray(edge)).reshape(-1, 2).astype(np.int64)
        codes = np.union1d(codes, pairs[:, 0] * total + pairs[:, 1])
    return np.stack([codes // total, codes % total], axis=1)


def _verify(pairs: np.ndarray, signatures: SignatureStore, rows: NewRows, config: DedupConfig, index_dir, index_parts, scratch: Path):
    """The pairs whose similarity reaches the threshold (see the module docstring), and how many
    pairs near it were judged by the estimate for want of an old record's shingle set."""
    estimate = signatures.estimates(pairs[:, 0], pairs[:, 1])
    if not config.verify_exact:
        return pairs[estimate >= config.threshold], 0
    # Only pairs whose estimate is near the threshold need their exact Jaccard: the estimate's
    # standard deviation is <= 0.5 / sqrt(num_perm) (0.044 at 128), so one EXACT_MARGIN away it
    # decides the same way except with negligible probability. The rule depends on the pair
    # alone, not on which run its records came in.
    near = np.flatnonzero(np.abs(estimate - config.threshold) < EXACT_MARGIN)
    similarity = estimate
    by_estimate = 0
    if len(near):
        sets = ShingleStore(scratch / "shingles.u32", np.unique(pairs[near]), rows, index_dir, index_parts)
        jaccard, known = sets.jaccards(pairs[near, 0], pairs[near, 1])
        sets.path.unlink()
        similarity[near[known]] = jaccard[known]
        by_estimate = int(np.count_nonzero(~known))
    return pairs[similarity >= config.threshold], by_estimate


# Above this many nodes scipy's connected components repay its import (measured: 200k nodes and
# 100k edges 0.035 s here against 0.009 + 0.22 s; 2M and 1M 0.85 s against 0.19 + 0.22 s).
_SCIPY_NODES = 500_000


def components(a: np.ndarray, b: np.ndarray, num_nodes: int) -> np.ndarray:
    """The connected components of the undirected graph on nodes ``0 .. num_nodes-1`` with edges
    ``(a[i], b[i])``: each node's component, numbered ``0 ..`` in the order of the components'
    smallest nodes (the numbering of ``scipy.sparse.csgraph.connected_components``; a test holds
    the two equal).

    Up to :data:`_SCIPY_NODES` nodes, union by hooking and pointer jumping, on whole arrays:
    every edge whose ends have different roots hooks the larger root under the smaller, then
    every node jumps to its root, until no edge joins two roots. Roots only ever point to smaller
    nodes, so a component's root ends as its smallest node, which no hook moves. scipy's import
    alone took 0.20-0.23 CPU-s of the run's one global step (2.3 s on one core for 50k
    near-duplicate-heavy conversations, whose graph this takes 0.01 s for); its own loop is four
    times faster, so a larger graph goes to it."""
    if num_nodes > _SCIPY_NODES:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(num_nodes, num_nodes))
        return connected_components(graph, directed=False)[1].astype(np.int64)
    parent = np.arange(num_nodes, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            break
        np.minimum.at(parent, np.maximum(root_a, root_b)[apart], np.minimum(root_a, root_b)[apart])
        while True:  # every node to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.unique(parent, return_inverse=True)[1].reshape(-1)


def _clusters(accepted: np.ndarray, rep_of: np.ndarray, hit: np.ndarray, num_new: int) -> _Groups:
    """Connected components over the verified pairs, each exact group riding on its rep."""
    nodes = np.unique(accepted)
    labels = np.empty(0, dtype=np.int64)
    if len(accepted):
        labels = components(np.searchsorted(nodes, accepted[:, 0]), np.searchsorted(nodes, accepted[:, 1]), len(nodes))
    num_labels = int(labels.max()) + 1 if len(labels) else 0
    live = np.flatnonzero(~hit)
    rep = rep_of[live]
    pos = np.minimum(np.searchsorted(nodes, rep), max(len(nodes) - 1, 0))
    in_component = nodes[pos] == rep if len(nodes) else np.zeros(len(rep), dtype=bool)
    # an exact group outside any component is a cluster of its own, numbered after the components
    label = np.where(in_component, labels[pos] if len(nodes) else 0, num_labels + rep)
    label_ids, cluster = np.unique(label, return_inverse=True)
    cluster = cluster.reshape(-1)
    # old members: the index's nodes in a component that holds a new row
    old_nodes, old_labels = nodes[nodes >= num_new], labels[nodes >= num_new]
    pos = np.minimum(np.searchsorted(label_ids, old_labels), max(len(label_ids) - 1, 0))
    held = label_ids[pos] == old_labels if len(label_ids) else np.zeros(len(old_labels), dtype=bool)
    old_cluster, old_nodes = pos[held], old_nodes[held]
    order = np.lexsort((old_nodes, old_cluster))
    old_count = np.bincount(old_cluster, minlength=len(label_ids))
    grouped = (np.bincount(cluster, minlength=len(label_ids)) + old_count)[cluster] > 1
    members, member_cluster = live[grouped], cluster[grouped]
    by_cluster = np.argsort(member_cluster, kind="stable")
    return _Groups(members[by_cluster], member_cluster[by_cluster], old_nodes[order], np.concatenate([[0], np.cumsum(old_count)]))


def _lose_to_old(groups: _Groups, rep_of: np.ndarray, signatures: SignatureStore, decisions: Decisions) -> None:
    """The new members of clusters holding old records go, as near duplicates of the most
    similar old member (the first, in node order, of equally similar ones)."""
    old_count = groups.old_count
    with_old = old_count[groups.cluster] > 0
    members, cluster = groups.members[with_old], groups.cluster[with_old]
    counts = old_count[cluster]
    work = np.cumsum(counts)
    lo = 0
    while lo < len(members):
        hi = max(lo + 1, int(np.searchsorted(work, (work[lo - 1] if lo else 0) + _CROSS_PAIRS, side="right")))
        m, n = members[lo:hi], counts[lo:hi]
        olds = groups.old_nodes[ranges(groups.old_start[cluster[lo:hi]], n)]
        sims = signatures.estimates(np.repeat(rep_of[m], n), olds)
        segments = np.concatenate([[0], np.cumsum(n)[:-1]])
        best = np.maximum.reduceat(sims, segments)
        first = np.minimum.reduceat(np.where(sims == np.repeat(best, n), np.arange(len(sims)), len(sims)), segments)
        decisions.reason[m], decisions.dup_node[m], decisions.similarity[m] = REMOVED_NEAR, olds[first], sims[first]
        lo = hi


def _keep_one_new(groups: _Groups, rows: NewRows, in_paths, exact, rep_of, is_good, signatures: SignatureStore, config, decisions) -> None:
    """Of each cluster without old records, keep one member (the keep policy); the others go."""
    members, cluster = groups.members, groups.cluster
    new_only = groups.old_count[cluster] == 0
    members, cluster = members[new_only], cluster[new_only]
    if not len(members):
        return
    by_row = np.argsort(members)
    ids = rows.take(members[by_row], schema.ID).take(pa.array(np.argsort(by_row)))
    keep_order = pa.table(
        {
            "cluster": cluster,
            "longest_response": -rows.numbers(RESPONSE_CHARS)[members],
            "source": rows.source_ranks(schema.SOURCE)[members],
            "source_index": rows.numbers(schema.SOURCE_INDEX)[members],
            "id": ids,
            "row": members,
        }
    )
    order = pc.sort_indices(keep_order, sort_keys=[(name, "ascending") for name in keep_order.column_names]).to_numpy()
    members, cluster = members[order], cluster[order]
    starts = np.flatnonzero(np.concatenate([[True], cluster[1:] != cluster[:-1]]))
    sizes = np.diff(np.append(starts, len(members)))
    winners = members[_first_good(members, starts, sizes, in_paths, is_good)]
    winner_of = np.repeat(winners, sizes)
    lost = members != winner_of
    m, w = members[lost], winner_of[lost]
    decisions.dup_node[m] = w
    same = exact[m] == exact[w] if config.exact else np.zeros(len(m), dtype=bool)
    decisions.reason[m[same]], decisions.similarity[m[same]] = REMOVED_EXACT, 1.0
    m, w = m[~same], w[~same]
    sims = signatures.estimates(rep_of[m], rep_of[w])
    decisions.reason[m], decisions.similarity[m], decisions.chained[m] = REMOVED_NEAR, sims, sims < config.threshold


def _first_good(members: np.ndarray, starts: np.ndarray, sizes: np.ndarray, in_paths, is_good) -> np.ndarray:
    """Per cluster (``members[starts[c]:starts[c] + sizes[c]]``, in keep order), the position of
    its first member that ``is_good``, or of its first member when none is (or no ``is_good``).

    Asked in rounds: each cluster's next member, then its next 8, 64, ... until one passes,
    so a cluster costs one question when its first member passes (the common case), and the
    records are read a row group at a time for all clusters of a round together."""
    winner = starts.copy()
    if is_good is None:
        return winner
    found = np.zeros(len(starts), dtype=bool)
    asked = np.zeros(len(starts), dtype=np.int64)
    pending = np.arange(len(starts))
    step = 1
    while len(pending):
        count = np.minimum(step, sizes[pending] - asked[pending])
        positions = ranges(starts[pending] + asked[pending], count)
        owners = np.repeat(pending, count)
        good = _verdicts(members[positions], in_paths, is_good)
        asked[pending] += count
        passed, first = np.unique(owners[good], return_index=True)
        winner[passed], found[passed] = positions[good][first], True
        pending = pending[~found[pending] & (asked[pending] < sizes[pending])]
        step *= 8
    return winner


def _verdicts(rows: np.ndarray, in_paths, is_good) -> np.ndarray:
    """``is_good`` of the given rows' records (distinct rows, any order); all at once through
    ``is_good.many(tables, count)`` where it has that (:class:`pipeline.quality.Verdict`)."""
    order = np.argsort(rows)
    out = np.empty(len(rows), dtype=bool)
    if many := getattr(is_good, "many", None):
        out[order] = many(dedup_index.iter_rows(in_paths, rows[order], None), len(rows))
        return out
    done = 0
    for table in dedup_index.iter_rows(in_paths, rows[order], None):
        for record in table.to_pylist():
            out[order[done]] = bool(is_good(record))
            done += 1
    return out

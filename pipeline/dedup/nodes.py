"""The data of the global step's nodes, out of core: what a candidate pair is judged on.

Owns how :mod:`~pipeline.dedup.cluster` reaches the signatures and shingle sets of the nodes
that candidate pairs name without holding a run's signatures, shingle sets or records in memory.
Nodes are numbered as in :mod:`~pipeline.dedup.lsh`: the rows of this run's signature files in
order are ``0 .. N-1``, the rows of the committed index parts ``N ..``.

A store is filled in one pass over the files, one row group at a time, and holds its nodes'
values in a scratch file, in node order (about 0.5 KB of signature and 1.2 KB of shingle set
per node of a 300-word conversation). Pairs are then judged in blocks: each block maps the
file, copies the rows it needs and unmaps it, so memory holds one block whatever the run's
size. The values are the ones :mod:`~pipeline.dedup.minhash` and the index store; the
similarities are computed exactly as the per-pair code computed them (the estimate is
``minhash.estimated_jaccard``; the exact Jaccard is ``|A & B| / |A | B|``, 1.0 for two empty
sets).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dedup import index as dedup_index
from pipeline.dedup.lsh import ranges, read_signature_file
from pipeline.dedup.minhash import estimated_jaccard

# Pairs judged per block: signatures of both ends (2 x 16k x 512 bytes at 128 permutations);
# shingle hashes of both ends (1M of them: a few tens of MB of keys and their merge, whatever the run).
_ESTIMATE_BLOCK_PAIRS = 16_384
_JACCARD_BLOCK_VALUES = 1 << 20


class NewRows:
    """This run's rows: the signature files (one per chunk), numbered ``0 .. total-1`` in order."""

    def __init__(self, sig_paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in sig_paths]
        counts = [read_signature_file(p).num_rows for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def numbers(self, column: str, dtype: type = np.int64) -> np.ndarray:
        """One numeric column of every row, concatenated (8 bytes a row)."""
        arrays = [read_signature_file(p).column(column).to_numpy() for p in self.paths]
        return np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype)

    def source_ranks(self, column: str) -> np.ndarray:
        """Per row, the rank of its string ``column`` among all distinct values (Arrow order is
        code-point order, as Python compares strings); the strings themselves stay in Arrow."""
        encoded = [read_signature_file(p).column(column).combine_chunks().dictionary_encode() for p in self.paths]
        if not encoded:
            return np.empty(0, np.int64)
        distinct = pc.unique(pa.concat_arrays([e.dictionary for e in encoded]))
        distinct = distinct.take(pc.sort_indices(distinct))
        ranks = [pc.index_in(e.dictionary, value_set=distinct).to_numpy().astype(np.int64)[e.indices.to_numpy()] for e in encoded]
        return np.concatenate(ranks)

    def iter_rows(self, rows: np.ndarray, columns: list[str] | None) -> Iterator[pa.Table]:
        """``columns`` of the given rows (sorted ascending), one record batch at a time, in order."""
        offset = 0
        for path, count in zip(self.paths, np.diff(self.offsets)):
            lo, hi = np.searchsorted(rows, [offset, offset + count])
            if hi > lo:
                yield from dedup_index.iter_ipc_rows(path, rows[lo:hi] - offset, columns)
            offset += count
        if len(rows) and (rows[0] < 0 or rows[-1] >= offset):
            raise IndexError(f"rows {int(rows[0])}..{int(rows[-1])} out of range ({offset} rows)")

    def take(self, rows: np.ndarray, column: str) -> pa.Array:
        """``column`` of the given rows (sorted ascending) as one array: for the few rows that
        need it (the members of a duplicate group, the records others duplicate)."""
        chunks = [t.column(column).combine_chunks() for t in self.iter_rows(rows, [column])]
        return pa.concat_arrays(chunks) if chunks else pa.array([], read_signature_file(self.paths[0]).schema.field(column).type)


class _Store:
    """Values of a sorted set of nodes in a scratch file, in node order."""

    def __init__(self, nodes: np.ndarray) -> None:
        self.nodes = nodes

    def positions(self, nodes: np.ndarray) -> np.ndarray:
        """Where each of ``nodes`` is in the store (every one must be there)."""
        pos = np.searchsorted(self.nodes, nodes)
        if len(nodes) and (pos.max() >= len(self.nodes) or np.any(self.nodes[pos] != nodes)):
            raise KeyError("dedup: a node's values were not gathered (a bug: please report it)")
        return pos

    def _fill(self, path: Path, rows: NewRows, index_dir, index_parts, column: str, write) -> None:
        new = self.nodes[self.nodes < rows.total]
        old = self.nodes[self.nodes >= rows.total] - rows.total
        with open(path, "wb") as fh:
            for table in rows.iter_rows(new, [column]):
                write(fh, table.column(column).combine_chunks())
            for values in dedup_index.iter_index_rows(index_dir, index_parts, old, column):
                write(fh, values)


class SignatureStore(_Store):
    """MinHash signatures of ``nodes`` (sorted, unique): the estimate of any pair of them."""

    def __init__(self, path: Path, nodes: np.ndarray, rows: NewRows, index_dir, index_parts, num_perm: int) -> None:
        super().__init__(nodes)
        self.path, self.num_perm = Path(path), num_perm

        def write(fh, values: pa.Array) -> None:
            fh.write(values.flatten().to_numpy().astype(np.uint32, copy=False).tobytes())

        self._fill(self.path, rows, index_dir, index_parts, dedup_index.SIGNATURE, write)

    def estimates(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The MinHash estimate of each pair ``(a[k], b[k])`` of nodes."""
        pos_a, pos_b = self.positions(a), self.positions(b)
        out = np.empty(len(a), dtype=np.float64)
        for lo in range(0, len(a), _ESTIMATE_BLOCK_PAIRS):
            hi = lo + _ESTIMATE_BLOCK_PAIRS
            signatures = np.memmap(self.path, dtype=np.uint32, mode="r", shape=(len(self.nodes), self.num_perm))
            out[lo:hi] = estimated_jaccard(signatures[pos_a[lo:hi]], signatures[pos_b[lo:hi]])
            del signatures  # unmapped: the pages it touched leave this process's memory
        return out


class ShingleStore(_Store):
    """Shingle sets of ``nodes`` (sorted, unique): the exact Jaccard of any pair of them. A node
    of a format-1 index part has none (``has_set`` False)."""

    def __init__(self, path: Path, nodes: np.ndarray, rows: NewRows, index_dir, index_parts) -> None:
        super().__init__(nodes)
        self.path = Path(path)
        lengths, valid = [], []

        def write(fh, values: pa.Array) -> None:
            lengths.append(pc.fill_null(pc.list_value_length(values), 0).to_numpy().astype(np.int64))
            valid.append(values.is_valid().to_numpy(zero_copy_only=False))
            fh.write(values.flatten().to_numpy().astype(np.uint32, copy=False).tobytes())  # null lists add no values

        self._fill(self.path, rows, index_dir, index_parts, dedup_index.SHINGLES, write)
        self.lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self.has_set = np.concatenate(valid) if valid else np.empty(0, bool)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if len(self.lengths) else self.lengths

    def jaccards(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(jaccard, known)`` of each pair ``(a[k], b[k])``: the exact Jaccard of the two
        shingle sets, and whether both sets are known (where not, the Jaccard is NaN)."""
        pos_a, pos_b = self.positions(a), self.positions(b)
        known = self.has_set[pos_a] & self.has_set[pos_b]
        out = np.full(len(a), np.nan)
        todo = np.flatnonzero(known)
        work = np.cumsum(self.lengths[pos_a[todo]] + self.lengths[pos_b[todo]])
        lo = 0
        while lo < len(todo):
            # as many pairs as fit the block (at least one, however large its sets)
            hi = max(lo + 1, int(np.searchsorted(work, (work[lo - 1] if lo else 0) + _JACCARD_BLOCK_VALUES, side="right")))
            block = todo[lo:hi]
            out[block] = self._block_jaccards(pos_a[block], pos_b[block])
            lo = hi
        return out, known

    def _block_jaccards(self, pos_a: np.ndarray, pos_b: np.ndarray) -> np.ndarray:
        len_a, len_b = self.lengths[pos_a], self.lengths[pos_b]
        total = int(self.lengths.sum())
        values = np.memmap(self.path, dtype=np.uint32, mode="r", shape=(total,)) if total else np.empty(0, np.uint32)
        set_a, set_b = values[ranges(self.starts[pos_a], len_a)], values[ranges(self.starts[pos_b], len_b)]
        del values
        # Each pair's values are put in their own range of uint64 keys; a value of both sets is
        # then a key that occurs twice (each set is distinct). The two arrays are each sorted
        # already, so the stable sort is one merge.
        pair = np.arange(len(pos_a), dtype=np.uint64) << np.uint64(32)
        keys = np.concatenate([np.repeat(pair, len_a) | set_a, np.repeat(pair, len_b) | set_b])
        keys.sort(kind="stable")
        shared = keys[1:][keys[1:] == keys[:-1]]
        inter = np.bincount((shared >> np.uint64(32)).astype(np.int64), minlength=len(pos_a))
        union = len_a + len_b - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)

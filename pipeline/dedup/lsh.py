"""Per-chunk signatures and per-partition LSH candidate pairs: the two mappable dedup steps.

Owns the signature file of a chunk and the candidate edge list of a band partition.

Signature file (Parquet, one per input chunk, row order = the chunk's): ``id``, ``source``,
``source_index``, ``response_chars`` (the keep policy's "longest response"), ``exact_hash``
(uint64 of the normal form), ``signature`` (uint32 x num_perm), ``shingles`` (the sorted
distinct shingle hashes, for exact-Jaccard verification; the kept rows' go into the index part),
``band_000`` ... (uint64 per LSH band, one column each so a partition reads only its bands).

Node numbering shared by every step: the rows of the signature files in order are nodes
``0 .. N-1``; the rows of the committed index parts in order are ``N .. N+M-1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import DedupConfig
from pipeline.dedup import index as dedup_index
from pipeline.dedup.minhash import band_hashes, choose_bands, signatures
from pipeline.dedup.normalize import key_texts, normalize_all, response_chars
from pipeline.dedup.shingles import shingle_hashes, unique_per_document
from pipeline.fsutil import write_parquet_atomic

RESPONSE_CHARS = "response_chars"
SHINGLES = dedup_index.SHINGLES  # the same column goes on into the index part of the kept rows
_BATCH_ROWS = 4096
_BATCH_CHARS = 1_000_000  # measured: larger batches fall out of cache
# Bucket groups up to this size give all their pairs to verification; larger ones (a template
# repeated thousands of times) a star plus a chain, which keeps them connected at linear cost.
_ALL_PAIRS_MAX = 32


def lsh_shape(config: DedupConfig) -> tuple[int, int]:
    """``(bands, rows)`` of this configuration (see :func:`minhash.choose_bands`)."""
    return choose_bands(config.threshold, config.num_perm, config.bands, config.rows)


def run_params(config: DedupConfig) -> dict:
    return dedup_index.index_params(config, *lsh_shape(config))


def exact_hashes(forms: list[str]) -> np.ndarray:
    """uint64 content hash of each normal form (blake2b, stable across runs and machines)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f.encode("utf-8"), digest_size=8).digest(), "little") for f in forms),
        dtype=np.uint64,
        count=len(forms),
    )


def table_signatures(table: pa.Table, config: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """``(exact_hash, signature, bands, shingle_sets)`` of every row of a canonical table;
    ``shingle_sets`` is a list<uint32> array of each row's sorted distinct shingle hashes (what
    exact-Jaccard verification compares, so the text is never shingled twice)."""
    bands, rows = lsh_shape(config)
    texts = key_texts(table, config.key)
    exact = np.empty(len(texts), dtype=np.uint64)
    sig = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    sets = []
    for start, end in _batches(texts):
        forms, cjk = normalize_all(texts[start:end])
        exact[start:end] = exact_hashes(forms)
        hashes, offsets = shingle_hashes(forms, cjk, config.word_ngram, config.char_ngram)
        sig[start:end] = signatures(hashes, offsets, config.num_perm, config.seed)
        values, set_offsets = unique_per_document(hashes, offsets)
        sets.append(pa.ListArray.from_arrays(pa.array(set_offsets.astype(np.int32)), pa.array(values, pa.uint32())))
    shingle_sets = pa.concat_arrays(sets) if sets else pa.array([], pa.list_(pa.uint32()))
    return exact, sig, band_hashes(sig, bands, rows), shingle_sets


def _batches(texts: list[str]):
    """Row ranges of at most _BATCH_ROWS rows and about _BATCH_CHARS characters, which bounds
    the memory of the batch-wide shingle arrays whatever the conversation lengths."""
    start, chars = 0, 0
    for i, text in enumerate(texts):
        chars += len(text)
        if i + 1 - start >= _BATCH_ROWS or chars >= _BATCH_CHARS:
            yield start, i + 1
            start, chars = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


def compute_signatures(in_path: str | os.PathLike, sig_path: str | os.PathLike, config: DedupConfig) -> int:
    """Write the signature file of one canonical chunk; returns its row count."""
    table = pq.read_table(in_path, columns=[schema.ID, schema.SOURCE, schema.SOURCE_INDEX, schema.MESSAGES])
    exact, sig, bands, shingle_sets = table_signatures(table, config)
    columns = {
        schema.ID: table.column(schema.ID),
        schema.SOURCE: table.column(schema.SOURCE),
        schema.SOURCE_INDEX: table.column(schema.SOURCE_INDEX),
        RESPONSE_CHARS: pa.array(response_chars(table), pa.int64()),
        dedup_index.EXACT_HASH: pa.array(exact, pa.uint64()),
        dedup_index.SIGNATURE: pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), config.num_perm),
        SHINGLES: shingle_sets,
    }
    for band in range(bands.shape[1]):
        columns[dedup_index.band_column(band)] = pa.array(bands[:, band], pa.uint64())
    params = json.dumps(run_params(config), sort_keys=True).encode()
    write_parquet_atomic(pa.table(columns), sig_path, metadata={dedup_index.PARAMS_KEY: params}, compression="none")
    return table.num_rows


def read_uint64(paths: list[Path], column: str) -> np.ndarray:
    """One uint64 column of several signature files, concatenated."""
    arrays = [pq.read_table(p, columns=[column]).column(column).to_numpy() for p in paths]
    return np.concatenate(arrays).astype(np.uint64) if arrays else np.empty(0, np.uint64)


def representatives(new_exact: np.ndarray, old_exact: np.ndarray, exact: bool) -> np.ndarray:
    """Rows that take part in near dedup: with exact dedup on, the first row of each normal form
    that no earlier run kept (the others are exact duplicates and share its signature)."""
    if not exact:
        return np.arange(len(new_exact))
    _, first = np.unique(new_exact, return_index=True)
    first.sort()
    return first[~np.isin(new_exact[first], old_exact)]


def _bucket_pairs(keys: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Pairs ``(low, high)`` of nodes sharing a key."""
    order = np.lexsort((nodes, keys))
    keys, nodes = keys[order], nodes[order]
    same = keys[1:] == keys[:-1]
    if not same.any():
        return np.empty((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    sizes = np.diff(np.append(starts, len(keys)))
    pairs = [np.stack([nodes[starts[sizes == 2]], nodes[starts[sizes == 2] + 1]], axis=1)]
    for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
        group = nodes[start : start + size]
        if size <= _ALL_PAIRS_MAX:
            i, j = np.triu_indices(size, k=1)
            pairs.append(np.stack([group[i], group[j]], axis=1))
        else:
            pairs.append(np.stack([np.repeat(group[0], size - 1), group[1:]], axis=1))
            pairs.append(np.stack([group[1:-1], group[2:]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def candidate_pairs(
    sig_paths: list[str | os.PathLike],
    partition: int,
    config: DedupConfig,
    index_dir: str | os.PathLike | None = None,
    index_parts: Sequence[str] = (),
) -> np.ndarray:
    """Candidate pairs from the bands of one partition (band b belongs to partition
    ``b % config.partitions``), as an ``(E, 2)`` int64 array of node ids ``low < high``, unique,
    sorted. Pairs between two records of earlier runs are left out: those are never removed."""
    if not 0 <= partition < config.partitions:
        raise ValueError(f"partition {partition} out of range 0..{config.partitions - 1}")
    sig_paths = [Path(p) for p in sig_paths]
    bands, _ = lsh_shape(config)
    my_bands = [b for b in range(bands) if b % config.partitions == partition]
    if not my_bands:
        return np.empty((0, 2), dtype=np.int64)
    params = run_params(config)
    old = dedup_index.load_index(
        index_dir,
        index_parts,
        columns=[dedup_index.EXACT_HASH] + [dedup_index.band_column(b) for b in my_bands],
        params=params,
    )
    new_exact = read_uint64(sig_paths, dedup_index.EXACT_HASH)
    num_new = len(new_exact)
    old_exact = old.column(dedup_index.EXACT_HASH).to_numpy().astype(np.uint64)
    reps = representatives(new_exact, old_exact, config.exact)
    nodes = np.concatenate([reps, num_new + np.arange(old.num_rows)])
    found = []
    for band in my_bands:
        column = dedup_index.band_column(band)
        new_keys = read_uint64(sig_paths, column)[reps]
        old_keys = old.column(column).to_numpy().astype(np.uint64)
        pairs = _bucket_pairs(np.concatenate([new_keys, old_keys]), nodes)
        found.append(pairs[pairs[:, 0] < num_new])
    pairs = np.concatenate(found)
    total = num_new + old.num_rows
    codes = np.unique(pairs[:, 0] * total + pairs[:, 1])
    return np.stack([codes // total, codes % total], axis=1).astype(np.int64)

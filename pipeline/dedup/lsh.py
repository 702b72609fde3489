"""Per-chunk signatures and per-partition LSH candidate pairs: the two mappable dedup steps.

Owns the signature file of a chunk and the candidate edge list of a band partition.

Signature file (one per input chunk, row order = the chunk's): ``id``, ``source``,
``source_index``, ``response_chars`` (the keep policy's "longest response"), ``exact_hash``
(uint64 of the normal form), ``signature`` (uint32 x num_perm), ``shingles`` (the sorted
distinct shingle hashes, for exact-Jaccard verification; the kept rows' go into the index part),
``band_000`` ... (uint64 per LSH band, one column each so a partition reads only its bands). The
dedup parameters are in the schema metadata.

It is an uncompressed Arrow IPC file of record batches of :data:`_ROW_GROUP_ROWS` rows, as the
index part it feeds is (format 3, :mod:`pipeline.dedup.index`), and for the same reasons: its
values are random hashes that no encoding shrinks, so Parquet only cost the CPU of encoding the
list levels once and decoding them on every read. Memory-mapped (:func:`read_signature_file`),
a step reads the columns and rows it needs without decoding; :func:`iter_signature_batches`
reads a batch at a time, not mapped, where a step reads whole rows (memory holds one batch).
(50k conversations: written in 0.06 CPU-s against 0.24 as Parquet, read whole at no cost
against 0.6 s.)

Node numbering shared by every step: the rows of the signature files in order are nodes
``0 .. N-1``; the rows of the committed index parts in order are ``N .. N+M-1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import DedupConfig
from pipeline.dedup import index as dedup_index
from pipeline.dedup.minhash import band_hashes, choose_bands, signatures
from pipeline.dedup.normalize import key_texts, normalize_all_utf8, response_chars
from pipeline.dedup.shingles import shingle_hashes, unique_per_document
from pipeline.fsutil import atomic_path, open_parquet

RESPONSE_CHARS = "response_chars"
SHINGLES = dedup_index.SHINGLES  # the same column goes on into the index part of the kept rows
_BATCH_ROWS = 4096
_BATCH_CHARS = 1_000_000  # measured: larger batches fall out of cache
# Rows a signature file's row group holds: read and written in such batches, so memory holds one
# batch, not the chunk; the global step reads the rows it needs a row group at a time.
_ROW_GROUP_ROWS = 4096
_BATCHES_FOR_WORKERS = 8  # about a second of signing on one core: what starting the workers costs
# Bucket groups up to this size give all their pairs to verification; larger ones (a template
# repeated thousands of times) a star plus a chain, which keeps them connected at linear cost.
_ALL_PAIRS_MAX = 32


def lsh_shape(config: DedupConfig) -> tuple[int, int]:
    """``(bands, rows)`` of this configuration (see :func:`minhash.choose_bands`)."""
    return choose_bands(config.threshold, config.num_perm, config.bands, config.rows)


def run_params(config: DedupConfig) -> dict:
    return dedup_index.index_params(config, *lsh_shape(config))


def exact_hashes(forms: Sequence[bytes]) -> np.ndarray:
    """uint64 content hash of each normal form's UTF-8 (blake2b, stable across runs and machines)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f, digest_size=8).digest(), "little") for f in forms),
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
        forms, cjk = normalize_all_utf8(texts[start:end])
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


_SIGNED_COLUMNS = [schema.ID, schema.SOURCE, schema.SOURCE_INDEX, schema.MESSAGES]


def compute_signatures(in_path: str | os.PathLike, sig_path: str | os.PathLike, config: DedupConfig, num_proc: int = 1) -> int:
    """Write the signature file of one canonical chunk; returns its row count.

    The chunk is read and the file written :data:`_ROW_GROUP_ROWS` rows at a time. With
    ``num_proc`` > 1 (cores that would otherwise wait: a refresh of fewer input files than
    cores) the batches are signed in that many worker processes, in order: the same file."""
    parquet = open_parquet(in_path)
    num_batches = -(-parquet.metadata.num_rows // _ROW_GROUP_ROWS)
    num_proc = min(num_proc, num_batches) if num_batches >= _BATCHES_FOR_WORKERS else 1
    with atomic_path(sig_path) as tmp, contextlib.ExitStack() as stack:
        if not num_batches:  # an empty chunk: an empty file, same columns
            outs = iter([_signature_table(pq.read_schema(in_path).empty_table().select(_SIGNED_COLUMNS), config)])
        elif num_proc > 1:
            pool = stack.enter_context(_signature_pool(config, num_proc))
            outs = pool.map(parquet.iter_batches(batch_size=_ROW_GROUP_ROWS, columns=_SIGNED_COLUMNS))
        else:
            outs = (
                _signature_table(pa.Table.from_batches([b]), config)
                for b in parquet.iter_batches(batch_size=_ROW_GROUP_ROWS, columns=_SIGNED_COLUMNS)
            )
        return _write_signature_file(tmp, outs, config)


def _signature_pool(config: DedupConfig, num_proc: int):
    """The signature workers, as a block: inside :func:`pipeline.workers.reusing` they are kept
    when done, for the run's next stage to switch to its own task (the quality filters)."""
    from pipeline import workers

    return workers.pool(
        "pipeline.dedup.lsh:_init_worker", "pipeline.dedup.lsh:_signatures_in_worker", (config.model_dump_json(),), num_proc
    )


def _write_signature_file(path: Path, outs: Iterator[pa.Table], config: DedupConfig) -> int:
    """The signature tables ``outs`` (in row order) as the signature file ``path``, one record
    batch each; its rows."""
    params = json.dumps(run_params(config), sort_keys=True).encode()
    rows, writer = 0, None
    try:
        for out in outs:
            if writer is None:
                out_schema = out.schema.with_metadata({dedup_index.PARAMS_KEY: params})
                writer = pa.ipc.new_file(str(path), out_schema, options=pa.ipc.IpcWriteOptions(compression=None))
            writer.write_table(out.cast(out_schema).combine_chunks())
            rows += out.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def read_signature_file(path: str | os.PathLike) -> pa.Table:
    """A signature file, memory-mapped: its columns are views of the file's pages, read as used."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read dedup signature file {path}: {exc}") from exc


def iter_signature_batches(path: str | os.PathLike, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A signature file's record batches in order (``columns`` of them), each read when needed
    and not mapped, so that it leaves memory once dropped."""
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield batch.select(columns) if columns is not None else batch
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read dedup signature file {path}: {exc}") from exc


@contextlib.contextmanager
def signing_alongside(sig_path: str | os.PathLike, config: DedupConfig, num_proc: int) -> Iterator[Callable[[pa.Table], None]]:
    """The signature file of a chunk that is being written: yields ``add(table)``, to be called
    with the chunk's rows in order, as its writer writes them (canonical columns).

    The same file as :func:`compute_signatures` of the finished chunk (the rows regrouped into
    the same :data:`_ROW_GROUP_ROWS`-row batches), made while the chunk is written: ``num_proc``
    worker processes sign the batches, and start (import) at once, beside the writer. Ingest
    parses on one core, so a refresh of one input file signs it on the cores ingest leaves idle
    instead of after it. Complete (renamed to ``sig_path``) when the block ends without an
    error; memory holds the few batches in flight."""
    batches: queue.Queue = queue.Queue(maxsize=2 * num_proc)
    failure: list[BaseException] = []

    def regrouped() -> Iterator[pa.Table]:
        pending: list[pa.Table] = []
        rows, sent = 0, False
        while (table := batches.get()) is not _END:
            if table is _ABORT:
                return
            pending.append(table)
            rows += table.num_rows
            while rows >= _ROW_GROUP_ROWS:
                whole = pa.concat_tables(pending)
                yield whole.slice(0, _ROW_GROUP_ROWS)
                pending, rows, sent = [whole.slice(_ROW_GROUP_ROWS)], rows - _ROW_GROUP_ROWS, True
        if rows:
            yield pa.concat_tables(pending)
        elif not sent:  # an empty chunk: an empty file, same columns
            yield schema.CONVERSATION_SCHEMA.empty_table().select(_SIGNED_COLUMNS)

    def sign(path: Path) -> None:
        try:
            with _signature_pool(config, num_proc) as pool:
                _write_signature_file(path, pool.map(regrouped()), config)
        except BaseException as exc:  # raised again in the writer's thread
            failure.append(exc)
            with contextlib.suppress(queue.Empty):  # unblock a writer waiting on a full queue
                while True:
                    batches.get_nowait()

    def add(table: pa.Table) -> None:
        if table.num_rows:
            _put_until_taken(batches, table.select(_SIGNED_COLUMNS), thread)
        if failure:
            raise failure[0]

    with atomic_path(sig_path) as tmp:
        thread = threading.Thread(target=sign, args=(tmp,), name="sftkit-signatures", daemon=True)
        thread.start()
        try:
            yield add
        except BaseException:
            _put_until_taken(batches, _ABORT, thread)
            thread.join()
            raise
        _put_until_taken(batches, _END, thread)
        thread.join()
        if failure:
            raise failure[0]


_END, _ABORT = object(), object()


def _put_until_taken(batches: queue.Queue, item: object, thread: threading.Thread) -> None:
    """Put ``item`` on the queue, unless the signing thread stops first (after a failure)."""
    while thread.is_alive():
        with contextlib.suppress(queue.Full):
            batches.put(item, timeout=0.1)
            return


_worker_config: DedupConfig | None = None


def _init_worker(config_json: str) -> None:
    global _worker_config
    _worker_config = DedupConfig.model_validate_json(config_json)


def _signatures_in_worker(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    assert _worker_config is not None, "worker was not initialised"
    return _signature_table(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch, _worker_config)


def _signature_table(table: pa.Table, config: DedupConfig) -> pa.Table:
    """The signature file's rows (see the module docstring) for canonical rows ``table``."""
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
    return pa.table(columns)


def read_uint64(paths: list[Path], column: str) -> np.ndarray:
    """One uint64 column of several signature files, concatenated."""
    arrays = [read_signature_file(p).column(column).to_numpy() for p in paths]
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
    """Pairs ``(low, high)`` of nodes sharing a key, every bucket at once (no loop over buckets)."""
    order = np.lexsort((nodes, keys))
    keys, nodes = keys[order], nodes[order]
    same = keys[1:] == keys[:-1]
    if not same.any():
        return np.empty((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    sizes = np.diff(np.append(starts, len(keys)))
    small = (sizes > 1) & (sizes <= _ALL_PAIRS_MAX)
    # all pairs of a small bucket: its member i (of s) pairs with each of its s - 1 - i successors
    member = ranges(starts[small], sizes[small])
    later = np.repeat(np.append(starts, len(keys))[1:][small], sizes[small]) - member - 1
    first = np.repeat(member, later)
    pairs = [np.stack([nodes[first], nodes[first + 1 + ranges(np.zeros(len(later), np.int64), later)]], axis=1)]
    # a large bucket: a star from its first member plus a chain
    big_starts, big_sizes = starts[sizes > _ALL_PAIRS_MAX], sizes[sizes > _ALL_PAIRS_MAX]
    if len(big_starts):
        rest = ranges(big_starts + 1, big_sizes - 1)
        pairs.append(np.stack([nodes[np.repeat(big_starts, big_sizes - 1)], nodes[rest]], axis=1))
        chain = ranges(big_starts + 1, big_sizes - 2)
        pairs.append(np.stack([nodes[chain], nodes[chain + 1]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


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

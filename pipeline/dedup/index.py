"""The persisted dedup index: what every earlier run kept, as immutable parts.

Layout of ``index_dir``::

    part-<16 hex>.arrow     one per run that kept something; never rewritten (format 3)
    part-<16 hex>.parquet   the same, as sftkit wrote it before format 3 (formats 1 and 2)

A part holds one row for every record a run *kept*:

| column | type | since format | what |
|---|---|---|---|
| ``id`` | string | 1 | the record's id (as in the shards) |
| ``exact_hash`` | uint64 | 1 | blake2b of the normal form: exact duplicates |
| ``signature`` | uint32 x num_perm | 1 | the MinHash: the estimate, and the band hashes' source |
| ``band_000`` ... | uint64, one per LSH band | 1 | the band hashes: candidates against this record |
| ``shingles`` | list<uint32> | 2 | the sorted distinct shingle hashes: exact-Jaccard verification |

The format is in each part's schema metadata (``sftkit.dedup.format``; absent = 1). From format 2
a later run confirms a candidate pair against an earlier run's record by the exact Jaccard of the
two shingle sets, as it does within a run, so refreshes decide every pair as one full build
would. A format-1 part (written by sftkit before the column existed) stays usable: pairs against
its records fall back to the MinHash estimate (std ~0.035 at J=0.8), the decision sftkit made
then; the dedup stage logs how many pairs that was, and a rebuild (a fresh output folder)
writes the current format. Falling back rather than refusing keeps old datasets refreshable, and
the estimate is exactly what those datasets were built with. A part of a newer format is refused.

Format 3 holds format 2's columns in an uncompressed Arrow IPC file (``.arrow``) instead of
Parquet. The MinHash values and shingle hashes are uniform random numbers that no encoding or
codec shrinks (zstd took 4 % off), so Parquet only cost the CPU of encoding the list levels on
write and decoding them on every read; an IPC file is the columns' own buffers, memory-mapped:
a refresh reads the band and hash columns of every earlier part without decoding anything, and
a few rows' shingle sets without reading the rest. (Writing a 50k-record part from the signature
files: 0.32-0.41 s as Parquet, of which 0.03 s is writing it as IPC; reading it whole 0.09-0.19 s
against nothing to decode.) Parts of formats 1 and 2 stay Parquet, and are read as before.

Its name is a content hash of what it adds (the parameters, the ids and normal-form hashes), so
writing it twice is harmless. The dedup parameters (num_perm, seed, bands, rows, n-gram sizes,
key, hash scheme) are stored in each part's schema metadata; loading a part built with other
parameters fails with a clear error, since its band hashes would silently never match (a config
change rebuilds the dataset anyway).

Memory: the shingle sets are by far the largest column (one uint32 per distinct shingle, about
4 bytes per word of the dedup key), so nothing reads them whole. Parts are written in row groups
(record batches) of bounded size, and :func:`iter_index_rows` reads, one at a time, only the rows
a run's candidate pairs name.

Two-phase update, for crash safety: a run writes its new part first (atomically, under its
final content-hash name; a refresh does so at its end, with :func:`write_part_from`, once it
knows which records reached the shards) but does not make it current. The dataset manifest is the one list of
current parts (``dedup_index``, see :mod:`pipeline.manifest`): the run adds its part there when
it writes the manifest, and the next run passes that list back as ``parts``. A run killed in
between leaves an orphan part that nothing lists, so its records (which never reached the
shards) are not treated as "kept before"; the next run removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outdir, schema
from pipeline.config import DedupConfig
from pipeline.fsutil import TMP_PREFIX, _fsync_dir, open_parquet, read_ahead

PARAMS_KEY = b"sftkit.dedup.params"
FORMAT_KEY = b"sftkit.dedup.format"
FORMAT = 3  # see above: 1 = no shingles column, 2 = Parquet, 3 = Arrow IPC
PART_NAME = re.compile(r"^part-[0-9a-f]{16}\.(arrow|parquet)$")
HASH_SCHEME = "poly64-splitmix64-top32/datasketch-affine32/v1"

EXACT_HASH = "exact_hash"
SIGNATURE = "signature"
SHINGLES = "shingles"
SHINGLES_TYPE = pa.list_(pa.uint32())
# A part's row groups hold at most this many rows and about this many bytes, so that reading the
# shingle sets of a few rows never reads more than one such group at a time.
_ROW_GROUP_ROWS = 65_536
_ROW_GROUP_BYTES = 32 << 20
_RESTRICT_BATCH_ROWS = 4096


def band_column(band: int) -> str:
    return f"band_{band:03d}"


def index_params(config: DedupConfig, bands: int, rows: int) -> dict:
    """Everything that decides the values stored in an index part."""
    return {
        "num_perm": config.num_perm,
        "seed": config.seed,
        "bands": bands,
        "rows": rows,
        "word_ngram": config.word_ngram,
        "char_ngram": config.char_ngram,
        "key": config.key,
        "scheme": HASH_SCHEME,
    }


def index_schema(num_perm: int, bands: int, part_format: int = FORMAT) -> pa.Schema:
    return pa.schema(
        [
            pa.field(schema.ID, pa.string(), nullable=False),
            pa.field(EXACT_HASH, pa.uint64(), nullable=False),
            pa.field(SIGNATURE, pa.list_(pa.uint32(), num_perm), nullable=False),
        ]
        + [pa.field(band_column(b), pa.uint64(), nullable=False) for b in range(bands)]
        + ([pa.field(SHINGLES, SHINGLES_TYPE, nullable=False)] if part_format >= 2 else [])
    )


def _is_ipc(path: str | os.PathLike) -> bool:
    return str(path).endswith(".arrow")


def _ipc_table(path: str | os.PathLike) -> pa.Table:
    """A format-3 part, memory-mapped: its columns are views of the file's pages, read as used.
    A part of a newer format is refused (see :func:`part_format`)."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    _check_format(path, table.schema.metadata or {})
    return table


def _metadata(path: str | os.PathLike) -> dict[bytes, bytes]:
    schema_ = pa.ipc.open_file(pa.memory_map(str(path))).schema if _is_ipc(path) else pq.read_schema(path)
    return schema_.metadata or {}


def _num_rows(path: str | os.PathLike) -> int:
    return _ipc_table(path).num_rows if _is_ipc(path) else pq.read_metadata(path).num_rows


def part_format(path: str | os.PathLike) -> int:
    """The format of an index part (see the module docstring): 1 when its metadata names none."""
    return _check_format(path, _metadata(path))


def _check_format(path: str | os.PathLike, meta: dict[bytes, bytes]) -> int:
    found = int(meta.get(FORMAT_KEY, b"1"))
    if found > FORMAT:
        raise ValueError(
            f"dedup index part {path} has format {found}, newer than this sftkit reads ({FORMAT}); upgrade sftkit to refresh this dataset"
        )
    return found


def _read_part(path: Path, columns: list[str] | None) -> pa.Table:
    """``columns`` of one part; the shingle sets of a format-1 part are nulls (not stored)."""
    if _is_ipc(path):
        table = _ipc_table(path)
        return table.select(columns) if columns is not None else table
    if part_format(path) >= 2:
        return pq.read_table(path, columns=columns)
    if columns is not None and SHINGLES not in columns:
        return pq.read_table(path, columns=columns)
    table = pq.read_table(path, columns=[c for c in columns if c != SHINGLES] if columns else None)
    table = table.append_column(pa.field(SHINGLES, SHINGLES_TYPE), pa.nulls(table.num_rows, SHINGLES_TYPE))
    return table.select(columns) if columns else table


def _check_part_name(part: str, where: object) -> str:
    if not isinstance(part, str) or not PART_NAME.match(part):
        raise ValueError(f"{where}: {part!r} is not a dedup index part name (part-<16 hex>.arrow or .parquet)")
    return part


def resolve_parts(index_dir: str | os.PathLike | None, parts: Sequence[str]) -> list[Path]:
    """Paths of the current ``parts`` (the manifest's ``dedup_index``); each must exist."""
    if index_dir is None:
        return []
    index_dir = Path(index_dir)
    paths = [index_dir / _check_part_name(p, index_dir) for p in parts]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"dedup index part {path} is listed as current but does not exist")
    return paths


def _check_params(path: Path, expected: dict) -> None:
    meta = _metadata(path)
    found = json.loads(meta.get(PARAMS_KEY, b"{}"))
    if found != expected:
        raise ValueError(
            f"dedup index part {path} was built with different dedup settings ({found}) than this run "
            f"({expected}); rebuild the dataset or point the run at a fresh index folder"
        )


def load_index(
    index_dir: str | os.PathLike | None,
    parts: Sequence[str] = (),
    *,
    columns: list[str] | None = None,
    params: dict | None = None,
) -> pa.Table:
    """The records kept by earlier runs, as one table (``columns`` only, in part order).

    ``parts`` are the current parts (none: an empty index, an empty table). With ``params`` (see
    :func:`index_params`) every part is checked to match them. ``shingles`` of a format-1 part
    are nulls. Read only the columns needed: the shingle sets are most of a part's bytes.
    """
    paths = resolve_parts(index_dir, parts)
    tables = []
    for path in paths:
        if params is not None:
            _check_params(path, params)
        tables.append(_read_part(path, columns))
    if not tables:
        if params is None:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or [schema.ID])})
        full = index_schema(params["num_perm"], params["bands"])
        names = columns or full.names
        return pa.schema([full.field(c) for c in names]).empty_table()
    return pa.concat_tables(tables, promote_options="default")  # a format-1 part's null shingles


def iter_rows(paths: Sequence[Path], rows: np.ndarray, columns: list[str] | None) -> Iterator[pa.Table]:
    """``columns`` of the given rows of Parquet files (or format-3 parts) read as one table
    (``rows`` global, sorted ascending), one row group at a time and in row order: memory holds
    one row group, never a file. Serves index parts and the dedup step's input files alike
    (signature files: :class:`pipeline.dedup.nodes.NewRows`)."""
    offset = 0
    for path in paths:
        if _is_ipc(path):
            count = _ipc_table(path).num_rows  # (and its format checked)
            lo, hi = np.searchsorted(rows, [offset, offset + count])
            yield from iter_ipc_rows(path, rows[lo:hi] - offset, columns)
            offset += count
            continue
        parquet = open_parquet(path)
        count = parquet.metadata.num_rows
        lo, hi = np.searchsorted(rows, [offset, offset + count])
        local = rows[lo:hi] - offset
        offset += count
        group_start = 0
        for group in range(parquet.metadata.num_row_groups if len(local) else 0):
            group_rows = parquet.metadata.row_group(group).num_rows
            a, b = np.searchsorted(local, [group_start, group_start + group_rows])
            if b > a:
                yield parquet.read_row_group(group, columns=columns).take(pa.array(local[a:b] - group_start))
            group_start += group_rows
    if len(rows) and (rows[0] < 0 or rows[-1] >= offset):
        raise IndexError(f"rows {int(rows[0])}..{int(rows[-1])} out of range ({offset} rows)")


def iter_ipc_rows(path: str | os.PathLike, rows: np.ndarray, columns: list[str] | None) -> Iterator[pa.Table]:
    """``columns`` of the given rows (sorted ascending, local) of an uncompressed Arrow IPC file
    (a format-3 part, a dedup signature file), one record batch (a row group) at a time.

    A take from mapped columns reads the taken rows' pages only; and each batch is mapped only
    while its rows are taken (the take copies them), so those pages leave memory with the batch.
    A step that takes most rows of a large file (dedup's stores, on near-duplicate-heavy data)
    holds one batch's pages, not the file's: mapped pages count as the process's memory for as
    long as the file stays mapped."""
    if not len(rows):
        return
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        ends = np.cumsum([reader.get_batch(i).num_rows for i in range(reader.num_record_batches)], dtype=np.int64)
    batch_of = np.searchsorted(ends, rows, "right")  # rows ascend: so do their batches
    cuts = np.flatnonzero(np.diff(batch_of)) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
        index = int(batch_of[lo])
        start = int(ends[index - 1]) if index else 0
        with pa.memory_map(str(path)) as source:
            batch = pa.ipc.open_file(source).get_batch(index)
            table = pa.Table.from_batches([batch.select(columns) if columns is not None else batch])
            taken = table.take(pa.array(rows[lo:hi] - start))
            del batch, table  # the last views of the map: it is unmapped here
        yield taken


def iter_index_rows(index_dir, parts, rows: np.ndarray, column: str) -> Iterator[pa.Array]:
    """Values of ``column`` for the given global index rows (sorted ascending), in order, one
    row group at a time, so that a large index is never held in memory whole. ``shingles`` of a
    format-1 part come back as nulls."""
    offset = 0
    paths = resolve_parts(index_dir, parts)
    for path in paths:
        count = _num_rows(path)
        lo, hi = np.searchsorted(rows, [offset, offset + count])
        if hi > lo and column == SHINGLES and part_format(path) < 2:
            yield pa.nulls(int(hi - lo), SHINGLES_TYPE)
        elif hi > lo:
            yield from (table.column(column).combine_chunks() for table in iter_rows([path], rows[lo:hi] - offset, [column]))
        offset += count
    if len(rows) and (rows[0] < 0 or rows[-1] >= offset):
        raise IndexError(f"dedup index row {int(rows[-1])} out of range ({offset} rows)")


def index_rows(index_dir, parts, rows: np.ndarray, column: str) -> pa.Array | None:
    """:func:`iter_index_rows` as one array (None for no rows)."""
    out = list(iter_index_rows(index_dir, parts, rows, column))
    return pa.concat_arrays(out) if out else None


class Stopped(Exception):
    """A part's writing was stopped by its caller (``stop``), its temporary file removed."""


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise Stopped("the dedup index part's writing was stopped")


def restrict_part(
    index_dir: str | os.PathLike,
    part: str,
    keep_ids: pa.Array | pa.ChunkedArray | Iterable[str],
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """A part holding only those records of ``part`` whose id is in ``keep_ids`` (an Arrow string
    array, so a run's ids need not become Python strings, or any iterable of them); its name.

    For a pipeline whose later stages (quality, tokenize) drop some records dedup kept: the
    index should remember only what reached the shards, or a later, better near-copy of a
    dropped record would be removed as a duplicate of nothing. Returns ``part`` itself when
    every record stays and None when none does; the original file is left for the caller's
    clean-up (it may still be listed by a committed manifest). ``stop``, asked before every
    batch, ends the writing with :class:`Stopped` when it says so.
    """
    index_dir = Path(index_dir)
    path = index_dir / _check_part_name(part, index_dir)
    ids = _read_part(path, [schema.ID]).column(schema.ID)
    if not isinstance(keep_ids, (pa.Array, pa.ChunkedArray)):
        keep_ids = pa.array(list(keep_ids), pa.string())
    keep = pc.is_in(ids, value_set=keep_ids).combine_chunks()  # (a value set may repeat values, or be chunked)
    if pc.all(keep).as_py() is not False:
        return part
    params = json.loads(_metadata(path)[PARAMS_KEY])
    writer = PartWriter(index_dir, params, part_format=part_format(path))
    try:
        start = 0
        # A few thousand rows at a time (open_parquet: no pre-buffering): a whole row group (32 MB
        # of shingle hashes) decoded at once took three times its size at the peak. Decoding runs
        # a batch or two ahead in a thread of its own, beside the writer's encoding: 1.5 -> 1.25 s
        # for a 200k-record part, on the run's last, otherwise single-threaded step.
        if _is_ipc(path):  # mapped: batches are views, nothing to decode ahead
            batches = iter(_ipc_table(path).to_batches(max_chunksize=_RESTRICT_BATCH_ROWS))
        else:
            batches = read_ahead(open_parquet(path).iter_batches(batch_size=_RESTRICT_BATCH_ROWS, use_threads=False))
        for batch in batches:
            _check_stop(stop)
            writer.write(pa.Table.from_batches([batch]).filter(keep.slice(start, batch.num_rows)))
            start += batch.num_rows
            del batch
            pa.default_memory_pool().release_unused()  # else Arrow's allocator keeps every batch's pages
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def write_part_from(
    index_dir: str | os.PathLike,
    sig_paths: Sequence[str | os.PathLike],
    kept: np.ndarray,
    keep_ids: pa.Array | pa.ChunkedArray,
    params: dict,
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """A new part, written once, from a run's signature files (one per chunk, in order): the
    rows dedup ``kept`` (one flag per signature row) whose id is in ``keep_ids`` (the ids that
    reached the shards); its name, or None when no row is left. The part :func:`restrict_part`
    would make of the part dedup would have written, without writing that one first and reading
    it back: a run's one global step and its last step each wrote and read about 1.4 GB of
    shingle hashes at 1M conversations. ``stop`` as for :func:`restrict_part`."""
    # the ids of every signature row against the kept ids at once: is_in builds its hash set of
    # the value set on every call, so once, not per file or batch
    from pipeline.dedup.lsh import iter_signature_batches, read_signature_file

    ids = pa.chunked_array([read_signature_file(path).column(schema.ID) for path in sig_paths], pa.string())
    if len(ids) != len(kept):
        raise ValueError(f"dedup's kept rows name {len(kept)} rows, the signature files hold {len(ids)}")
    keep_all = np.logical_and(kept, pc.is_in(ids, value_set=keep_ids).to_numpy(zero_copy_only=False))
    del ids
    writer = PartWriter(index_dir, params)
    start = 0
    try:
        for path in sig_paths:
            rows = read_signature_file(path).num_rows
            keep = keep_all[start : start + rows]
            start += rows
            if not keep.any():
                continue
            offset = 0
            for batch in iter_signature_batches(path, writer.schema.names):  # one batch in memory
                _check_stop(stop)
                writer.write(pa.Table.from_batches([batch]).filter(pa.array(keep[offset : offset + batch.num_rows])))
                offset += batch.num_rows
                del batch
                pa.default_memory_pool().release_unused()  # else Arrow's allocator keeps every batch's pages
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class PartWriter:
    """Streams the kept records of one run into a new part; its name is the content hash."""

    def __init__(self, index_dir: str | os.PathLike, params: dict, part_format: int = FORMAT) -> None:
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        metadata = {PARAMS_KEY: json.dumps(params, sort_keys=True).encode(), FORMAT_KEY: str(part_format).encode()}
        self.schema = index_schema(params["num_perm"], params["bands"], part_format).with_metadata(metadata)
        # format 3 is an Arrow IPC file; 1 and 2 (a restricted old part keeps its format) Parquet
        self.suffix = ".arrow" if part_format >= 3 else ".parquet"
        self.tmp = self.index_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-part{self.suffix}"
        self.params_json = json.dumps(params, sort_keys=True).encode()
        self.id_digest, self.exact_digest = hashlib.blake2b(), hashlib.blake2b()
        self.rows = 0
        self._writer: pq.ParquetWriter | pa.ipc.RecordBatchFileWriter | None = None
        # rows not yet written: a row group is written once it is full (see _group_rows)
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0

    def write(self, table: pa.Table) -> None:
        """Append rows; they are written in row groups of the bounded size whatever the batching."""
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        # The name hashes what the part adds: the ids and normal-form hashes of its records, in
        # order, however they were batched (a restricted part is written row group by row group).
        self.id_digest.update("".join(f"{i}\n" for i in table.column(schema.ID).to_pylist()).encode("utf-8"))
        self.exact_digest.update(table.column(EXACT_HASH).to_numpy().tobytes())
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        while self._pending_rows >= (group_rows := self._group_rows()):
            self._write_group(group_rows)
        self.rows += table.num_rows

    def _group_rows(self) -> int:
        row_bytes = max(1, self._pending_bytes // max(1, self._pending_rows))
        return max(1, min(_ROW_GROUP_ROWS, _ROW_GROUP_BYTES // row_bytes))

    def _write_group(self, rows: int) -> None:
        if self._writer is None and self.suffix == ".arrow":
            self._writer = pa.ipc.new_file(self.tmp, self.schema, options=pa.ipc.IpcWriteOptions(compression=None))
        if self._writer is None:
            # The MinHash values and the shingle hashes are uniform random 32-bit numbers: zstd
            # takes 4 % off them (a 200k-record part: 257 MB against 267 MB) and half again to the
            # CPU of writing and reading the part, so they are stored plain and uncompressed.
            # (Delta encoding of the sorted shingle hashes takes 7 % off, for a sixth more CPU.)
            raw = {SIGNATURE, SHINGLES}
            self._writer = pq.ParquetWriter(
                self.tmp,
                self.schema,
                compression={name: "none" if name in raw else "zstd" for name in self.schema.names},
                use_dictionary=[name for name in self.schema.names if name not in raw],
            )
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        if isinstance(self._writer, pq.ParquetWriter):
            self._writer.write_table(group, row_group_size=rows)
        else:
            self._writer.write_table(group.combine_chunks())  # one record batch a group
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._pending_bytes = rest.nbytes

    def close(self) -> str | None:
        """Finish the part and give it its final name; ``None`` when nothing was written."""
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is None:
            return None
        self._writer.close()
        digest = hashlib.blake2b(self.params_json + self.id_digest.digest() + self.exact_digest.digest(), digest_size=8)
        name = f"part-{digest.hexdigest()}{self.suffix}"
        try:
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            outdir.will_write(self.index_dir / name)  # sftkit's journal: a file it may delete later
            os.replace(self.tmp, self.index_dir / name)
            _fsync_dir(self.index_dir)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return name

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.tmp.exists():
            self.tmp.unlink()

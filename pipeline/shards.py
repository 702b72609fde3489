"""The shard writer: tokenized rows -> ``DIR/shards/{train,val}-NNNNN.parquet``.

This module owns the train/validation split (by a hash of the row id, so a row keeps its split
across refreshes whatever else is in the run), the row order inside the shards (by source and
source index, so the bytes do not depend on parallelism), the cutting into files of about
``target_rows`` rows, and the Parquet file metadata (tokenizer and template name and
fingerprint, split, format version). Every file is written atomically; the same input and
config give byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import SFTConfig, ShardConfig
from pipeline.fsutil import atomic_path, gather_rows, sha256_file
from pipeline.manifest import ShardEntry
from pipeline.stage import StageRun, StageStats

SHARDS_DIR = "shards"
_SPLIT_KEY = b"sftkit-split"


def split_of(row_id: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of ids, ``train`` for the rest."""
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8, key=_SPLIT_KEY).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def read_tokenized(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Tokenized rows in :data:`schema.SHARD_SCHEMA` (``columns`` of it) from an Arrow IPC file
    (what the tokenize stage writes: memory-mapped, so the rows stay on disk until a row group is
    gathered) or a Parquet file (read into memory).

    The columns are picked before the cast: casting a whole mapped file to read its ids held a
    copy of most of it (1M conversations: 534 MiB at the peak against 283 for their ids alone)."""
    target = schema.SHARD_SCHEMA if columns is None else pa.schema([schema.SHARD_SCHEMA.field(c) for c in columns])
    try:
        if _is_arrow_ipc(path):
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            table = table if columns is None else table.select(columns)
        else:
            table = pq.read_table(path, schema=schema.SHARD_SCHEMA, columns=columns)
        return table.cast(target)
    except (OSError, pa.ArrowInvalid, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read tokenized rows from {path}: {exc}") from exc


@dataclass
class WrittenShards:
    """What :func:`write_shards` wrote: the manifest entries of the new files, and the stage's counts."""

    entries: list[ShardEntry]
    stats: StageStats


def write_shards(
    in_paths: list[Path],
    data_dir: Path,
    config: SFTConfig,
    *,
    metadata: dict[bytes, bytes],
    start_index: dict[str, int] | None = None,
) -> WrittenShards:
    """Write the tokenized rows of ``in_paths`` as shard files under ``data_dir`` (``config.shards``
    sets the split and the file size); return their manifest entries and the stage's counts.

    ``metadata`` goes into every file's Parquet metadata. ``start_index`` gives the first file
    number per split, so a refresh appends after the files the dataset already has.
    """
    data_dir = Path(data_dir)
    start_index = dict(start_index or {})
    shard_config = config.shards
    entries: list[ShardEntry] = []
    with StageRun("shards") as run:
        files = _in_key_order(in_paths)
        if files is not None and all(file.sorted and _is_arrow_ipc(file.path) for file in files):
            # What the steps write: the shard files are cut first, then written side by side.
            records_read, entries = _write_planned(files, data_dir, shard_config, metadata, start_index)
            run.count(records_read, kept=sum(entry["records"] for entry in entries))
            return WrittenShards(entries, run.stats)
        if files is None:  # the files' rows interleave: one global sort (not what the steps write)
            table = pa.concat_tables([read_tokenized(path) for path in in_paths]) if in_paths else None
            files = [table] if table is not None and table.num_rows else []
        background = _Background()
        writers = {
            split: _SplitWriter(split, data_dir, shard_config, metadata, start_index.get(split, 0), background) for split in schema.SPLITS
        }
        records_read, previous = 0, None
        try:
            for file in files:
                for table in _pieces(file):
                    records, previous = _route(table, writers, shard_config.val_fraction, previous)
                    records_read += records
                    del table  # freed (or unmapped) here, before the next piece is read
            entries = [entry for split in schema.SPLITS for entry in writers[split].close()]
            background.stop()
        except BaseException:
            background.stop(failed=True)
            for writer in writers.values():
                writer.abort()  # no half-written shard under its final name
            raise
        # A record split across two files, or one lost between the splits, breaks this count.
        run.count(records_read, kept=sum(entry["records"] for entry in entries))
    return WrittenShards(entries, run.stats)


class ShardStream:
    """A run's shard files written while its rows are made: the tokenize steps hand each table of
    kept rows to :meth:`add` as they write it, and the files come out as :func:`write_shards`
    would write them from the steps' work files afterwards (the same cuts, row groups and bytes).

    Rows must come in key order, table after table (what the tokenize steps of one input's
    chunks, run one after another, make). A table out of that order, or an error while writing,
    ends the stream: its files are removed and :attr:`broken` says why, and the caller writes the
    shards from the work files instead. Files are written under ``staging`` (a folder of the
    run's ``.work/``); :meth:`finish` moves them into ``DIR/shards/``.
    """

    def __init__(self, staging: Path, config: ShardConfig, metadata: dict[bytes, bytes], start_index: dict[str, int]) -> None:
        self.staging, self.config = staging, config
        self.broken: str | None = None
        self.steps: list[str] = []  # the caller's names for what made the rows added so far
        self.records_read = 0
        self._background = _Background()
        self._writers = {
            split: _SplitWriter(split, staging, config, metadata, start_index.get(split, 0), self._background) for split in schema.SPLITS
        }
        self._previous: tuple | None = None  # (source, source index) of the last row routed
        self._last_key: tuple | None = None  # the last row's sort key

    def add(self, table: pa.Table) -> None:
        """Route ``table``'s rows (:data:`schema.SHARD_SCHEMA`) to their files; a no-op once broken."""
        if self.broken is not None or not table.num_rows:
            return
        try:
            order = pc.sort_indices(table, _ORDER).to_numpy()
            first = _sort_key(table, 0)
            if not (order == np.arange(len(order))).all() or (self._last_key is not None and not self._last_key < first):
                self.abort("rows came out of key order")
                return
            self._last_key = _sort_key(table, len(order) - 1)
            records, self._previous = _route(table, self._writers, self.config.val_fraction, self._previous)
            self.records_read += records
        except Exception as exc:  # the shards step writes the files again, and meets the error itself
            self.abort(f"writing failed: {exc}")

    def finish(self, data_dir: Path) -> WrittenShards:
        """Close the files, move them into ``data_dir``'s shards folder; their entries and counts."""
        with StageRun("shards") as run:
            try:
                entries = [entry for split in schema.SPLITS for entry in self._writers[split].close()]
                self._background.stop()
            except BaseException:
                self.abort("writing failed")
                raise
            for entry in entries:
                final = data_dir / entry["path"]
                with atomic_path(final) as tmp:  # entered in the journal, then renamed into place
                    os.replace(self.staging / entry["path"], tmp)
            shutil.rmtree(self.staging, ignore_errors=True)
            run.count(self.records_read, kept=sum(entry["records"] for entry in entries))
        return WrittenShards(entries, run.stats)

    def abort(self, reason: str) -> None:
        """Stop writing and remove what was written (all of it under ``staging``)."""
        if self.broken is None:
            self.broken = reason
        with contextlib.suppress(BaseException):
            self._background.stop(failed=True)
        for writer in self._writers.values():
            writer.abort()
        shutil.rmtree(self.staging, ignore_errors=True)


_ORDER = [(schema.SOURCE, "ascending"), (schema.SOURCE_INDEX, "ascending"), (schema.ID, "ascending"), (schema.TURN, "ascending")]


def _sort_key(table: pa.Table, row: int) -> tuple:
    """A row's sort key as Python values that compare as Arrow sorts them (nulls last)."""
    values = (table.column(name)[row].as_py() for name, _ in _ORDER)
    return tuple((True,) if value is None else (False, value) for value in values)


@dataclass
class _InOrder:
    """A tokenized file whose key range does not overlap another's; ``sorted``: its rows are in
    key order already (what the tokenize stage writes), so it can be read batch by batch."""

    path: Path
    sorted: bool


def _in_key_order(in_paths: list[Path]) -> list[_InOrder] | None:
    """The files in the order of their rows' sort key (source, source index, id, turn), when the
    files' key ranges do not overlap (each tokenize work file holds one contiguous run of one
    input's records); ``None`` when they do.

    Then the shards are written file by file: a file whose rows are in key order one record batch
    at a time, any other whole (memory-mapped) and sorted, so the stage's memory does not grow
    with the run. Only the key columns are read here.
    """
    ranges = []
    for path in in_paths:
        table = read_tokenized(path, [name for name, _ in _ORDER])
        if table.num_rows:
            order = pc.sort_indices(table, _ORDER).to_numpy()
            in_order = bool((order == np.arange(len(order))).all())
            ranges.append((_sort_key(table, int(order[0])), _sort_key(table, int(order[-1])), _InOrder(path, in_order)))
        del table
    ranges.sort(key=lambda r: r[0])
    for (_, last, _), (first, _, _) in zip(ranges, ranges[1:]):
        if not last < first:
            return None
    return [file for _, _, file in ranges]


def _pieces(file: pa.Table | _InOrder) -> Iterator[pa.Table]:
    """A file's rows for :func:`_route`: one table per record batch when the file is Arrow IPC in
    key order (read, not mapped, so each batch leaves memory once routed), else the whole file."""
    if isinstance(file, pa.Table):
        yield file
        return
    try:
        batched = file.sorted and _is_arrow_ipc(file.path)
    except OSError as exc:
        raise ValueError(f"cannot read tokenized rows from {file.path}: {exc}") from exc
    if not batched:
        yield read_tokenized(file.path)
        return
    try:
        with pa.OSFile(str(file.path), "rb") as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)]).cast(schema.SHARD_SCHEMA)
    except (OSError, pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"cannot read tokenized rows from {file.path}: {exc}") from exc


# --- cut first, then write the files side by side ---------------------------------------------
# The shard files of the usual run (work files in key order, Arrow IPC) are planned from the key
# and length columns alone, with the cuts the streaming writer below makes, and then written by
# one thread per core, a whole file each: Parquet encoding and compression are most of the stage
# and release the GIL, and a file's bytes depend only on its rows. Each thread reads the record
# batches its file needs one at a time, so memory stays a few batches per core.


@dataclass
class _FileJob:
    """One planned shard file: its split and number, and its rows in order, as (work file, row)."""

    split: str
    number: int
    files: np.ndarray
    rows: np.ndarray
    records: int
    tokens: int
    trainable_tokens: int


def _write_planned(
    files: list[_InOrder], data_dir: Path, config: ShardConfig, metadata: dict[bytes, bytes], start_index: dict[str, int]
) -> tuple[int, list[ShardEntry]]:
    """(records read, manifest entries) of the shard files of ``files``, written in parallel."""
    records_read, jobs, batch_ends = _plan_files(files, config, start_index)
    workers = min(len(jobs), os.cpu_count() or 1)
    if not jobs:
        return records_read, []
    with ThreadPoolExecutor(workers, thread_name_prefix="sftkit-shards") as pool:
        futures = [pool.submit(_write_job, job, files, batch_ends, data_dir, config, metadata) for job in jobs]
        try:
            entries = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # files not started stay unwritten; those being written finish or fail
            raise
    return records_read, entries


def _plan_files(files: list[_InOrder], config: ShardConfig, start_index: dict[str, int]) -> tuple[int, list[_FileJob], list[np.ndarray]]:
    """The records in ``files``, the shard files to write (split by split, in number order) and
    each work file's record batch ends (cumulative rows), read from the key and length columns."""
    columns = [schema.SOURCE, schema.SOURCE_INDEX, schema.ID, schema.LENGTH, schema.NUM_TRAINABLE]
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {split: [] for split in schema.SPLITS}
    last: dict[str, tuple | None] = dict.fromkeys(schema.SPLITS)
    batch_ends, records_read, previous = [], 0, None
    for number, file in enumerate(files):
        try:
            with pa.memory_map(str(file.path)) as source:  # the columns read, not the file, are paged in
                reader = pa.ipc.open_file(source)
                keys, sizes = [], []
                for i in range(reader.num_record_batches):  # one at a time: a compressed batch is decoded whole
                    batch = reader.get_batch(i)
                    sizes.append(batch.num_rows)
                    keys.append(pa.Table.from_batches([batch.select(columns)]))
                    del batch
                batch_ends.append(np.cumsum(sizes, dtype=np.int64))
                # (every file here has rows: _in_key_order leaves out the empty ones)
                table = pa.concat_tables(keys).cast(pa.schema([schema.SHARD_SCHEMA.field(c) for c in columns]))
                del keys, reader
                source_ = table.column(schema.SOURCE).to_numpy(zero_copy_only=False)
                source_index = table.column(schema.SOURCE_INDEX).to_numpy()
                lengths = table.column(schema.LENGTH).to_numpy()
                trainable = table.column(schema.NUM_TRAINABLE).to_numpy()
                ids = table.column(schema.ID).to_pylist()
                del table
        except (OSError, pa.ArrowInvalid, ValueError) as exc:
            raise ValueError(f"cannot read tokenized rows from {file.path}: {exc}") from exc
        rows = np.arange(len(ids))
        splits = np.array([split_of(row_id, config.val_fraction) for row_id in ids])
        records_read += int(_starts_record(source_, source_index, rows, previous).sum())
        previous = (source_[-1], source_index[-1])
        for split in schema.SPLITS:
            mine = rows[splits == split]
            if not len(mine):
                continue
            starts = _starts_record(source_, source_index, mine, last[split])
            last[split] = (source_[mine[-1]], source_index[mine[-1]])
            parts[split].append((np.full(len(mine), number, np.int32), mine, starts, lengths[mine], trainable[mine]))
    jobs = []
    for split in schema.SPLITS:
        if not parts[split]:
            continue
        file_of, rows, starts, lengths, trainable = (np.concatenate(column) for column in zip(*parts[split]))
        record_starts = np.flatnonzero(starts)
        number, start = start_index.get(split, 0), 0
        while start < len(rows):  # a file ends at the first record start at or past target_rows rows
            at = int(np.searchsorted(record_starts, start + config.target_rows, "left"))
            end = int(record_starts[at]) if at < len(record_starts) else len(rows)
            piece = slice(start, end)
            jobs.append(
                _FileJob(
                    split,
                    number,
                    file_of[piece],
                    rows[piece],
                    int(starts[piece].sum()),
                    int(lengths[piece].sum()),
                    int(trainable[piece].sum()),
                )
            )
            number, start = number + 1, end
    return records_read, jobs, batch_ends


def _write_job(
    job: _FileJob, files: list[_InOrder], batch_ends: list[np.ndarray], data_dir: Path, config: ShardConfig, metadata: dict[bytes, bytes]
) -> ShardEntry:
    """(In a writer thread.) Write one planned shard file, atomically; its manifest entry."""
    path = f"{SHARDS_DIR}/{schema.shard_file_name(job.split, job.number)}"
    groups = _RowGroups(config.row_group_rows)
    with atomic_path(data_dir / path) as tmp:
        with _parquet_writer(tmp, {**metadata, schema.META_SPLIT: job.split.encode()}, config) as writer:
            for table, rows in _job_pieces(job, files, batch_ends):
                for group in groups.add(table, rows):
                    writer.write_table(group, row_group_size=config.row_group_rows)
            if (group := groups.rest()) is not None:
                writer.write_table(group, row_group_size=config.row_group_rows)
    counts = {"rows": len(job.rows), "records": job.records, "tokens": job.tokens, "trainable_tokens": job.trainable_tokens}
    return _entry(data_dir, path, job.split, counts)


def _job_pieces(job: _FileJob, files: list[_InOrder], batch_ends: list[np.ndarray]) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(record batch, rows of it) in the job's order, each batch read (not mapped) when needed."""
    runs = np.flatnonzero(np.diff(job.files)) + 1
    for first, last in zip([0, *runs.tolist()], [*runs.tolist(), len(job.files)]):
        number = int(job.files[first])
        rows, ends = job.rows[first:last], batch_ends[number]
        path = files[number].path
        try:
            with pa.OSFile(str(path), "rb") as source:
                reader = pa.ipc.open_file(source)
                batch_of = np.searchsorted(ends, rows, "right")  # rows ascend: so do their batches
                cuts = np.flatnonzero(np.diff(batch_of)) + 1
                for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
                    index = int(batch_of[lo])
                    offset = int(ends[index - 1]) if index else 0
                    table = pa.Table.from_batches([reader.get_batch(index)]).cast(schema.SHARD_SCHEMA)
                    yield table, rows[lo:hi] - offset
        except (OSError, pa.ArrowInvalid, ValueError) as exc:
            raise ValueError(f"cannot read tokenized rows from {path}: {exc}") from exc


def _parquet_writer(path: Path, metadata: dict[bytes, bytes], config: ShardConfig) -> pq.ParquetWriter:
    """A shard file's writer: :data:`schema.SHARD_SCHEMA` with ``metadata`` (the split's included)."""
    arrow_schema = schema.SHARD_SCHEMA.with_metadata({**(schema.SHARD_SCHEMA.metadata or {}), **metadata})
    compression = None if config.compression == "none" else config.compression
    return pq.ParquetWriter(path, arrow_schema, compression=compression, write_statistics=True)


def _entry(data_dir: Path, path: str, split: str, counts: dict[str, int]) -> ShardEntry:
    """A finished shard file's manifest entry (``counts``: rows, records, tokens, trainable_tokens)."""
    return {"path": path, "split": split, **counts, "sha256": sha256_file(data_dir / path)}


class _RowGroups:
    """Rows gathered into row groups of ``size`` rows counted from a file's start, each one
    contiguous chunk, so a file's bytes depend only on its rows."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending: list[pa.Table] = []
        self._rows = 0

    def add(self, table: pa.Table, rows: np.ndarray) -> Iterator[pa.Table]:
        """Add ``rows`` of ``table``; yields each row group they fill (consume it whole)."""
        while len(rows):
            take = rows[: self.size - self._rows]
            self._pending.append(gather_rows(table, take))
            self._rows += len(take)
            rows = rows[len(take) :]
            if self._rows == self.size:
                yield self._take()

    def rest(self) -> pa.Table | None:
        """The last, partial row group, if any rows wait."""
        return self._take() if self._rows else None

    def _take(self) -> pa.Table:
        group = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._rows = [], 0
        return group


def _is_arrow_ipc(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"ARROW1"


def _starts_record(source: np.ndarray, source_index: np.ndarray, rows: np.ndarray, previous: tuple | None) -> np.ndarray:
    """For rows in sort order: True where a row is its record's first (``previous``: the
    (source, source index) of the row before the first, or None)."""
    first = np.ones(len(rows), dtype=bool)
    if len(rows):
        first[1:] = (source[rows[1:]] != source[rows[:-1]]) | (source_index[rows[1:]] != source_index[rows[:-1]])
        if previous is not None:
            first[0] = (source[rows[0]], source_index[rows[0]]) != previous
    return first


def _route(table: pa.Table, writers: dict[str, _SplitWriter], val_fraction: float, previous: tuple | None) -> tuple[int, tuple | None]:
    """Send ``table``'s rows, in sort order, to their split's writer; returns the records read
    and the (source, source index) of the last row."""
    if not table.num_rows:
        return 0, previous
    order = pc.sort_indices(table, _ORDER).to_numpy()
    source = table.column(schema.SOURCE).to_numpy(zero_copy_only=False)
    source_index = table.column(schema.SOURCE_INDEX).to_numpy()
    splits = np.array([split_of(row_id, val_fraction) for row_id in table.column(schema.ID).to_pylist()])
    records = int(_starts_record(source, source_index, order, previous).sum())
    for split, writer in writers.items():
        rows = order[splits[order] == split]
        writer.add(table, rows, _starts_record(source, source_index, rows, writer.last_record), source, source_index)
    return records, (source[order[-1]], source_index[order[-1]])


class _Background:
    """One thread that encodes, compresses, writes and syncs the shard files, in the order the
    work is given, while the caller gathers the next row groups (the Parquet writer and the
    file system release the GIL). At most :data:`_IN_FLIGHT` row groups wait for it."""

    _IN_FLIGHT = 4

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sftkit-shards")
        self._pending: deque[Future] = deque()

    def submit(self, work: Callable[[], Any]) -> Future:
        while len(self._pending) >= self._IN_FLIGHT:
            self._pending.popleft().result()  # an error in the thread is raised here
        future = self._pool.submit(work)
        self._pending.append(future)
        return future

    def stop(self, failed: bool = False) -> None:
        """Wait for all the work; raise its first error unless the caller is failing already."""
        try:
            while self._pending:
                future = self._pending.popleft()
                if failed:
                    future.exception()
                else:
                    future.result()
        finally:
            self._pool.shutdown(wait=True)


class _SplitWriter:
    """One split's shard files, written as rows arrive in sort order: a file is cut at the first
    record start at or past ``target_rows`` rows, row groups are ``row_group_rows`` rows from the
    file's start, each gathered into one contiguous chunk, so the bytes depend only on the rows."""

    def __init__(
        self, split: str, data_dir: Path, config: ShardConfig, metadata: dict[bytes, bytes], first_number: int, background: _Background
    ) -> None:
        self.split, self.data_dir, self.config, self.background = split, data_dir, config, background
        self.metadata = {**metadata, schema.META_SPLIT: split.encode()}
        self.number = first_number
        self.entries: list[Future] = []  # each file's manifest entry, once the thread finished it
        self.last_record: tuple | None = None
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._groups = _RowGroups(config.row_group_rows)
        self._file: dict = {}

    def add(self, table: pa.Table, rows: np.ndarray, new_record: np.ndarray, source: np.ndarray, source_index: np.ndarray) -> None:
        if not len(rows):
            return
        lengths = table.column(schema.LENGTH).to_numpy()
        trainable = table.column(schema.NUM_TRAINABLE).to_numpy()
        # Where this file of rows must be cut: a record start once the open file has target_rows.
        start = 0
        while start < len(rows):
            room = self.config.target_rows - self._file.get("rows", 0) if self._writer else self.config.target_rows
            starts_after = np.flatnonzero(new_record[start:]) + start
            at = int(np.searchsorted(starts_after, start + max(room, 0), "left"))
            end = int(starts_after[at]) if at < len(starts_after) else len(rows)
            if end == start:  # the open file is full and a record starts here
                self._finish_file()
                continue
            piece = rows[start:end]
            self._open()
            self._file["rows"] += len(piece)
            self._file["records"] += int(new_record[start:end].sum())
            self._file["tokens"] += int(lengths[piece].sum())
            self._file["trainable_tokens"] += int(trainable[piece].sum())
            self._append(table, piece)
            start = end
            if start < len(rows):
                self._finish_file()
        last = rows[-1]
        self.last_record = (source[last], source_index[last])

    def _append(self, table: pa.Table, rows: np.ndarray) -> None:
        for group in self._groups.add(table, rows):
            self._write(group)

    def _flush(self) -> None:
        if (group := self._groups.rest()) is not None:
            self._write(group)

    def _write(self, group: pa.Table) -> None:
        self.background.submit(functools.partial(self._writer.write_table, group, row_group_size=self.config.row_group_rows))

    def _open(self) -> None:
        if self._writer is not None:
            return
        name = schema.shard_file_name(self.split, self.number)
        self._file = {"path": f"{SHARDS_DIR}/{name}", "rows": 0, "records": 0, "tokens": 0, "trainable_tokens": 0}
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.data_dir / SHARDS_DIR / name))
        self._writer = _parquet_writer(tmp, self.metadata, self.config)

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._flush()
        writer, stack, file = self._writer, self._stack, dict(self._file)
        self._writer, self._stack = None, None
        self.entries.append(self.background.submit(functools.partial(self._finished, writer, stack, file)))
        self.number += 1

    def _finished(self, writer: pq.ParquetWriter, stack: contextlib.ExitStack, file: dict) -> ShardEntry:
        """(In the background thread.) Close the file, rename it into place, hash it."""
        try:
            writer.close()
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary file
            raise
        stack.close()  # syncs and renames the finished file into place
        return _entry(self.data_dir, file["path"], self.split, {k: v for k, v in file.items() if k != "path"})

    def close(self) -> list[ShardEntry]:
        self._finish_file()
        return [entry.result() for entry in self.entries]

    def abort(self) -> None:
        """After an error, once the background thread stopped: close the open file and remove it
        (its temporary name, never renamed)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            error = RuntimeError("shard writing stopped")
            with contextlib.suppress(BaseException):
                self._stack.__exit__(type(error), error, None)
            self._writer, self._stack = None, None

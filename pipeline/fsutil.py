"""Crash-safe file writing: nothing half-written ever carries a final name.

Every file sftkit produces goes through :func:`atomic_path`: it is written under a temporary
name in the same folder, fsynced, and renamed into place only when complete. A run killed with
``kill -9`` leaves at worst a ``.tmp-*`` file that no reader lists and the next run removes.

Inside an sftkit output folder, each final name is entered in the folder's journal before the
file is created (``pipeline.outdir``: sftkit deletes only files it wrote), and a full disk, a
folder one may not write or a read-only file system is one ``ValueError`` naming the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import outdir

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds."""
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        outdir.will_write(final)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        error = outdir.write_error(exc, final)
        if error is None:
            raise
        raise error from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(
    table: pa.Table,
    final: str | os.PathLike,
    *,
    rows: np.ndarray | None = None,
    metadata: dict[bytes, bytes] | None = None,
    compression: str = "zstd",
    row_group_size: int | None = None,
) -> Path:
    """Write ``table`` (or its ``rows``, in that order) to ``final`` atomically.

    ``metadata`` is merged into the schema metadata. Every row group is gathered into one
    contiguous chunk before it is written, so the bytes depend on the rows alone, not on how
    ``table`` happens to be chunked (the Parquet writer cuts pages at chunk boundaries), and
    only one row group is ever copied at a time. Written without timestamps or other varying
    fields, so the same rows give the same bytes.
    """
    arrow_schema = table.schema
    if metadata:
        arrow_schema = arrow_schema.with_metadata({**(arrow_schema.metadata or {}), **metadata})
    rows = np.arange(table.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    step = row_group_size or 1024 * 1024  # pyarrow's own default row group size
    with atomic_path(final) as tmp:
        with pq.ParquetWriter(tmp, arrow_schema, compression=compression, write_statistics=True) as writer:
            for start in range(0, len(rows), step):
                writer.write_table(gather_rows(table, rows[start : start + step]), row_group_size=step)
    return Path(final)


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """A Parquet file to stream: read through a 1 MiB buffer, without pre-buffering.

    pyarrow's ``ParquetFile`` pre-buffers by default, and its ``iter_batches`` then keeps every
    column chunk it has read until the reader closes: streaming a 290 MB dedup signature file
    held 296 MiB of Arrow memory at the end, against 22 MiB this way (200k conversations), so a
    stage's memory grew with its chunk's size. Local files lose nothing by it."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)


def compression_of(file: str | os.PathLike | pq.FileMetaData) -> str:
    """The codec of a Parquet file's first column chunk (the file, or its metadata when the caller
    has read it), as ``ParquetWriter`` names it ("none" for an uncompressed file; "zstd" for one
    without row groups): a stage that rewrites a chunk keeps the chunk's codec, so a run's work
    files stay as the run wrote them."""
    metadata = file if isinstance(file, pq.FileMetaData) else pq.read_metadata(file)
    if not metadata.num_row_groups or not metadata.num_columns:
        return "zstd"
    codec = metadata.row_group(0).column(0).compression.lower()
    return "none" if codec == "uncompressed" else codec


def gather_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)`` as one contiguous chunk, built from zero-copy slices of the runs of
    consecutive rows (``take`` on a chunked table concatenates every chunk of every column first,
    which would copy the whole table for each row group)."""
    if not len(rows):
        return table.slice(0, 0).combine_chunks()
    if rows.min() < 0 or rows.max() >= table.num_rows:  # slice would clamp them silently
        raise IndexError(f"rows {rows.min()}..{rows.max()} outside a table of {table.num_rows} rows")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate([[0], breaks])].tolist()
    lengths = np.diff(np.concatenate([[0], breaks, [len(rows)]])).tolist()
    return pa.concat_tables([table.slice(start, length) for start, length in zip(starts, lengths)]).combine_chunks()


def read_ahead(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` in order, produced by a thread of their own up to ``depth`` ahead of the caller:
    a reader that releases the GIL (pyarrow decoding Parquet) then works beside the caller (pyarrow
    encoding what it read). The producer's exception is raised here, at its place in the order;
    leaving the loop early waits for at most ``depth`` items in flight, then stops."""
    iterator, end = iter(items), object()
    with ThreadPoolExecutor(1, thread_name_prefix="sftkit-read-ahead") as pool:
        pending = deque(pool.submit(next, iterator, end) for _ in range(max(1, depth)))
        while (item := pending.popleft().result()) is not end:
            pending.append(pool.submit(next, iterator, end))
            yield item


def write_json_atomic(obj: Any, final: str | os.PathLike) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    return Path(final)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True) -> int:
    """Delete ``.tmp-*`` leftovers of a crashed run in ``folder`` (and below it, if ``recursive``);
    returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in (folder.rglob if recursive else folder.glob)(f"{TMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink()
            removed += 1
    return removed


class ParquetSink:
    """Rows or tables -> one Parquet file, written batch by batch under a temporary name.

    The file is opened on the first write (or at :meth:`finish` when ``create_when_empty``) and
    renamed to its final name when the enclosing ExitStack closes without an error. A sink that
    wrote nothing and need not exist removes a file of that name left by an earlier run.
    """

    def __init__(
        self,
        final: str | os.PathLike,
        arrow_schema: pa.Schema,
        stack: contextlib.ExitStack,
        *,
        create_when_empty: bool,
        compression: str = "zstd",
    ):
        self.final = Path(final)
        self.schema = arrow_schema
        self.stack = stack
        self.create_when_empty = create_when_empty
        self.compression = compression
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Append plain-dict rows; returns how many."""
        if not rows:
            return 0
        return self.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def write_table(self, table: pa.Table) -> int:
        if not table.num_rows:
            return 0
        self._open().write_table(table)
        self.rows += table.num_rows
        return table.num_rows

    def finish(self) -> None:
        if self.writer is None:
            if self.create_when_empty:
                self._open()
            elif self.final.exists():
                self.final.unlink()  # an earlier run's output that this run has nothing for

    def _open(self) -> pq.ParquetWriter:
        if self.writer is None:
            tmp = self.stack.enter_context(atomic_path(self.final))
            self.writer = pq.ParquetWriter(tmp, self.schema, compression=self.compression)
            # Registered after atomic_path, so it runs first: the file is closed before the rename.
            self.stack.callback(self.writer.close)
        return self.writer

"""The persisted dedup index: what every earlier run kept, as immutable Parquet parts.

Layout of ``index_dir``::

    part-<16 hex>.parquet   one per run that kept something; never rewritten

A part holds, for every record a run *kept*: ``id``, ``exact_hash`` (uint64 of the normal
form), ``signature`` (the MinHash, uint32 x num_perm) and one uint64 column per LSH band
(``band_000`` ...). Its name is a content hash of what it adds, so writing it twice is
harmless. The dedup parameters (num_perm, seed, bands, rows, n-gram sizes, key, hash scheme)
are stored in each part's Parquet metadata; loading a part built with other parameters fails
with a clear error, since its band hashes would silently never match (a config change
rebuilds the dataset anyway).

Two-phase update, for crash safety: a run writes its new part first (atomically, under its
final content-hash name) but does not make it current. The dataset manifest is the one list of
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
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outdir, schema
from pipeline.config import DedupConfig
from pipeline.fsutil import TMP_PREFIX, _fsync_dir

PARAMS_KEY = b"sftkit.dedup.params"
PART_NAME = re.compile(r"^part-[0-9a-f]{16}\.parquet$")
HASH_SCHEME = "poly64-splitmix64-top32/datasketch-affine32/v1"

EXACT_HASH = "exact_hash"
SIGNATURE = "signature"


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


def index_schema(num_perm: int, bands: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(schema.ID, pa.string(), nullable=False),
            pa.field(EXACT_HASH, pa.uint64(), nullable=False),
            pa.field(SIGNATURE, pa.list_(pa.uint32(), num_perm), nullable=False),
        ]
        + [pa.field(band_column(b), pa.uint64(), nullable=False) for b in range(bands)]
    )


def _check_part_name(part: str, where: object) -> str:
    if not isinstance(part, str) or not PART_NAME.match(part):
        raise ValueError(f"{where}: {part!r} is not a dedup index part name (part-<16 hex>.parquet)")
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
    meta = pq.read_schema(path).metadata or {}
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

    ``parts`` are the current parts (none: an empty index, an empty table). With ``params`` (see :func:`index_params`) every part is checked to match them.
    """
    paths = resolve_parts(index_dir, parts)
    tables = []
    for path in paths:
        if params is not None:
            _check_params(path, params)
        tables.append(pq.read_table(path, columns=columns))
    if not tables:
        if params is None:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or [schema.ID])})
        full = index_schema(params["num_perm"], params["bands"])
        names = columns or full.names
        return pa.schema([full.field(c) for c in names]).empty_table()
    return pa.concat_tables(tables)


def index_rows(index_dir, parts, rows: np.ndarray, column: str) -> pa.Array | None:
    """Values of ``column`` for the given global index rows (sorted ascending), part by part,
    so that a large index is never held in memory whole."""
    out = []
    offset = 0
    for path in resolve_parts(index_dir, parts):
        count = pq.read_metadata(path).num_rows
        local = rows[(rows >= offset) & (rows < offset + count)] - offset
        if len(local):
            values = pq.read_table(path, columns=[column]).column(column).combine_chunks()
            out.append(values.take(pa.array(local)))
        offset += count
    if offset and rows.size and rows.max() >= offset:
        raise IndexError(f"dedup index row {int(rows.max())} out of range ({offset} rows)")
    return pa.concat_arrays(out) if out else None


def restrict_part(index_dir: str | os.PathLike, part: str, keep_ids: Iterable[str]) -> str | None:
    """A part holding only those records of ``part`` whose id is in ``keep_ids``; its name.

    For a pipeline whose later stages (quality, tokenize) drop some records dedup kept: the
    index should remember only what reached the shards, or a later, better near-copy of a
    dropped record would be removed as a duplicate of nothing. Returns ``part`` itself when
    every record stays and None when none does; the original file is left for the caller's
    clean-up (it may still be listed by a committed manifest).
    """
    index_dir = Path(index_dir)
    path = index_dir / _check_part_name(part, index_dir)
    table = pq.read_table(path)
    keep = pc.is_in(table.column(schema.ID), value_set=pa.array(sorted(set(keep_ids)), pa.string()))
    if pc.all(keep).as_py() is not False:
        return part
    params = json.loads((pq.read_schema(path).metadata or {})[PARAMS_KEY])
    writer = PartWriter(index_dir, params)
    try:
        writer.write(table.filter(keep))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class PartWriter:
    """Streams the kept records of one run into a new part; its name is the content hash."""

    def __init__(self, index_dir: str | os.PathLike, params: dict) -> None:
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.schema = index_schema(params["num_perm"], params["bands"]).with_metadata(
            {PARAMS_KEY: json.dumps(params, sort_keys=True).encode()}
        )
        self.tmp = self.index_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-part.parquet"
        self.digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=8)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        # The name hashes what the part adds: the ids and normal-form hashes of its records.
        self.digest.update("\n".join(table.column(schema.ID).to_pylist()).encode("utf-8"))
        self.digest.update(table.column(EXACT_HASH).to_numpy().tobytes())
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> str | None:
        """Finish the part and give it its final name; ``None`` when nothing was written."""
        if self._writer is None:
            return None
        self._writer.close()
        name = f"part-{self.digest.hexdigest()}.parquet"
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

"""The shard writer: tokenized rows -> ``DIR/shards/{train,val}-NNNNN.parquet``.

This module owns the train/validation split (by a hash of the row id, so a row keeps its split
across refreshes whatever else is in the run), the row order inside the shards (by source and
source index, so the bytes do not depend on parallelism), the cutting into files of about
``target_rows`` rows, and the Parquet file metadata (tokenizer and template name and
fingerprint, split, format version). Every file is written atomically; the same input and
config give byte-identical files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import SFTConfig, ShardConfig
from pipeline.fsutil import sha256_file, write_parquet_atomic
from pipeline.manifest import ShardEntry
from pipeline.stage import StageRun, StageStats

SHARDS_DIR = "shards"
_SPLIT_KEY = b"sftkit-split"


def split_of(row_id: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of ids, ``train`` for the rest."""
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8, key=_SPLIT_KEY).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def read_tokenized(path: Path) -> pa.Table:
    """Tokenized rows in :data:`schema.SHARD_SCHEMA` from an Arrow IPC file (what the tokenize
    stage writes: memory-mapped, so the rows stay on disk until a row group is gathered) or a
    Parquet file (read into memory)."""
    try:
        with open(path, "rb") as f:
            arrow_ipc = f.read(6) == b"ARROW1"
        if arrow_ipc:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        else:
            table = pq.read_table(path, schema=schema.SHARD_SCHEMA)
        return table.cast(schema.SHARD_SCHEMA)
    except (OSError, pa.ArrowInvalid, ValueError) as exc:
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
        table = pa.concat_tables([read_tokenized(path) for path in in_paths]) if in_paths else None
        if table is not None and table.num_rows:
            entries = _write(table, data_dir, shard_config, metadata, start_index, run)
    return WrittenShards(entries, run.stats)


def _write(table: pa.Table, data_dir: Path, config: ShardConfig, metadata, start_index, run: StageRun) -> list[ShardEntry]:
    order = pc.sort_indices(
        table,
        [
            (schema.SOURCE, "ascending"),
            (schema.SOURCE_INDEX, "ascending"),
            (schema.ID, "ascending"),
            (schema.TURN, "ascending"),
        ],
    ).to_numpy()
    # A record's rows (several under per_turn) are one run in this order: a file is cut only
    # between records, so each file's distinct records add up to the dataset's.
    source = table.column(schema.SOURCE).to_numpy(zero_copy_only=False)
    source_index = table.column(schema.SOURCE_INDEX).to_numpy()
    splits = np.array([split_of(row_id, config.val_fraction) for row_id in table.column(schema.ID).to_pylist()])
    lengths = table.column(schema.LENGTH).to_numpy()
    trainable = table.column(schema.NUM_TRAINABLE).to_numpy()
    compression = None if config.compression == "none" else config.compression

    def starts_record(rows: np.ndarray) -> np.ndarray:
        """For rows in this order: True where a row is its record's first."""
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (source[rows[1:]] != source[rows[:-1]]) | (source_index[rows[1:]] != source_index[rows[:-1]])
        return first

    records_read = int(starts_record(order).sum())
    entries: list[ShardEntry] = []
    for split in schema.SPLITS:
        rows = order[splits[order] == split]
        new_record = starts_record(rows)
        record_starts = np.flatnonzero(new_record)
        # The rows are gathered one row group at a time while writing: no copy of the whole split.
        for number, (start, end) in enumerate(_cuts(record_starts, len(rows), config.target_rows)):
            file_rows = rows[start:end]
            name = schema.shard_file_name(split, start_index.get(split, 0) + number)
            path = data_dir / SHARDS_DIR / name
            write_parquet_atomic(
                table,
                path,
                rows=file_rows,
                metadata={**metadata, schema.META_SPLIT: split.encode()},
                compression=compression,
                row_group_size=config.row_group_rows,
            )
            entries.append(
                {
                    "path": f"{SHARDS_DIR}/{name}",
                    "split": split,
                    "rows": len(file_rows),
                    "records": int(new_record[start:end].sum()),
                    "tokens": int(lengths[file_rows].sum()),
                    "trainable_tokens": int(trainable[file_rows].sum()),
                    "sha256": sha256_file(path),
                }
            )
    # A record split across two files, or one lost between the splits, breaks this count.
    run.count(records_read, kept=sum(entry["records"] for entry in entries))
    return entries


def _cuts(record_starts: np.ndarray, total: int, target_rows: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of about ``target_rows`` rows each, cut only where a record starts."""
    cuts, start = [], 0
    while start < total:
        wanted = start + target_rows
        at = int(np.searchsorted(record_starts, wanted, "left"))
        end = int(record_starts[at]) if at < len(record_starts) else total
        cuts.append((start, end))
        start = end
    return cuts

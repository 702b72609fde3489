"""The memory-mappable companion of a Parquet shard: its format, its only writer, its only reader.

Parquet is what users inspect, but its pages are compressed and cannot be mapped zero-copy, so
the trainer keeps one companion folder per shard, built once from the shard and then only read.
It is keyed by the shard's sha256, so a changed shard can never be served from a stale
companion, and two datasets holding the same shard share it.

Layout of ``<cache root>/<shard sha256>/`` (all little-endian, no headers)::

    input_ids.i32   int32[total_tokens]   every row's input_ids, concatenated in row order
    labels.i32      int32[total_tokens]   every row's labels (-100 where not trained), same order
    offsets.i64     int64[rows + 1]       row i is [offsets[i], offsets[i + 1]); offsets[0] == 0
    meta.json       {"format_version", "shard_sha256", "rows", "tokens", "trainable_tokens"}

``meta.json`` is written last: a folder without it is an interrupted build and is rebuilt. Every
file is written under a temporary name and renamed (pipeline.fsutil), so concurrent builders
(DataLoader workers, DDP ranks) at worst do the same work twice.

The cache root is ``DATA_DIR/.cache/mmap`` when the dataset folder is writable, otherwise
``$SFTKIT_CACHE_DIR`` or ``$XDG_CACHE_HOME/sftkit/mmap`` (``~/.cache/sftkit/mmap``).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.fsutil import atomic_path, open_parquet, write_json_atomic
from pipeline.schema import IGNORE_INDEX, INPUT_IDS, LABELS

COMPANION_FORMAT_VERSION = 1
TOKENS_FILE = "input_ids.i32"
LABELS_FILE = "labels.i32"
OFFSETS_FILE = "offsets.i64"
META_FILE = "meta.json"


class CompanionError(ValueError):
    """A shard whose rows cannot be turned into a companion (e.g. labels of the wrong length)."""


# --- where companions live -------------------------------------------------------------------
def user_cache_root() -> Path:
    if os.environ.get("SFTKIT_CACHE_DIR"):
        return Path(os.environ["SFTKIT_CACHE_DIR"]) / "mmap"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sftkit" / "mmap"


def cache_roots(data_dir: str | os.PathLike) -> list[Path]:
    """Where to look for companions, in order: inside the dataset, then the user's cache."""
    return [Path(data_dir) / ".cache" / "mmap", user_cache_root()]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False


def companion_dir(data_dir: str | os.PathLike, shard_path: str | os.PathLike, sha256: str) -> Path:
    """The folder of a complete companion for this shard, building it if none exists yet."""
    for root in cache_roots(data_dir):
        if is_complete(root / sha256, sha256):
            return root / sha256
    for root in cache_roots(data_dir):
        if _writable(root):
            return build_companion(shard_path, sha256, root / sha256)
    raise CompanionError(
        f"cannot build the memory-map companion of {shard_path}: neither "
        f"{' nor '.join(str(r) for r in cache_roots(data_dir))} is writable; set SFTKIT_CACHE_DIR"
    )


def is_complete(folder: Path, sha256: str) -> bool:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format_version") == COMPANION_FORMAT_VERSION and meta.get("shard_sha256") == sha256


# --- the writer ------------------------------------------------------------------------------
def build_companion(shard_path: str | os.PathLike, sha256: str, folder: str | os.PathLike) -> Path:
    """Stream a Parquet shard's input_ids/labels into the flat files above, one batch at a time."""
    shard_path, folder = Path(shard_path), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = tokens = trainable = 0
    ends: list[np.ndarray] = []
    with atomic_path(folder / TOKENS_FILE) as tokens_tmp, atomic_path(folder / LABELS_FILE) as labels_tmp:
        with open(tokens_tmp, "wb") as tokens_out, open(labels_tmp, "wb") as labels_out:
            parquet = open_parquet(shard_path)
            for batch in parquet.iter_batches(columns=[INPUT_IDS, LABELS], batch_size=8192):
                ids_col = batch.column(INPUT_IDS)
                labels_col = batch.column(LABELS)
                ids_offsets = ids_col.offsets.to_numpy().astype(np.int64)
                labels_offsets = labels_col.offsets.to_numpy().astype(np.int64)
                if not np.array_equal(np.diff(ids_offsets), np.diff(labels_offsets)):
                    bad = int(np.flatnonzero(np.diff(ids_offsets) != np.diff(labels_offsets))[0])
                    raise CompanionError(
                        f"{shard_path}: row {rows + bad} has {len(labels_col[bad])} labels for "
                        f"{len(ids_col[bad])} input_ids; labels must be the same length as input_ids"
                    )
                # .values ignores a sliced list's offset, so slice the flat values explicitly
                ids = ids_col.values.to_numpy()[ids_offsets[0] : ids_offsets[-1]]
                labels = labels_col.values.to_numpy()[labels_offsets[0] : labels_offsets[-1]]
                ids.astype("<i4", copy=False).tofile(tokens_out)
                labels.astype("<i4", copy=False).tofile(labels_out)
                ends.append(tokens + ids_offsets[1:] - ids_offsets[0])
                rows += len(batch)
                tokens += int(ids_offsets[-1] - ids_offsets[0])
                trainable += int(np.count_nonzero(labels != IGNORE_INDEX))
    offsets = np.concatenate([np.zeros(1, np.int64), *ends]).astype("<i8")
    with atomic_path(folder / OFFSETS_FILE) as offsets_tmp:
        offsets.tofile(offsets_tmp)
    meta = {
        "format_version": COMPANION_FORMAT_VERSION,
        "shard_sha256": sha256,
        "rows": rows,
        "tokens": tokens,
        "trainable_tokens": trainable,
    }
    write_json_atomic(meta, folder / META_FILE)
    return folder


# --- the reader ------------------------------------------------------------------------------
def _map(path: Path, dtype: str) -> np.ndarray:
    """A read-only ndarray over the file's pages (a plain ndarray: slicing it is cheap).

    Pages read through it are page cache: clean, shared and reclaimable, but counted in this
    process's RSS (as RssFile) once touched; the process's own memory (RssAnon) does not grow.
    """
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype)


class Companion:
    """The rows of one shard, served from memory maps opened on first use in each process.

    Pickling drops the maps, so a DataLoader worker opens its own after the fork/spawn.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        self.rows: int = meta["rows"]
        self.tokens: int = meta["tokens"]
        self.trainable_tokens: int = meta["trainable_tokens"]
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = (
                _map(self.folder / TOKENS_FILE, "<i4"),
                _map(self.folder / LABELS_FILE, "<i4"),
                _map(self.folder / OFFSETS_FILE, "<i8"),
            )
        return self._maps

    def lengths(self) -> np.ndarray:
        offsets = _map(self.folder / OFFSETS_FILE, "<i8")
        return np.diff(offsets).astype(np.int32)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy read-only views of row ``index``'s input_ids and labels."""
        tokens, labels, offsets = self._maps or self._open()
        start, end = offsets[index], offsets[index + 1]
        return tokens[start:end], labels[start:end]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

"""``ShardDataset``: the rows of a prepared dataset's split, served from memory maps.

Opening a dataset reads ``manifest.json``, checks every listed shard against its sha256 (and the
tokenizer against the manifest's fingerprint when one is given), and finds or builds each shard's
memory-mappable companion (format and cache location: :mod:`trainer.companion`). Rows are then
read straight from the page cache, so resident memory stays flat however large the dataset is.
:meth:`ShardDataset.concat` lays several folders' splits end to end (a training mixture).
"""

from __future__ import annotations

import bisect
import copy
import os
from pathlib import Path

import numpy as np

from pipeline.fsutil import sha256_file
from pipeline.manifest import read_manifest, resolve_inside, shard_entries
from pipeline.schema import SPLITS
from trainer.companion import Companion, companion_dir


class DatasetError(ValueError):
    """A dataset folder the trainer cannot use: corrupted shard, wrong tokenizer, bad split."""


class ShardDataset:
    """Memory-mapped rows of one split: ``ds[i] -> {"input_ids", "labels"}`` (int32 numpy views).

    ``lengths`` is an int32 array of every row's token count, which is all the batch planner
    needs; rows themselves are only touched when a batch is collated.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        tokenizer=None,
        *,
        verify: bool = True,
    ):
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.data_dir)
        if tokenizer is not None:
            check_tokenizer(self.manifest, tokenizer, self.data_dir)
        self.shards: list[Companion] = []
        for entry in shard_entries(self.manifest, split):
            path = resolve_inside(self.data_dir, entry["path"])
            if not path.is_file():
                raise DatasetError(f"shard {path} listed in {self.data_dir}/manifest.json is missing")
            if verify:
                actual = sha256_file(path)
                if actual != entry["sha256"]:
                    raise DatasetError(
                        f"shard {path} is corrupted: its sha256 is {actual[:12]}… but the manifest "
                        f"records {entry['sha256'][:12]}…; re-run `sftkit prepare` into {self.data_dir}"
                    )
            companion = Companion(companion_dir(self.data_dir, path, entry["sha256"]))
            if companion.rows != entry["rows"] or companion.tokens != entry["tokens"]:
                raise DatasetError(
                    f"shard {path} holds {companion.rows} rows / {companion.tokens} tokens but the "
                    f"manifest records {entry['rows']} / {entry['tokens']}"
                )
            self.shards.append(companion)
        self._index()

    def _index(self) -> None:
        # First global row index of every shard, for a bisect from row index to shard.
        self._starts = np.cumsum([0] + [s.rows for s in self.shards]).tolist()
        self.lengths: np.ndarray = np.concatenate([s.lengths() for s in self.shards]) if self.shards else np.zeros(0, np.int32)

    @classmethod
    def concat(cls, datasets: list[ShardDataset]) -> ShardDataset:
        """One dataset whose rows are those of ``datasets`` in turn (all of one split); its
        ``data_dir`` and ``manifest`` are the first one's."""
        if not datasets or len({d.split for d in datasets}) != 1:
            raise DatasetError("concat needs at least one dataset, all of the same split")
        joined = copy.copy(datasets[0])
        joined.shards = [s for d in datasets for s in d.shards]
        joined._index()
        return joined

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_tokens(self) -> int:
        return int(sum(s.tokens for s in self.shards))

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` of row ``index``: read-only views into the memory maps."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for the {len(self)}-row {self.split} split")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.shards[shard].row(index - self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        input_ids, labels = self.row(index)
        return {"input_ids": input_ids, "labels": labels}


def check_tokenizer(manifest: dict, tokenizer, data_dir: Path) -> None:
    """Refuse a tokenizer whose ids differ from the ones the shards were written with."""
    from pipeline.tokenizers import tokenizer_fingerprint

    expected = (manifest.get("tokenizer") or {}).get("fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if expected and expected != actual:
        raise DatasetError(
            f"tokenizer mismatch: {data_dir} was tokenized with "
            f"{manifest['tokenizer'].get('name')!r} (fingerprint {expected}) but the given tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} has fingerprint {actual}; "
            "train with the tokenizer the data was prepared with"
        )

"""Fetching single shard rows and splitting them into decoded tokens marked trained or not.

A row is found through the Parquet footers (row counts per file), so ``--row N`` decodes a few
pages of one file, whatever the size of the dataset.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.manifest import read_manifest
from pipeline.report.summary import SPLIT, shard_files

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Piece:
    """The text one token adds to the decoded conversation, and whether the model learns it."""

    text: str
    trained: bool


def split_sizes(files: dict[str, list[Path]]) -> dict[str, list[int]]:
    return {split: [pq.ParquetFile(p).metadata.num_rows for p in paths] for split, paths in files.items()}


def read_row(data_dir: str | os.PathLike, index: int, split: str = "train") -> dict[str, Any]:
    """Row ``index`` (0-based, in manifest order) of ``split``, with ``split`` and ``row`` added."""
    files = shard_files(data_dir, read_manifest(data_dir))
    if split not in files:
        raise ValueError(f"{data_dir} has no {split!r} split (it has: {', '.join(files) or 'no shards'})")
    total = sum(split_sizes({split: files[split]})[split])
    if not 0 <= index < total:
        raise ValueError(f"row {index} is out of range: the {split} split of {data_dir} has {total} rows (0..{total - 1})")
    # polars skips whole files by their footer row counts and decodes only the pages it needs;
    # reading the row group with pyarrow would decode every token of up to a whole shard.
    row = pl.scan_parquet([str(p) for p in files[split]]).slice(index, 1).collect().to_dicts()[0]
    return {**row, SPLIT: split, "row": index}


def find_row(data_dir: str | os.PathLike, row_id: str) -> dict[str, Any]:
    """The shard row with id ``row_id`` (any split)."""
    files = shard_files(data_dir, read_manifest(data_dir))
    for split, paths in files.items():
        found = pl.scan_parquet([str(p) for p in paths], row_index_name="row").filter(pl.col(schema.ID) == row_id).head(1).collect()
        if found.height:
            return {**found.to_dicts()[0], SPLIT: split}
    raise ValueError(f"no row with id {row_id!r} in the shards of {data_dir}")


def sample_rows(data_dir: str | os.PathLike, k: int, split: str = "train", seed: int | None = None) -> list[dict[str, Any]]:
    """``k`` distinct random rows of ``split`` (all of them, in random order, if it has fewer)."""
    if k < 1:
        raise ValueError(f"--sample needs a positive number of rows, got {k}")
    files = shard_files(data_dir, read_manifest(data_dir))
    if split not in files:
        raise ValueError(f"{data_dir} has no {split!r} split (it has: {', '.join(files) or 'no shards'})")
    total = sum(split_sizes({split: files[split]})[split])
    picks = random.Random(seed).sample(range(total), min(k, total))
    return [read_row(data_dir, index, split) for index in picks]


def token_pieces(tokenizer, input_ids: list[int], labels: list[int], window: int = 6) -> list[Piece]:
    """One :class:`Piece` per token; the pieces joined give the decoded conversation.

    Decoding tokens one by one is wrong for SentencePiece (leading spaces vanish) and for
    characters split over several byte-level tokens. So each token's text is the difference
    between decoding it with a few tokens of left context and decoding the context alone (as
    streaming detokenizers do); a token ending inside a character contributes nothing and its
    bytes appear with the token that completes the character.
    """
    n = len(input_ids)
    if n == 0:
        return []
    contexts = [input_ids[max(0, i - window) : i] for i in range(n)]
    withs = [input_ids[max(0, i - window) : i + 1] for i in range(n)]
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    before = tokenizer.batch_decode(contexts, **options)
    after = tokenizer.batch_decode(withs, **options)
    pieces = []
    for i in range(n):
        prefix = before[i].rstrip(REPLACEMENT_CHAR)
        full = after[i] if i == n - 1 else after[i].rstrip(REPLACEMENT_CHAR)
        if full.startswith(prefix):
            text = full[len(prefix) :]
        else:
            text = tokenizer.decode([input_ids[i]], **options)
        pieces.append(Piece(text, labels[i] != schema.IGNORE_INDEX))
    return pieces


def spans(pieces: list[Piece]) -> list[Piece]:
    """Consecutive pieces with the same trained flag merged into one."""
    merged: list[Piece] = []
    for piece in pieces:
        if merged and merged[-1].trained == piece.trained:
            merged[-1] = Piece(merged[-1].text + piece.text, piece.trained)
        else:
            merged.append(piece)
    return merged


def local_tokenizer_path(name: str) -> str | None:
    """``name`` as a local folder or file, else its snapshot in the Hugging Face cache, else None.

    Inspecting never goes to the network: a dataset prepared with a hub tokenizer finds it in the
    local cache, and a missing one falls back to showing messages instead of waiting on retries.
    """
    if Path(name).exists():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name, local_files_only=True)
    except Exception:  # not a valid repo id, or not cached: both mean "not available offline"
        return None


def load_row_tokenizer(manifest: dict[str, Any], override: str | None = None):
    """The dataset's tokenizer (or ``override``), and a warning line if it cannot be trusted.

    Returns ``(tokenizer or None, warning or None)``: the caller falls back to showing messages.
    """
    from pipeline.tokenizers import load_tokenizer, tokenizer_fingerprint

    recorded = manifest.get("tokenizer") or {}
    name = override or recorded.get("name")
    if not name:
        return None, "the manifest names no tokenizer; showing the messages instead of the tokens"
    whose = "the tokenizer given with --tokenizer" if override else "the dataset's tokenizer"
    local = local_tokenizer_path(str(name))
    if local is None:
        return None, (
            f"{whose} {name!r} is neither a local folder nor in the Hugging Face cache"
            f"{'' if override else ' (pass --tokenizer PATH)'}; showing the messages instead"
        )
    try:
        tokenizer = load_tokenizer(local)
    except (ValueError, OSError) as exc:
        return None, f"cannot load {whose} {name!r} ({exc}); showing the messages instead"
    expected = recorded.get("fingerprint")
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        return tokenizer, (
            f"tokenizer {name!r} differs from the one that made the shards (fingerprint "
            f"{tokenizer_fingerprint(tokenizer)} != {expected}); the decoded text may be wrong"
        )
    return tokenizer, None

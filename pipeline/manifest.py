"""``DIR/manifest.json``: what a prepared dataset holds, written last and atomically.

Readers (the trainer, ``sftkit inspect``, users' scripts) trust only the shards the manifest
lists, so a crashed run can never expose a partial dataset. Paths inside a manifest are relative
to its folder and are refused if they point outside it.

Layout::

    {
      "format_version": 1,
      "version": 3,                      # increments with every refresh that changed something
      "created_at": "2026-11-28T23:00:00+00:00",
      "tokenizer": {"name": ..., "fingerprint": ...},
      "template": {"name": ..., "fingerprint": ...},
      "config": {...}, "config_fingerprint": ...,
      "inputs": [{"source", "sha256", "records"}],          # what has been read, for incremental runs
      "shards": [{"path", "split", "rows", "records", "tokens", "trainable_tokens", "sha256"}],
      "rejected": [{"path", "rows", "records"}],
      "counts": {"read", "kept", "rows", "rejected": {stage: {reason: n}},
                 "turns_rejected": {reason: n}, "render_mismatch": n},
      "stages": [{"name", "seconds", "records_in", "records_out"}],
      "history": [{"version", "created_at", "read", "kept", "shards_added"}]
    }

Counts are of records (an input record is read, kept or rejected exactly once: read = kept +
sum of rejected); ``rows`` is the rows in the shards, more than ``kept`` when
``tokenize.reasoning: per_turn`` cut records into one row per assistant turn, and
``turns_rejected`` the turns of kept records that were refused (filed in rejected/ with their
``turn``; ``records`` of a rejected file counts only whole records). ``render_mismatch`` is the
kept rows whose tokens before their last trained turn differ from the generation prompt's.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.fsutil import write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or points outside its dataset folder."""


def manifest_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(data_dir)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; is {data_dir} a dataset made by `sftkit prepare`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ManifestError(f"{path} is not an sftkit manifest (no 'shards' list)")
    for entry in manifest["shards"]:
        resolve_inside(data_dir, entry["path"])
    return manifest


def read_manifest_or_none(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_manifest(data_dir) if manifest_path(data_dir).is_file() else None


def write_manifest(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, **manifest}
    return write_json_atomic(manifest, manifest_path(data_dir))


def resolve_inside(data_dir: str | os.PathLike, relative: str) -> Path:
    """``data_dir/relative``, refusing absolute paths and anything that escapes ``data_dir``."""
    root = Path(data_dir).resolve()
    if os.path.isabs(relative):
        raise ManifestError(f"manifest in {data_dir} lists an absolute path {relative!r}; refusing it")
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ManifestError(f"manifest in {data_dir} lists {relative!r}, which is outside the dataset folder")
    return target


def shard_entries(manifest: dict[str, Any], split: str | None = None) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if split is None or s["split"] == split]


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()

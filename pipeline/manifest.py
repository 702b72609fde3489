"""``DIR/manifest.json``: what a prepared dataset holds. Built, written, read and documented here.

Readers (the trainer, ``sftkit inspect``, users' scripts) trust only the files the manifest
lists, so a crashed run can never expose a partial dataset: the manifest is written last and
atomically, by :func:`write_manifest`, from what :func:`build_manifest` assembled. Paths inside
a manifest are relative to its folder and are refused if they point outside it.

Layout::

    {
      "format_version": 1,
      "version": 3,                      # increments with every refresh that changed something
      "created_at": "2026-11-28T23:00:00+00:00",
      "tokenizer": {"name": ..., "fingerprint": ...},
      "template": {"name": ..., "fingerprint": ...},
      "config": {...}, "config_fingerprint": ...,   # a changed fingerprint rebuilds the dataset
      "code_version": "1a2b3c4d5e6f",   # hash of pipeline/'s source that wrote this version
      "inputs": [{"source", "sha256", "records"}],  # what has been read, for incremental runs
      "shards": [{"path", "split", "rows", "records", "tokens", "trainable_tokens", "sha256"}],
      "rejected": [{"path", "rows", "records"}],
      "dedup_index": ["part-<16 hex>.arrow", ...],  # the current dedup index parts, in
                                         # dedup_index/: the records every version kept
                                         # (.parquet: a part an older sftkit wrote)
      "counts": {"read", "kept", "rows", "rejected": {stage: {reason: n}},
                 "turns_rejected": {reason: n}, "render_mismatch": n, "turns_without_stop": n},
      "stages": [{"name", "seconds", "records_in", "records_out", "rejected": {reason: n},
                  "extra": {...}, "peak_rss_bytes"}],  # this version's run, per stage (extra: stage
                                         # figures; peak_rss_bytes: the process's peak RSS during it)
      "history": [{"version", "created_at", "read", "kept", "shards_added",
                   "rebuild",            # true: config, tokenizer or template changed, all redone
                   "removed"}]           # files sftkit deleted in that run (its own, never a user's)
    }

Counts are of records (an input record is read, kept or rejected exactly once: read = kept +
sum of rejected, checked before any manifest is written); ``rows`` is the rows in the shards,
more than ``kept`` when ``tokenize.reasoning: per_turn`` cut records into one row per assistant
turn, and ``turns_rejected`` the turns of kept records that were refused (filed in rejected/
with their ``turn``; ``records`` of a rejected file counts only whole records).
``render_mismatch`` is the kept rows whose tokens before their last trained turn differ from the
generation prompt's; ``turns_without_stop`` the trained turns that end with no end-of-turn token
(a template that writes none and whose stop sftkit does not know: the model learns no stop from
them). ``counts.rejected`` is counted from the rejected files themselves, by each
row's own stage (the tokenize step files template failures under stage ``template``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from typing_extensions import TypedDict  # typing's cannot be a pydantic field on Python 3.11 (Prefect's JSON results)

from pipeline import schema
from pipeline.fsutil import write_json_atomic
from pipeline.stage import StageStats

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
# The dataset's folders, relative to DIR: the only places manifest paths point into.
SHARDS = "shards"
REJECTED = "rejected"
DEDUP_INDEX = "dedup_index"
STAGE_ORDER = ("ingest", "dedup", "quality", "tokenize", "shards")


class ShardEntry(TypedDict):
    path: str  # shards/train-00000.parquet
    split: str
    rows: int
    records: int  # distinct (source, source_index): rows before per_turn
    tokens: int
    trainable_tokens: int
    sha256: str


class RejectedEntry(TypedDict):
    path: str  # rejected/<stage>-<step key>.parquet
    rows: int
    records: int  # rows that are whole records (a refused turn of a kept record is not one)


class InputEntry(TypedDict):
    source: str
    sha256: str
    records: int


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


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Every file the manifest lists, relative to its folder: shards, rejected files, index parts.

    Tolerates a damaged manifest (entries of the wrong type are skipped): sftkit reads this to
    know which files are its own before it deletes anything.
    """
    listed = {
        entry["path"]
        for key in (SHARDS, REJECTED)
        for entry in manifest.get(key) or []
        if isinstance(entry, dict) and isinstance(entry.get("path"), str)
    }
    return listed | {f"{DEDUP_INDEX}/{part}" for part in manifest.get("dedup_index") or [] if isinstance(part, str)}


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def build_manifest(
    root: Path,
    previous: dict[str, Any] | None,
    *,
    version: int,
    tokenizer: dict[str, str],
    template: dict[str, str],
    config: dict[str, Any],
    config_fingerprint: str,
    code_version: str,
    new_inputs: list[InputEntry],
    new_shards: list[ShardEntry],
    new_rejected: Iterable[Path],
    dedup_index: list[str],
    stages: Iterable[StageStats],
    rebuild: bool,
) -> dict[str, Any]:
    """The next version of the manifest: ``previous`` (None for a first run or a rebuild) plus what
    this run added. Refuses, with the figures, to build one that loses a record. The caller adds
    the run's new dedup index part and, once it knows them, the files the run removes
    (``history[-1]["removed"]``)."""
    totals: dict[str, StageStats] = {}
    for stats in stages:
        totals[stats.name] = totals[stats.name] + stats if stats.name in totals else stats
    counts = previous["counts"] if previous else {}
    rejected_counts = {stage: Counter(reasons) for stage, reasons in counts.get("rejected", {}).items()}
    turns_rejected = Counter(counts.get("turns_rejected", {}))
    rejected_files: list[RejectedEntry] = []
    for path in new_rejected:
        table = pq.read_table(path, columns=[schema.STAGE, schema.REASON, schema.TURN])
        stage, reason, turn = (table.column(c).to_pylist() for c in (schema.STAGE, schema.REASON, schema.TURN))
        for row_stage, row_reason, row_turn in zip(stage, reason, turn):
            if row_turn is None:
                rejected_counts.setdefault(row_stage, Counter())[row_reason] += 1
            else:
                turns_rejected[row_reason] += 1
        # A turn refused while its record was kept is no record.
        records = table.column(schema.TURN).null_count
        rejected_files.append({"path": Path(path).relative_to(root).as_posix(), "rows": table.num_rows, "records": records})

    shards = (previous["shards"] if previous else []) + new_shards
    rejected = (previous.get("rejected", []) if previous else []) + rejected_files
    read_now = totals["ingest"].records_in if "ingest" in totals else 0
    read = counts.get("read", 0) + read_now
    kept = sum(s.get("records", s["rows"]) for s in shards)
    rejected_total = sum(f.get("records", f["rows"]) for f in rejected)
    if read != kept + rejected_total:
        raise AssertionError(
            f"conservation broken in {root}: read {read} records but shards hold {kept} and "
            f"rejected/ holds {rejected_total}; refusing to write a manifest that loses records"
        )
    tokenize_extra = totals["tokenize"].extra if "tokenize" in totals else {}
    created = now_iso()
    history = (previous.get("history", []) if previous else []) + [
        {
            "version": version,
            "created_at": created,
            "read": read_now,
            "kept": sum(s.get("records", s["rows"]) for s in new_shards),
            "shards_added": len(new_shards),
            "rebuild": rebuild,
            "removed": [],
        }
    ]
    return {
        "version": version,
        "created_at": created,
        "tokenizer": tokenizer,
        "template": template,
        "config": config,
        "config_fingerprint": config_fingerprint,
        "code_version": code_version,
        "inputs": (previous.get("inputs", []) if previous else []) + new_inputs,
        "shards": shards,
        "rejected": rejected,
        "dedup_index": dedup_index,
        "counts": {
            "read": read,
            "kept": kept,
            "rejected": {stage: dict(reasons) for stage, reasons in rejected_counts.items()},
            "render_mismatch": counts.get("render_mismatch", 0) + tokenize_extra.get("render_mismatch", 0),
            "turns_without_stop": counts.get("turns_without_stop", 0) + tokenize_extra.get("turns_without_stop", 0),
            "rows": sum(s["rows"] for s in shards),
            "turns_rejected": dict(turns_rejected),
        },
        "stages": [{**totals[name].to_dict(), "name": name} for name in STAGE_ORDER if name in totals],
        "history": history,
    }

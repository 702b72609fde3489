"""Is the dataset on disk the dataset the manifest describes? sha256 of every listed file, cached.

``sftkit inspect`` runs :func:`check_integrity` first: every shard the manifest lists (and every
rejected file listed with a ``sha256``) must exist and hash to the recorded value. Hashing a large
dataset costs a full read, so each file's digest is remembered in a small JSON cache keyed by
``(path, size, mtime_ns)``; an unchanged file is hashed once, a rewritten one (new size or
modification time) again. The cache holds digests of what is on disk, never the manifest's
values, so a refresh that rewrites the manifest does not invalidate it.

The cache lives in ``DIR/.cache/integrity.json`` next to the trainer's memory-map companions,
or, when the dataset folder is read-only, under the user's sftkit cache
(``$SFTKIT_CACHE_DIR`` or ``~/.cache/sftkit``) in a file named after the folder's resolved path.
A damaged or missing cache is rebuilt silently: it can only save work, never hide a mismatch,
except from someone who rewrites a file keeping its size and forging its modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import sha256_file, write_json_atomic
from pipeline.manifest import ManifestError, manifest_path, read_manifest, resolve_inside

CACHE_NAME = "integrity.json"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class IntegrityProblem:
    """One listed file that is not what the manifest says: ``kind`` is "missing" or "mismatch"."""

    path: Path
    kind: str
    expected: str | None = None
    actual: str | None = None

    def message(self) -> str:
        if self.kind == "missing":
            return f"{self.path} is listed in the manifest but does not exist"
        return f"{self.path} is corrupted: its sha256 is {self.actual[:12]}… but the manifest records {self.expected[:12]}…"


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """``read_manifest`` plus the shape every reader relies on, so that a hand-edited or truncated
    manifest is one clear ManifestError instead of a KeyError deep inside a reader."""
    where = manifest_path(data_dir)
    try:
        manifest = read_manifest(data_dir)
    except (KeyError, TypeError, AttributeError) as exc:  # read_manifest met an entry of the wrong shape
        try:
            problem = manifest_shape_problem(json.loads(where.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            problem = None
        raise ManifestError(
            f"{where} is damaged: {problem or 'its shard entries are not objects with a path'}; re-run `sftkit prepare` into a new folder"
        ) from exc
    problem = manifest_shape_problem(manifest)
    if problem:
        raise ManifestError(f"{where} is damaged: {problem}; re-run `sftkit prepare` into a new folder")
    return manifest


def manifest_shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a parsed manifest, or None."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is not a list"
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shard entry {index} is not an object"
        for key, kind in (("path", str), ("split", str), ("rows", int), ("tokens", int), ("sha256", str)):
            if key not in entry:
                return f"shard entry {index} has no {key!r}"
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                return f"shard entry {index} has a {key!r} of the wrong type ({entry[key]!r})"
    rejected = manifest.get("rejected", [])
    if not isinstance(rejected, list):
        return "'rejected' is not a list"
    for index, entry in enumerate(rejected):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return f"rejected entry {index} has no 'path'"
    if "counts" in manifest and not isinstance(manifest["counts"], dict):
        return "'counts' is not an object"
    return None


def cache_path(data_dir: str | os.PathLike) -> Path:
    """Where the digest cache of ``data_dir`` lives (inside it when it is writable)."""
    inside = Path(data_dir) / ".cache" / CACHE_NAME
    if _writable_dir(inside.parent):
        return inside
    from trainer.companion import user_cache_root

    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:20]
    return user_cache_root().parent / "integrity" / f"{key}.json"


def _writable_dir(folder: Path) -> bool:
    if folder.is_dir():
        return os.access(folder, os.W_OK | os.X_OK)
    parent = folder.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format_version") != CACHE_FORMAT_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(path: Path, files: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"format_version": CACHE_FORMAT_VERSION, "files": files}, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run a re-hash


def listed_files(manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(relative path, expected sha256) of every file the manifest vouches for.

    Shards always (a shard without a sha256 is still checked for existence); rejected files when
    they are listed, with their sha256 when the manifest records one.
    """
    out: list[tuple[str, str | None]] = []
    for entry in manifest.get("shards") or []:
        out.append((entry["path"], entry.get("sha256")))
    for entry in manifest.get("rejected") or []:
        if isinstance(entry, dict) and "path" in entry:
            out.append((entry["path"], entry.get("sha256")))
    return out


def file_digest(path: Path, cache: dict[str, Any], key: str) -> str:
    """sha256 of ``path``, from ``cache[key]`` when size and mtime_ns still match, else hashed."""
    stat = path.stat()
    cached = cache.get(key)
    if (
        isinstance(cached, dict)
        and cached.get("size") == stat.st_size
        and cached.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(cached.get("sha256"), str)
    ):
        return cached["sha256"]
    digest = sha256_file(path)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest


def check_integrity(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[IntegrityProblem]:
    """Every listed file that is missing or whose sha256 differs from the manifest's, in order."""
    data_dir = Path(data_dir)
    where = cache_path(data_dir)
    cache = _load_cache(where)
    before = dict(cache)
    problems: list[IntegrityProblem] = []
    seen: set[str] = set()
    for relative, expected in listed_files(manifest):
        if relative in seen:
            continue
        seen.add(relative)
        path = resolve_inside(data_dir, relative)  # ManifestError for a path outside data_dir
        if not path.is_file():
            problems.append(IntegrityProblem(path, "missing", expected))
            continue
        if not expected:
            continue
        actual = file_digest(path, cache, relative)
        if actual != expected:
            problems.append(IntegrityProblem(path, "mismatch", expected, actual))
    # Forget files the manifest no longer lists, so the cache stays the size of the dataset.
    cache = {key: value for key, value in cache.items() if key in seen}
    if cache != before:
        _save_cache(where, cache)
    return problems

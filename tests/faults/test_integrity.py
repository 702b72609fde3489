"""``sftkit inspect`` checks every listed file against its manifest sha256, and hashes each file once.

A flipped bit in a shard trains silently on garbage; a deleted shard trains on less than the
manifest promises. Either is reported loudly (red, on stderr, naming the file) with exit code 3.
An unchanged dataset is not re-read: digests are cached by (path, size, mtime_ns).
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from flows.cli import EXIT_INTEGRITY, app
from pipeline.fsutil import sha256_file
from pipeline.report import integrity
from tests.support.report import one_line


@pytest.fixture
def hash_calls(monkeypatch):
    """Every file the integrity check hashes, in order."""
    calls = []

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


def inspect(*args, **env):
    return CliRunner().invoke(app, ["inspect", *map(str, args)], env={"COLUMNS": "400", "NO_COLOR": "1", **env})


def flip_bytes(path, at: float = 0.5, count: int = 4) -> bytes:
    """Invert ``count`` bytes in the middle of the file, keeping its size; returns the original."""
    original = path.read_bytes()
    data = bytearray(original)
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def shard(report_copy, index: int = 0):
    manifest = json.loads((report_copy / "manifest.json").read_text(encoding="utf-8"))
    return report_copy / manifest["shards"][index]["path"]


def test_flipped_bytes_are_reported_loudly_and_restoring_the_file_clears_it(report_copy):
    assert inspect(report_copy).exit_code == 0
    target = shard(report_copy)
    original = flip_bytes(target)

    result = inspect(report_copy, FORCE_COLOR="1", NO_COLOR=None)  # as on a terminal: the warning is red
    assert result.exit_code == EXIT_INTEGRITY, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    warning = one_line(result.stderr)
    assert f"{target} is corrupted: its sha256 is" in warning
    assert "Traceback" not in result.output
    assert "\x1b[1;31m" in result.stderr  # bold red
    assert "do not train on it" in warning

    target.write_bytes(original)  # restored: a new mtime, so it is hashed again and found right
    result = inspect(report_copy)
    assert result.exit_code == 0, result.output
    assert "INTEGRITY" not in result.output and "corrupted" not in result.output


def test_every_view_of_inspect_checks_first(report_copy):
    target = shard(report_copy)
    flip_bytes(target, at=0.9)
    for extra in (["--row", "0"], ["--rejected"], ["--sample", "2", "--seed", "0"], ["--html", report_copy.parent / "r.html"]):
        result = inspect(report_copy, *extra)
        assert result.exit_code == EXIT_INTEGRITY, (extra, result.output)
        assert f"{target} is corrupted" in one_line(result.stderr)
        assert "Traceback" not in result.output


def test_a_missing_shard_is_reported_with_exit_3(report_copy):
    target = shard(report_copy, -1)
    target.unlink()
    result = inspect(report_copy)
    assert result.exit_code == EXIT_INTEGRITY, result.output
    assert f"{target} is listed in the manifest but does not exist" in one_line(result.stderr)
    assert "Traceback" not in result.output


def test_an_unchanged_dataset_is_hashed_once(report_copy, hash_calls):
    manifest = json.loads((report_copy / "manifest.json").read_text(encoding="utf-8"))
    with_sha = [e for e in manifest["shards"] + manifest["rejected"] if e.get("sha256")]
    assert inspect(report_copy).exit_code == 0
    assert sorted(hash_calls) == sorted(os.path.basename(e["path"]) for e in with_sha)
    assert (report_copy / ".cache" / integrity.CACHE_NAME).is_file()

    hash_calls.clear()
    assert inspect(report_copy).exit_code == 0
    assert inspect(report_copy, "--rejected").exit_code == 0
    assert hash_calls == []  # nothing re-read

    # a file whose modification time changed is hashed again (and only that one)
    target = shard(report_copy, 1)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert inspect(report_copy).exit_code == 0
    assert hash_calls == [target.name]


def test_a_damaged_cache_only_costs_a_rehash(report_copy, hash_calls):
    assert inspect(report_copy).exit_code == 0
    first = len(hash_calls)
    (report_copy / ".cache" / integrity.CACHE_NAME).write_text("{not json", encoding="utf-8")
    assert inspect(report_copy).exit_code == 0
    assert len(hash_calls) == 2 * first
    # a cache that vouches for the wrong digest cannot hide the truth for long: once the file is
    # written again (new mtime) it is re-hashed
    target = shard(report_copy)
    flip_bytes(target)
    assert inspect(report_copy).exit_code == EXIT_INTEGRITY


def test_rejected_files_are_checked_when_the_manifest_records_their_sha256(report_copy):
    manifest_file = report_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    entry = manifest["rejected"][0]
    rejected = report_copy / entry["path"]
    entry["sha256"] = sha256_file(rejected)
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    assert inspect(report_copy).exit_code == 0

    flip_bytes(rejected)
    result = inspect(report_copy)
    assert result.exit_code == EXIT_INTEGRITY
    assert f"{rejected} is corrupted" in one_line(result.stderr)

    rejected.unlink()
    result = inspect(report_copy)
    assert result.exit_code == EXIT_INTEGRITY
    assert f"{rejected} is listed in the manifest but does not exist" in one_line(result.stderr)


def test_a_listed_rejected_file_without_sha256_must_still_exist(report_copy):
    manifest = json.loads((report_copy / "manifest.json").read_text(encoding="utf-8"))
    rejected = report_copy / manifest["rejected"][-1]["path"]
    rejected.unlink()
    result = inspect(report_copy)
    assert result.exit_code == EXIT_INTEGRITY
    assert f"{rejected} is listed in the manifest but does not exist" in one_line(result.stderr)


def test_read_only_dataset_keeps_its_cache_in_the_user_cache(report_copy, hash_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setattr(integrity, "_writable_dir", lambda folder: False)
    where = integrity.cache_path(report_copy)
    assert str(where).startswith(str(tmp_path / "user-cache"))
    assert inspect(report_copy).exit_code == 0
    assert where.is_file() and not (report_copy / ".cache" / integrity.CACHE_NAME).exists()
    hash_calls.clear()
    assert inspect(report_copy).exit_code == 0
    assert hash_calls == []


def test_check_integrity_as_a_library_call(report_copy):
    from pipeline.manifest import read_manifest

    assert integrity.check_integrity(report_copy, read_manifest(report_copy)) == []
    target = shard(report_copy)
    flip_bytes(target)
    (problem,) = integrity.check_integrity(report_copy, read_manifest(report_copy))
    assert problem.kind == "mismatch" and problem.path == target.resolve()


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda m: m.write_text('{"shards": [', encoding="utf-8"), "cannot read"),
        (lambda m: m.write_text("[]", encoding="utf-8"), "is not an sftkit manifest"),
        (lambda m: m.write_text('{"shards": [{"split": "train"}]}', encoding="utf-8"), "shard entry 0 has no 'path'"),
        (lambda m: m.write_text('{"shards": "x"}', encoding="utf-8"), "'shards' is not a list"),
        (lambda m: m.write_text('{"shards": [{"path": "../../etc/passwd"}]}', encoding="utf-8"), "outside the dataset folder"),
        (lambda m: m.unlink(), "manifest.json does not exist"),
    ],
)
def test_a_damaged_manifest_is_one_sentence(report_copy, damage, phrase):
    damage(report_copy / "manifest.json")
    result = inspect(report_copy)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert phrase in one_line(result.output)
    assert "Traceback" not in result.output


def test_inspect_of_a_missing_folder_or_a_file_is_one_sentence(tmp_path):
    for target in (tmp_path / "nope", tmp_path):
        result = inspect(target)
        assert result.exit_code == 2 and "manifest.json does not exist" in one_line(result.output)
    (tmp_path / "file").write_text("x")
    result = inspect(tmp_path / "file")
    assert result.exit_code == 2 and "manifest.json does not exist" in one_line(result.output)

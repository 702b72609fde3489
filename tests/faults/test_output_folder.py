"""Faults around the output folder, and what sftkit does about each: never lose or corrupt a user's data.

* two runs into one folder: the second stops at once naming the first; the first finishes intact;
* a lock file left by a dead run is taken over (the OS drops a dead process's flock);
* a folder sftkit did not make is refused, one an older sftkit made is adopted;
* sftkit deletes only files it wrote: a user's files in shards/ or rejected/ survive refreshes and
  rebuilds, and every removal is listed in the manifest history;
* a full disk, a folder one may not write, a read-only file system: one sentence naming the
  folder (with the free space left, for a full disk), not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import outdir
from pipeline.config import SFTConfig
from pipeline.manifest import read_manifest
from pipeline.steps import prepare
from tests.support.inputs import alpaca_records, make_inputs, shard_bytes, write_json


def _config(**shards) -> SFTConfig:
    return SFTConfig.model_validate({"shards": {"val_fraction": 0.2, **shards}})


def _env(repo_root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(repo_root)}


def _busy(out: Path, pid: int) -> str:
    return rf"another sftkit prepare \(pid {pid}, started [^)]+\) is writing {re.escape(str(out))}"


def _lock_info(out: Path) -> dict:
    try:
        return json.loads((out / outdir.LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _conserved(manifest: dict, out: Path) -> None:
    rejected = sum(pq.ParquetFile(out / r["path"]).metadata.num_rows for r in manifest["rejected"])
    assert manifest["counts"]["read"] == manifest["counts"]["kept"] + rejected
    assert sum(pq.ParquetFile(out / s["path"]).metadata.num_rows for s in manifest["shards"]) == manifest["counts"]["rows"]


# --- one run at a time -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_the_same_folder_fails_at_once_and_the_first_completes(tmp_path, bpe_tokenizer_path, repo_root):
    """Two real `sftkit prepare` processes; the first is slow because its input is large."""
    big = write_json(tmp_path / "big.json", alpaca_records(0, 40_000))
    small = write_json(tmp_path / "small.json", alpaca_records(0, 5))
    out = tmp_path / "data"
    cli = [sys.executable, "-m", "flows.cli", "prepare", "--tokenizer", str(bpe_tokenizer_path), "--no-flow", "--out", str(out)]
    first = subprocess.Popen(
        [*cli, str(big)], cwd=repo_root, env=_env(repo_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while _lock_info(out).get("pid") != first.pid and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if first.poll() is not None:
            pytest.fail(f"the first run ended before a second could start: {first.stderr.read()}")
        assert _lock_info(out)["pid"] == first.pid

        started = time.monotonic()
        second = subprocess.run([*cli, str(small)], cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        still_running = first.poll() is None
    finally:
        rc = first.wait(timeout=600)
        stderr = first.stderr.read()
    assert still_running, "the second run waited for the first instead of failing at once"
    assert second.returncode == 2, second.stdout + second.stderr
    assert re.search(_busy(out, first.pid), " ".join((second.stdout + second.stderr).split())), second.stderr
    assert elapsed < 60
    assert rc == 0, stderr

    manifest = read_manifest(out)  # the first run's, whole: the second wrote nothing
    assert manifest["version"] == 1
    assert [i["source"] for i in manifest["inputs"]] == [str(big)]
    assert manifest["counts"]["read"] == 40_000
    _conserved(manifest, out)
    assert not (out / ".work").exists()
    assert _lock_info(out) == {}  # released: nobody holds it


def test_an_in_process_prepare_fails_at_once_while_another_holds_the_folder(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    with outdir.hold(out):
        started = time.monotonic()
        with pytest.raises(ValueError, match=_busy(out, os.getpid())):
            prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
        assert time.monotonic() - started < 5
        assert not (out / "manifest.json").exists()
    manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())  # free again
    _conserved(manifest, out)


def test_a_lock_held_by_a_killed_process_is_released_by_the_os(tmp_path, bpe_tokenizer_path, repo_root):
    out = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pipeline import outdir\n"
            f"with outdir.hold({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n",
        ],
        cwd=repo_root,
        env=_env(repo_root),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=_busy(out, holder.pid)):
            with outdir.hold(out):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _lock_info(out)["pid"] == holder.pid  # the dead holder's words are still in the file
    inputs = make_inputs(tmp_path / "in")
    manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    _conserved(manifest, out)


def test_a_stale_lock_file_naming_a_dead_pid_is_taken_over(tmp_path, bpe_tokenizer_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "data"
    out.mkdir()
    (out / outdir.LOCK).write_text(json.dumps({"pid": dead.pid, "started_at": "2020-01-01T00:00:00+00:00"}))
    inputs = make_inputs(tmp_path / "in")
    manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    _conserved(manifest, out)
    assert _lock_info(out) == {}


@pytest.mark.prefect
def test_the_refresh_flow_holds_the_lock_too(prefect_harness, tmp_path, bpe_tokenizer_path):
    from flows.refresh import refresh_flow

    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    with outdir.hold(out):
        with pytest.raises(ValueError, match=_busy(out, os.getpid())):
            refresh_flow(
                inputs=[str(p) for p in inputs], tokenizer=str(bpe_tokenizer_path), out=str(out), config=_config().model_dump(mode="json")
            )
    assert not (out / "manifest.json").exists()


def test_the_cli_refuses_a_busy_or_foreign_folder_before_starting_any_engine(tmp_path, bpe_tokenizer_path):
    from flows.cli import app

    inputs = make_inputs(tmp_path / "in")
    out, foreign = tmp_path / "data", tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = [*map(str, inputs), "--tokenizer", str(bpe_tokenizer_path)]
    with outdir.hold(out):
        started = time.monotonic()
        result = CliRunner().invoke(app, ["prepare", *args, "--out", str(out)])  # the Prefect flow path
        assert time.monotonic() - started < 5  # no engine was started
    assert result.exit_code == 2, result.output
    assert re.search("error: " + _busy(out, os.getpid()), " ".join(result.output.split())), result.output
    result = CliRunner().invoke(app, ["prepare", *args, "--out", str(foreign)])
    assert result.exit_code == 2 and "was not made by sftkit" in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# --- whose folder ----------------------------------------------------------------------------
def test_a_non_empty_folder_sftkit_did_not_make_is_refused_untouched(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "shards" / "thesis.parquet").write_bytes(b"years of work")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=re.escape(f"{out} is not empty and was not made by sftkit: choose an empty or new folder")):
        prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # not even a lock file
    assert (out / "shards" / "thesis.parquet").read_bytes() == b"years of work"

    a_file = tmp_path / "data.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare([str(p) for p in inputs], str(bpe_tokenizer_path), a_file, _config())


def test_a_new_or_empty_folder_is_marked_as_sftkits(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "data", empty):
        manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
        marker = json.loads((out / outdir.MARKER).read_text())
        assert set(marker) == {"created_at", "sftkit_version"}
        journal = outdir.written(out)
        assert {s["path"] for s in manifest["shards"]} <= journal
        assert {r["path"] for r in manifest["rejected"]} <= journal


def test_a_folder_an_older_sftkit_made_is_adopted(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    for own in outdir.OWN_FILES:  # what an sftkit before markers left: a manifest and its files
        (out / own).unlink(missing_ok=True)
    (out / "shards" / "notes.txt").write_text("keep me")
    (out / "shards" / "train-00042.parquet").write_bytes(b"unlisted: maybe the user's, so it stays")

    second = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    assert second["version"] == first["version"] + 1
    assert (out / outdir.MARKER).is_file()
    assert {s["path"] for s in first["shards"]} <= outdir.written(out)  # what its manifest listed is sftkit's
    # A rebuild removes the adopted dataset's files, and nothing else.
    rebuilt = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config(target_rows=4))
    assert {s["path"] for s in first["shards"]} - {s["path"] for s in rebuilt["shards"]} <= set(rebuilt["history"][-1]["removed"])
    assert (out / "shards" / "notes.txt").read_text() == "keep me"
    assert (out / "shards" / "train-00042.parquet").read_bytes().startswith(b"unlisted")
    _conserved(rebuilt, out)


# --- delete only what sftkit wrote -----------------------------------------------------------
def test_user_files_survive_refreshes_and_rebuilds(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config(target_rows=3))
    user_files = {
        "shards/notes.txt": b"which runs I trained on",
        "shards/my-own.parquet": (out / first["shards"][0]["path"]).read_bytes(),  # a real Parquet file
        "rejected/reviewed.parquet": b"my review",
        "dedup_index/README": b"my notes on the index",
        "shards/mine/.tmp-scratch": b"a subfolder of mine",
        "README.md": b"# my dataset",
    }
    for relative, data in user_files.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)

    def users_files_intact():
        assert {r: (out / r).read_bytes() for r in user_files} == user_files

    refreshed = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config(target_rows=3))
    assert refreshed["version"] == 2 and refreshed["history"][-1]["removed"] == []
    users_files_intact()
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config(target_rows=3))  # up to date: tidy
    users_files_intact()

    # A rebuild into fewer shards: the old dataset's files go, each named in the history.
    rebuilt = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    history = rebuilt["history"][-1]
    assert history["rebuild"] is True
    old_files = {s["path"] for s in refreshed["shards"]} | {r["path"] for r in refreshed["rejected"]}
    new_files = {s["path"] for s in rebuilt["shards"]} | {r["path"] for r in rebuilt["rejected"]}
    assert set(history["removed"]) >= old_files - new_files
    assert set(history["removed"]) <= old_files | {f"dedup_index/{p}" for p in refreshed["dedup_index"]}
    assert not any((out / r).exists() for r in history["removed"])
    users_files_intact()
    on_disk = {p.relative_to(out).as_posix() for p in (out / "shards").glob("*.parquet")}
    assert on_disk == {s["path"] for s in rebuilt["shards"]} | {"shards/my-own.parquet"}
    assert not (out / ".work").exists() and not (out / "manifest.previous.json").exists()
    _conserved(rebuilt, out)
    # The journal is trimmed at the end of a run to what is still there.
    assert all((out / r).exists() for r in outdir.written(out))


def test_a_killed_runs_files_go_but_a_users_files_of_the_same_kind_stay(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    manifest = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    listed = shard_bytes(out)
    outdir.will_write(out / "shards" / "train-00099.parquet")  # a killed run journals, then writes
    (out / "shards" / "train-00099.parquet").write_bytes(b"half a run")
    (out / "shards" / "train-00098.parquet").write_bytes(b"the user's")  # never journaled
    (out / "rejected").mkdir(exist_ok=True)
    (out / "rejected" / ".tmp-0123456789ab-ingest-x.parquet").write_bytes(b"half written")

    again = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    assert again["version"] == manifest["version"]
    assert not (out / "shards" / "train-00099.parquet").exists()
    assert not (out / "rejected" / ".tmp-0123456789ab-ingest-x.parquet").exists()
    assert (out / "shards" / "train-00098.parquet").read_bytes() == b"the user's"
    assert {k: v for k, v in shard_bytes(out).items() if k != "train-00098.parquet"} == listed


def test_remove_refuses_paths_outside_the_folder_and_files_it_did_not_write(tmp_path):
    out = tmp_path / "data"
    outdir.claim(out)
    (tmp_path / "outside.txt").write_text("x")
    (out / "shards").mkdir()
    (out / "shards" / "user.parquet").write_text("x")
    outdir.record(out, "../outside.txt")  # a tampered journal
    assert outdir.remove(out, ["../outside.txt", "shards/user.parquet", outdir.MARKER]) == []
    assert (tmp_path / "outside.txt").exists() and (out / "shards" / "user.parquet").exists()
    assert (out / outdir.MARKER).exists()


# --- a full disk, a folder one may not write -------------------------------------------------
def _fail_parquet_writes(monkeypatch, error_no: int, message: str) -> None:
    original = pq.ParquetWriter.__init__

    def refuse(self, where, *args, **kwargs):
        if "data" in Path(str(where)).parts:  # only writes into the output folder
            raise OSError(error_no, message, str(where))
        return original(self, where, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "__init__", refuse)


def test_a_full_disk_is_one_sentence_naming_the_folder_and_its_free_space(tmp_path, bpe_tokenizer_path, monkeypatch):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    (out / "shards" / "notes.txt").write_text("mine")
    before = read_manifest(out)

    original = pq.ParquetWriter.write_table

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(ValueError) as caught:
        prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    message = str(caught.value)
    assert re.fullmatch(
        rf"cannot write to {re.escape(str(out))}: the disk is full \([\d.]+ (bytes|KiB|MiB|GiB|TiB) free there\); "
        r"free some space or choose another output folder",
        message,
    ), message
    assert read_manifest(out) == before  # the dataset is as it was
    assert (out / "shards" / "notes.txt").read_text() == "mine"

    # Through the CLI: exit 2 and that sentence, no traceback.
    from flows.cli import app

    result = CliRunner().invoke(
        app, ["prepare", *map(str, inputs), "--tokenizer", str(bpe_tokenizer_path), "--out", str(out), "--no-flow", "--val-fraction", "0.2"]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error: cannot write to" in text and "the disk is full" in text and "Traceback" not in text

    monkeypatch.setattr(pq.ParquetWriter, "write_table", original)  # space freed: the run completes
    manifest = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    assert manifest["version"] == before["version"] + 1
    _conserved(manifest, out)


@pytest.mark.parametrize(
    "error_no, says",
    [
        (errno.EACCES, "permission denied; choose a folder you can write to"),
        (errno.EROFS, "it is on a read-only file system; choose another output folder"),
    ],
)
def test_an_unwritable_folder_is_one_sentence_naming_it(tmp_path, bpe_tokenizer_path, monkeypatch, error_no, says):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    _fail_parquet_writes(monkeypatch, error_no, os.strerror(error_no))
    with pytest.raises(ValueError, match=re.escape(f"cannot write to {out}: {says}")):
        prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config())
    assert not (out / "manifest.json").exists()


def test_an_unreadable_input_is_not_reported_as_the_output_folders_fault(tmp_path):
    out = tmp_path / "data"
    outdir.claim(out)
    elsewhere = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "inputs" / "a.jsonl"))
    assert outdir.write_error(elsewhere, out / "shards" / "train-00000.parquet") is None
    inside = PermissionError(errno.EACCES, "Permission denied", str(out / "shards" / ".tmp-x"))
    assert "cannot write to" in str(outdir.write_error(inside, out / "shards" / "train-00000.parquet"))
    assert outdir.write_error(FileNotFoundError(errno.ENOENT, "gone"), out / "x") is None


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder_for_real(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="permission denied"):
            prepare([str(p) for p in inputs], str(bpe_tokenizer_path), parent / "data", _config())
    finally:
        parent.chmod(0o700)


def test_a_users_file_in_the_way_of_a_shard_stops_the_run_untouched(tmp_path, bpe_tokenizer_path):
    """A file of the user's under the very name sftkit writes next is never overwritten."""
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config(val_fraction=0.0))
    mine = out / "shards" / f"train-{len(first['shards']):05d}.parquet"  # the next number
    mine.write_bytes(b"USER DATA")
    with pytest.raises(ValueError, match=r"is in the way: .* move it out of"):
        prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, _config(val_fraction=0.0))
    assert mine.read_bytes() == b"USER DATA"
    assert mine.relative_to(out).as_posix() not in outdir.written(out)
    assert read_manifest(out)["version"] == first["version"]  # the dataset is as it was


@pytest.mark.slow
def test_a_rebuild_killed_halfway_leaves_the_old_dataset_whole(tmp_path, bpe_tokenizer_path, repo_root):
    inputs = make_inputs(tmp_path / "in")
    big = tmp_path / "in" / "big.json"
    write_json(big, alpaca_records(0, 20_000))
    out = tmp_path / "data"
    first = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, _config())
    before = {s["path"]: (out / s["path"]).read_bytes() for s in first["shards"]}
    run = subprocess.Popen(  # a rebuild (another max length) over much more data, killed mid-run
        [
            sys.executable,
            "-m",
            "flows.cli",
            "prepare",
            str(inputs[0]),
            str(big),
            "--tokenizer",
            str(bpe_tokenizer_path),
            "--out",
            str(out),
            "--no-flow",
            "--max-length",
            "777",
            "--val-fraction",
            "0.2",
        ],
        cwd=repo_root,
        env=_env(repo_root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / ".work").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert {k: v for k, v in read_manifest(out).items() if k != "format_version"} == first  # the old dataset
    assert {p: (out / p).read_bytes() for p in before} == before
    result = CliRunner().invoke(__import__("flows.cli", fromlist=["app"]).app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    # The next run finishes the rebuild and removes the killed run's and the old dataset's files.
    again = SFTConfig.model_validate({"shards": {"val_fraction": 0.2}, "tokenize": {"max_length": 777}})
    rebuilt = prepare([str(inputs[0])], str(bpe_tokenizer_path), out, again)
    assert rebuilt["version"] == first["version"] + 1
    on_disk = {p.relative_to(out).as_posix() for p in (out / "shards").glob("*.parquet")}
    assert on_disk == {s["path"] for s in rebuilt["shards"]}

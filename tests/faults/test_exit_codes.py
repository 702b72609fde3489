"""Exit codes a script can rely on, and one clear sentence (never a traceback) for every expected failure.

0    done
1    prepare ran but kept no record: there is nothing to train on
2    bad options or inputs: nothing was done
3    a dataset's files are missing or differ from their manifest sha256 (tests/faults/test_integrity.py)
143  train stopped by SIGTERM after saving its checkpoint (128 + 15, what a shell reports)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flows.cli import EXIT_FAILED, EXIT_SIGTERM, EXIT_USAGE, app
from tests.support.training import (
    assert_stopped_by_sigterm,
    corpus_dataset,
    run_train,
    sigterm_mid_run,
    start_train,
    train_args,
    train_command,
    wait_for_steps,
)
from trainer.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests here run on one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path_factory.mktemp("exit") / "data", bpe_tokenizer, bpe_tokenizer_path)


def cli(*args) -> CliRunner.Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def one_line(text: str) -> str:
    return " ".join(text.split())


def assert_clean_failure(result, code: int, *phrases: str) -> None:
    """Exited with ``code`` through typer (no exception escaped), said every phrase, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in one_line(result.output), result.output


# --- prepare --------------------------------------------------------------------------------
def test_prepare_that_keeps_nothing_exits_1(tmp_path, bpe_tokenizer_path):
    source = tmp_path / "odd.jsonl"
    source.write_text("\n".join(json.dumps({"foo": i, "bar": "x"}) for i in range(5)) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    result = cli("prepare", source, "--tokenizer", bpe_tokenizer_path, "--out", out, "--no-flow")
    assert_clean_failure(result, EXIT_FAILED, "nothing was kept", "all 5 records read were rejected")
    # the records are not lost: every one is filed in rejected/ and the manifest says so
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["kept"] == 0 and manifest["counts"]["read"] == 5


def test_prepare_with_a_tokenizer_folder_that_is_not_there_is_one_sentence(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    missing = tmp_path / "no-such-tokenizer"
    result = cli("prepare", source, "--tokenizer", missing, "--out", tmp_path / "ds", "--no-flow")
    assert_clean_failure(result, EXIT_USAGE, f"tokenizer folder '{missing}' given with --tokenizer does not exist")
    assert not (tmp_path / "ds").exists()


# --- train: numeric options -----------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, bound",
    [
        ("--max-steps", "0", "≥ 1"),
        ("--max-steps", "-1", "≥ 1"),
        ("--epochs", "0", "> 0"),
        ("--epochs", "-2", "> 0"),
        ("--lr", "0", "> 0"),
        ("--lr", "-1e-5", "> 0"),
        ("--batch-tokens", "0", "≥ 1"),
        ("--grad-accum", "0", "≥ 1"),
        ("--eval-every", "0", "≥ 1"),
        ("--save-every", "-5", "≥ 1"),
        ("--patience", "-1", "≥ 0"),
    ],
)
def test_train_refuses_numbers_that_make_no_sense(tmp_path, option, value, bound):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(out), option, value], env={"COLUMNS": "400"})
    assert_clean_failure(result, EXIT_USAGE, option, f"must be {bound}")
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("option, value", [("--max-length", "0"), ("--max-length", "-3"), ("--val-fraction", "-0.1")])
def test_prepare_refuses_numbers_that_make_no_sense(tmp_path, bpe_tokenizer_path, option, value):
    result = cli("prepare", tmp_path / "x.jsonl", "--tokenizer", bpe_tokenizer_path, "--out", tmp_path / "ds", option, value)
    assert_clean_failure(result, EXIT_USAGE, option, "must be")
    assert not (tmp_path / "ds").exists()


def test_train_config_refuses_zero_and_negative_steps(tmp_path):
    # the library path too: max_steps=0 used to fall through to the full epoch schedule
    for bad in ({"max_steps": 0}, {"max_steps": -1}, {"grad_accum": 0}, {"batch_tokens": 0}, {"epochs": 0}):
        with pytest.raises(ValueError):
            TrainConfig(data=tmp_path, **bad)
    assert TrainConfig(data=tmp_path, lr=0.0).lr == 0.0  # a frozen run stays possible from Python


# --- train: bad inputs are one sentence -----------------------------------------------------
def test_train_bad_inputs_are_one_sentence_each(data_dir, tmp_path):
    run = tmp_path / "run"
    assert_clean_failure(cli(*train_args(tmp_path / "missing", run)), EXIT_USAGE, "manifest.json does not exist")
    assert_clean_failure(cli(*train_args(tmp_path, run)), EXIT_USAGE, "manifest.json does not exist")

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken, ignore=shutil.ignore_patterns(".cache"))
    manifest_file = broken / "manifest.json"
    good_manifest = manifest_file.read_text(encoding="utf-8")
    manifest_file.write_text(good_manifest[: len(good_manifest) // 2], encoding="utf-8")  # a truncated write
    assert_clean_failure(cli(*train_args(broken, run)), EXIT_USAGE, "cannot read", "manifest.json")

    manifest = json.loads(good_manifest)
    del manifest["shards"][0]["path"]
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    assert_clean_failure(cli(*train_args(broken, run)), EXIT_USAGE, "is damaged: shard entry 0 has no 'path'")

    manifest = json.loads(good_manifest)
    manifest["shards"][1]["rows"] = "many"
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    assert_clean_failure(cli(*train_args(broken, run)), EXIT_USAGE, "shard entry 1 has a 'rows' of the wrong type")

    manifest_file.write_text(good_manifest, encoding="utf-8")
    (broken / json.loads(good_manifest)["shards"][0]["path"]).unlink()
    assert_clean_failure(cli(*train_args(broken, run)), EXIT_USAGE, "is missing")

    assert_clean_failure(
        cli(*train_args(data_dir, run, "--tokenizer", tmp_path / "no-such-tokenizer")),
        EXIT_USAGE,
        "tokenizer folder",
        "does not exist",
    )
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved, ignore=shutil.ignore_patterns(".cache"))
    manifest = json.loads((moved / "manifest.json").read_text(encoding="utf-8"))
    manifest["tokenizer"]["name"] = str(tmp_path / "tokenizer-that-moved")
    (moved / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert_clean_failure(cli(*train_args(moved, run)), EXIT_USAGE, "tokenizer", "--tokenizer")

    assert_clean_failure(
        cli(*train_args(data_dir, run, "--model", tmp_path / "no-such-model")), EXIT_USAGE, "model folder", "does not exist"
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert_clean_failure(cli(*train_args(data_dir, a_file)), EXIT_USAGE, "is a file")
    assert not run.exists()


# --- train: SIGTERM -------------------------------------------------------------------------
def test_sigterm_saves_then_exits_143_and_the_run_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    # SIGTERM twice: schedulers resend it, and the save the first one started must still finish
    returncode, stderr = sigterm_mid_run(train_command(data_dir, out, "--max-steps", "400", "--save-every", "1000"), out, signals=2)
    assert returncode == EXIT_SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM" in one_line(stderr) and "--resume" in stderr
    stopped_at = assert_stopped_by_sigterm(out)

    # the sentence is true: the same command with --resume continues from there and finishes
    run_train(train_command(data_dir, out, "--max-steps", stopped_at + 2, "--save-every", "1000", "--resume"), timeout=300)
    assert (out / "final").is_dir()


GROUP_SIGTERM_SCRIPT = """
import sys
from trainer.loop import TrainConfig, run_training
summary = run_training(TrainConfig(data=sys.argv[1], out=sys.argv[2], max_steps=400, lr=3e-3, batch_tokens=512,
                                   eval_every=1000, save_every=1000, device="cpu", num_workers=2, progress=False))
print("stop_reason", summary["stop_reason"], flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(data_dir, tmp_path):
    """A scheduler signals every process of the job: DataLoader workers must not die first and
    turn a clean stop into a traceback."""
    out = tmp_path / "run"
    process = start_train(
        [sys.executable, "-c", GROUP_SIGTERM_SCRIPT, str(data_dir), str(out)], stdout=subprocess.PIPE, start_new_session=True
    )
    wait_for_steps(process, out, 3)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "stop_reason sigterm" in stdout
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert sorted((out / "checkpoints").glob("step-*"))


SIGTERM_WHILE_WORKERS_START_SCRIPT = """
import os, signal
import torch
from trainer.loop import _SigtermFlag, _ignore_sigterm, _started

def signalled_first(worker_id):
    os.killpg(0, signal.SIGTERM)  # the scheduler's signal, to the whole group, before the worker's own init
    _ignore_sigterm(worker_id)

loader = torch.utils.data.DataLoader(list(range(8)), batch_size=None, num_workers=2, worker_init_fn=signalled_first)
with _SigtermFlag() as flag:
    print(sorted(_started(loader)), flag.raised, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="signal masks are POSIX")
def test_a_group_sigterm_while_loader_workers_start_leaves_them_running_and_reaches_the_trainer(repo_root):
    """Each epoch starts its DataLoader workers again; a SIGTERM to the whole group that lands
    before a worker's init has made it ignore the signal must not end that worker (torch's own
    handler would, and the run would fail with a traceback instead of saving)."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_WORKERS_START_SCRIPT],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "[0, 1, 2, 3, 4, 5, 6, 7] True"


# --- train: a damaged checkpoint --------------------------------------------------------------
def test_resume_from_a_damaged_checkpoint_names_it_and_the_one_to_use(data_dir, tmp_path):
    out = tmp_path / "run"
    steps = ["--max-steps", "4", "--save-every", "2", "--eval-every", "100"]
    first = cli(*train_args(data_dir, out, *steps))
    assert first.exit_code == 0, first.output
    shutil.rmtree(out / "final")
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a disk error, a copy cut short

    result = cli(*train_args(data_dir, out, "--max-steps", "6", "--save-every", "2", "--eval-every", "100", "--resume"))
    assert_clean_failure(result, EXIT_USAGE, f"checkpoint {latest} is damaged", "previous checkpoint step-00000002")

    shutil.move(str(latest), str(tmp_path / "aside"))  # what the sentence says to do
    result = cli(*train_args(data_dir, out, "--max-steps", "6", "--save-every", "2", "--eval-every", "100", "--resume"))
    assert result.exit_code == 0, result.output
    assert (out / "final").is_dir()


def test_loading_a_checkpoint_into_another_model_is_one_sentence(tmp_path):
    import torch

    from trainer.checkpoint import CheckpointError, load_checkpoint

    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "train_state": {}}, folder / "state.pt")
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(folder, model=torch.nn.Linear(3, 3))

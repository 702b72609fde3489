"""The training loop end to end on the tiny model: learning, exact resume after kill -9, SIGTERM, DDP.

Runs that must survive a crash or span processes go through the real ``sftkit train`` command
in subprocesses; one thread each so that CPU results are bit-for-bit reproducible.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.training import TRAIN_ENV, assert_same_curves, corpus_dataset, kill_mid_run, train_losses
from trainer.loop import TrainConfig, run_training
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ENV = TRAIN_ENV


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path_factory.mktemp("loop") / "data", bpe_tokenizer, bpe_tokenizer_path)


def train_command(data_dir, out, *extra, launcher=(sys.executable, "-m")):
    return [
        *launcher,
        "flows.cli",
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--batch-tokens",
        "512",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--eval-every",
        "10",
        "--seed",
        "1",
        *extra,
    ]


def test_loss_decreases_and_the_run_leaves_a_loadable_model(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_training(
        TrainConfig(
            data=data_dir, out=out, max_steps=30, lr=3e-3, batch_tokens=512, eval_every=10, save_every=20, device="cpu", progress=False
        )
    )
    rows = read_metrics(out)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert summary["steps"] == 30 and len(train) == 30 and len(evals) == 3
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "data_wait"} <= set(train[0])
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.3
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert (out / "loss.png").stat().st_size > 0

    # every eval improved, so the best is the last: keep-last-2 leaves steps 20 and 30
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000020", "step-00000030"]

    # final/ is a plain Hugging Face folder: fine-tuning continues from it with --model
    again = tmp_path / "again"
    run_training(
        TrainConfig(
            data=data_dir,
            out=again,
            model=str(out / "final"),
            max_steps=2,
            lr=3e-3,
            batch_tokens=512,
            eval_every=100,
            device="cpu",
            progress=False,
        )
    )
    assert train_losses(again)[0] < train[0]["loss"] - 0.3


def test_early_stopping_after_patience_evaluations_without_improvement(data_dir, tmp_path):
    out = tmp_path / "run"
    # lr 0: the model never changes, so no evaluation after the first is an improvement
    summary = run_training(
        TrainConfig(
            data=data_dir,
            out=out,
            max_steps=50,
            lr=0.0,
            batch_tokens=512,
            eval_every=2,
            patience=2,
            save_every=1000,
            device="cpu",
            progress=False,
        )
    )
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 6 and summary["best_step"] == 2
    assert [r["best"] for r in read_metrics(out) if r["type"] == "eval"] == [True, False, False]
    assert (out / "final" / "model.safetensors").is_file()


def test_no_packing_trains_on_length_grouped_padded_batches(data_dir, tmp_path):
    summary = run_training(
        TrainConfig(
            data=data_dir,
            out=tmp_path / "run",
            max_steps=4,
            lr=3e-3,
            batch_tokens=512,
            packing=False,
            eval_every=2,
            save_every=1000,
            device="cpu",
            progress=False,
        )
    )
    rows = [r for r in read_metrics(tmp_path / "run") if r["type"] == "train"]
    assert summary["steps"] == 4 and all(0 < r["loss"] < 20 for r in rows)
    assert all(r["tokens"] <= 512 for r in rows)


def test_cli_reports_a_corrupted_shard_as_one_clear_error(data_dir, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    corrupted = tmp_path / "data"
    shutil.copytree(data_dir, corrupted, ignore=shutil.ignore_patterns(".cache"))
    shard = corrupted / "shards" / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100] + b"\0" * 100)
    result = CliRunner().invoke(app, ["train", "--data", str(corrupted), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2
    # rich wraps long lines (even inside the path), so compare without whitespace
    assert "shards/train-00000.parquetiscorrupted" in "".join(result.output.split())


def test_kill_9_then_resume_reproduces_the_uninterrupted_loss_curve(data_dir, tmp_path):
    steps = ["--max-steps", "24", "--save-every", "4"]
    subprocess.run(train_command(data_dir, tmp_path / "full", *steps), cwd=REPO, env=ENV, check=True, capture_output=True)
    uninterrupted = train_losses(tmp_path / "full")
    assert len(uninterrupted) == 24

    crashed = tmp_path / "crashed"
    logged_before_kill = kill_mid_run(train_command(data_dir, crashed, *steps), crashed, after_steps=8)
    assert 8 <= logged_before_kill < 24, "the run should have been killed mid-way"
    assert not (crashed / "final").exists()

    resumed = subprocess.run(
        train_command(data_dir, crashed, *steps, "--resume"), cwd=REPO, env=ENV, check=True, capture_output=True, text=True
    )
    assert "resuming" in resumed.stdout and "from step 0" not in resumed.stdout
    assert train_losses(crashed) == uninterrupted  # bit-for-bit, not approximately
    assert [r["step"] for r in read_metrics(crashed) if r["type"] == "train"] == list(range(1, 25))


def test_sigterm_saves_a_checkpoint_and_exits_143(data_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        train_command(data_dir, out, "--max-steps", "400", "--save-every", "1000"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while len(train_losses(out)) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]  # 128 + SIGTERM, after the checkpoint is saved
    stop = [r for r in read_metrics(out) if r["type"] == "stop"]
    assert stop and stop[-1]["reason"] == "sigterm"
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == stop[-1]["step"]
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)
    assert state["train_state"]["step"] == stop[-1]["step"]
    assert not (out / "final").exists()


def test_two_process_ddp_matches_one_process_with_grad_accumulation(data_dir, tmp_path):
    """2 ranks x 1 micro-batch per step and 1 rank x 2 accumulated micro-batches see the same
    global batches, so with loss normalised over all ranks their curves must agree."""
    steps = ["--max-steps", "6", "--save-every", "100", "--eval-every", "3"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")
    ddp = subprocess.run(
        train_command(data_dir, tmp_path / "ddp", *steps, launcher=torchrun), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("final model + tokenizer:") == 1  # rank 0 speaks for the run
    single = run_training(
        TrainConfig(
            data=data_dir,
            out=tmp_path / "single",
            max_steps=6,
            lr=3e-3,
            batch_tokens=512,
            grad_accum=2,
            eval_every=3,
            save_every=100,
            device="cpu",
            seed=1,
            progress=False,
        )
    )
    assert_same_curves(tmp_path / "ddp", tmp_path / "single")
    assert single["steps"] == 6
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


def test_fresh_run_refuses_a_folder_that_holds_checkpoints(data_dir, tmp_path):
    config = dict(
        data=data_dir, out=tmp_path / "run", max_steps=2, batch_tokens=1024, eval_every=100, save_every=1, device="cpu", progress=False
    )
    run_training(TrainConfig(**config))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        run_training(TrainConfig(**config))
    with pytest.raises(ValueError, match="batch plan changed .*batch_tokens 1024 -> 2048"):
        run_training(TrainConfig(**{**config, "resume": True, "batch_tokens": 2048}))
    assert run_training(TrainConfig(**{**config, "max_steps": 3, "resume": True}))["steps"] == 3

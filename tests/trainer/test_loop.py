"""The training loop end to end on the tiny model: learning, exact resume after kill -9, SIGTERM, DDP.

Runs that must survive a crash or span processes go through the real ``sftkit train`` command
in subprocesses; one thread each so that CPU results are bit-for-bit reproducible.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.support.training import (
    TORCHRUN,
    assert_same_curves,
    assert_stopped_by_sigterm,
    corpus_dataset,
    cpu_config,
    kill_mid_run,
    run_train,
    sigterm_mid_run,
    train_command,
    train_losses,
)
from trainer.checkpoint import step_dir
from trainer.loop import TrainConfig, run_training
from trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path_factory.mktemp("loop") / "data", bpe_tokenizer, bpe_tokenizer_path)


def test_loss_decreases_and_the_run_leaves_a_loadable_model(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_training(cpu_config(data=data_dir, out=out, max_steps=30, eval_every=10, save_every=20))
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
    run_training(cpu_config(data=data_dir, out=again, model=str(out / "final"), max_steps=2, eval_every=100))
    assert train_losses(again)[0] < train[0]["loss"] - 0.3


def test_early_stopping_after_patience_evaluations_without_improvement(data_dir, tmp_path):
    out = tmp_path / "run"
    # lr 0: the model never changes, so no evaluation after the first is an improvement
    summary = run_training(cpu_config(data=data_dir, out=out, max_steps=50, lr=0.0, eval_every=2, patience=2, save_every=1000))
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 6 and summary["best_step"] == 2
    assert [r["best"] for r in read_metrics(out) if r["type"] == "eval"] == [True, False, False]
    assert (out / "final" / "model.safetensors").is_file()


def test_no_packing_trains_on_length_grouped_padded_batches(data_dir, tmp_path):
    summary = run_training(cpu_config(data=data_dir, out=tmp_path / "run", max_steps=4, packing=False, eval_every=2, save_every=1000))
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
    run_train(train_command(data_dir, tmp_path / "full", *steps))
    uninterrupted = train_losses(tmp_path / "full")
    assert len(uninterrupted) == 24

    crashed = tmp_path / "crashed"
    logged_before_kill = kill_mid_run(train_command(data_dir, crashed, *steps), crashed, after_steps=8)
    assert 8 <= logged_before_kill < 24, "the run should have been killed mid-way"
    assert not (crashed / "final").exists()

    resumed = run_train(train_command(data_dir, crashed, *steps, "--resume"))
    assert "resuming" in resumed.stdout and "from step 0" not in resumed.stdout
    assert train_losses(crashed) == uninterrupted  # bit-for-bit, not approximately
    assert [r["step"] for r in read_metrics(crashed) if r["type"] == "train"] == list(range(1, 25))


def test_sigterm_saves_a_checkpoint_and_exits_143(data_dir, tmp_path):
    out = tmp_path / "run"
    returncode, stderr = sigterm_mid_run(train_command(data_dir, out, "--max-steps", "400", "--save-every", "1000"), out)
    assert returncode == 143, stderr[-2000:]  # 128 + SIGTERM, after the checkpoint is saved
    stopped_at = assert_stopped_by_sigterm(out)
    state = torch.load(step_dir(out, stopped_at) / "state.pt", weights_only=True)
    assert state["train_state"]["step"] == stopped_at


def test_two_process_ddp_matches_one_process_with_grad_accumulation(data_dir, tmp_path):
    """2 ranks x 1 micro-batch per step and 1 rank x 2 accumulated micro-batches see the same
    global batches, so with loss normalised over all ranks their curves must agree."""
    steps = ["--max-steps", "6", "--save-every", "100", "--eval-every", "3"]
    ddp = run_train(train_command(data_dir, tmp_path / "ddp", *steps, launcher=TORCHRUN))
    assert ddp.stdout.count("final model + tokenizer:") == 1  # rank 0 speaks for the run
    single = run_training(
        cpu_config(data=data_dir, out=tmp_path / "single", max_steps=6, grad_accum=2, eval_every=3, save_every=100, seed=1)
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

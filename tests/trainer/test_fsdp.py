"""FSDP2 sharded training, sharded (DCP) checkpoints and activation checkpointing on the tiny model.

Multi-rank runs go through the real ``sftkit train`` command under torchrun (gloo on CPU), one
thread per process; the reference FSDP run is made once per module and compared against.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.support.training import (
    CURVES,
    TORCHRUN,
    assert_same_curves,
    corpus_dataset,
    kill_mid_run,
    run_train,
    train_command,
    train_losses,
)
from trainer import SFTTrainer, ShardDataset, TrainConfig
from trainer.batching import PlannedBatches
from trainer.checkpoint import (
    SHARDED_DIR,
    CheckpointError,
    TrainState,
    load_checkpoint,
    rng_state,
    set_rng_state,
    step_dir,
)
from trainer.metrics import read_metrics
from trainer.models import tiny_model
from trainer.schedule import build_optimizer

# 384-token micro-batches: 15 per rank and epoch (8 steps of 2), and 5 validation batches, so
# the two ranks evaluate 3 and 2 batches and FSDP's idle forward is exercised. The last step is
# no evaluation step, so final/ is the best checkpoint loaded back into the sharded model.
# (later options win over train_command's own --batch-tokens and --eval-every)
STEPS = ["--batch-tokens", "384", "--grad-accum", "2", "--max-steps", "24", "--save-every", "4", "--eval-every", "5"]
FSDP = ["--fsdp", "--activation-checkpointing"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path_factory.mktemp("fsdp") / "data", bpe_tokenizer, bpe_tokenizer_path)


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-rank FSDP2 run (with activation checkpointing): the reference curve."""
    out = tmp_path_factory.mktemp("fsdp-run") / "run"
    run_train(train_command(data_dir, out, *STEPS, *FSDP, launcher=TORCHRUN))
    return out


def test_fsdp_matches_ddp_with_grad_accumulation(data_dir, fsdp_run, tmp_path):
    """Same ranks, same data order, same normaliser: sharding must not change the curve, the
    global gradient norm (clipping) or the evaluation."""
    run_train(train_command(data_dir, tmp_path / "ddp", *STEPS, launcher=TORCHRUN))
    assert_same_curves(fsdp_run, tmp_path / "ddp", (*CURVES, ("train", "grad_norm")))
    assert len([r for r in read_metrics(fsdp_run) if r["type"] == "train"]) == 24

    # the checkpoint is sharded: one DCP file per rank, state.pt without model or optimizer
    checkpoint = step_dir(fsdp_run, 24)
    assert sorted(p.name for p in (checkpoint / SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert set(state) == {"scheduler", "train_state", "config"}
    assert state["train_state"]["world_size"] == 2


def test_fsdp_kill_9_then_resume_reproduces_the_uninterrupted_loss_curve(data_dir, fsdp_run, tmp_path):
    crashed = tmp_path / "crashed"
    # SIGKILL reaches torchrun and both workers at once, like a lost node
    logged_before_kill = kill_mid_run(train_command(data_dir, crashed, *STEPS, *FSDP, launcher=TORCHRUN), crashed, after_steps=7)
    assert 7 <= logged_before_kill < 24, "the run should have been killed mid-way"
    assert not (crashed / "final").exists()

    resumed = run_train(train_command(data_dir, crashed, *STEPS, *FSDP, "--resume", launcher=TORCHRUN))
    assert "resuming" in resumed.stdout and "from step 0" not in resumed.stdout
    assert train_losses(crashed) == train_losses(fsdp_run)  # bit-for-bit, not approximately
    assert [r["step"] for r in read_metrics(crashed) if r["type"] == "train"] == list(range(1, 25))


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(data_dir, fsdp_run, tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 20:  # resume mid-epoch: step 20 is 4 steps into epoch 2
            shutil.rmtree(later)
    shutil.rmtree(run / "final")
    resumed = run_train(train_command(data_dir, run, *STEPS, "--fsdp", "--resume"))
    # 8 micro-batches on each of 2 ranks = 16 global ones: the single rank goes on at its 16th
    assert "saved on 2 rank(s) and continues on 1: 8 micro-batches per rank become 16, skipping 0" in resumed.stdout
    rows = [r for r in read_metrics(run) if r["type"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 25))
    reference = train_losses(fsdp_run)
    # the weights came back (a fresh model starts near 7.3): the loss goes on where it was
    assert abs(rows[20]["loss"] - reference[20]) < 0.3 < reference[0] - rows[20]["loss"]

    # DCP reshards the optimizer too: every AdamW moment of the 2-rank run is back, whole, on one rank
    model = tiny_model(bpe_tokenizer, seed=1)
    optimizer = build_optimizer(model, 3e-3, 0.0, torch.device("cpu"))
    own_rng = rng_state()
    state = load_checkpoint(step_dir(fsdp_run, 20), model=model, optimizer=optimizer)
    set_rng_state(own_rng)  # loading with an optimizer restored rank 0's RNGs into this process
    assert (state.step, state.world_size) == (20, 2)
    for param in model.parameters():
        moments = optimizer.state[param]
        assert moments["exp_avg_sq"].shape == param.shape and moments["exp_avg_sq"].abs().sum() > 0
        assert int(moments["step"]) == 20

    final, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(final(torch.tensor([[1, 2, 3]])).logits).all()


def test_fsdp_final_is_a_plain_transformers_model_with_the_gathered_weights(fsdp_run, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    final, info = AutoModelForCausalLM.from_pretrained(fsdp_run / "final", output_loading_info=True)
    assert not any(info.values()), info
    best = min((r for r in read_metrics(fsdp_run) if r["type"] == "eval"), key=lambda r: r["eval_loss"])["step"]
    assert best < 24  # final/ had to load the best checkpoint back, not take the last weights
    # the best step's shards, gathered whole into one unsharded model (DCP reshards on load)
    gathered = tiny_model(bpe_tokenizer, seed=123)
    load_checkpoint(step_dir(fsdp_run, best), model=gathered)
    tokens = torch.tensor([bpe_tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        expected, actual = gathered(tokens).logits, final(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    fresh = tiny_model(bpe_tokenizer, seed=123)
    with torch.no_grad():  # control: the comparison can tell weights apart
        assert not torch.allclose(fresh(tokens).logits, expected, atol=1e-3)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(data_dir, bpe_tokenizer, tmp_path):
    dataset = ShardDataset(data_dir, "train")
    batch = PlannedBatches(dataset, [[[0, 1, 2], [3], [4, 5]]], bpe_tokenizer.pad_token_id)[0]  # packed rows
    results = []
    for checkpointing in (False, True):
        config = TrainConfig(
            data=data_dir, out=tmp_path / str(checkpointing), device="cpu", progress=False, activation_checkpointing=checkpointing
        )
        trainer = SFTTrainer(tiny_model(bpe_tokenizer, seed=0), dataset, None, config, tokenizer=bpe_tokenizer)
        trainer.model.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            loss = trainer.compute_loss(batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        results.append((loss.detach(), grads, sum(saved)))
    (plain_loss, plain_grads, plain_saved), (ckpt_loss, ckpt_grads, ckpt_saved) = results
    assert ckpt_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # the layers' activations are recomputed in backward, not kept from the forward pass
    assert ckpt_saved < plain_saved / 2


def test_resume_position_on_another_number_of_ranks():
    # rank r of w trains plan[r::w]: 5 micro-batches on each of 2 ranks consumed global 0..9
    assert TrainState(micro_index=5, world_size=2).on_ranks(1) == (TrainState(micro_index=10, world_size=1), 0)
    assert TrainState(micro_index=5, world_size=2).on_ranks(4) == (TrainState(micro_index=3, world_size=4), 2)
    assert TrainState(micro_index=6, world_size=1).on_ranks(3) == (TrainState(micro_index=2, world_size=3), 0)
    assert TrainState(micro_index=0, world_size=2).on_ranks(3) == (TrainState(micro_index=0, world_size=3), 0)


def test_a_sharded_checkpoint_whose_metadata_names_other_code_is_refused(fsdp_run, tmp_path, bpe_tokenizer):
    import pickle

    checkpoint = tmp_path / "checkpoints" / "step-00000024"
    shutil.copytree(step_dir(fsdp_run, 24), checkpoint)

    class Planted:  # unpickling it would call os.makedirs: any code could stand there
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    (checkpoint / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(CheckpointError, match="is damaged: sharded/.metadata cannot be read .*makedirs is not allowed"):
        load_checkpoint(checkpoint, model=tiny_model(bpe_tokenizer, seed=0))
    assert not (tmp_path / "pwned").exists()


# Two DDP steps in each torchrun process; records how many storages the gradients live in.
BUCKET_PROBE = """
import json, sys
import torch
from pipeline.tokenizers import load_tokenizer
from trainer import SFTTrainer, ShardDataset, TrainConfig, distributed
from trainer.batching import PlannedBatches
from trainer.models import tiny_model
from flows.cli import exit_without_teardown

data, tokenizer_path, out = sys.argv[1:]
distributed.init_from_env("cpu")
tokenizer = load_tokenizer(tokenizer_path)
dataset = ShardDataset(data, "train")
config = TrainConfig(data=data, out=out, device="cpu", batch_tokens=384, progress=False)
trainer = SFTTrainer(tiny_model(tokenizer, seed=0), dataset, None, config, tokenizer=tokenizer)
plan = trainer.planner.rank_plan(0)
storages = []
for step in range(2):  # the second step starts from gradients set to None by zero_grad
    batch = next(iter(PlannedBatches(dataset, plan[step : step + 1], trainer.pad_token_id)))
    trainer.forward_backward([batch])
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    storages.append([len(grads), len({g.untyped_storage().data_ptr() for g in grads})])
    trainer.optimizer_step(1)
with open(f"{out}-rank{trainer.dist.rank}.json", "w") as handle:
    json.dump(storages, handle)
distributed.barrier()  # both ranks done before either tears its process group down
distributed.shutdown()
exit_without_teardown()  # as `sftkit train` ends: the interpreter's teardown can abort under gloo
"""


def test_ddp_gradients_live_in_its_buckets_not_beside_them(data_dir, bpe_tokenizer_path, tmp_path):
    """What the memory estimate counts for DDP: one copy of the gradients, not two."""
    probe = tmp_path / "probe.py"
    probe.write_text(BUCKET_PROBE)
    run_train([*TORCHRUN, str(probe), str(data_dir), str(bpe_tokenizer_path), str(tmp_path / "grads")])
    for rank in (0, 1):
        for params, storages in json.loads((tmp_path / f"grads-rank{rank}.json").read_text()):
            assert params > 10 and storages <= 2, (params, storages)  # each gradient a view into a bucket

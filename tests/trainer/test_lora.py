"""LoRA through peft on the real tiny Llama: only adapters train, the merged model equals base +
adapter, checkpoints hold the adapters and resume exactly, and misuse is one clear sentence."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.training import corpus_dataset, cpu_config, run_train, train_command, train_losses
from trainer.loop import SFTTrainer, TrainConfig
from trainer.lora import KNOWN_TARGETS, MERGED_DIR, apply_lora, find_targets
from trainer.models import tiny_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    return corpus_dataset(tmp_path_factory.mktemp("lora") / "data", bpe_tokenizer, bpe_tokenizer_path, repeat=2)


def lora_trainer(data_dir, tokenizer, out, **options):
    from trainer.data import ShardDataset

    config = cpu_config(data=data_dir, out=out, lr=1e-2, eval_every=100, save_every=100, seed=1, lora_r=8, **options)
    model = tiny_model(tokenizer, seed=1)
    return SFTTrainer(model, ShardDataset(data_dir, "train"), ShardDataset(data_dir, "val"), config, tokenizer=tokenizer)


def test_lora_trains_only_the_adapters_and_its_loss_falls(data_dir, bpe_tokenizer, tmp_path):
    trainer = lora_trainer(data_dir, bpe_tokenizer, tmp_path / "run", max_steps=12)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # every attention and MLP projection of the Llama layout got an adapter
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed == {name for name in trainable if ".lora_B." in name or ".lora_A." in name}
    assert any(".lora_B." in name for name in changed)  # B starts at zero: the adapters did move
    losses = train_losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_final_holds_the_adapter_and_the_merged_model_gives_the_same_logits(data_dir, bpe_tokenizer, tmp_path):
    from peft import PeftModel

    trainer = lora_trainer(data_dir, bpe_tokenizer, tmp_path / "run", max_steps=6, merge=True)
    trainer.train()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter, not a copy of the base

    base_plus_adapter = PeftModel.from_pretrained(tiny_model(bpe_tokenizer, seed=1), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / MERGED_DIR).eval()  # plain transformers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    plain_base = tiny_model(bpe_tokenizer, seed=1).eval()
    ids = torch.tensor([bpe_tokenizer.encode("What is the capital of France? Paris is.")])
    with torch.no_grad():
        expected = base_plus_adapter(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
        untouched = plain_base(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (expected - untouched).abs().max() > 1e-3  # the adapter changed the model (the test can fail)


def test_a_lora_run_resumes_from_its_checkpoint_exactly(data_dir, tmp_path):
    # later options win over train_command's own --lr and --eval-every
    lora = ["--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0.1", "--max-steps", "8", "--save-every", "4", "--eval-every", "100"]
    run_train(train_command(data_dir, tmp_path / "full", *lora))
    uninterrupted = train_losses(tmp_path / "full")
    assert len(uninterrupted) == 8

    # the same run stopped after its step-4 checkpoint (as a crash would leave it), then resumed
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000008")
    shutil.rmtree(crashed / "final")
    metrics = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(metrics[:4]) + "\n")
    resumed = run_train(train_command(data_dir, crashed, *lora, "--resume"))
    assert "from step 4" in resumed.stdout
    assert train_losses(crashed) == uninterrupted  # dropout included: the RNG state is restored
    # the checkpoint holds the adapters and their optimizer state, not a copy of the frozen base
    saved = torch.load(crashed / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert saved["model"] and all(".lora_A." in name or ".lora_B." in name for name in saved["model"])

    other_rank = run_train(train_command(data_dir, crashed, *lora, "--lora-r", "8", "--resume"), expect=2)  # the last --lora-r wins
    assert "holds LoRA adapters of another setup (lora_r 4 -> 8)" in other_rank.stderr
    other_dtype = run_train(train_command(data_dir, crashed, *lora, "--dtype", "bf16", "--resume"), expect=2)
    assert "are fp32 and --dtype asks for bf16; resume with --dtype fp32" in " ".join(other_dtype.stderr.split())


def test_bf16_weights_keep_adapters_in_fp32_and_train(data_dir, bpe_tokenizer, tmp_path):
    from trainer.data import ShardDataset

    config = cpu_config(data=data_dir, out=tmp_path / "run", lr=1e-2, max_steps=6, eval_every=100, lora_r=8, dtype="bf16")
    model = tiny_model(bpe_tokenizer, seed=1, dtype="bf16")
    trainer = SFTTrainer(model, ShardDataset(data_dir, "train"), None, config, tokenizer=bpe_tokenizer)
    dtypes = {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    trainer.train()
    losses = train_losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_targets_are_found_by_name_and_a_wrong_name_is_one_clear_sentence(bpe_tokenizer):
    model = tiny_model(bpe_tokenizer, seed=0)
    assert set(find_targets(model)) <= set(KNOWN_TARGETS)
    assert find_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"--lora-targets qkv name no linear layer .* q_proj"):
        find_targets(model, ["qkv"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--merge"], "--merge and --lora-targets apply to LoRA runs only"),
        (["--lora-r", "4", "--lora-targets", "attn"], "--lora-targets attn name no linear layer"),
        # refused up front: one process used to train it with sharded checkpoints holding the whole base
        (["--lora-r", "4", "--fsdp"], "--fsdp does not take --lora-r yet"),
        (["--lora-r", "4", "--fsdp", "--dry-run"], "--fsdp does not take --lora-r yet"),
    ],
)
def test_cli_refuses_lora_misuse_with_one_sentence(data_dir, tmp_path, options, message):
    result = run_train(train_command(data_dir, tmp_path / "run", "--max-steps", "1", *options), expect=2)
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_resuming_a_full_fine_tune_with_lora_is_refused_with_the_reason(data_dir, tmp_path):
    """The adapters-only check used to be skipped for a full checkpoint: resuming it with
    --lora-r failed on the adapters' names, telling the user to pass another --model."""
    from trainer.loop import run_training

    config = dict(
        data=data_dir, out=tmp_path / "run", device="cpu", batch_tokens=512, max_steps=1, save_every=1, eval_every=100, progress=False
    )
    run_training(TrainConfig(**config))
    with pytest.raises(ValueError, match=r"it is a full fine-tune's checkpoint and --lora-r 4 asks for LoRA adapters"):
        run_training(TrainConfig(**{**config, "max_steps": 2, "resume": True, "lora_r": 4}))


def test_merging_an_adapter_on_a_tied_lm_head_is_refused(bpe_tokenizer):
    """The tiny model ties lm_head to the embeddings (as Qwen2.5-0.5B and Llama 3.2 1B do): merging
    an lm_head adapter changed the embeddings too, and final/merged gave logits 3.7 apart from
    base + adapter. Without --merge the adapter is fine (peft applies it to the head alone)."""
    model = tiny_model(bpe_tokenizer, seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match=r"--merge cannot fold an adapter on lm_head .*\(tie_word_embeddings\)"):
        apply_lora(model, r=4, alpha=None, dropout=0.0, targets=["lm_head", "q_proj"], merge=True)
    assert apply_lora(tiny_model(bpe_tokenizer, seed=0), r=4, alpha=None, dropout=0.0, targets=["q_proj"], merge=True)
    assert apply_lora(tiny_model(bpe_tokenizer, seed=0), r=4, alpha=None, dropout=0.0, targets=["lm_head"], merge=False)

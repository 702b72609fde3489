"""The memory estimate against real models on CPU: exact parameter, gradient and optimizer bytes,
activations as autograd saves them, a measured peak, and `sftkit train --dry-run`."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from flows.cli import app
from tests.support.models import MODELS, model_config
from tests.support.training import corpus_dataset
from trainer import SFTTrainer, ShardDataset, TrainConfig
from trainer.lora import apply_lora
from trainer.loss import CausalLMLoss
from trainer.memory import Strategy, _layer_activation_bytes, estimate, estimate_memory, load_model_config, model_shape
from trainer.memory_fit import parse_size, suggest_fits, usable_bytes
from trainer.models import tiny_model
from trainer.sharding import checkpoint_activations

runner = CliRunner()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Llama-3.1-8B's config.json (huggingface.co/meta-llama/Llama-3.1-8B), as the README's memory
# table has it (bench/_common.py): counted on the meta device only.
LLAMA_8B = MODELS["Llama-3.1-8B"]


def wide_llama(layers: int = 2, vocab: int = 2000, hidden: int = 256, intermediate: int = 704) -> LlamaConfig:
    """Still small, but wide enough that activations are not all rounding."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        use_cache=False,
    )


def build(config, dtype: str = "fp32", lora_r: int = 0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPES[dtype])
    return apply_lora(model, r=lora_r, alpha=None, dropout=0.0, targets=None) if lora_r else model


def packed_batch(vocab: int, tokens: int, sequence: int = 256):
    """One packed row: several sequences, positions restarting (the trainer's usual batch)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    return ids, torch.arange(tokens).remainder(sequence).unsqueeze(0)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- parameters, gradients, optimizer states: exact ----------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        wide_llama(),
        model_config(("qwen2", 3000, 128, 352, 3, 4, 2, False)),  # q/k/v biases, untied head (a row in MODEL_FIELDS order)
    ],
    ids=["llama-tied", "qwen2-untied"],
)
def test_counts_on_the_meta_device_equal_the_real_model(config):
    shape = model_shape(config)
    model = build(config)
    layers = model.model.layers
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params == sum(p.numel() for p in layers[0].parameters())
    assert shape.matmul_params == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    adapters, _ = shape.lora_params(8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    lora = build(config, lora_r=8)
    assert adapters == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    folder = corpus_dataset(tmp_path_factory.mktemp("memory") / "data", bpe_tokenizer, bpe_tokenizer_path, repeat=1)
    return ShardDataset(folder, "train")


@pytest.mark.parametrize("dtype,lora_r", [("fp32", 0), ("bf16", 0), ("fp32", 8), ("bf16", 8)])
def test_weights_gradients_and_optimizer_bytes_are_exact_after_one_step(dataset, bpe_tokenizer, tmp_path, dtype, lora_r):
    model = tiny_model(bpe_tokenizer, seed=0, dtype=dtype)
    config = TrainConfig(
        data=dataset.data_dir, out=tmp_path / "run", device="cpu", batch_tokens=512, lr=1e-3, progress=False, dtype=dtype, lora_r=lora_r
    )
    trainer = SFTTrainer(model, dataset, None, config, tokenizer=bpe_tokenizer)
    _, _, micro, _ = next(trainer._step_batches())
    result = trainer.forward_backward(micro)
    params = list(trainer.model.parameters())
    gradients = tensor_bytes(p.grad for p in params if p.grad is not None)
    trainer.optimizer_step(result["trained_tokens"])
    states = tensor_bytes(t for state in trainer.optimizer.state.values() for t in state.values())

    expected = estimate_memory(load_model_config("tiny", bpe_tokenizer), batch_tokens=512, lora_r=lora_r, dtype=dtype, device="cpu").parts
    assert expected["weights"] == tensor_bytes(params)
    assert expected["gradients"] == gradients > 0
    assert expected["optimizer states"] == states


# --- activations and logits: against autograd and a measured peak ---------------------------
def saved_bytes(model, ids, positions, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves for backward in the decoder (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        decoder(input_ids=ids, position_ids=positions, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    "dtype,lora_r,autocast",
    [
        ("fp32", 0, False),
        ("bf16", 0, False),
        ("fp32", 0, True),
        ("fp32", 8, False),
        ("bf16", 8, False),
        ("fp32", 8, True),
        ("bf16", 8, True),
    ],
)
def test_each_layer_saves_what_the_formula_says(dtype, lora_r, autocast):
    """One more decoder layer costs what ``_layer_activation_bytes`` says, to 1 %. CPU autocast
    stands in for the GPU's (the formula's ``device="cuda"``: bf16 compute)."""
    tokens = 1024
    ids, positions = packed_batch(2000, tokens)
    two, three = (saved_bytes(build(wide_llama(n), dtype, lora_r), ids, positions, autocast) for n in (2, 3))
    shape = model_shape(wide_llama(2))
    strategy = Strategy(batch_tokens=tokens, lora_r=lora_r, dtype=dtype, device="cuda" if autocast else "cpu")
    weight_bytes = 2 if dtype == "bf16" else 4
    per_layer = tokens * _layer_activation_bytes(shape, strategy, weight_bytes, 2 if autocast else weight_bytes, autocast)
    if autocast and dtype == "fp32":  # the bf16 weight copies that the matmuls keep for backward
        per_layer += 2 * sum(i * o * n for _, i, o, n in shape.linears) // shape.num_layers
    assert three - two == pytest.approx(per_layer, rel=0.01)


def measured_peak(config, *, chunk: int, checkpointing: bool, autocast: bool, tokens: int = 2048) -> int:
    """Peak bytes above weights and optimizer states in a second training step, tracked tensor by
    tensor (torch's MemTracker, which works on CPU)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = build(config)
    if checkpointing:
        checkpoint_activations(model)
    objective = CausalLMLoss(model, chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, positions = packed_batch(config.vocab_size, tokens)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss, _ = objective(ids, positions, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's states exist from here on, as in every later step
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return peak["Total"] - peak["Parameter"] - peak["Optstate"]


# (config, loss chunk, activation checkpointing, autocast); the ratios measured when this was written
# are in the README's "Training real models".
PEAK_CASES = {
    "plain loss": (wide_llama(), 0, False, False),
    "chunked loss": (wide_llama(), 1024, False, False),
    "checkpointing": (wide_llama(), 0, True, False),
    "autocast": (wide_llama(), 0, False, True),
    "autocast+checkpointing+chunked": (wide_llama(), 1024, True, True),
}


@pytest.mark.parametrize("case", list(PEAK_CASES))
def test_activations_and_logits_are_within_20_percent_of_the_measured_peak(case):
    config, chunk, checkpointing, autocast = PEAK_CASES[case]
    measured = measured_peak(config, chunk=chunk, checkpointing=checkpointing, autocast=autocast)
    parts = estimate_memory(
        config, batch_tokens=2048, loss_chunk_tokens=chunk, activation_checkpointing=checkpointing, device="cuda" if autocast else "cpu"
    ).parts
    transient = sum(parts[name] for name in ("activations", "logits", "never at once", "autocast copies") if name in parts)
    assert 0.8 <= measured / transient <= 1.2, (measured, parts)


def test_the_chunked_loss_estimate_saves_what_the_measurement_saves():
    """A 32k vocabulary on a narrow model: the logits dominate, plain and chunked."""
    config = wide_llama(vocab=32000, hidden=64, intermediate=192)
    plain, chunked = (measured_peak(config, chunk=chunk, checkpointing=False, autocast=False) for chunk in (0, 1024))
    estimated = [estimate_memory(config, batch_tokens=2048, loss_chunk_tokens=chunk, device="cpu").parts for chunk in (0, 1024)]
    assert plain == pytest.approx(estimated[0]["activations"] + estimated[0]["logits"], rel=0.05)
    assert chunked == pytest.approx(estimated[1]["activations"] + estimated[1]["logits"], rel=0.05)
    assert plain / chunked > 1.5


# --- what fits -------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("80GB") == parse_size("80GiB") == 80 * 2**30  # GPU memory is sold in GiB labelled GB
    assert parse_size("24GiB") == parse_size("24G") == parse_size("24 gib") == 24 * 2**30
    assert parse_size("81559MiB") == 81559 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="80GB"):
        parse_size("eighty gigs")
    for nothing in ("0", "0GB", "0.4"):  # used to pass as a 0-byte GPU that nothing fits
        with pytest.raises(ValueError, match="is no memory at all"):
            parse_size(nothing)


@pytest.mark.parametrize("gpu_memory,gpus", [("80GB", 1), ("80GB", 8), ("24GiB", 1), ("40GB", 4)])
def test_every_suggestion_fits_and_none_extends_another(gpu_memory, gpus):
    shape = model_shape(model_config(LLAMA_8B))
    current = Strategy(batch_tokens=8192, world_size=gpus)
    budget = usable_bytes(parse_size(gpu_memory))
    assert estimate(shape, current).total > budget
    suggestions = suggest_fits(shape, current, parse_size(gpu_memory), gpus=gpus)
    assert suggestions
    for suggestion in suggestions:
        assert estimate(shape, suggestion.strategy).total <= budget
        for other in suggestions:
            assert other is suggestion or not set(other.args) < set(suggestion.args)
    assert [s.cost for s in suggestions] == sorted(s.cost for s in suggestions)


def test_a_run_that_fits_gets_no_suggestion():
    shape = model_shape(wide_llama())
    assert suggest_fits(shape, Strategy(batch_tokens=2048), parse_size("80GB")) == []


# --- sftkit train --dry-run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A local model folder with a config.json and nothing else: the dry run reads no weights."""
    folder = tmp_path_factory.mktemp("llama-8b")
    model_config(LLAMA_8B).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return folder


def dry_run(*args: str):
    return runner.invoke(app, ["train", "--dry-run", *args], env={"COLUMNS": "200"})


def test_dry_run_with_the_tiny_model_prints_the_table_and_creates_nothing(dataset, tmp_path):
    out = tmp_path / "run"
    result = dry_run("--data", str(dataset.data_dir), "--out", str(out), "--gpu-memory", "24GiB")
    assert result.exit_code == 0, result.output
    for row in ("weights", "gradients", "optimizer states", "activations", "logits", "total"):
        assert row in result.output
    assert "fits a 24.00 GiB GPU" in result.output
    both = dry_run("--data", str(dataset.data_dir), "--mixture", str(tmp_path / "mix.yaml"), "--out", str(out))
    assert both.exit_code == 2 and "give --data or --mixture, not both" in both.output  # as train itself says
    assert not out.exists()


def test_dry_run_of_a_model_folder_suggests_flags_that_then_fit(model_folder, tmp_path):
    base = ("--model", str(model_folder), "--out", str(tmp_path / "run"), "--gpu-memory", "80GB")
    result = dry_run(*base)
    assert result.exit_code == 0, result.output
    assert "8,030,261,248 params" in result.output and "does not fit" in result.output
    shape = model_shape(LlamaConfig.from_pretrained(model_folder))
    for suggestion in suggest_fits(shape, Strategy(batch_tokens=8192), parse_size("80GB")):
        gpus = ("--gpus", str(suggestion.strategy.fsdp_gpus)) if suggestion.strategy.fsdp_gpus > 1 else ()
        again = dry_run(*base, *suggestion.args, *gpus)
        assert again.exit_code == 0, again.output
        assert "fits a 80.00 GiB GPU" in again.output, (suggestion.args, again.output)
    assert not (tmp_path / "run").exists()


def test_dry_run_of_the_tiny_model_takes_its_vocabulary_from_an_explicit_tokenizer(bpe_tokenizer_path, tmp_path):
    """What the refusal without --data says to do: --tokenizer alone (it used to be refused too)."""
    result = dry_run("--out", str(tmp_path / "run"), "--tokenizer", str(bpe_tokenizer_path))
    assert result.exit_code == 0, result.output
    assert "total" in result.output and not (tmp_path / "run").exists()
    refused = dry_run("--out", str(tmp_path / "run"))
    assert refused.exit_code == 2 and "pass --data DIR (or --tokenizer)" in refused.output
    zero = dry_run("--out", str(tmp_path / "run"), "--tokenizer", str(bpe_tokenizer_path), "--gpu-memory", "0GB")
    assert zero.exit_code == 2 and "is no memory at all" in zero.output and "Traceback" not in zero.output


def test_gpu_memory_without_dry_run_is_refused(dataset, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(dataset.data_dir), "--out", str(tmp_path / "r"), "--gpus", "2"])
    assert result.exit_code == 2
    assert "--dry-run" in result.output
    assert not (tmp_path / "r").exists()


def test_estimate_as_dict_is_json_for_other_reports():
    result = estimate_memory(model_config(LLAMA_8B), batch_tokens=8192, lora_r=16, dtype="bf16", activation_checkpointing=True)
    data = json.loads(json.dumps(result.as_dict()))
    assert data["total_bytes"] == result.total == sum(data["bytes"].values())
    assert data["strategy"]["lora_r"] == 16

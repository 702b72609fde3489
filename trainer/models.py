"""The model and tokenizer a run trains: ``tiny`` (random, sized to the tokenizer) or a local HF folder.

The tokenizer is the one the data was prepared with (``manifest["tokenizer"]["name"]``) unless
an explicit one is given or the model folder carries its own; either way ShardDataset checks
its fingerprint against the manifest. Nothing is loaded with ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.manifest import read_manifest
from pipeline.tokenizers import load_tokenizer

TINY = "tiny"


def resolve_tokenizer(data_dir: Path, model: str, explicit: str | None):
    """Explicit tokenizer > the model folder's own > the one named in the dataset's manifest."""
    if explicit:
        _refuse_missing_folder(explicit, "tokenizer", "--tokenizer")
        return load_tokenizer(str(explicit))
    if (
        model != TINY
        and Path(model).is_dir()
        and any((Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    ):
        return load_tokenizer(str(model))
    name = (read_manifest(data_dir).get("tokenizer") or {}).get("name")
    if not name:
        raise ValueError(f"{data_dir}/manifest.json names no tokenizer; pass one explicitly with --tokenizer")
    candidates = [Path(name), Path(data_dir) / name]
    for candidate in candidates:
        if candidate.exists():
            return load_tokenizer(str(candidate))
    if model == TINY or not Path(name).is_absolute():
        # a hub name (only usable online) or a folder that moved since `sftkit prepare`
        try:
            return load_tokenizer(name)
        except ValueError as exc:
            raise ValueError(
                f"the tokenizer {name!r} named in {data_dir}/manifest.json cannot be loaded from here; "
                "pass the tokenizer folder with --tokenizer"
            ) from exc
    raise ValueError(f"tokenizer folder {name!r} named in {data_dir}/manifest.json does not exist; pass --tokenizer")


def _refuse_missing_folder(name: str, what: str, option: str) -> None:
    """A name written as a path (``/…``, ``./…``, ``~/…``, ``a/b/c``) that is not there is a typo or a
    moved folder, not a hub id: say so instead of the hub client's complaint about repo ids."""
    text = str(name)
    looks_like_path = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path and not Path(text).expanduser().exists():
        raise ValueError(f"{what} folder {text!r} given with {option} does not exist")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_model(tokenizer, *, seed: int, max_positions: int = 4096, attn_implementation: str = "sdpa", dtype: str = "fp32"):
    """A 2-layer, 64-wide Llama with random weights and the tokenizer's vocabulary: for demos and tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=DTYPES[dtype])
    return model


def load_model(model: str, tokenizer, *, seed: int, max_positions: int, attn_implementation: str | None, dtype: str = "fp32"):
    """``tiny`` or a local Hugging Face causal-LM folder, its weights in ``dtype`` (``fp32``: master
    weights in fp32 and bf16 autocast on GPU; ``bf16``: half the memory, for LoRA's frozen base)."""
    if model == TINY:
        return tiny_model(tokenizer, seed=seed, max_positions=max_positions, attn_implementation=attn_implementation or "sdpa", dtype=dtype)
    from transformers import AutoModelForCausalLM

    _refuse_missing_folder(model, "model", "--model")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model, trust_remote_code=False, dtype=DTYPES[dtype], attn_implementation=attn_implementation or "sdpa"
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load model {model!r}: {exc}") from exc
    vocab = loaded.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise ValueError(f"model {model!r} has {vocab} embeddings but the tokenizer has {len(tokenizer)} tokens")
    loaded.config.use_cache = False
    return loaded

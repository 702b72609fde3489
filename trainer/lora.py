"""LoRA through peft: which layers get adapters, and what a LoRA run writes.

Only the adapters train; the base weights stay frozen (and may be held in bf16, ``--dtype bf16``,
while peft keeps the adapters in fp32). The adapters go on every linear layer of attention and
MLP, found by name for the layouts people fine-tune:

    Llama, Mistral, Qwen2/3, Gemma, DeepSeek-R1 distills   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    Phi-3                                                   qkv_proj o_proj gate_up_proj down_proj

``--lora-targets`` names them explicitly for any other layout. ``RUN/final/`` of a LoRA run holds
the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``); with ``--merge`` also ``RUN/final/merged/``, the base model with
the adapters folded in, which loads with plain ``transformers``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# Attention and MLP projections of the common decoder layouts (see the module docstring).
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
MERGED_DIR = "merged"


def find_targets(model: torch.nn.Module, requested: list[str] | None = None) -> list[str]:
    """The module names (last path component) that get adapters; a clear error when none match."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if requested:
        missing = sorted(set(requested) - linear_names)
        if missing:
            raise ValueError(
                f"--lora-targets {','.join(missing)} name no linear layer of this model; "
                f"its linear layers are {', '.join(sorted(linear_names))}"
            )
        return list(requested)
    found = [name for name in KNOWN_TARGETS if name in linear_names]
    if not found:
        raise ValueError(
            "found no attention/MLP projection by its usual name in this model; name the layers with "
            f"--lora-targets (its linear layers are {', '.join(sorted(linear_names))})"
        )
    return found


def _refuse_merging_a_tied_head(model: torch.nn.Module, targets: list[str]) -> None:
    """An adapter on an LM head that shares its weight with the input embeddings (Qwen2.5 0.5-3B,
    Llama 3.2 1B/3B, Gemma, the tiny model) cannot be merged: folding it into the shared weight
    changes the embeddings too, and final/merged then gives other logits than base + adapter."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    name = next((n.rsplit(".", 1)[-1] for n, module in model.named_modules() if module is head), None)
    if name in targets:
        raise ValueError(
            f"--merge cannot fold an adapter on {name} into this model: its {name} shares its weight with the "
            f"input embeddings (tie_word_embeddings), which the merge would change too; drop {name} from "
            "--lora-targets, or drop --merge and load final/ with peft"
        )


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float | None, dropout: float, targets: list[str] | None, merge: bool = False):
    """Wrap ``model`` in a peft LoRA model: adapters on ``targets``, everything else frozen
    (``merge``: the run will write final/merged, refused for an adapter on a tied LM head)."""
    from peft import LoraConfig, get_peft_model

    targets = find_targets(model, targets)
    if merge:
        _refuse_merging_a_tied_head(model, targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft asks transformers for the attribute it renamed in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the adapters of a LoRA model), by their state-dict names."""
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trained}


def save_final(model, folder: Path, tokenizer=None, *, merge: bool) -> None:
    """Write the adapter (and, with ``merge``, the merged model under ``folder/merged``).

    Merging folds the adapters into the base weights in place: call it last.
    """
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(folder / MERGED_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / MERGED_DIR)

"""Shapes of the models people fine-tune, from their public ``config.json`` (nothing is downloaded).

The memory tests check ``trainer.memory``'s estimate on them; ``bench/memory_table.py`` and
``bench/gpu_step.py`` print the README's figures for the same configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The config.json fields that change a causal LM's parameter count and memory, in the order of the
# rows below; the rest are transformers' defaults.
MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
# Models people fine-tune, their public config.json values (huggingface.co/<name>): model_type, then MODEL_FIELDS.
MODELS = {
    "Qwen2.5-0.5B": ("qwen2", 151936, 896, 4864, 24, 14, 2, True),
    "Llama-3.1-8B": ("llama", 128256, 4096, 14336, 32, 32, 8, False),
    "Qwen2.5-7B": ("qwen2", 152064, 3584, 18944, 28, 28, 4, False),
}


def model_config(row: Sequence[Any], **more: Any) -> Any:
    """The transformers config of a row like MODELS' (nothing is downloaded), ``more`` fields on top."""
    from transformers import AutoConfig

    model_type, *values = row
    return AutoConfig.for_model(model_type, **dict(zip(MODEL_FIELDS, values, strict=True)), **more)

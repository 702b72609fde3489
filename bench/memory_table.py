"""The README's memory table: trainer/memory.py's per-GPU estimate for models people fine-tune.

The configs are the public ``config.json`` values of each model (huggingface.co/<name>); only the
fields that change the count are written here, the rest are transformers' defaults. Nothing is
downloaded: the models are built on the meta device.

    .venv/bin/python bench/memory_table.py                 # markdown, 8,192 tokens per GPU
    .venv/bin/python bench/memory_table.py --batch-tokens 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {
    "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "Llama-3.1-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "Qwen2.5-7B": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
}

# (column, estimate_memory settings): fp32 weights train under bf16 autocast on the GPU (mixed precision).
COLUMNS = [
    ("full, plain loss", dict(loss_chunk_tokens=0)),
    ("full", dict()),
    ("full + AC", dict(activation_checkpointing=True)),
    ("LoRA r=16, bf16 base", dict(lora_r=16, dtype="bf16")),
    ("LoRA r=16, bf16 base + AC", dict(lora_r=16, dtype="bf16", activation_checkpointing=True)),
    ("FSDP x8", dict(fsdp_gpus=8, world_size=8)),
    ("FSDP x8 + AC", dict(fsdp_gpus=8, world_size=8, activation_checkpointing=True)),
]


def model_config(name: str):
    from transformers import AutoConfig

    model_type, fields = MODELS[name]
    return AutoConfig.for_model(model_type, **fields)


def main() -> None:
    from trainer.memory import estimate_memory, model_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    print("| model | params | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name in MODELS:
        config = model_config(name)
        shape = model_shape(config)
        cells = [f"{estimate_memory(shape, batch_tokens=args.batch_tokens, **settings).total / 2**30:.1f}" for _, settings in COLUMNS]
        print(f"| {name} | {shape.num_params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    print(f"\nGiB per GPU at {args.batch_tokens:,} tokens per micro-batch (one packed row, sdpa), chunked loss unless noted.")


if __name__ == "__main__":
    main()

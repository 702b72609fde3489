"""The README's memory table: trainer/memory.py's per-GPU estimate for models people fine-tune.

The configs are the public ``config.json`` values of each model (huggingface.co/<name>); only the
fields that change the count are written here, the rest are transformers' defaults. Nothing is
downloaded: the models are built on the meta device.

    .venv/bin/python -m bench.memory_table                 # markdown, 8,192 tokens per GPU
    .venv/bin/python -m bench.memory_table --batch-tokens 16384

Writes the figures to bench/results/memory_table.json too.
"""

from __future__ import annotations

from bench._common import argument_parser, write_results

MODELS = {
    "Qwen2.5-0.5B": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "Llama-3.1-8B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen2.5-7B": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
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

    parser = argument_parser(__doc__)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    print("| model | params | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    models = {}
    for name in MODELS:
        shape = model_shape(model_config(name))
        gib = {column: estimate_memory(shape, batch_tokens=args.batch_tokens, **settings).total / 2**30 for column, settings in COLUMNS}
        models[name] = {"params": shape.num_params, "gib_per_gpu": gib}
        print(f"| {name} | {shape.num_params / 1e9:.2f}B | " + " | ".join(f"{value:.1f}" for value in gib.values()) + " |")
    print(f"\nGiB per GPU at {args.batch_tokens:,} tokens per micro-batch (one packed row, sdpa), chunked loss unless noted.")
    write_results("memory_table", {"batch_tokens": args.batch_tokens, "models": models}, args.out)


if __name__ == "__main__":
    main()

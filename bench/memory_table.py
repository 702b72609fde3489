"""The README's memory table: trainer/memory.py's per-GPU estimate for models people fine-tune.

The models are bench/_common.py's MODELS: the public ``config.json`` values of each
(huggingface.co/<name>), only the fields that change the count, the rest transformers' defaults.
Nothing is downloaded: the models are built on the meta device.

    .venv/bin/python -m bench.memory_table                 # markdown, 8,192 tokens per GPU
    .venv/bin/python -m bench.memory_table --batch-tokens 16384

Writes the figures to bench/results/memory_table.json too.
"""

from __future__ import annotations

from bench._common import argument_parser, write_results
from tests.support.models import MODELS, model_config

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


def main() -> None:
    from trainer.memory import estimate_memory, model_shape

    parser = argument_parser(__doc__)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    print("| model | params | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    models = {}
    for name, row in MODELS.items():
        shape = model_shape(model_config(row))
        gib = {column: estimate_memory(shape, batch_tokens=args.batch_tokens, **settings).total / 2**30 for column, settings in COLUMNS}
        models[name] = {"params": shape.num_params, "gib_per_gpu": gib}
        print(f"| {name} | {shape.num_params / 1e9:.2f}B | " + " | ".join(f"{value:.1f}" for value in gib.values()) + " |")
    print(f"\nGiB per GPU at {args.batch_tokens:,} tokens per micro-batch (one packed row, sdpa), chunked loss unless noted.")
    write_results("memory_table", {"batch_tokens": args.batch_tokens, "models": models}, args.out)


if __name__ == "__main__":
    main()

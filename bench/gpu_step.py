"""GPU training-step benchmark: tokens/s, MFU and data-wait share of the trainer on a ~0.5B model.

A randomly initialised Qwen2.5-0.5B-shaped model (bench/_common.py's MODELS row: 24 layers,
hidden 896, 14 heads / 2 KV heads, vocab 151,936, tied embeddings) trains on a synthetic prepared
dataset (realistic lengths, built by bench/loader.py's builder with the real shard writer) through
the trainer's own path: ShardDataset memory maps -> BFD packing plan -> DataLoader workers with
pinned int32 batches -> SFTTrainer.forward_backward (bf16 autocast, masked CE) -> fused AdamW step.

MFU counts 6 x parameters x tokens (the LM head included, the embedding lookup not) plus the
attention term 12 x layers x hidden x mean sequence length per token (PaLM appendix B), over the
GPU's dense bf16 peak (``--peak-tflops`` to override the built-in table); the model FLOPs, so
activation checkpointing's recomputation and LoRA's skipped weight gradients are not counted.

The strategies go into the trainer's own TrainConfig: ``--lora R`` (lora_r), ``--dtype``,
``--activation-checkpointing``, ``--fsdp`` (run it under torchrun; every rank builds its batches
from the same dataset folder, rank 0 writes it). On CUDA the output holds the peak allocated
memory (``torch.cuda.max_memory_allocated``) next to trainer/memory.py's estimate for the same
settings, so the estimator can be checked on the GPU.

    .venv/bin/python -m bench.gpu_step                 # on a CUDA machine
    .venv/bin/python -m bench.gpu_step --lora 16 --dtype bf16 --activation-checkpointing
    .venv/bin/torchrun --nproc-per-node 8 -m bench.gpu_step --fsdp --activation-checkpointing
    .venv/bin/python -m bench.gpu_step --smoke         # tiny model, CPU, a few steps: checks it runs

Writes bench/results/gpu_step[_smoke][_loraR][_bf16][_ac][_fsdpN].json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench._common import argument_parser, write_results
from bench.loader import build_dataset
from tests.support.models import MODELS, model_config
from trainer import distributed
from trainer.data import ShardDataset
from trainer.loop import SFTTrainer, TrainConfig
from trainer.memory import estimate, model_shape
from trainer.memory_fit import strategy_from_config
from trainer.models import DTYPES

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "4090": 165.0}


# The smoke run's model: a row like bench/_common.py's MODELS, small enough to train on a CPU.
SMOKE_MODEL = ("qwen2", 32_000, 64, 192, 2, 4, 2, True)


def qwen2_config(smoke: bool):
    if smoke:
        return model_config(SMOKE_MODEL, max_position_embeddings=8192, use_cache=False)
    return model_config(MODELS["Qwen2.5-0.5B"], max_position_embeddings=32_768, rope_theta=1_000_000.0, use_cache=False)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--pack-length", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--attn", default=None, help="sdpa | flash_attention_2 | eager")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the weights' dtype")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over torchrun's ranks (run under torchrun)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        print("no CUDA device: running the CPU smoke configuration")
    rows = args.rows or (2_000 if smoke else 40_000)
    steps = args.steps or (3 if smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    batch_tokens = args.batch_tokens or (4096 if smoke else 16_384)
    pack_length = args.pack_length or (None if smoke else 4096)
    info = distributed.init_from_env("cpu" if smoke else "cuda")
    if args.fsdp and info.world_size == 1:
        print("--fsdp on one process trains unsharded; run it under torchrun --nproc-per-node N")
    device = distributed.resolve_device("cpu" if smoke else "cuda", info)

    # Under torchrun every rank must read the same folder: a fixed one unless --work names it.
    shared = Path(tempfile.gettempdir()) / f"sftkit-bench-gpu-{'smoke' if smoke else 'full'}-{rows}"
    work = args.work or (shared if info.world_size > 1 else Path(tempfile.mkdtemp(prefix="sftkit-bench-gpu-")))
    data = work / "data"
    if info.is_main and not (data / "manifest.json").exists():
        build_dataset(data, rows)
    if info.is_main:
        dataset = ShardDataset(data, "train")  # builds the memory-map companions once, before the others open them
    distributed.barrier()
    if not info.is_main:
        dataset = ShardDataset(data, "train")

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen2_config(smoke), attn_implementation=args.attn or "sdpa", dtype=DTYPES[args.dtype])
    params = sum(p.numel() for p in model.parameters())
    # The settings that move memory, named as TrainConfig names them.
    strategy = dict(lora_r=args.lora, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp)
    config = TrainConfig(
        data=data,
        out=work / "run",
        device=device.type,
        batch_tokens=batch_tokens,
        pack_length=pack_length,
        max_steps=warmup + steps,
        lr=1e-4,
        num_workers=args.workers,
        progress=False,
        attn_implementation=args.attn,
        **strategy,
    )
    # What `sftkit train --dry-run` estimates for this config, on this run's device (no autocast on a CPU).
    estimated = estimate(model_shape(model.config), replace(strategy_from_config(config, info.world_size), device=device.type))
    trainer = SFTTrainer(model, dataset, None, config)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size

    batches = trainer._step_batches()
    timed = {"tokens": 0, "seconds": 0.0, "wait": 0.0, "sequences": 0}
    losses = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        _, _, micro, waited = next(batches)
        result = trainer.forward_backward(micro)
        trainer.optimizer_step(result["trained_tokens"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started  # includes the wait for batches
        losses.append(result["loss"])
        if step >= warmup:
            timed["tokens"] += result["tokens"]
            timed["seconds"] += elapsed
            timed["wait"] += waited
            timed["sequences"] += sum(int(((b["position_ids"] == 0) & (b["attention_mask"] == 1)).sum()) for b in micro)
    batches.close()

    tokens_per_s = timed["tokens"] / timed["seconds"]
    mean_seq = timed["tokens"] / max(timed["sequences"], 1)
    flops_per_token = 6 * params + 12 * layers * hidden * mean_seq
    peak = peak_flops(device, args.peak_tflops)
    measured_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    gathered = distributed.all_reduce_max(measured_peak or 0, device) if info.world_size > 1 else measured_peak
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "world_size": info.world_size,
        "strategy": {**strategy, "fsdp": args.fsdp and info.world_size > 1, "loss_chunk_tokens": config.loss_chunk_tokens},
        "model_parameters": params,
        "batch_tokens": batch_tokens,
        "pack_length": pack_length,
        "timed_steps": steps,
        "tokens_per_s": tokens_per_s,  # all ranks together
        "data_wait_fraction": timed["wait"] / timed["seconds"],
        "mean_sequence_tokens": mean_seq,
        "achieved_tflops": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / (peak * info.world_size) if peak else None,
        "loss_first_last": [losses[0], losses[-1]],
        # torch.cuda.max_memory_allocated on the busiest rank, and the estimator's total for one GPU
        "peak_memory_gib": gathered / 2**30 if measured_peak is not None else None,
        "estimated_memory_gib": estimated.total / 2**30,
        "estimated_memory_rows_gib": {name: value / 2**30 for name, value, _ in estimated.rows()},
        "peak_over_estimate": gathered / estimated.total if measured_peak is not None else None,
    }
    distributed.shutdown()
    if not info.is_main:
        return
    print(json.dumps(results, indent=2))
    variant = "".join(
        [
            f"_lora{args.lora}" if args.lora else "",
            "_bf16" if args.dtype == "bf16" else "",
            "_ac" if args.activation_checkpointing else "",
            f"_fsdp{info.world_size}" if results["strategy"]["fsdp"] else "",
        ]
    )
    write_results(f"gpu_step{'_smoke' if smoke else ''}{variant}", results, args.out, packages=["accelerate", "peft"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

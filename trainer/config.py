"""``TrainConfig``: every setting of a training run, with its default.

Its own module, free of torch, so that the CLI derives its option defaults from it (and answers
``sftkit --help``) without loading the training stack. ``trainer.loop`` re-exports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Trained positions whose logits exist at once in the chunked loss (trainer.loss). 1024 x a 152k
# vocabulary is 0.6 GB of fp32 logits (and as much again for their gradient) instead of 19 GB
# for a 32k row.
DEFAULT_CHUNK_TOKENS = 1024


class TrainConfig(BaseModel):
    """Everything ``sftkit train`` can set; the defaults follow the lesson (lr 1e-5, 3 epochs, early stop)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: Path | None = Field(None, description="dataset folder (needed by run_training, not by SFTTrainer)")
    mixture: Path | None = Field(None, description="a training mixture spec (YAML), instead of data")
    out: Path = Path("runs/sft")
    model: str = "tiny"
    tokenizer: str | None = Field(None, description="override the tokenizer named in the manifest")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(1e-5, ge=0, description="0 is allowed here (a frozen run); the CLI asks for > 0")
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_tokens: int = Field(8192, ge=1, description="token slots per micro-batch (per rank)")
    pack_length: int | None = Field(None, ge=1, description="length of one packed row; default batch_tokens")
    grad_accum: int = Field(1, ge=1)
    packing: bool = True
    eval_every: int = Field(200, ge=1)
    patience: int | None = Field(3, ge=0)
    save_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = Field(None, description="DataLoader workers; default 2 on CUDA, 0 on CPU")
    attn_implementation: str | None = None
    fsdp: bool = Field(False, description="under torchrun: shard weights, gradients and optimizer state (FSDP2)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in backward")
    loss_chunk_tokens: int = Field(
        DEFAULT_CHUNK_TOKENS, ge=0, description="trained positions whose logits exist at once; 0 = the model's full logits"
    )
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype the model's weights are loaded and kept in")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator; default 2 x lora_r")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | None = Field(None, description="layer names that get adapters; default attention + MLP")
    merge: bool = Field(False, description="LoRA: also write final/merged, the base model with the adapters folded in")
    progress: bool = True

    @model_validator(mode="after")
    def _options_that_go_together(self):
        if self.data is not None and self.mixture is not None:
            raise ValueError("give --data or --mixture, not both")
        if not self.lora_r and (self.merge or self.lora_targets):
            raise ValueError("--merge and --lora-targets apply to LoRA runs only; add --lora-r N (e.g. 16)")
        # Refused here, before any model loads: on several ranks sharding.shard refuses it anyway
        # (after every rank loaded the model), and on one rank the sharded checkpoints would hold
        # the whole frozen base, not the adapters alone.
        if self.lora_r and self.fsdp:
            raise ValueError(
                "--fsdp does not take --lora-r yet (final/ would need the adapters gathered from the shards); "
                "drop --fsdp to train LoRA with DDP"
            )
        return self

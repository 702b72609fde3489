"""sftkit's trainer: memory-mapped shards -> packed token batches -> masked loss -> checkpoints."""

from __future__ import annotations

__all__ = ["SFTTrainer", "collate", "ShardDataset", "TrainConfig"]


def __getattr__(name: str):
    if name == "ShardDataset":
        from trainer.data import ShardDataset

        return ShardDataset
    if name == "collate":
        from trainer.batching import collate

        return collate
    if name == "TrainConfig":
        from trainer.config import TrainConfig

        return TrainConfig
    if name == "SFTTrainer":
        from trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")

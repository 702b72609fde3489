"""Optimizer and learning-rate schedule: AdamW (fused on CUDA), linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_schedule_with_warmup


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) are never decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

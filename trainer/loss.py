"""The SFT loss: cross-entropy over trained tokens only, summed, divided by a count chosen by the caller.

Labels arrive unshifted (label t is the token at t). The target of logit t is label t+1, except
where t+1 starts a new packed sequence (its position id is 0): there the target is ignored, so
the last token of one conversation is never trained to predict the first of the next.

The loop divides the summed loss by the trained-token count of the whole optimizer step (all
gradient-accumulation micro-batches on all ranks), so 4 micro-batches of 1024 tokens give the
same update as one of 4096, and long and short conversations weigh per token, not per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.schema import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``targets[:, t]`` = the label logit t is trained on; shape (batch, width - 1)."""
    targets = labels[:, 1:].long().clone()
    targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def count_targets(batch: dict) -> int:
    """Trained targets in a collated batch (computed on the host, before any forward pass)."""
    return int(shifted_targets(batch["labels"], batch["position_ids"]).ne(IGNORE_INDEX).sum())


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over non-ignored targets; exactly 0 (not NaN) when there are none."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )

"""Which rows each rank trains on, and when: a pure function of (seed, epoch, rank, world size).

Nothing here keeps iterator state. The data position of a run is two plain integers, the epoch
and the index of the next micro-batch in that epoch's per-rank plan; a checkpoint stores them and
a resumed run re-derives the very same plan and skips to that index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer.batching import MicroBatch, plan_packed, plan_padded


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch, identical on every rank and every resume."""
    return epoch_rng(seed, epoch).permutation(num_rows)


def rank_slice(plan: Sequence[MicroBatch], rank: int, world_size: int) -> list[MicroBatch]:
    """Rank ``rank``'s disjoint share of a plan; every rank gets the same count (the rest is dropped)."""
    per_rank = len(plan) // world_size
    return list(plan[rank::world_size][:per_rank])


@dataclass(frozen=True)
class EpochPlanner:
    """Plans every epoch's micro-batches from the lengths array alone (rows are never read here)."""

    lengths: np.ndarray
    seed: int
    batch_tokens: int
    packing: bool = True
    pack_length: int | None = None
    rank: int = 0
    world_size: int = 1

    def global_plan(self, epoch: int) -> list[MicroBatch]:
        order = epoch_order(len(self.lengths), self.seed, epoch)
        rng = epoch_rng(self.seed, epoch)
        if self.packing:
            return plan_packed(self.lengths, order, self.batch_tokens, self.pack_length, rng=rng)
        return plan_padded(self.lengths, order, self.batch_tokens, rng=rng)

    def rank_plan(self, epoch: int) -> list[MicroBatch]:
        return rank_slice(self.global_plan(epoch), self.rank, self.world_size)

    def steps_per_epoch(self, grad_accum: int) -> int:
        """Optimizer steps in an epoch; the last step of an epoch may take fewer micro-batches."""
        micro = len(self.rank_plan(0))
        return -(-micro // grad_accum)


def eval_plan(lengths: np.ndarray, batch_tokens: int, packing: bool, pack_length: int | None, rank: int, world_size: int) -> list[MicroBatch]:
    """The validation micro-batches of one rank: fixed order, every row exactly once across ranks."""
    order = np.arange(len(lengths))
    if packing:
        plan = plan_packed(lengths, order, batch_tokens, pack_length, rng=None)
    else:
        plan = plan_padded(lengths, order, batch_tokens, rng=None)
    return plan[rank::world_size]

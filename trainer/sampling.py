"""Which rows each rank trains on, and when: a pure function of (seed, epoch, rank, world size).

Nothing here keeps iterator state. The data position of a run is two plain integers, the epoch
and the index of the next micro-batch in that epoch's per-rank plan; a checkpoint stores them and
a resumed run re-derives the very same plan and skips to that index.

An epoch's row order is a shuffle of all rows, or, for a training mixture (:mod:`trainer.mixture`),
:meth:`MixtureSampler.epoch_order`: each group's rows drawn to its budget (whole copies, then a
random fill), then shuffled; equally a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """Plans every epoch's micro-batches from the lengths array alone (rows are never read here).

    ``order`` maps an epoch to its row order (indices into ``lengths``, repeats allowed); by
    default every row once, shuffled by (seed, epoch).
    """

    lengths: np.ndarray
    seed: int
    batch_tokens: int
    packing: bool = True
    pack_length: int | None = None
    rank: int = 0
    world_size: int = 1
    order: Callable[[int], np.ndarray] | None = None

    def global_plan(self, epoch: int) -> list[MicroBatch]:
        order = self.order(epoch) if self.order is not None else epoch_order(len(self.lengths), self.seed, epoch)
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


def eval_plan(
    lengths: np.ndarray, batch_tokens: int, packing: bool, pack_length: int | None, rank: int, world_size: int
) -> list[MicroBatch]:
    """The validation micro-batches of one rank: fixed order, every row exactly once across ranks."""
    order = np.arange(len(lengths))
    if packing:
        plan = plan_packed(lengths, order, batch_tokens, pack_length, rng=None)
    else:
        plan = plan_padded(lengths, order, batch_tokens, rng=None)
    return plan[rank::world_size]


# --- a mixture's epochs ---------------------------------------------------------------------
def first_fit(costs: np.ndarray, budget: float) -> np.ndarray:
    """Positions (ascending) of the rows first fit takes: walking ``costs`` in order, take a row
    whenever it still fits in what is left of ``budget``. Vectorised: each pass takes the longest
    fitting prefix of the rows that can still fit."""
    chosen = []
    candidates = np.arange(len(costs))
    left = float(budget)
    while len(candidates) and left > 0:
        candidates = candidates[costs[candidates] <= left]
        if not len(candidates):
            break
        running = np.cumsum(costs[candidates])
        take = int(np.searchsorted(running, left, side="right"))
        chosen.append(candidates[:take])
        left -= float(running[take - 1])
        candidates = candidates[take + 1 :]  # the next one did not fit, and never will
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


# closer_fit looks for its move among this many picked and left-out rows (positions in a shuffle,
# so a random sample); more would only slow large groups, whose first fit is close already.
SWAP_SAMPLE = 4096


def closer_fit(costs: np.ndarray, picked: np.ndarray, budget: float, rounds: int = 2, *, over: bool = True) -> np.ndarray:
    """``picked`` improved by up to ``rounds`` single moves, each the one addition of a row left
    out, or swap of a picked row for one left out, that brings the total nearest to ``budget``
    (never above it unless ``over``). First fit stops short by up to a row's size, which on a
    small group is a visible share."""
    picked = np.sort(picked)
    for _ in range(rounds):
        gap = float(budget - costs[picked].sum())
        out = np.ones(len(costs), bool)
        out[picked] = False
        left_out = np.flatnonzero(out)[:SWAP_SAMPLE]
        if not len(left_out) or gap == 0:
            break
        by_cost = left_out[np.argsort(costs[left_out], kind="stable")]
        sorted_costs = costs[by_cost]
        # Each picked row a (and "no row", cost 0, for an addition) wants a left-out row costing cost[a] + gap.
        swap_out = np.append(picked[:SWAP_SAMPLE], -1)
        removed = costs[swap_out[:-1]]
        removed = np.append(removed, 0)
        at = np.searchsorted(sorted_costs, removed + gap)
        best_gap, best = abs(gap), None
        for side in (at - 1, at):
            valid = (side >= 0) & (side < len(by_cost))
            signed = gap - (sorted_costs[np.clip(side, 0, len(by_cost) - 1)] - removed)
            new_gap = np.abs(signed)
            new_gap[~valid | ((signed < 0) & (not over))] = np.inf
            k = int(np.argmin(new_gap))
            if new_gap[k] < best_gap:
                best_gap, best = float(new_gap[k]), (swap_out[k], by_cost[side[k]])
        if best is None:
            break
        remove, add = best
        picked = np.sort(np.append(picked[picked != remove] if remove >= 0 else picked, add))
    return picked


def draw(members: np.ndarray, cost: np.ndarray, budget: float, rng: np.random.Generator, *, over: bool = True) -> np.ndarray:
    """``budget`` (in ``cost`` units) worth of ``members``: whole copies, then a random fill of the
    rest, as near the budget as the rows allow (at most the budget unless ``over``)."""
    total = float(cost[members].sum())
    if total <= 0 or budget <= 0:
        return np.zeros(0, np.int64)
    copies = int(budget // total)
    shuffled = members[rng.permutation(len(members))]
    rest = budget - copies * total
    extra = shuffled[closer_fit(cost[shuffled], first_fit(cost[shuffled], rest), rest, over=over)]
    return np.concatenate([np.tile(members, copies), extra])


class MixtureSampler:
    """An epoch's row order (indices into the mixture's training rows), from (seed, epoch) alone.

    Group g's draw uses the generator ``[seed, epoch, g + 1]`` and the final shuffle
    ``[seed, epoch, 0]``, so changing one group's weight leaves the others' draws as they were.
    """

    def __init__(
        self,
        members: list[np.ndarray],
        cost: np.ndarray,
        trained: np.ndarray,
        budgets: list[float],
        caps: list[int | None],
        seed: int,
        by_tokens: bool,
    ):
        self.members, self.cost, self.trained = members, cost, trained
        self.budgets, self.caps, self.seed, self.by_tokens = budgets, caps, seed, by_tokens
        self._cached: tuple[int, np.ndarray] | None = None

    def group_draw(self, g: int, epoch: int) -> np.ndarray:
        """Group g's rows this epoch (with repeats), in draw order."""
        rng = np.random.default_rng([self.seed, epoch, g + 1])
        budget, cap = self.budgets[g], self.caps[g]
        capped = cap is not None and self.by_tokens and cap < budget
        picks = draw(self.members[g], self.cost, cap if capped else budget, rng, over=not capped)
        if cap is not None and not self.by_tokens and self.trained[picks].sum() > cap:
            picks = draw(self.members[g], self.trained, cap, rng, over=False)  # by rows, but over the token cap
        return picks

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            picks = np.concatenate([self.group_draw(g, epoch) for g in range(len(self.members))])
            order = picks[np.random.default_rng([self.seed, epoch, 0]).permutation(len(picks))]
            self._cached = (epoch, order)
        return self._cached[1]

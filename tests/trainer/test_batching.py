"""Batch plans and collate: every row once per epoch, budgets respected, padding per the contract."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.schema import IGNORE_INDEX
from trainer import collate
from trainer.batching import PlanError, best_fit_decreasing, collate_packed, plan_efficiency, plan_packed, plan_padded
from trainer.sampling import EpochPlanner, epoch_order, rank_slice


def realistic_lengths(n: int, seed: int = 0, max_length: int = 4096) -> np.ndarray:
    """Log-normal SFT conversation lengths (median ~330 tokens, long tail cut at max_length)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.8, sigma=0.8, size=n), 8, max_length).astype(np.int32)


def next_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """The naive packer: rows in order, a new bin whenever the next row does not fit."""
    bins, fill = [], capacity + 1
    for row in order.tolist():
        if fill + int(lengths[row]) > capacity:
            bins.append([])
            fill = 0
        bins[-1].append(row)
        fill += int(lengths[row])
    return bins


def rows_of(plan):
    return [r for batch in plan for packed in batch for r in packed]


def test_collate_right_pads_with_mask_zero_and_labels_ignored():
    rows = [
        {"input_ids": np.array([5, 6, 7], np.int32), "labels": np.array([-100, 6, 7], np.int32)},
        {"input_ids": np.array([8], np.int32), "labels": np.array([8], np.int32)},
    ]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2]
    assert batch["packed"] is False


def test_packed_rows_restart_positions_per_sequence():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [4, 5]}
    batch = collate_packed([[a, b], [b]], pad_token_id=9, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [4, 5, 9, 9, 9, 9, 9, 9]]
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch["labels"].tolist()[0][5:] == [IGNORE_INDEX] * 3
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch["packed"] is True


def test_best_fit_decreasing_packs_every_row_once_within_capacity():
    lengths = realistic_lengths(5000)
    order = epoch_order(len(lengths), seed=3, epoch=0)
    bins = best_fit_decreasing(lengths, order, 8192)
    flat = [r for b in bins for r in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert max(int(lengths[b].sum()) for b in bins) <= 8192


def test_packing_fills_at_least_99_percent_on_a_realistic_distribution():
    lengths = realistic_lengths(20_000)
    order = epoch_order(len(lengths), seed=0, epoch=0)
    plan = plan_packed(lengths, order, 8192, rng=np.random.default_rng(0))
    naive = [[b] for b in next_fit(lengths, order, 8192)]
    assert plan_efficiency(lengths, plan, 8192) >= 0.99
    assert plan_efficiency(lengths, plan, 8192) > plan_efficiency(lengths, naive, 8192)


def test_plan_is_deterministic_per_seed_and_epoch_and_differs_between_epochs():
    lengths = realistic_lengths(2000)
    planner = EpochPlanner(lengths, seed=7, batch_tokens=4096)
    assert planner.global_plan(1) == EpochPlanner(lengths, seed=7, batch_tokens=4096).global_plan(1)
    assert planner.global_plan(0) != planner.global_plan(1)
    assert sorted(rows_of(planner.global_plan(1))) == list(range(len(lengths)))


def test_padded_plan_groups_lengths_within_the_token_budget():
    lengths = realistic_lengths(3000)
    plan = plan_padded(lengths, epoch_order(len(lengths), 0, 0), 8192, rng=np.random.default_rng(0))
    assert sorted(rows_of(plan)) == list(range(len(lengths)))
    for batch in plan:
        assert all(len(packed) == 1 for packed in batch)
        assert len(batch) * max(int(lengths[p[0]]) for p in batch) <= 8192
    # length grouping keeps padding low compared with batching in shuffled order
    assert plan_efficiency(lengths, plan, 8192) > 0.8


def test_ranks_get_disjoint_slices_with_the_same_number_of_micro_batches():
    lengths = realistic_lengths(1001, max_length=2048)
    plans = [EpochPlanner(lengths, 0, 2048, rank=r, world_size=3).rank_plan(0) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    seen = [set(rows_of(p)) for p in plans]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert rank_slice(list(range(10)), 1, 3) == [1, 4, 7]


def test_row_longer_than_the_budget_is_a_clear_error():
    lengths = np.array([100, 5000, 30], np.int32)
    with pytest.raises(PlanError, match="row 1 has 5000 tokens, more than --batch-tokens=4096"):
        plan_packed(lengths, np.arange(3), 4096, rng=None)
    with pytest.raises(PlanError, match="row 1 has 5000 tokens"):
        plan_padded(lengths, np.array([2, 0, 1]), 4096, rng=None)

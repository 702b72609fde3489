"""Token-budget batches: the packing planner, length-grouped padding, and ``collate``.

A plan is computed once per epoch from the lengths array alone. It is a list of micro-batches;
a micro-batch is a list of *packed rows*; a packed row is a list of dataset row indices laid end
to end. Without packing every packed row holds one sequence, so one collate serves both modes.

Packed rows carry ``position_ids`` that restart at 0 for every sequence and no attention mask:
transformers (>= 4.5x, ``masking_utils.find_packed_sequence_indices``) turns restarting positions
into a block-diagonal causal mask in its sdpa/eager/flex paths and into varlen calls in
flash-attention, so sequences never attend to each other. The loss side
(:func:`trainer.loss.shifted_targets`) uses the same restarts to never predict across a boundary.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.schema import IGNORE_INDEX

MicroBatch = list[list[int]]

# A bin's remaining capacity and id live in one int so the open bins are a plain sorted list
# that bisect searches in C; this keeps best-fit at ~1 µs per row without a tree structure.
_BIN_ID_BITS = 32


class PlanError(ValueError):
    """A row that cannot fit in any batch under the requested token budget."""


def _check_fits(lengths: np.ndarray, order: np.ndarray, capacity: int, flag: str) -> None:
    if len(order) and int(lengths[order].max()) > capacity:
        row = int(order[np.argmax(lengths[order])])
        raise PlanError(
            f"row {row} has {int(lengths[row])} tokens, more than {flag}={capacity}; raise {flag} "
            f"or prepare the data with --max-length <= {capacity}"
        )


def best_fit_decreasing(lengths: np.ndarray, order: np.ndarray, capacity: int, flag: str = "--batch-tokens") -> list[list[int]]:
    """Pack rows into bins of ``capacity`` tokens: longest first, each into the fullest bin it fits.

    Rows of equal length keep their order in ``order`` (the epoch's shuffle), so which rows share
    a bin changes from epoch to epoch while the fill does not.
    """
    order = np.asarray(order)
    _check_fits(lengths, order, capacity, flag)
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    sizes = lengths[by_length].tolist()
    smallest = min(sizes) if sizes else 0
    bins: list[list[int]] = []
    open_bins: list[int] = []  # sorted keys: remaining << 32 | bin id
    for row, size in zip(by_length.tolist(), sizes):
        at = bisect.bisect_left(open_bins, size << _BIN_ID_BITS)
        if at == len(open_bins):
            bin_id, remaining = len(bins), capacity
            bins.append([row])
        else:
            key = open_bins.pop(at)
            bin_id, remaining = key & ((1 << _BIN_ID_BITS) - 1), key >> _BIN_ID_BITS
            bins[bin_id].append(row)
        remaining -= size
        if remaining >= max(smallest, 1):
            bisect.insort(open_bins, (remaining << _BIN_ID_BITS) | bin_id)
    return bins


def plan_packed(
    lengths: np.ndarray,
    order: np.ndarray,
    batch_tokens: int,
    pack_length: int | None = None,
    *,
    rng: np.random.Generator | None,
) -> list[MicroBatch]:
    """Packed micro-batches: bins of ``pack_length`` tokens (default: the whole budget), shuffled,
    then grouped ``batch_tokens // pack_length`` bins per micro-batch."""
    pack_length = pack_length or batch_tokens
    if pack_length > batch_tokens:
        raise PlanError(f"--pack-length {pack_length} is larger than --batch-tokens {batch_tokens}")
    bins = best_fit_decreasing(lengths, order, pack_length, "--pack-length" if pack_length < batch_tokens else "--batch-tokens")
    if rng is not None:
        bins = [bins[i] for i in rng.permutation(len(bins))]
    per_batch = max(1, batch_tokens // pack_length)
    return [bins[i : i + per_batch] for i in range(0, len(bins), per_batch)]


def plan_padded(
    lengths: np.ndarray,
    order: np.ndarray,
    batch_tokens: int,
    *,
    rng: np.random.Generator | None,
    group_batches: int = 64,
) -> list[MicroBatch]:
    """Padded micro-batches of similar lengths: rows * longest row <= ``batch_tokens``.

    The epoch order is cut into windows of about ``group_batches`` batches, each window sorted by
    length and cut greedily, then all batches are shuffled: little padding, still random.
    """
    order = np.asarray(order)
    _check_fits(lengths, order, batch_tokens, "--batch-tokens")
    if not len(order):
        return []
    mean = max(1.0, float(lengths[order].mean()))
    window = max(1, int(group_batches * batch_tokens / mean))
    batches: list[MicroBatch] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        current: list[int] = []
        longest = 0
        for row in chunk.tolist():
            size = int(lengths[row])
            if current and max(longest, size) * (len(current) + 1) > batch_tokens:
                batches.append([[r] for r in current])
                current, longest = [], 0
            current.append(row)
            longest = max(longest, size)
        if current:
            batches.append([[r] for r in current])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def plan_efficiency(lengths: np.ndarray, plan: Sequence[MicroBatch], batch_tokens: int) -> float:
    """Share of the planned token slots that hold real tokens (1.0 = no padding at all)."""
    real = sum(int(lengths[r]) for batch in plan for packed in batch for r in packed)
    return real / (len(plan) * batch_tokens) if plan else 1.0


# --- collate ---------------------------------------------------------------------------------
def collate_packed(
    packed_rows: Sequence[Sequence[dict]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor | bool]:
    """Lay each group of rows end to end in one batch row, right-padded to the longest.

    Returns int32 tensors (cheap to pin and copy; widened on the device): ``input_ids``,
    ``labels`` (-100 on padding), ``attention_mask`` (0 on padding), ``position_ids``
    (restarting at 0 for every sequence, and for the padding tail so it is a sequence of its
    own), and ``packed`` — True when some row holds more than one sequence, in which case the
    attention mask must not be given to the model (it would hide the restarts). When some row
    carries a ``loss_weight`` (a mixture group's), ``loss_weights`` (float32, the weight of each
    label position, 1 elsewhere) comes too; batches without such rows are unchanged. A row's
    ``train_from`` (a mixture's ``train_on: last``) leaves its labels before that position -100.
    """
    widths = [sum(len(r["input_ids"]) for r in group) for group in packed_rows]
    width = max(widths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    size = (len(packed_rows), width)
    input_ids = np.full(size, pad_token_id, dtype=np.int32)
    labels = np.full(size, IGNORE_INDEX, dtype=np.int32)
    attention_mask = np.zeros(size, dtype=np.int32)
    position_ids = np.zeros(size, dtype=np.int32)
    positions = np.arange(width, dtype=np.int32)
    weighted = any("loss_weight" in row for group in packed_rows for row in group)
    loss_weights = np.ones(size, dtype=np.float32) if weighted else None
    for b, group in enumerate(packed_rows):
        cursor = 0
        for row in group:
            n = len(row["input_ids"])
            if len(row["labels"]) != n:
                raise ValueError(f"a row has {len(row['labels'])} labels for {n} input_ids")
            input_ids[b, cursor : cursor + n] = row["input_ids"]
            start = row.get("train_from", 0)
            labels[b, cursor + start : cursor + n] = row["labels"][start:]
            position_ids[b, cursor : cursor + n] = positions[:n]
            if weighted and "loss_weight" in row:
                loss_weights[b, cursor : cursor + n] = row["loss_weight"]
            cursor += n
        attention_mask[b, :cursor] = 1
        position_ids[b, cursor:] = positions[: width - cursor]
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
        "position_ids": torch.from_numpy(position_ids),
        "packed": any(len(group) > 1 for group in packed_rows),
    }
    if loss_weights is not None:
        batch["loss_weights"] = torch.from_numpy(loss_weights)
    return batch


def collate(rows: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor | bool]:
    """Right-pad rows ``{"input_ids", "labels"}`` into a batch: attention_mask 0 and labels -100 on padding."""
    return collate_packed([[row] for row in rows], pad_token_id, pad_to_multiple_of)


class PlannedBatches(torch.utils.data.Dataset):
    """Micro-batch ``k`` of a plan, collated: what a DataLoader's workers produce ahead of the loop."""

    def __init__(self, dataset, plan: Sequence[MicroBatch], pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.dataset = dataset
        self.plan = plan
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor | bool]:
        groups = [[self.dataset[r] for r in packed] for packed in self.plan[k]]
        return collate_packed(groups, self.pad_token_id, self.pad_to_multiple_of)

"""Labels from turns located in the tokens: which turns train, the labels array, the length limit.

``labels`` = ``input_ids`` over every trained turn's tokens (its end token included) and -100
elsewhere; under ``train_on: all`` every token trains except those of the turns not selected.
A row longer than ``max_length`` is ``too_long``, or with ``truncate`` cut at the end of the last
whole trained turn that fits, so no later header is left dangling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline import schema
from pipeline.masking.policies import trained_turns
from pipeline.masking.results import Encoded
from pipeline.stage import Drop

if TYPE_CHECKING:
    from pipeline.masking.masker import _Turn


def selected_turns(turns: list[_Turn], train_flags: Sequence[bool | None], train_on: str, *, per_turn: bool) -> list[_Turn]:
    """The turns ``train_on`` and the data's ``train`` flags select for training, in order."""
    if per_turn:  # a row per turn: only the turn it ends at
        return [t for t in turns[-1:] if train_flags[t.message_index] is not False]
    wanted = trained_turns([t.message_index for t in turns], train_flags, train_on)
    if len(wanted) == len(turns):
        return turns
    return [t for t in turns if t.message_index in set(wanted)]


def build_labels(
    ids: np.ndarray, turns: list[_Turn], train_flags: Sequence[bool | None], train_on: str, *, per_turn: bool
) -> np.ndarray | Drop:
    """The labels of a row whose turns' tokens are known, or ``no_trainable_tokens``."""
    selected = selected_turns(turns, train_flags, train_on, per_turn=per_turn)
    if train_on == "all":
        labels = ids.copy()
        for turn in turns:
            if turn not in selected:
                labels[turn.first_token : turn.last_token + 1] = schema.IGNORE_INDEX
    else:
        labels = np.full_like(ids, schema.IGNORE_INDEX)
        for turn in selected:
            labels[turn.first_token : turn.last_token + 1] = ids[turn.first_token : turn.last_token + 1]
    if not (labels != schema.IGNORE_INDEX).any():
        return Drop(
            "no_trainable_tokens",
            f"no assistant turn is trained (train_on={train_on}, "
            f"{len(turns)} assistant turns, {sum(f is False for f in train_flags)} marked train: false)",
            stage="tokenize",
        )
    return labels


def fit_length(
    ids: np.ndarray, labels: np.ndarray, turns: list[_Turn], *, max_length: int, truncate: bool, train_on: str
) -> Encoded | Drop:
    """The row as training tokens within ``max_length``, or ``too_long`` / ``no_trainable_tokens``."""
    length = len(ids)
    if length <= max_length:
        return Encoded(ids.astype(np.int32, copy=False), labels.astype(np.int32, copy=False))
    first_trained = int(np.flatnonzero(labels != schema.IGNORE_INDEX)[0])
    if first_trained >= max_length:
        return Drop(
            "too_long",
            f"the prompt before the first trained token is {first_trained} tokens, max_length is {max_length}",
            stage="tokenize",
        )
    if not truncate:
        return Drop("too_long", f"{length} tokens, max_length is {max_length}", stage="tokenize")
    # Cut after the last whole trained turn that fits; if none fits, cut inside the first one:
    # its end token is then not trained. Under ``train_on: all`` every token counts: cut at the limit.
    turn_ends = [t.last_token + 1 for t in turns if t.last_token + 1 <= max_length and labels[t.last_token] != schema.IGNORE_INDEX]
    cut = max(turn_ends) if turn_ends and train_on != "all" else max_length
    ids, labels = ids[:cut], labels[:cut]
    if not (labels != schema.IGNORE_INDEX).any():
        return Drop("no_trainable_tokens", f"nothing trainable left after truncating to {cut} tokens", stage="tokenize")
    return Encoded(ids.astype(np.int32), labels.astype(np.int32), truncated=True, truncated_tokens=length - cut)

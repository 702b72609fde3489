"""What a row trains, read back from its labels, for tests that check masks."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import schema


def trained_runs(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> list[str]:
    """The decoded text of every run of consecutive trained tokens (label not -100), in order."""
    runs, current = [], []
    for token, label in zip(list(input_ids), list(labels)):
        if label != schema.IGNORE_INDEX:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]

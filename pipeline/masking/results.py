"""What masking a conversation gives: training tokens (a row that cannot be kept is a
:class:`pipeline.stage.Drop` instead, with the stage that files it: ``template`` or ``tokenize``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import schema


@dataclass
class Encoded:
    """One conversation as training tokens: ``labels`` = ``input_ids`` where trained, -100 elsewhere."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    truncated: bool = False
    truncated_tokens: int = 0  # tokens cut off the end by truncation
    # The tokens before the last trained turn differ from what the generation prompt of the
    # messages before it tokenizes to: training shows the model something inference never will.
    render_mismatch: bool = False
    # Trained turns that end with no end-of-turn token of the template's (it writes none, and no
    # stop is known for it): the model learns no stop from them.
    turns_without_stop: int = 0

    @property
    def num_trainable(self) -> int:
        return int(np.count_nonzero(self.labels != schema.IGNORE_INDEX))

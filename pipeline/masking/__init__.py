"""Token-exact loss masks: a conversation -> ``input_ids`` and ``labels``, for any template and tokenizer.

* ``input_ids`` are what ``apply_chat_template(..., tokenize=True)`` gives for the whole conversation;
  text in the data that spells a control token stays text (:mod:`.control`).
* ``labels`` = ``input_ids`` on each trained assistant turn, as the model writes it after the prompt
  it sees at inference, end-of-turn marker included; -100 elsewhere (:mod:`.locate`, :mod:`.labels`).
* Every trained span is decoded and checked against its turn (:mod:`.verify`): a row that fails is a
  :class:`pipeline.stage.Drop` (``mask_unverifiable``), never a row with a wrong mask.
* A row over ``max_length`` is ``too_long``, or with ``truncate`` cut after a whole trained turn.
* A row whose tokens before its last trained turn differ from its generation prompt's is flagged
  ``render_mismatch``. Which turns train, reasoning and roles: :mod:`.policies`.

:class:`Masker` (:mod:`.masker`) runs the three phases: render, tokenize, finish.
"""

from pipeline.masking.control import _PlainControlEncoder, control_tokens
from pipeline.masking.masker import SPAN_METHODS, Masker, RenderedBatch
from pipeline.masking.policies import REASONING_POLICIES, SYSTEM_POLICIES, TRAIN_ON, trained_turns
from pipeline.masking.results import Encoded

__all__ = [
    "Encoded",
    "Masker",
    "REASONING_POLICIES",
    "RenderedBatch",
    "SPAN_METHODS",
    "SYSTEM_POLICIES",
    "TRAIN_ON",
    "control_tokens",
    "trained_turns",
    "_PlainControlEncoder",
]

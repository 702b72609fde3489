"""Token-exact loss masks: rendered conversation -> ``input_ids`` and ``labels``.

What the package guarantees, for any chat template and any tokenizer:

* ``input_ids`` are one tokenization of the whole rendered text, what
  ``apply_chat_template(..., tokenize=True)`` gives (one BOS; prompt and response never apart).
* Control-token text in the data stays text (:mod:`.control`).
* Each assistant turn's span comes from the template's ``{% generation %}`` blocks, or is
  located in the rendering without them (:mod:`.locate`); it is what the model writes after the
  prompt it sees at inference, end-of-turn marker included.
* Every trained span is decoded and checked (:mod:`.verify`); a row that fails is rejected as
  ``mask_unverifiable``, never written with a wrong mask.
* The tokens before the last trained turn are compared with the generation prompt's
  (``render_mismatch``); policies for turns, reasoning and roles are in :mod:`.policies`.

Modules: :mod:`.masker` (the three phases), :mod:`.locate`, :mod:`.control`,
:mod:`.byte_table` (token boundaries for byte-level BPE), :mod:`.policies`, :mod:`.verify`,
:mod:`.results`. Length: rows over ``max_length`` are ``too_long`` or, with ``truncate``, cut at
the end of the last whole assistant turn that fits.
"""

from pipeline.masking.control import _PlainControlEncoder, control_tokens
from pipeline.masking.masker import SPAN_METHODS, Masker, RenderedBatch
from pipeline.masking.policies import REASONING_POLICIES, SYSTEM_POLICIES, TRAIN_ON, trained_turns
from pipeline.masking.results import Encoded, Rejection

__all__ = [
    "Encoded",
    "Masker",
    "REASONING_POLICIES",
    "Rejection",
    "RenderedBatch",
    "SPAN_METHODS",
    "SYSTEM_POLICIES",
    "TRAIN_ON",
    "control_tokens",
    "trained_turns",
    "_PlainControlEncoder",
]

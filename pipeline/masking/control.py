"""Control-token text in the data stays text: placeholders for the template's control tokens.

A literal ``<|im_end|>`` or ``</s>`` inside a message must be encoded as plain characters, never
as the control token; only the control tokens the template writes are control tokens. Rows
without such text are encoded by a private copy of the tokenizer as they are (identical to
``apply_chat_template``); rows with it by a copy in which the template's control tokens are
renamed to private-use placeholders of the same length, so the split points, offsets and the
tokenization of every stretch between them stay those of the original tokenizer (the result of
``apply_chat_template(..., sanitize_control_tokens=True)``, with offsets for the mask).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# Private-use characters for placeholders. The lead character of a placeholder names which
# control token it stands for; the filler pads it to the same length, so offsets never shift.
_CONTENT_LEAD, _CONTENT_FILL = 0xF0000, "\U000fff00"  # control text found in the data
_TEMPLATE_LEAD, _TEMPLATE_FILL = 0x100000, "\U0010ff00"  # control tokens written by the template
_PLACEHOLDER_CHARS = re.compile("[\U000f0000-\U0010ffff]")


def control_tokens(tokenizer, template_source: str) -> tuple[str, ...]:
    """Token texts that must not be taken as control tokens when they appear in the data.

    Same rule as transformers' ``sanitize_control_tokens``: every special added token, and every
    other added token that the template itself writes (whitespace tokens excepted).
    """
    found = []
    for token in tokenizer.added_tokens_decoder.values():
        content = token.content
        if not content or content.isspace():
            continue
        if token.special or content in template_source:
            found.append(content)
    return tuple(sorted(set(found), key=lambda t: (-len(t), t)))


class _PlainControlEncoder:
    """A copy of the tokenizer whose control tokens are matched only as placeholders.

    The template's control tokens are replaced in the text by same-length placeholders that this
    copy knows as added tokens with the original ids; the control-token text that came from the
    data is left as it is and, no longer being an added token, is encoded as plain text.
    """

    def __init__(self, backend, controls: Sequence[str]):
        from tokenizers import AddedToken, Tokenizer

        data = json.loads(backend.to_str())
        originals = {entry["content"]: entry for entry in data.get("added_tokens", [])}
        data["added_tokens"] = [entry for entry in data.get("added_tokens", []) if entry["content"] not in controls]
        self.tokenizer = Tokenizer.from_str(json.dumps(data))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.template_placeholders: dict[str, str] = {}
        self.content_placeholders: dict[str, str] = {}
        new_tokens = []
        for index, control in enumerate(controls):
            template_ph = chr(_TEMPLATE_LEAD + index) + _TEMPLATE_FILL * (len(control) - 1)
            self.template_placeholders[control] = template_ph
            self.content_placeholders[control] = chr(_CONTENT_LEAD + index) + _CONTENT_FILL * (len(control) - 1)
            entry = originals.get(control, {})
            new_tokens.append(
                AddedToken(
                    template_ph,
                    single_word=entry.get("single_word", False),
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    normalized=False,
                    special=False,
                )
            )
        self.tokenizer.add_tokens(new_tokens)
        self.base = min(self.tokenizer.token_to_id(t.content) for t in new_tokens)
        lookup = np.zeros(len(new_tokens), dtype=np.int32)
        for control, placeholder in self.template_placeholders.items():
            lookup[self.tokenizer.token_to_id(placeholder) - self.base] = backend.token_to_id(control)
        self.lookup = lookup
        self._to_text = {ph: control for control, ph in self.content_placeholders.items()}
        self._content_re = re.compile("|".join(re.escape(p) for p in self.content_placeholders.values()))
        self._template_re = re.compile("|".join(re.escape(c) for c in controls))

    def hide(self, text: str, control_re: re.Pattern) -> str:
        """Data text -> the same text with its control-token strings as content placeholders."""
        return control_re.sub(lambda m: self.content_placeholders[m.group(0)], text)

    def texts(self, rendered: str) -> tuple[str, str]:
        """A render of hidden data -> (the true rendered text, the text this encoder tokenizes)."""
        true_text = self._content_re.sub(lambda m: self._to_text[m.group(0)], rendered)
        marked = self._template_re.sub(lambda m: self.template_placeholders[m.group(0)], rendered)
        marked = self._content_re.sub(lambda m: self._to_text[m.group(0)], marked)
        return true_text, marked

    def encode_batch(self, marked_texts: list[str], *, offsets: bool = True):
        encode = self.tokenizer.encode_batch if offsets else self.tokenizer.encode_batch_fast
        encodings = encode(marked_texts, add_special_tokens=False)
        ids = []
        for encoding in encodings:
            array = np.asarray(encoding.ids, dtype=np.int32)
            placeholder = array >= self.base
            array[placeholder] = self.lookup[array[placeholder] - self.base]
            ids.append(array)
        return encodings, ids


def _private_copy(backend):
    """The Rust tokenizer with this Masker's own settings.

    transformers leaves state on the shared backend (``split_special_tokens=True`` sets
    ``encode_special_tokens`` until the next call; padding and truncation may be switched on), and
    such state would silently change ids; a copy encodes exactly the vocabulary, nothing else.
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = False
    return copy


def _row_strings(messages: list[dict[str, Any]], tools: str | None):
    for m in messages:
        yield m["content"]
        if m.get("name"):
            yield m["name"]
        if m.get("tool_calls"):
            yield m["tool_calls"]
        if m.get("reasoning"):
            yield m["reasoning"]
    if tools:
        yield tools

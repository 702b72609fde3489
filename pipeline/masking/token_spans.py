"""Each located turn's first and last token: from character offsets, or from byte boundaries.

A turn is located as characters of the rendered text (:mod:`.locate`, or the template's
``{% generation %}`` blocks); here it becomes a range of tokens, through the character offsets
the tokenizer reports (the offset-mapping path) or through the tokens' byte boundaries (the
byte-table path, :mod:`.byte_table`). A token that merges template text with the turn (``"]["``
across ``"[/INST][TOOL_CALLS]"``) would train prompt characters: only whitespace may lie between
a turn's characters and the edges of its tokens, or the row is ``mask_unverifiable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.stage import Drop

if TYPE_CHECKING:
    from pipeline.masking.masker import _Turn


def tokens_from_offsets(turns: list[_Turn], encoding: Any, text: str) -> Drop | None:
    """Set each turn's first and last token from ``encoding``'s character offsets into ``text``."""
    for turn in turns:
        first = _token_at_or_after(encoding, turn.char_start, turn.char_end)
        last = _token_at_or_before(encoding, turn.char_end - 1, turn.char_start)
        if first is None or last is None or last < first:
            return no_tokens(turn)
        # token_to_chars, not offsets[i]: the offsets property builds the whole row's list per call.
        token_start, token_end = encoding.token_to_chars(first)[0], encoding.token_to_chars(last)[1]
        if text[token_start : turn.char_start].strip() or text[turn.char_end : token_end].strip():
            return straddles(turn, text[min(token_start, turn.char_start) : turn.char_start + 8])
        turn.first_token, turn.last_token = first, last
    return None


def tokens_from_bytes(turns: list[_Turn], text: str, raw: bytes, bounds: np.ndarray, base: int) -> Drop | None:
    """Set each turn's first and last token from the tokens' byte boundaries in ``raw`` (``text``
    as UTF-8): token ``i`` spans bytes ``bounds[i] - base`` to ``bounds[i + 1] - base``."""
    ascii_text = len(raw) == len(text)
    for turn in turns:
        start = turn.char_start if ascii_text else len(text[: turn.char_start].encode("utf-8"))
        end = turn.char_end if ascii_text else start + len(text[turn.char_start : turn.char_end].encode("utf-8"))
        if end <= start:
            return no_tokens(turn)
        first = int(bounds.searchsorted(start + base, "right")) - 1  # the token holding byte `start`
        last = int(bounds.searchsorted(end + base, "left")) - 1  # the token holding byte `end - 1`
        token_start, token_end = int(bounds[first]) - base, int(bounds[last + 1]) - base
        if (token_start != start or token_end != end) and (
            raw[token_start:start].decode("utf-8", "replace").strip() or raw[end:token_end].decode("utf-8", "replace").strip()
        ):
            return straddles(turn, raw[token_start : start + 8].decode("utf-8", "replace"))
        turn.first_token, turn.last_token = first, last
    return None


def token_start_from_bytes(raw: bytes, text: str, bounds: np.ndarray, base: int) -> Callable[[int], int]:
    """A function giving a token's first character in ``text``, from the byte boundaries."""
    ascii_text = len(raw) == len(text)  # then a byte offset is a character offset

    def token_start(token: int) -> int:
        byte = int(bounds[token]) - base
        return byte if ascii_text else len(raw[:byte].decode("utf-8", "replace"))

    return token_start


def no_tokens(turn: _Turn) -> Drop:
    return Drop(
        "mask_unverifiable",
        f"assistant turn {turn.message_index} covers no tokens of the rendered text",
        stage="tokenize",
    )


def straddles(turn: _Turn, around: str) -> Drop:
    return Drop(
        "mask_unverifiable",
        f"assistant turn {turn.message_index}: a token straddles the turn's boundary ({around!r}), so the "
        "response cannot be trained without training template text",
        stage="tokenize",
    )


def _token_at_or_after(encoding, char: int, limit: int) -> int | None:
    while char < limit:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
        char += 1
    return None


def _token_at_or_before(encoding, char: int, limit: int) -> int | None:
    while char >= limit:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
        char -= 1
    return None

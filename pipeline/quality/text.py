"""Text measures the quality filters share: word tokens and character classes.

Which scripts are written without spaces and what a combining mark is are
:mod:`pipeline.text`'s (the definition dedup uses too); this module turns them into the
filters' measures. A token is a lowercase word, or one character of a script written without
spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar, Tibetan), so n-grams are character
n-grams there and word n-grams elsewhere, Korean included. Hand-written because the measures
are a few regular expressions over ``str``; no tokenizer library gives the language-neutral
split we want.
"""

from __future__ import annotations

import functools
import re

from pipeline.text import (
    ASTRAL,
    UNSPACED_CHAR,
    UNSPACED_RANGES,
    count_marks,
    mark_ranges,
)

# ASCII text has neither characters of unspaced scripts nor combining marks.
_ASCII_WORD = re.compile(r"[^\W_]+")


@functools.cache
def _token_pattern(astral: bool) -> re.Pattern[str]:
    # One letter, digit or mark of an unspaced script (not its punctuation: Thai ๚, Khmer ។),
    # or a run of letters, digits and combining marks outside those scripts. The marks of
    # astral scripts are in the pattern only for text that has astral code points.
    bmp_marks, astral_marks = mark_ranges()
    marks = bmp_marks + astral_marks if astral else bmp_marks
    unspaced = f"(?=[\\w{marks}])[{UNSPACED_RANGES}]"
    return re.compile(f"{unspaced}|(?:[^\\W_{UNSPACED_RANGES}]|[{marks}])+")


def tokens(text: str) -> list[str]:
    """Lowercase words; each character of a script written without spaces is a token of its own."""
    text = text.lower()
    if text.isascii():
        return _ASCII_WORD.findall(text)
    return _token_pattern(bool(ASTRAL.search(text))).findall(text)


def join_tokens(words: list[str]) -> str:
    """Tokens back to readable text: spaces between words, none around unspaced-script characters."""
    out = []
    for i, word in enumerate(words):
        if i and not (UNSPACED_CHAR.match(word) or UNSPACED_CHAR.match(words[i - 1])):
            out.append(" ")
        out.append(word)
    return "".join(out)


_LETTER = re.compile(r"[^\W\d_]")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s")
# C0/C1 control characters other than tab, newline and carriage return (which are ordinary text).
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def char_classes(text: str) -> tuple[int, int, int, int]:
    """(non-space chars, letters, digits, control chars) of ``text``.

    Letters include every script's, and the combining marks that sit on them (a Myanmar or
    Devanagari word is a third marks). Counted with C-speed regular expressions; everything
    else non-space is a symbol.
    """
    control = len(CONTROL.findall(text))
    # \s counts some control characters (\x1c-\x1f) as space; count them as control only.
    spaces = len(_SPACE.findall(text)) - len(re.findall("[\x0b\x0c\x1c-\x1f\x85]", text))
    letters = len(_LETTER.findall(text)) + count_marks(text)
    return len(text) - spaces, letters, len(_DIGIT.findall(text)), control

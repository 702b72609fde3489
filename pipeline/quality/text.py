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

import numpy as np

from pipeline.text import (
    ASTRAL,
    UNSPACED_CHAR,
    UNSPACED_RANGES,
    count_marks,
    mark_ranges,
)

# A run of letters and digits: a token of text that has neither characters of unspaced scripts nor
# combining marks (all ASCII text, most Latin, Cyrillic, Greek text).
_WORD = re.compile(r"[^\W_]+")
# Byte table lowercasing the ASCII bytes _WORD matches and turning every other byte into a space.
_ASCII_LOWER_WORD_BYTES = b"".join(chr(code).lower().encode() if _WORD.match(chr(code)) else b" " for code in range(128)) + b" " * 128


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
    if not text.isascii():
        text = text.lower()
    if text.isascii():
        # The runs of _WORD, lowercased by bytes.translate and split in C: twice as fast as findall.
        return text.encode("ascii").translate(_ASCII_LOWER_WORD_BYTES).decode("ascii").split()
    if _has_marks(text):
        return _token_pattern(bool(ASTRAL.search(text))).findall(text)
    # Without combining marks the full pattern finds what simpler means find:
    if not _NON_ASCII_WORD_CHAR.search(text):  # every non-ASCII character separates words
        return text.encode("ascii", "replace").translate(_ASCII_LOWER_WORD_BYTES).decode("ascii").split()
    if not UNSPACED_CHAR.search(text):
        return _WORD.findall(text)
    return _token_pattern(bool(ASTRAL.search(text))).findall(text)


_NON_ASCII_WORD_CHAR = re.compile(r"[^\W\x00-\x7f]")


@functools.cache
def _mark_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    bmp_marks, astral_marks = mark_ranges()
    return re.compile(f"[{bmp_marks}]"), re.compile(f"[{astral_marks}]")


def _has_marks(text: str) -> bool:
    bmp, astral = _mark_patterns()
    return bmp.search(text) is not None or (ASTRAL.search(text) is not None and astral.search(text) is not None)


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
# \s counts some control characters (\x1c-\x1f) as space; they count as control only.
_CONTROL_SPACE = re.compile("[\x0b\x0c\x1c-\x1f\x85]")

# The classes char_classes counts; a combining mark counts as a letter.
_SYMBOL, _LETTER_CLASS, _DIGIT_CLASS, _SPACE_CLASS, _CONTROL_CLASS, _MARK_CLASS = range(6)


def _classify(chars: str, marks: re.Pattern[str]) -> np.ndarray:
    """The class of each character of ``chars``, found with the patterns above (one source of truth)."""
    classes = np.full(len(chars), _SYMBOL, np.uint8)
    assigned = np.zeros(len(chars), bool)
    for cls, pattern in (
        (_LETTER_CLASS, _LETTER),
        (_DIGIT_CLASS, _DIGIT),
        (_SPACE_CLASS, _SPACE),
        (_CONTROL_CLASS, CONTROL),
        (_MARK_CLASS, marks),
    ):
        where = np.array([match.start() for match in pattern.finditer(chars)], np.int64)
        if cls == _SPACE_CLASS:  # minus the control characters \s also matches
            where = where[[not _CONTROL_SPACE.match(chars[i]) for i in where]]
        assert not assigned[where].any(), "character classes overlap"
        classes[where], assigned[where] = cls, True
    return classes


# ASCII bytes to their classes, for bytes.translate; ASCII text has no marks.
_ASCII_CLASSES = bytes(_classify("".join(map(chr, range(128))), re.compile("(?!)"))) + bytes(128)


@functools.cache
def _bmp_classes() -> np.ndarray:
    """The class of every code point of the Basic Multilingual Plane (built on first use)."""
    return _classify("".join(map(chr, range(0x10000))), re.compile(f"[{mark_ranges()[0]}]"))


def char_classes(text: str) -> tuple[int, int, int, int]:
    """(non-space chars, letters, digits, control chars) of ``text``.

    Letters include every script's, and the combining marks that sit on them (a Myanmar or
    Devanagari word is a third marks). Everything else non-space is a symbol. Each character's
    class is looked up in a table: ASCII text with ``bytes.translate``, other text of the Basic
    Multilingual Plane with numpy; text with code points beyond it is matched with the patterns.
    """
    if text.isascii():
        classes = text.encode("ascii").translate(_ASCII_CLASSES)
        non_space = len(text) - classes.count(_SPACE_CLASS)
        return non_space, classes.count(_LETTER_CLASS), classes.count(_DIGIT_CLASS), classes.count(_CONTROL_CLASS)
    if not ASTRAL.search(text):
        code_points = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), np.uint16)
        counts = np.bincount(_bmp_classes()[code_points], minlength=6).tolist()
        letters = counts[_LETTER_CLASS] + counts[_MARK_CLASS]
        return len(text) - counts[_SPACE_CLASS], letters, counts[_DIGIT_CLASS], counts[_CONTROL_CLASS]
    control = len(CONTROL.findall(text))
    spaces = len(_SPACE.findall(text)) - len(_CONTROL_SPACE.findall(text))
    letters = len(_LETTER.findall(text)) + count_marks(text)
    return len(text) - spaces, letters, len(_DIGIT.findall(text)), control

"""Text measures the quality filters share: word/CJK tokens and character classes.

Chinese and Japanese have no spaces between words, so every CJK character counts as one token
(char n-grams for CJK, word n-grams elsewhere). Hand-written because the measures are a few
regular expressions over ``str``; no tokenizer library gives the language-neutral split we want.
"""

from __future__ import annotations

import re

# CJK unified ideographs (+ extension A, compatibility) and Japanese kana.
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
# One CJK character, or a run of letters/digits that are not CJK.
_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")


def tokens(text: str) -> list[str]:
    """Lowercase words; each CJK character is a token of its own."""
    return _TOKEN.findall(text.lower())


_CJK_START = re.compile(f"[{CJK_RANGES}]")


def join_tokens(words: list[str]) -> str:
    """Tokens back to readable text: spaces between words, none around CJK characters."""
    out = []
    for i, word in enumerate(words):
        if i and not (_CJK_START.match(word) or _CJK_START.match(words[i - 1])):
            out.append(" ")
        out.append(word)
    return "".join(out)


_LETTER = re.compile(r"[^\W\d_]")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s")
# C0/C1 control characters other than tab, newline and carriage return (which are ordinary text).
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def char_classes(text: str) -> tuple[int, int, int, int]:
    """(non-space chars, letters incl. CJK, digits, control chars) of ``text``.

    Counted with C-speed regular expressions; everything else non-space is a symbol.
    """
    control = len(CONTROL.findall(text))
    # \s counts some control characters (\x1c-\x1f) as space; count them as control only.
    spaces = len(_SPACE.findall(text)) - len(re.findall("[\x0b\x0c\x1c-\x1f\x85]", text))
    return len(text) - spaces, len(_LETTER.findall(text)), len(_DIGIT.findall(text)), control

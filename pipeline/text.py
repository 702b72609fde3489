"""What a word is in every script: the one definition the quality filters and dedup share.

Owns two facts about Unicode text; :mod:`pipeline.quality.text` and
:mod:`pipeline.dedup.normalize` build their measures on them, and nothing else spells them.

**Scripts written without spaces between words** (:data:`UNSPACED_RANGES`): Chinese (Han
ideographs, radicals, strokes, Bopomofo and the ideographic marks 々 〆 〇), Japanese kana
(full- and half-width), Thai, Lao, Khmer, Myanmar and Tibetan. Splitting such text at spaces
gives whole phrases or sentences, so every character of these scripts is a token of its own.
Korean is *not* among them: Hangul is written with spaces between words, like English, so
Korean text is split into words like every other spaced script. (Scripts still rarer in
instruction data that also go without spaces, such as Tai Tham or Javanese, are left out.)

A character is one code point: Thai vowel signs and tone marks are tokens of their own
(สวัสดี is six tokens). A consistent split is all n-gram matching needs, and grapheme
clusters would need a library for no gain in what is found.

What each consumer does with it:

* quality: the repetition statistics and the decontamination n-grams count every such
  character as one token, and words elsewhere, Korean words included.
* dedup: the normal form makes every such character one token, and a text made mostly of
  them is shingled by character n-grams (``dedup.char_ngram``). Its ranges
  (:data:`CHARACTER_SHINGLED_RANGES`) are frozen as they were before this module, and they cut
  **Hangul** into characters too, the one deliberate difference: a Korean
  word carries its particles and endings (학교에서, 학교로), so word n-grams miss copies that
  differ in one particle, while syllable n-grams find them; and the persisted dedup index
  holds hashes of this normal form, so changing it would silently stop old datasets from
  matching new copies of what they kept.

**Combining marks** (Unicode category M: Thai and Devanagari vowel signs, Myanmar medials,
accents typed as separate code points) belong to the letter they sit on. Python's ``\\w``
does not match them, so the quality measures add them back: they count as letters, and a
word of a spaced script is not cut at them (भारत is one word, not भ + रत).
"""

from __future__ import annotations

import functools
import re
import unicodedata

UNSPACED_RANGES = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u19e0-\u19ff"  # Khmer symbols
    "\u2e80-\u2fdf"  # CJK and Kangxi radicals
    "\u3005-\u3007"  # ideographic iteration mark, closing mark, number zero
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3100-\u312f"  # Bopomofo
    "\u3190-\u31ff"  # Kanbun, Bopomofo extended, CJK strokes, Katakana extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua9e0-\ua9ff"  # Myanmar extended B
    "\uaa60-\uaa7f"  # Myanmar extended A
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
    "\U00020000-\U000323af"  # CJK extensions B-H
)
"""Code point ranges of the scripts written without spaces, as the body of a regex class."""

# Dedup's normal form hashes these ranges character by character. They are the ranges dedup used
# before this module existed, frozen: the persisted dedup index holds hashes of that normal form,
# so a range added here would silently stop old datasets from matching new copies of what they
# kept. They are the unspaced scripts above less a few rare blocks (々〆〇, Khmer symbols, Myanmar
# extended, CJK extension H), plus Hangul.
CHARACTER_SHINGLED_RANGES = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1100-\u11ff"  # Hangul Jamo
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3100-\u31ff"  # Bopomofo, Hangul compatibility Jamo, Katakana extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f"  # Hangul Jamo extended A
    "\uac00-\ud7ff"  # Hangul syllables, Jamo extended B
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
"""What dedup's normal form cuts into one token per character (frozen; see above)."""

UNSPACED_CHAR = re.compile(f"[{UNSPACED_RANGES}]")
ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@functools.cache
def mark_ranges() -> tuple[str, str]:
    """Every combining mark (Unicode category M) as regex class bodies: (within the BMP, beyond).

    Built once from the Unicode database (Python's re has no \\p{M}). Split because sre
    matches a class within the Basic Multilingual Plane with a bitmap, but one reaching
    beyond it with a scan of ranges; callers use the second only for text that has such
    code points. Planes 3-13 and 15-16 hold no marks; plane 14 holds variation selectors.
    """
    bmp: list[str] = []
    astral: list[str] = []
    for plane_range in (range(0x30000), range(0xE0000, 0xF0000)):
        start = previous = None
        for cp in plane_range:
            if not unicodedata.category(chr(cp)).startswith("M"):
                continue
            if previous is not None and cp == previous + 1 and (cp > 0xFFFF) == (start > 0xFFFF):
                previous = cp
                continue
            if start is not None:
                (bmp if start <= 0xFFFF else astral).append(_class_range(start, previous))
            start = previous = cp
        if start is not None:
            (bmp if start <= 0xFFFF else astral).append(_class_range(start, previous))
    return "".join(bmp), "".join(astral)


def _class_range(first: int, last: int) -> str:
    return re.escape(chr(first)) if first == last else f"{re.escape(chr(first))}-{re.escape(chr(last))}"


@functools.cache
def _mark_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    bmp, astral = mark_ranges()
    return re.compile(f"[{bmp}]"), re.compile(f"[{astral}]")


def count_marks(text: str) -> int:
    """How many combining marks ``text`` holds."""
    if text.isascii():
        return 0
    bmp, astral = _mark_patterns()
    count = len(bmp.findall(text))
    if ASTRAL.search(text):
        count += len(astral.findall(text))
    return count

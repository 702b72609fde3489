"""Text normalisation and dedup keys: what "the same text" means for dedup.

Owns the one normal form both exact and near dedup hash: Unicode NFKC, case-folded,
punctuation (every Unicode ``P*`` category) turned into spaces, each character of a script
written without spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar, Tibetan) and of
Hangul made a token of its own (:data:`pipeline.text.CHARACTER_SHINGLED_RANGES` says why
Korean too), whitespace collapsed to single spaces. The result is a space-separated token string, so
formatting-only variants ("Hello,  WORLD!" / "hello world") share one form, and the shingler
can cut n-grams without knowing the script.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.text import ASTRAL, CHARACTER_SHINGLED_RANGES

_CHARACTER_RUN = re.compile(f"[{CHARACTER_SHINGLED_RANGES}]+")


@functools.cache
def _punctuation() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Character classes of every Unicode ``P*`` code point: (Basic Multilingual Plane, beyond).

    Python's re has no \\p{P}; the classes are built once from the Unicode database. They are
    split because sre matches a class within the BMP with a bitmap, but one reaching beyond it
    with a linear scan of ranges (16x slower on ordinary text).
    """
    bmp, astral = [], []
    # Planes 3-16 hold no punctuation (CJK extension G/H, tags, private use); skipping them
    # makes this 5x faster.
    for cp in range(0x30000):
        if unicodedata.category(chr(cp)).startswith("P"):
            (bmp if cp <= 0xFFFF else astral).append(re.escape(chr(cp)))
    return re.compile("[" + "".join(bmp) + "]"), re.compile("[" + "".join(astral) + "]")


# ASCII bytes to their normal form's: punctuation and whitespace (what str.split splits on, the
# separators \x1c-\x1f included) to a space, upper case to lower case (casefold, for ASCII).
_ASCII_TO_FORM = bytes(
    ord(" ") if unicodedata.category(chr(code)).startswith("P") or chr(code).isspace() else ord(chr(code).lower()) for code in range(128)
) + bytes(range(128, 256))


def _ascii_form(text: str) -> bytes:
    """The normal form of an ASCII ``text``, as bytes: NFKC leaves ASCII as it is and casefold is
    lower(), so one byte table and one split give the form :func:`normalize` defines, three times
    faster, without decoding the text or lowering it as a string."""
    return b" ".join(text.encode("ascii").translate(_ASCII_TO_FORM).split())


def normalize(text: str) -> tuple[str, int]:
    """The normal form of ``text`` and how many of its tokens are single characters (unspaced
    scripts and Hangul).

    >>> normalize("Hello,  WORLD!")[0]
    'hello world'
    >>> normalize("你好，世界")
    ('你 好 世 界', 4)
    >>> normalize("안녕, 세계!")
    ('안 녕 세 계', 4)
    """
    if text.isascii():
        return _ascii_form(text).decode("ascii"), 0
    text = unicodedata.normalize("NFKC", text).casefold()
    bmp_punctuation, astral_punctuation = _punctuation()
    text = bmp_punctuation.sub(" ", text)
    if text.isascii():  # the common case skips the scans for unspaced scripts and astral code points
        return " ".join(text.split()), 0
    if ASTRAL.search(text):
        text = astral_punctuation.sub(" ", text)
    num_unspaced = 0

    def spaced(match: re.Match[str]) -> str:
        nonlocal num_unspaced
        run = match.group()
        num_unspaced += len(run)
        return " " + " ".join(run) + " "

    text = _CHARACTER_RUN.sub(spaced, text)
    return " ".join(text.split()), num_unspaced


def key_texts(table: pa.Table, key: str) -> list[str]:
    """The text each canonical row is deduplicated on.

    ``conversation``: every message's content, in order, one per line. ``prompt``: only the
    non-assistant turns (system, user, tool), so rows asking the same thing collide whatever
    their answers.
    """
    if key not in ("conversation", "prompt"):
        raise ValueError(f"unknown dedup key {key!r}; expected 'conversation' or 'prompt'")
    messages = table.column(schema.MESSAGES).combine_chunks()
    offsets = messages.offsets.to_numpy()
    flat = messages.flatten()
    contents = flat.field("content").to_pylist()
    if key == "prompt":
        keep = pc.not_equal(flat.field("role"), "assistant").to_numpy(zero_copy_only=False)
        contents = [c if k else None for c, k in zip(contents, keep)]
    out = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        out.append("\n".join(c for c in contents[start:end] if c is not None))
    return out


def response_chars(table: pa.Table) -> np.ndarray:
    """Characters of assistant content per row: the "longest response" of the keep policy."""
    messages = table.column(schema.MESSAGES).combine_chunks()
    offsets = messages.offsets.to_numpy()
    flat = messages.flatten()
    lengths = pc.utf8_length(flat.field("content")).to_numpy(zero_copy_only=False).astype(np.int64)
    is_assistant = pc.equal(flat.field("role"), "assistant").to_numpy(zero_copy_only=False)
    per_message = np.where(is_assistant, lengths, 0)
    cumulative = np.concatenate([[0], np.cumsum(per_message)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def normalize_all(texts: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """:func:`normalize` over many texts: normal forms and unspaced-script token counts."""
    forms, unspaced = normalize_all_utf8(texts)
    return [form.decode("utf-8") for form in forms], unspaced


def normalize_all_utf8(texts: Iterable[str]) -> tuple[list[bytes], np.ndarray]:
    """:func:`normalize` over many texts, the forms as UTF-8 (what the hashes are taken of), and
    the unspaced-script token counts. An ASCII text's form is made as bytes and never decoded
    (signing 50k conversations spent a quarter of its time normalising)."""
    forms: list[bytes] = []
    unspaced: list[int] = []
    for text in texts:
        if text.isascii():
            forms.append(_ascii_form(text))
            unspaced.append(0)
        else:
            form, num_unspaced = normalize(text)
            forms.append(form.encode("utf-8"))
            unspaced.append(num_unspaced)
    return forms, np.asarray(unspaced, dtype=np.int64)


def row_dicts(table: pa.Table, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Canonical rows as plain dicts (what a quality predicate receives), by row index."""
    rows = sorted(set(int(r) for r in rows))
    if not rows:
        return {}
    picked = table.take(pa.array(rows, pa.int64())).to_pylist()
    return dict(zip(rows, picked))

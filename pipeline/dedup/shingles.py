"""Shingling and shingle hashing for every script, vectorised over a whole batch.

Owns what a *shingle* is and its 32-bit hash (the value MinHash permutes). Input is the normal
form of :mod:`pipeline.dedup.normalize`: tokens separated by single spaces, where a CJK /
Japanese / Korean / Thai character is a token of its own. A document uses character n-grams
(``char_ngram``) when more than half its tokens are such characters, word n-grams
(``word_ngram``) otherwise, so mixed-script text falls to its dominant script while the other
script's words still take part as tokens. A document with fewer tokens than n gets one
shingle: all of its tokens. An empty document has no shingles.

A shingle is the byte string "tok_1 tok_2 ... tok_n". Its hash is computed without a Python
call per shingle: the batch is one UTF-8 buffer, a prefix sum of ``byte_i * P**i`` (mod 2**64)
gives every substring's polynomial hash in O(1) numpy work, and a splitmix64 finaliser mixes
it; the top 32 bits are the shingle hash. :func:`hash32` is the same function on one byte
string (the reference the tests and the benchmark compare against).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_P = np.uint64(0x9E3779B97F4A7C15 | 1)  # odd, so it has an inverse mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_LEN_MIX = np.uint64(0xD6E8FEB86659FD93)
_MASK64 = (1 << 64) - 1

_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _ensure_powers(length: int) -> None:
    """Grow the cached tables of P**i and P**-i (mod 2**64) to at least ``length`` entries."""
    global _powers, _inverse_powers
    if len(_powers) >= length:
        return
    size = max(length, 2 * len(_powers))
    _powers = _power_table(_P, size)
    _inverse_powers = _power_table(_P_INV, size)


def _power_table(base: np.uint64, size: int) -> np.ndarray:
    # Doubling (table[k:2k] = table[:k] * base**k) is vectorised; np.cumprod is a scalar loop.
    table = np.ones(size, dtype=np.uint64)
    filled, step = 1, base
    with np.errstate(over="ignore"):
        while filled < size:
            count = min(filled, size - filled)
            table[filled : filled + count] = table[:count] * step
            step = step * step
            filled += count
    return table


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: an avalanching bijection on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _finish(raw: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return (splitmix64(raw + lengths.astype(np.uint64) * _LEN_MIX) >> np.uint64(32)).astype(np.uint32)


def hash32(data: bytes) -> int:
    """The 32-bit hash of one shingle (its UTF-8 bytes); equal to what the batch path computes."""
    raw = 0
    power = 1
    for byte in data:
        raw = (raw + byte * power) & _MASK64
        power = (power * int(_P)) & _MASK64
    with np.errstate(over="ignore"):
        return int(_finish(np.array([raw], dtype=np.uint64), np.array([len(data)]))[0])


def ngram_sizes(token_counts: np.ndarray, cjk_counts: np.ndarray, word_ngram: int, char_ngram: int) -> np.ndarray:
    """Per document: ``char_ngram`` when most tokens are CJK/Thai characters, else ``word_ngram``."""
    return np.where(2 * cjk_counts > token_counts, char_ngram, word_ngram).astype(np.int64)


def shingle_strings(form: str, n: int) -> list[str]:
    """The shingles of one normal form as strings (reference path; the batch path hashes these)."""
    tokens = form.split(" ") if form else []
    if not tokens:
        return []
    if len(tokens) <= n:
        return [" ".join(tokens)]
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def shingle_hashes(forms: Sequence[bytes], cjk_counts: np.ndarray, word_ngram: int, char_ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every shingle of every document, and per-document offsets into them.

    ``forms`` are normal forms in UTF-8 (:func:`pipeline.dedup.normalize.normalize_all_utf8`).
    Returns ``(hashes, offsets)``: document ``d``'s shingles are ``hashes[offsets[d]:offsets[d+1]]``
    (duplicates included, as MinHash does not care).
    """
    num_docs = len(forms)
    token_counts = np.fromiter((f.count(b" ") + 1 if f else 0 for f in forms), dtype=np.int64, count=num_docs)
    sizes = ngram_sizes(token_counts, np.asarray(cjk_counts, dtype=np.int64), word_ngram, char_ngram)
    shingle_counts = np.where(token_counts > 0, np.maximum(token_counts - sizes + 1, 1), 0)
    offsets = np.concatenate([[0], np.cumsum(shingle_counts)]).astype(np.int64)
    total = int(offsets[-1])
    if total == 0:
        return np.empty(0, dtype=np.uint32), offsets

    blob = b" ".join(f for f in forms if f)
    data = np.frombuffer(blob, dtype=np.uint8)
    _ensure_powers(len(data) + 1)
    spaces = np.flatnonzero(data == 32)
    token_start = np.concatenate([[0], spaces + 1])
    token_end = np.concatenate([spaces, [len(data)]])
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum(data * _powers[: len(data)], out=prefix[1:])

        token_offsets = np.concatenate([[0], np.cumsum(token_counts)])
        doc = np.repeat(np.arange(num_docs), shingle_counts)
        k = np.arange(total) - offsets[doc]
        first = token_offsets[doc] + k
        last = token_offsets[doc] + np.minimum(k + sizes[doc], token_counts[doc]) - 1
        start = token_start[first]
        end = token_end[last]
        raw = (prefix[end] - prefix[start]) * _inverse_powers[start]
        return _finish(raw, end - start), offsets


def unique_per_document(hashes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's shingle hashes sorted and deduplicated (its shingle *set*), same layout."""
    counts = np.diff(offsets)
    doc = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    # one uint64 key (document, hash) sorts ~10x faster than a two-key lexsort
    keys = np.sort((doc << np.uint64(32)) | hashes.astype(np.uint64))
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    kept_counts = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=len(counts))
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)

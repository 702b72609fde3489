"""MinHash signatures, LSH band hashes and the band/row choice, vectorised over a batch.

Owns the signature of a shingle set. The definition is datasketch's own (2.x default scheme
``affine32``): the 32-bit shingle hash is pre-mixed with the MurmurHash3 finaliser, then
permutation k maps it to ``a_k * h + b_k mod 2**32`` and the signature keeps each
permutation's minimum. The ``(a, b)`` parameters come from ``datasketch.MinHash(num_perm,
seed).permutations``, so a signature here is bit-identical to
``datasketch.MinHash(num_perm, seed, hashfunc=shingles.hash32)`` updated with the same
shingles (a test checks this). The difference is speed: one numpy pass over all shingles of a
batch instead of one Python call per shingle.
"""

from __future__ import annotations

import functools

import numpy as np

EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's value for "no shingle seen"
_CHUNK_CELLS = 1 << 20  # shingles x permutations evaluated at once (4 MiB of uint32; measured best)


@functools.cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``(a, b)`` permutation parameters for ``num_perm`` and ``seed`` (its
    ``affine32`` scheme: ``a`` odd, both drawn from ``numpy.random.RandomState(seed)``).

    Drawn here rather than read from ``datasketch.MinHash(...).permutations``: importing
    datasketch costs most of a second, more than a small refresh's whole dedup stage. A test
    checks these are datasketch's own for many ``(num_perm, seed)``, and stored indexes do not
    change if a later datasketch changes its default scheme.
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch's pre-mix)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures ``(num_docs, num_perm)`` uint32 of the shingle sets given as
    ``hashes[offsets[d]:offsets[d+1]]``; a document without shingles keeps :data:`EMPTY`."""
    a, b = permutations(num_perm, seed)
    num_docs = len(offsets) - 1
    out = np.full((num_docs, num_perm), EMPTY, dtype=np.uint32)
    if len(hashes) == 0:
        return out
    counts = np.diff(offsets)
    doc_of = np.repeat(np.arange(num_docs), counts)
    step = max(1, _CHUNK_CELLS // num_perm)
    a_col, b_col = a[:, None], b[:, None]
    with np.errstate(over="ignore"):
        mixed = fmix32(hashes.astype(np.uint32))
        for s0 in range(0, len(hashes), step):
            s1 = min(s0 + step, len(hashes))
            # permutations x shingles: each document's minimum is then a contiguous reduction
            permuted = a_col * mixed[None, s0:s1]
            permuted += b_col
            docs = doc_of[s0:s1]
            starts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
            minima = np.minimum.reduceat(permuted, starts, axis=1).T
            rows = docs[starts]
            out[rows] = np.minimum(out[rows], minima)
    return out


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per band ``(num_docs, bands)``: a hash of the band's ``rows`` signature values.

    Two documents share a band bucket when all ``rows`` values agree (up to 64-bit collisions).
    """
    from pipeline.dedup.shingles import splitmix64

    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands x rows = {bands} x {rows} exceeds num_perm = {sig.shape[1]}")
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(sig.shape[0], band + 1, dtype=np.uint64)
            for col in range(band * rows, (band + 1) * rows):
                h = splitmix64(h * np.uint64(0x100000001B3) + sig[:, col].astype(np.uint64))
            out[:, band] = h
    return out


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of agreeing signature values, row by row (datasketch's ``MinHash.jaccard``)."""
    return np.count_nonzero(sig_a == sig_b, axis=-1) / sig_a.shape[-1]


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that a pair with this Jaccard similarity shares at least one band bucket."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


# A pair exactly at the threshold should become a candidate this often.
RECALL_AT_THRESHOLD = 0.99


def choose_bands(threshold: float, num_perm: int, bands: int | None = None, rows: int | None = None) -> tuple[int, int]:
    """``(bands, rows)``: the given ones, or the most selective split that still makes a pair *at*
    ``threshold`` a candidate with probability >= :data:`RECALL_AT_THRESHOLD`.

    datasketch's optimiser balances false positives against false negatives and so puts the
    S-curve's midpoint near the threshold (half the pairs at the threshold are missed). Here
    candidates are verified afterwards, so false positives only cost a comparison and the curve
    is moved left instead: at 0.8 / 128 permutations this gives 21 bands x 6 rows.
    """
    if bands and rows:
        if bands * rows > num_perm:
            raise ValueError(f"dedup bands x rows = {bands} x {rows} exceeds num_perm = {num_perm}")
        return bands, rows
    if rows:
        return num_perm // rows, rows
    if bands:
        return bands, num_perm // bands
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1

"""Token boundaries without offsets, for byte-level BPE tokenizers (GPT-2, Llama-3, Qwen style).

When every token of the tokenizer stands for a fixed byte string (the *byte-table path*), the
ids are encoded without offsets and token boundaries come from the cumulative byte lengths of the
ids, after every row's ids, decoded to bytes through the table, are checked to give back its
rendered text byte for byte (a row that does not goes the *offset-mapping path*: it is located
through the character offsets the tokenizer reports). Byte boundaries are finer than character
offsets, so in two corners this is the more exact of the two: a trained span that ends inside a
character split over several byte tokens, and a post-processor that trims whitespace from offsets
(the offsets leave a leading-space token of the content untrained; the byte table trains it, as
``apply_chat_template``'s assistant mask does).
"""

from __future__ import annotations

import unicodedata

import numpy as np


class ByteTable:
    """The byte string every token id stands for, as one flat table, for byte-level tokenizers.

    Built only when concatenating the tokens' bytes gives back the encoded text exactly: a BPE
    model over GPT-2's byte alphabet, a ByteLevel pre-tokenizer that adds no prefix space, no
    normalizer or NFC only (rows whose text NFC would change go the offset-mapping path), and
    added tokens that strip no whitespace. :meth:`build` returns None for any other tokenizer.
    """

    def __init__(self, pieces: list[bytes | None], normalizer: str | None):
        self.normalizer = normalizer
        self.lengths = np.array([-1 if p is None else len(p) for p in pieces], dtype=np.int64)
        self.starts = np.zeros(len(pieces), dtype=np.int64)
        np.cumsum(np.maximum(self.lengths, 0)[:-1], out=self.starts[1:])
        self.flat = np.frombuffer(b"".join(p or b"" for p in pieces), dtype=np.uint8)

    @classmethod
    def build(cls, data: dict) -> ByteTable | None:
        """From the tokenizer's JSON (``json.loads(backend.to_str())``)."""
        model, normalizer = data.get("model") or {}, data.get("normalizer")
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
            return None
        if model.get("end_of_word_suffix"):
            return None
        if normalizer is not None and normalizer.get("type") != "NFC":
            return None
        pre = data.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
        if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
            return None
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        alphabet = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's stand-in chars
        vocab: dict[str, int] = model.get("vocab") or {}
        size = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))], default=-1) + 1
        pieces: list[bytes | None] = [None] * size
        for token, token_id in vocab.items():
            try:
                pieces[token_id] = bytes(alphabet[ch] for ch in token)
            except KeyError:  # a token outside the byte alphabet: not a byte-level vocabulary
                return None
        for added in data.get("added_tokens", []):
            if added.get("lstrip") or added.get("rstrip"):
                return None  # such a token swallows whitespace its own text does not hold
            pieces[added["id"]] = added["content"].encode("utf-8")
        return cls(pieces, normalizer and normalizer["type"])

    def covers(self, text: str) -> bool:
        """Whether ``text`` can go the byte-table path: the tokenizer sees it unchanged (nothing
        for the normalizer to do), so the ids' bytes can be compared with it."""
        return self.normalizer is None or unicodedata.is_normalized("NFC", text)

    def decode_bytes(self, ids: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
        """The bytes the ids stand for, one after the other (an unknown id stands for none);
        the byte offset of every token's start plus the end; and which ids are unknown."""
        raw_lengths = self.lengths[ids]
        unknown = raw_lengths < 0
        lengths = np.maximum(raw_lengths, 0)
        bounds = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        total = int(bounds[-1])
        # index of every output byte in the flat table: token start + position within the token
        dtype = np.int32 if max(total, len(self.flat)) < 2**31 else np.int64  # half the memory traffic
        index = np.repeat((self.starts[ids] - bounds[:-1]).astype(dtype), lengths)
        index += np.arange(total, dtype=dtype)
        return self.flat[index].tobytes(), bounds, unknown

"""The tokenizer's character offsets, rebuilt from token bytes, for SentencePiece BPE tokenizers (Mistral style).

Such a tokenizer (a Metaspace pre-tokenizer, byte fallback) spells every token as a fixed byte
string too: its piece with "▁" read as a space, a byte-fallback token ``<0xNN>`` as that byte, an
added token as its text. So, as on the byte-table path (:mod:`.byte_table`), its rows are encoded
without offsets, and every row's ids, spelled through the table, must give back its rendered text
byte for byte (a row that does not, such as text holding a "▁" of its own, goes the
offset-mapping path). Unlike that path, these rows keep the exact result of the offset-mapping
path that served them before: from the tokens' bytes this module rebuilds the character offsets
the tokenizer would report (:class:`PieceOffsets`), and spells each trained span as the
tokenizer's decoder would give it back (:meth:`PieceTable.decoded`), so the Masker locates,
labels and verifies every row exactly as it did with the tokenizer's offsets and decoder, at the
cost of encoding ids alone.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.masking.byte_table import ByteTable

METASPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the ByteFallback decoder reads as one byte
_INNER_METASPACE = re.compile(f"[^{METASPACE}]{METASPACE}")  # a "▁" after another character
# The decoder of Llama/Mistral SentencePiece tokenizers, as transformers converts them; with any
# other decoder the trained spans are decoded by the tokenizer itself.
_SENTENCEPIECE_DECODER = [
    {"type": "Replace", "pattern": {"String": METASPACE}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]


class PieceTable:
    """The byte string every token id spells, for a SentencePiece BPE tokenizer.

    Built only for a BPE model with byte fallback, no normalizer, a Metaspace pre-tokenizer that
    prepends "▁" to the first piece of text at most (``prepend_scheme`` first or never), and
    added tokens that strip no whitespace and that the decoder takes as text; :meth:`build`
    returns None for any other tokenizer.
    """

    def __init__(
        self,
        bytes_table: ByteTable,
        prepends: bool,
        strip_start: int | None,
        added: tuple[str, ...] = (),
        prepended_byte: int = 0x20,
        space_cuts: bool = False,
    ):
        self.bytes = bytes_table
        self.prepends = prepends  # a text that starts with plain text gets one "▁" before it
        self.strip_start = strip_start  # the decoder's Strip: leading spaces it removes; None: other decoder
        self.added = added  # the added tokens' texts
        self.prepended_byte = prepended_byte  # the first byte spelled by a token that starts with the prepended "▁"
        # No piece holds a "▁" after another character: a space after a character other than a
        # space cuts the tokenization in two (see :meth:`space_cut`).
        self.space_cuts = space_cuts

    @classmethod
    def build(cls, data: dict) -> PieceTable | None:
        """From the tokenizer's JSON (``json.loads(backend.to_str())``)."""
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            return None
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or data.get("normalizer") is not None:
            return None
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "Metaspace" or pre.get("replacement") != METASPACE:
            return None
        scheme = pre.get("prepend_scheme")
        if scheme not in ("first", "never"):  # "always" prepends after every added token as well
            return None
        vocab: dict[str, int] = model.get("vocab") or {}
        added_tokens = data.get("added_tokens", [])
        size = max([*vocab.values(), *(t["id"] for t in added_tokens)], default=-1) + 1
        pieces: list[bytes | None] = [None] * size
        for piece, token_id in vocab.items():
            if piece.startswith("<0x") and _BYTE_PIECE.fullmatch(piece):
                pieces[token_id] = bytes([int(piece[3:5], 16)])
            else:
                pieces[token_id] = piece.replace(METASPACE, " ").encode("utf-8")
        for added in added_tokens:
            content = added["content"]
            if added.get("lstrip") or added.get("rstrip") or _BYTE_PIECE.fullmatch(content):
                return None  # whitespace its text does not hold, or a byte the decoder would make of it
            pieces[added["id"]] = content.encode("utf-8")
        decoder = data.get("decoder") or {}
        steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
        strip_start = None
        if steps and len(steps) == 4 and steps[:3] == _SENTENCEPIECE_DECODER:
            strip = steps[3]
            if strip.get("type") == "Strip" and strip.get("content") == " " and not strip.get("stop"):
                strip_start = int(strip.get("start") or 0)
        # A "▁" outside the vocabulary is spelled by its first byte-fallback token.
        prepended_byte = 0x20 if METASPACE in vocab else METASPACE.encode("utf-8")[0]
        added = tuple(t["content"] for t in added_tokens)
        space_cuts = not model.get("dropout") and not any(_INNER_METASPACE.search(piece) for piece in vocab)
        return cls(ByteTable(pieces, None), scheme == "first", strip_start, added, prepended_byte, space_cuts)

    def covers(self, text: str) -> bool:
        """Whether ``text`` can go this path: a "▁" of its own would be spelled back as a space."""
        return METASPACE not in text

    def decode_bytes(self, ids: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
        return self.bytes.decode_bytes(ids)

    def shift(self, spelled: memoryview, raw: bytes) -> int | None:
        """How many bytes the ids spell before ``raw`` (the ``▁`` the pre-tokenizer put before a
        text that starts with plain text), or None when they do not spell ``raw``."""
        if len(spelled) == len(raw) and spelled == raw:
            return 0
        if self.prepends and len(spelled) == len(raw) + 1 and spelled[0] == 0x20 and spelled[1:] == raw:
            return 1
        return None

    def starts_otherwise(self, text: str, token: int) -> bool:
        """Whether ``text`` encoded on its own certainly does not start with ``token``: the
        pre-tokenizer puts a "▁" before it (it starts with plain text that is not a space), so its
        first token spells the byte of that "▁" first, and ``token`` spells another."""
        if not (self.prepends and text and text[0] not in (" ", METASPACE)) or text.startswith(self.added):
            return False
        lengths = self.bytes.lengths
        if not 0 <= token < len(lengths) or lengths[token] <= 0:
            return False
        return int(self.bytes.flat[self.bytes.starts[token]]) != self.prepended_byte

    def space_cut(self, text: str, start: int, end: int) -> int | None:
        """The last place in ``text[start + 1 : end]`` where the tokenization is certainly cut in
        two, or None: a space that follows a character other than a space (or "▁").

        Every token is a piece of the vocabulary, an added token or a byte, so when no piece holds
        a "▁" after another character (:attr:`space_cuts`) no token holds such a space with the
        character before it, and BPE merges nothing across it: the text before the cut and the
        text from it tokenize each as on their own. (The text from it starts with "▁", so the
        pre-tokenizer prepends nothing to it either.)"""
        if not self.space_cuts:
            return None
        cut = text.rfind(" ", start + 1, end)
        while cut > start + 1 and text[cut - 1] == " ":
            cut -= 1  # the first space of a run: "▁▁" is a piece
        if cut <= start or text[cut - 1] in (" ", METASPACE):
            return None
        return cut

    def decoded(self, spelled: bytes) -> str | None:
        """What the tokenizer's decoder gives back for tokens that spell ``spelled``; None when
        that takes the decoder itself (another decoder, or bytes that are not whole characters,
        which ByteFallback turns into one "\ufffd" per byte)."""
        if self.strip_start is None:
            return None
        try:
            text = spelled.decode("utf-8")
        except UnicodeDecodeError:
            return None
        cut = 0
        while cut < self.strip_start and cut < len(text) and text[cut] == " ":
            cut += 1
        return text[cut:]


class PieceOffsets:
    """The character offsets the tokenizer reports for one row's tokens, rebuilt from their bytes,
    with the look-ups :func:`.token_spans.tokens_from_offsets` makes of an Encoding.

    The tokenizer aligns every token with the characters of the text it came from: a "▁" with
    the space it replaces, the "▁" it prepends with the first character, and each byte-fallback
    token with the whole character whose byte it is; its offsets are those characters. In a row
    whose ids spell its text every character lies in some token, and the first token holding a
    character is the first whose last byte is at or after the character's first byte.
    """

    def __init__(self, raw: bytes, text: str, bounds: np.ndarray, base: int, shift: int):
        """``bounds``: each token's first spelled byte, plus the end, counted from ``base``;
        ``shift``: spelled bytes before ``raw`` (see :meth:`PieceTable.shift`)."""
        self.raw, self.bounds, self.base, self.shift = raw, bounds, base, shift
        self.chars = len(text)
        self._char_of_byte = None if len(raw) == len(text) else np.cumsum((np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80) - 1

    def char_to_token(self, char: int) -> int | None:
        """The first token whose characters hold ``char`` (as ``Encoding.char_to_token``)."""
        if not 0 <= char < self.chars:
            return None
        byte = char if self._char_of_byte is None else int(self._char_of_byte.searchsorted(char))
        if byte == 0:
            return 0  # the first token holds the first character, the "▁" prepended before it included
        return int(self.bounds.searchsorted(self.base + self.shift + byte, "right")) - 1

    def token_to_chars(self, token: int) -> tuple[int, int]:
        first = max(int(self.bounds[token]) - self.base - self.shift, 0)
        last = max(int(self.bounds[token + 1]) - 1 - self.base - self.shift, 0)
        if self._char_of_byte is None:
            return first, last + 1
        return int(self._char_of_byte[first]), int(self._char_of_byte[last]) + 1

    def token_start(self, token: int) -> int:
        return self.token_to_chars(token)[0]

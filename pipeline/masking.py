"""Token-exact loss masks: rendered conversation -> ``input_ids`` and ``labels``.

This module owns how a conversation becomes tokens and which of them are trained:

* **One tokenization of the whole rendered text.** ``input_ids`` are what
  ``apply_chat_template(..., tokenize=True)`` gives (``add_special_tokens=False``: the template
  writes BOS itself, so there is exactly one). Prompt and response are never tokenized apart.
* **Control-token text in the data stays text.** A literal ``<|im_end|>`` or ``</s>`` inside a
  message is encoded as plain characters, never as the control token; only the control tokens
  the template writes are control tokens. Rows without such text take the plain path (identical
  to ``apply_chat_template``); rows with it are encoded by a copy of the tokenizer in which the
  template's control tokens are renamed to private-use placeholders of the same length, so the
  split points, offsets and the tokenization of every stretch between them stay those of the
  original tokenizer (same result as ``apply_chat_template(..., sanitize_control_tokens=True)``,
  but with offsets for the mask).
* **Spans.** The character span of each assistant turn comes from the template's
  ``{% generation %}`` blocks when it has them, otherwise from rendering prefixes of the
  conversation; the span is mapped to tokens through the fast tokenizer's offsets.
* **Verification.** The trained tokens of every assistant turn are decoded and must equal the
  turn's content (plus its rendered tool calls) and its end token; otherwise the row is rejected
  as ``mask_unverifiable`` — a wrong mask is never written.
* **Byte-level tokenizers take a faster road.** When every token of the
  tokenizer stands for a fixed byte string (byte-level BPE without a normalizer that changes the
  text, GPT-2/Llama-3/Qwen style), the ids are encoded without offsets and token boundaries come
  from the cumulative byte lengths of the ids, after every row's ids, spelled through a byte
  table, are checked to give back its rendered text byte for byte (a row that does not takes
  the offsets road). Byte boundaries are finer than character offsets, so in two corners the
  byte road is the more exact of the two: a trained span that ends inside a character split
  over several byte tokens (the offsets road loses its last tokens and rejects the row), and a
  post-processor that trims whitespace from offsets (the offsets road leaves a leading-space
  token of the content untrained; the byte road trains it, as ``apply_chat_template``'s
  assistant mask does).
* **Length.** Rows over ``max_length`` are rejected as ``too_long`` or, with ``truncate``, cut at
  the end of the last whole assistant turn that fits (or inside the first one, whose end token
  is then not trained); a prompt that alone does not fit is always ``too_long``.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline import schema
from pipeline.templates import KNOWN_END_TOKENS, Template, render, template_variables, with_default_system

# Private-use characters for placeholders. The lead character of a placeholder names which
# control token it stands for; the filler pads it to the same length, so offsets never shift.
_CONTENT_LEAD, _CONTENT_FILL = 0xF0000, "\U000FFF00"  # control text found in the data
_TEMPLATE_LEAD, _TEMPLATE_FILL = 0x100000, "\U0010FF00"  # control tokens written by the template
_PLACEHOLDER_CHARS = re.compile("[\U000F0000-\U0010FFFF]")

TRAIN_ON = ("all_assistant", "last_assistant", "all")
SPAN_METHODS = ("auto", "generation", "prefix")


@dataclass(frozen=True)
class Rejection:
    """A row that cannot be kept: the stage that refused it, a reason code and a human detail."""

    stage: str
    reason: str
    detail: str


@dataclass
class Encoded:
    """One conversation as training tokens: ``labels`` = ``input_ids`` where trained, -100 elsewhere."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    truncated: bool = False

    @property
    def num_trainable(self) -> int:
        return int(np.count_nonzero(self.labels != schema.IGNORE_INDEX))


@dataclass
class _Turn:
    """One assistant turn located in the rendered text."""

    message_index: int  # index into the rendered message list
    char_start: int
    char_end: int
    end_token: str | None
    first_token: int = -1
    last_token: int = -1  # inclusive


def control_tokens(tokenizer, template_source: str) -> tuple[str, ...]:
    """Token texts that must not be taken as control tokens when they appear in the data.

    Same rule as transformers' ``sanitize_control_tokens``: every special added token, and every
    other added token that the template itself writes (whitespace tokens excepted).
    """
    found = []
    for token in tokenizer.added_tokens_decoder.values():
        content = token.content
        if not content or content.isspace():
            continue
        if token.special or content in template_source:
            found.append(content)
    return tuple(sorted(set(found), key=lambda t: (-len(t), t)))


class _PlainControlEncoder:
    """A copy of the tokenizer whose control tokens are matched only as placeholders.

    The template's control tokens are replaced in the text by same-length placeholders that this
    copy knows as added tokens with the original ids; the control-token text that came from the
    data is left as it is and, no longer being an added token, is encoded as plain text.
    """

    def __init__(self, backend, controls: Sequence[str]):
        from tokenizers import AddedToken, Tokenizer

        data = json.loads(backend.to_str())
        originals = {entry["content"]: entry for entry in data.get("added_tokens", [])}
        data["added_tokens"] = [entry for entry in data.get("added_tokens", []) if entry["content"] not in controls]
        self.tokenizer = Tokenizer.from_str(json.dumps(data))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.template_placeholders: dict[str, str] = {}
        self.content_placeholders: dict[str, str] = {}
        new_tokens = []
        for index, control in enumerate(controls):
            template_ph = chr(_TEMPLATE_LEAD + index) + _TEMPLATE_FILL * (len(control) - 1)
            self.template_placeholders[control] = template_ph
            self.content_placeholders[control] = chr(_CONTENT_LEAD + index) + _CONTENT_FILL * (len(control) - 1)
            entry = originals.get(control, {})
            new_tokens.append(
                AddedToken(
                    template_ph,
                    single_word=entry.get("single_word", False),
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    normalized=False,
                    special=False,
                )
            )
        self.tokenizer.add_tokens(new_tokens)
        self.base = min(self.tokenizer.token_to_id(t.content) for t in new_tokens)
        lookup = np.zeros(len(new_tokens), dtype=np.int32)
        for control, placeholder in self.template_placeholders.items():
            lookup[self.tokenizer.token_to_id(placeholder) - self.base] = backend.token_to_id(control)
        self.lookup = lookup
        self._to_text = {ph: control for control, ph in self.content_placeholders.items()}
        self._content_re = re.compile("|".join(re.escape(p) for p in self.content_placeholders.values()))
        self._template_re = re.compile("|".join(re.escape(c) for c in controls))

    def hide(self, text: str, control_re: re.Pattern) -> str:
        """Data text -> the same text with its control-token strings as content placeholders."""
        return control_re.sub(lambda m: self.content_placeholders[m.group(0)], text)

    def texts(self, rendered: str) -> tuple[str, str]:
        """A render of hidden data -> (the true rendered text, the text this encoder tokenizes)."""
        true_text = self._content_re.sub(lambda m: self._to_text[m.group(0)], rendered)
        marked = self._template_re.sub(lambda m: self.template_placeholders[m.group(0)], rendered)
        marked = self._content_re.sub(lambda m: self._to_text[m.group(0)], marked)
        return true_text, marked

    def encode_batch(self, marked_texts: list[str], *, offsets: bool = True):
        encode = self.tokenizer.encode_batch if offsets else self.tokenizer.encode_batch_fast
        encodings = encode(marked_texts, add_special_tokens=False)
        ids = []
        for encoding in encodings:
            array = np.asarray(encoding.ids, dtype=np.int32)
            placeholder = array >= self.base
            array[placeholder] = self.lookup[array[placeholder] - self.base]
            ids.append(array)
        return encodings, ids


class _TokenBytes:
    """The byte string every token id stands for, as one flat table, for byte-level tokenizers.

    Built only when concatenating the tokens' bytes gives back the encoded text exactly: a BPE
    model over GPT-2's byte alphabet, a ByteLevel pre-tokenizer that adds no prefix space, no
    normalizer or NFC only (rows whose text NFC would change are left to the offsets road), and
    added tokens that strip no whitespace. :meth:`build` returns None for any other tokenizer.
    """

    def __init__(self, pieces: list[bytes | None], normalizer: str | None):
        self.normalizer = normalizer
        self.lengths = np.array([-1 if p is None else len(p) for p in pieces], dtype=np.int64)
        self.starts = np.zeros(len(pieces), dtype=np.int64)
        np.cumsum(np.maximum(self.lengths, 0)[:-1], out=self.starts[1:])
        self.flat = np.frombuffer(b"".join(p or b"" for p in pieces), dtype=np.uint8)

    @classmethod
    def build(cls, backend) -> "_TokenBytes | None":
        data = json.loads(backend.to_str())
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

    def takes(self, text: str) -> bool:
        """Whether the tokenizer sees ``text`` unchanged (nothing for the normalizer to do)."""
        return self.normalizer is None or unicodedata.is_normalized("NFC", text)

    def spell(self, ids: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
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


@dataclass
class RenderedBatch:
    """A batch between the phases of :meth:`Masker.encode_batch`."""

    results: list  # per row: a Rejection as soon as one is known, else None until finish
    by_bytes: list["_Rendered"] = field(default_factory=list)  # rows the byte table takes
    by_offsets: list["_Rendered"] = field(default_factory=list)  # rows that need the tokenizer's offsets
    encoded_by_bytes: list = field(default_factory=list)  # (row, encoding, ids) once tokenized
    encoded_by_offsets: list = field(default_factory=list)


@dataclass
class _Rendered:
    """One conversation rendered and located, ready to tokenize."""

    index: int  # row in the batch
    text: str  # the rendered conversation, as apply_chat_template gives it
    marked_text: str  # the text the encoder tokenizes (placeholders for template control tokens)
    turns: list[_Turn]
    messages: list[dict[str, Any]]  # as rendered (default system included), with the data's own text
    train_flags: list[bool | None]
    has_control_text: bool


class Masker:
    """Renders, tokenizes and masks conversations for one tokenizer, template and policy."""

    def __init__(
        self,
        tokenizer,
        template: Template,
        *,
        max_length: int,
        train_on: str = "all_assistant",
        truncate: bool = False,
        span_method: str = "auto",
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if span_method not in SPAN_METHODS:
            raise ValueError(f"span_method must be one of {SPAN_METHODS}, got {span_method!r}")
        if span_method == "generation" and not template.has_generation_tags:
            raise ValueError(f"chat template {template.name!r} has no {{% generation %}} blocks to find spans with")
        self.tokenizer = tokenizer
        self.backend = _private_copy(tokenizer.backend_tokenizer)
        self.token_bytes = _TokenBytes.build(self.backend)
        self.template = template
        self.max_length = max_length
        self.train_on = train_on
        self.truncate = truncate
        self.use_generation = span_method == "generation" or (span_method == "auto" and template.has_generation_tags)
        self.variables = template_variables(tokenizer)
        self.controls = control_tokens(tokenizer, template.source)
        self.control_re = re.compile("|".join(re.escape(c) for c in self.controls)) if self.controls else None
        self._plain_control_encoder: _PlainControlEncoder | None = None
        self._lock = threading.Lock()
        if template.end_token:
            self.end_tokens: tuple[str, ...] = (template.end_token,)
        else:
            ends = set(KNOWN_END_TOKENS) & set(self.controls)
            if tokenizer.eos_token:
                ends.add(tokenizer.eos_token)
            self.end_tokens = tuple(sorted(ends, key=lambda t: (-len(t), t)))

    # --- public ------------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]], tools: str | None = None) -> Encoded | Rejection:
        return self.encode_batch([(messages, tools)])[0]

    def encode_batch(self, rows: Sequence[tuple[list[dict[str, Any]], str | None]]) -> list[Encoded | Rejection]:
        """Canonical conversations (messages, tools JSON) -> an Encoded or a Rejection each, in order."""
        return self.finish(self.tokenize(self.render(rows)))

    # The three phases of encode_batch, for callers that overlap them: render and finish are
    # Python, tokenize is the Rust tokenizer (it runs without the GIL).
    def render(self, rows: Sequence[tuple[list[dict[str, Any]], str | None]]) -> "RenderedBatch":
        """Phase 1: render every conversation and locate its assistant turns in the text."""
        batch = RenderedBatch([None] * len(rows))
        table = self.token_bytes
        for index, (messages, tools) in enumerate(rows):
            outcome = self._render_row(index, messages, tools)
            if isinstance(outcome, Rejection):
                batch.results[index] = outcome
            elif table is not None and table.takes(outcome.text):
                batch.by_bytes.append(outcome)
            else:
                batch.by_offsets.append(outcome)
        return batch

    def tokenize(self, batch: "RenderedBatch") -> "RenderedBatch":
        """Phase 2: tokenize the rendered texts (byte-table rows without offsets)."""
        batch.encoded_by_bytes = self._encode(batch.by_bytes, offsets=False)
        batch.encoded_by_offsets = self._encode(batch.by_offsets, offsets=True)
        return batch

    def finish(self, batch: "RenderedBatch") -> list[Encoded | Rejection]:
        """Phase 3: locate turns in tokens, build labels, verify every trained span, fit the length."""
        results, table = batch.results, self.token_bytes
        staged: dict[int, tuple[np.ndarray, np.ndarray, list[_Turn]]] = {}
        checks = []  # (row index, turn, the turn's message as rendered, its trained tokens decoded)
        encoded = batch.encoded_by_bytes
        leftovers = []
        # Every row's ids, spelled through the table in one gather, must give back its text byte
        # for byte: then a span of the text *is* the decoding of the tokens over it. A row that is
        # not spelled exactly takes the offsets road (none does with a plain byte-level
        # tokenizer; a pre-tokenizer step that drops characters would send every row there).
        if encoded:
            blob, all_bounds, unknown = table.spell(np.concatenate([ids for _, _, ids in encoded]))  # type: ignore[union-attr]
            spelled = memoryview(blob)
            unknown_before = np.concatenate([[0], np.cumsum(unknown)]) if unknown.any() else None
        first_token = 0
        for row, _encoding, ids in encoded:
            bounds = all_bounds[first_token : first_token + len(ids) + 1]  # this row's, offset by `base`
            base, end = int(bounds[0]), int(bounds[-1])
            raw = row.text.encode("utf-8")
            complete = unknown_before is None or unknown_before[first_token + len(ids)] == unknown_before[first_token]
            first_token += len(ids)
            if not (complete and end - base == len(raw) and spelled[base:end] == raw):
                leftovers.append(row)
                continue
            outcome = self._locate_by_bytes(row, raw, bounds, base) or self._labels(row, ids)
            if isinstance(outcome, Rejection):
                results[row.index] = outcome
                continue
            staged[row.index] = outcome
            checks += [
                (
                    row.index,
                    turn,
                    row.messages[turn.message_index],
                    raw[bounds[turn.first_token] - base : bounds[turn.last_token + 1] - base].decode("utf-8", "replace"),
                )
                for turn in outcome[2]
            ]
        offset_checks = []
        for row, encoding, ids in batch.encoded_by_offsets + self._encode(leftovers, offsets=True):
            outcome = self._locate_by_offsets(row, encoding) or self._labels(row, ids)
            if isinstance(outcome, Rejection):
                results[row.index] = outcome
            else:
                staged[row.index] = outcome
                offset_checks += [(row.index, turn, row.messages[turn.message_index]) for turn in outcome[2]]
        decoded = self.backend.decode_batch(
            [staged[index][0][t.first_token : t.last_token + 1].tolist() for index, t, _ in offset_checks],
            skip_special_tokens=False,
        )
        checks += [(*check, text) for check, text in zip(offset_checks, decoded)]
        for index, turn, message, text in checks:
            if index in staged and not _span_matches(text, message, turn.end_token):
                del staged[index]
                results[index] = Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    f"trained tokens of assistant turn {turn.message_index} decode to {_clip(text)!r}, "
                    f"not to its content and end token",
                )
        for index, (ids, labels, _turns) in staged.items():
            results[index] = self._fit_length(ids, labels, _turns)
        return results  # type: ignore[return-value]

    # --- rendering ---------------------------------------------------------------------------
    def _control_encoder(self) -> _PlainControlEncoder:
        with self._lock:  # one Masker may serve several tokenizing threads
            if self._plain_control_encoder is None:
                self._plain_control_encoder = _PlainControlEncoder(self.backend, self.controls)
            return self._plain_control_encoder

    def _render_row(self, index: int, canonical: list[dict[str, Any]], tools: str | None) -> _Rendered | Rejection:
        try:
            true_messages = schema.messages_for_template(canonical)
            tool_schemas = schema.tools_for_template(tools)
        except (ValueError, TypeError) as exc:
            return Rejection("template", "template_error", f"tool calls or tools are not valid JSON: {exc}")
        has_control_text = self.control_re is not None and any(
            self.control_re.search(text) for text in _row_strings(canonical, tools)
        )
        messages = true_messages
        if has_control_text:
            if any(_PLACEHOLDER_CHARS.search(text) for text in _row_strings(canonical, tools)):
                return Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    "the conversation holds control-token text and private-use characters (U+F0000 and up) "
                    "that sftkit needs as placeholders to keep that text plain",
                )
            encoder = self._control_encoder()
            hidden = [
                {
                    **m,
                    "content": encoder.hide(m["content"], self.control_re),
                    "name": encoder.hide(m["name"], self.control_re) if m.get("name") else m.get("name"),
                    "tool_calls": encoder.hide(m["tool_calls"], self.control_re) if m.get("tool_calls") else None,
                }
                for m in canonical
            ]
            messages = schema.messages_for_template(hidden)
            tool_schemas = schema.tools_for_template(encoder.hide(tools, self.control_re) if tools else tools)
        train_flags = [m.get("train") for m in canonical]
        if self.template.default_system and (not messages or messages[0]["role"] != "system"):
            train_flags = [None, *train_flags]
        messages = with_default_system(messages, self.template)
        true_messages = with_default_system(true_messages, self.template)
        try:
            rendered, spans = render(
                self.template, self.variables, messages, tool_schemas, with_spans=self.use_generation
            )
            if not self.use_generation:
                spans = self._prefix_spans(rendered, messages, tool_schemas)
        except _PrefixMismatch as exc:
            return Rejection("tokenize", "mask_unverifiable", str(exc))
        except Exception as exc:  # a template raises whatever its author chose (raise_exception, TypeError …)
            return Rejection("template", "template_error", f"chat template {self.template.name!r} failed: {exc}")
        assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(assistant_indices):
            return Rejection(
                "tokenize",
                "mask_unverifiable",
                f"the template marked {len(spans)} generation blocks for {len(assistant_indices)} assistant turns",
            )
        if has_control_text:
            text, marked = self._control_encoder().texts(rendered)
        else:
            text = marked = rendered
        turns = [
            _Turn(i, *self._trim_span(text, start, end)) for i, (start, end) in zip(assistant_indices, spans)
        ]
        return _Rendered(index, text, marked, turns, true_messages, train_flags, has_control_text)

    def _prefix_spans(self, rendered: str, messages, tools) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = render(self.template, self.variables, messages[:i], tools, add_generation_prompt=True)
            through, _ = render(self.template, self.variables, messages[: i + 1], tools)
            if not (rendered.startswith(before) and rendered.startswith(through) and len(through) >= len(before)):
                raise _PrefixMismatch(
                    f"rendering the conversation up to assistant turn {i} is not a prefix of the whole "
                    "rendering, so the turn cannot be located (template without {% generation %} blocks)"
                )
            # The template's separator before the content (Mistral's " " after [/INST]) is not
            # part of the turn; a generation block would start after it too.
            start = len(before)
            content = message["content"].strip()
            skip = _leading_space(rendered, start, len(through))
            if content and rendered.startswith(content, start + skip):
                start += skip - _leading_space(message["content"], 0, None) if skip else 0
            spans.append((start, len(through)))
        return spans

    def _trim_span(self, text: str, start: int, end: int) -> tuple[int, int, str | None]:
        """Cut the whitespace after a turn's end token; take an end token left just outside the span."""
        body_end = start + len(text[start:end].rstrip())
        for token in self.end_tokens:
            if text.endswith(token, start, body_end):
                return start, body_end, token
        for token in self.end_tokens:
            if text.startswith(token, end):
                return start, end + len(token), token
        return start, body_end, None

    # --- labels ------------------------------------------------------------------------------
    def _encode(self, rows: list[_Rendered], *, offsets: bool) -> list[tuple[_Rendered, Any, np.ndarray]]:
        """(row, encoding, ids) for ``rows``: one Rust batch call per encoder, plain rows first."""
        plain = [r for r in rows if not r.has_control_text]
        hidden = [r for r in rows if r.has_control_text]
        encoded = []
        if plain:
            encode = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
            encodings = encode([r.marked_text for r in plain], add_special_tokens=False)
            encoded += [(r, e, np.asarray(e.ids, dtype=np.int32)) for r, e in zip(plain, encodings)]
        if hidden:
            encodings, ids = self._control_encoder().encode_batch([r.marked_text for r in hidden], offsets=offsets)
            encoded += list(zip(hidden, encodings, ids))
        return encoded

    def _locate_by_offsets(self, row: _Rendered, encoding) -> Rejection | None:
        """Set each turn's first and last token from the encoding's character offsets."""
        for turn in row.turns:
            first = _token_at_or_after(encoding, turn.char_start, turn.char_end)
            last = _token_at_or_before(encoding, turn.char_end - 1, turn.char_start)
            if first is None or last is None or last < first:
                return _no_tokens(turn)
            # A token that merges template text with the turn (e.g. "][" across "[/INST][TOOL_CALLS]")
            # would train prompt characters: only whitespace may lie outside the turn's span.
            # token_to_chars, not offsets[i]: the offsets property builds the whole row's list per call.
            token_start, token_end = encoding.token_to_chars(first)[0], encoding.token_to_chars(last)[1]
            text = row.marked_text
            if text[token_start : turn.char_start].strip() or text[turn.char_end : token_end].strip():
                return _straddles(turn, text[min(token_start, turn.char_start) : turn.char_start + 8])
            turn.first_token, turn.last_token = first, last
        return None

    def _locate_by_bytes(self, row: _Rendered, raw: bytes, bounds: np.ndarray, base: int) -> Rejection | None:
        """Set each turn's first and last token from the tokens' byte boundaries (``bounds - base``)."""
        ascii_text = len(raw) == len(row.text)
        for turn in row.turns:
            start = turn.char_start if ascii_text else len(row.text[: turn.char_start].encode("utf-8"))
            end = turn.char_end if ascii_text else start + len(row.text[turn.char_start : turn.char_end].encode("utf-8"))
            if end <= start:
                return _no_tokens(turn)
            first = int(bounds.searchsorted(start + base, "right")) - 1  # the token holding byte `start`
            last = int(bounds.searchsorted(end + base, "left")) - 1  # the token holding byte `end - 1`
            token_start, token_end = int(bounds[first]) - base, int(bounds[last + 1]) - base
            if (token_start != start or token_end != end) and (
                raw[token_start:start].decode("utf-8", "replace").strip()
                or raw[end:token_end].decode("utf-8", "replace").strip()
            ):
                return _straddles(turn, raw[token_start : start + 8].decode("utf-8", "replace"))
            turn.first_token, turn.last_token = first, last
        return None

    def _labels(self, row: _Rendered, ids: np.ndarray):
        """Labels for a row whose turns are located: (ids, labels, turns) or a Rejection."""
        turns, train_flags = row.turns, row.train_flags
        selected = self._selected_turns(turns, train_flags)
        if self.train_on == "all":
            labels = ids.copy()
            for turn in turns:
                if turn not in selected:
                    labels[turn.first_token : turn.last_token + 1] = schema.IGNORE_INDEX
        else:
            labels = np.full_like(ids, schema.IGNORE_INDEX)
            for turn in selected:
                labels[turn.first_token : turn.last_token + 1] = ids[turn.first_token : turn.last_token + 1]
        if not (labels != schema.IGNORE_INDEX).any():
            return Rejection(
                "tokenize",
                "no_trainable_tokens",
                f"no assistant turn is trained (train_on={self.train_on}, "
                f"{len(turns)} assistant turns, {sum(f is False for f in train_flags)} marked train: false)",
            )
        return ids, labels, turns

    def _selected_turns(self, turns: list[_Turn], train_flags) -> list[_Turn]:
        wanted = [t for t in turns if train_flags[t.message_index] is not False]
        if self.train_on == "last_assistant":
            last = turns[-1] if turns and train_flags[turns[-1].message_index] is not False else None
            wanted = [t for t in wanted if t is last or train_flags[t.message_index] is True]
        return wanted

    def _fit_length(self, ids: np.ndarray, labels: np.ndarray, turns: list[_Turn]) -> Encoded | Rejection:
        length = len(ids)
        if length > self.max_length:
            trained = np.flatnonzero(labels != schema.IGNORE_INDEX)
            first_trained = int(trained[0])
            if first_trained >= self.max_length:
                return Rejection(
                    "tokenize",
                    "too_long",
                    f"the prompt before the first trained token is {first_trained} tokens, "
                    f"max_length is {self.max_length}",
                )
            if not self.truncate:
                return Rejection("tokenize", "too_long", f"{length} tokens, max_length is {self.max_length}")
            # Cut after the last whole trained turn that fits, so no later header is left dangling;
            # if none fits, cut inside the first one: its end token is then not trained.
            turn_ends = [
                t.last_token + 1
                for t in turns
                if t.last_token + 1 <= self.max_length and labels[t.last_token] != schema.IGNORE_INDEX
            ]
            cut = max(turn_ends) if turn_ends and self.train_on != "all" else self.max_length
            ids, labels = ids[:cut], labels[:cut]
            if not (labels != schema.IGNORE_INDEX).any():
                return Rejection(
                    "tokenize", "no_trainable_tokens", f"nothing trainable left after truncating to {cut} tokens"
                )
            return Encoded(ids.astype(np.int32), labels.astype(np.int32), truncated=True)
        return Encoded(ids.astype(np.int32, copy=False), labels.astype(np.int32, copy=False))


def _private_copy(backend):
    """The Rust tokenizer with this Masker's own settings.

    transformers leaves state on the shared backend (``split_special_tokens=True`` sets
    ``encode_special_tokens`` until the next call; padding and truncation may be switched on), and
    such state would silently change ids; a copy encodes exactly the vocabulary, nothing else.
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = False
    return copy


class _PrefixMismatch(Exception):
    pass


def _no_tokens(turn: _Turn) -> Rejection:
    return Rejection(
        "tokenize", "mask_unverifiable", f"assistant turn {turn.message_index} covers no tokens of the rendered text"
    )


def _straddles(turn: _Turn, around: str) -> Rejection:
    return Rejection(
        "tokenize",
        "mask_unverifiable",
        f"assistant turn {turn.message_index}: a token straddles the turn's boundary ({around!r}), so the "
        "response cannot be trained without training template text",
    )


def _row_strings(messages: list[dict[str, Any]], tools: str | None):
    for m in messages:
        yield m["content"]
        if m.get("name"):
            yield m["name"]
        if m.get("tool_calls"):
            yield m["tool_calls"]
    if tools:
        yield tools


def _leading_space(text: str, start: int, end: int | None) -> int:
    stretch = text[start:end]
    return len(stretch) - len(stretch.lstrip())


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


def _span_matches(decoded: str, message: dict[str, Any], end_token: str | None) -> bool:
    """Decoded trained tokens == the turn's content (+ its rendered tool calls) + its end token."""
    body = decoded.strip()
    if end_token:
        if not body.endswith(end_token):
            return False
        body = body[: -len(end_token)].rstrip()
    content = message["content"].strip()
    calls = message.get("tool_calls")
    if not calls:
        return body == content
    if not body.startswith(content):
        return False
    rest = body[len(content) :]
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if not name or name not in rest:
            return False
    return True


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

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
* **Length.** Rows over ``max_length`` are rejected as ``too_long`` or, with ``truncate``, cut at
  the end of the last whole assistant turn that fits (or inside the first one, whose end token
  is then not trained); a prompt that alone does not fit is always ``too_long``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
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

    def encode_batch(self, marked_texts: list[str]):
        encodings = self.tokenizer.encode_batch(marked_texts, add_special_tokens=False)
        ids = []
        for encoding in encodings:
            array = np.asarray(encoding.ids, dtype=np.int32)
            placeholder = array >= self.base
            array[placeholder] = self.lookup[array[placeholder] - self.base]
            ids.append(array)
        return encodings, ids


@dataclass
class _Rendered:
    """One conversation rendered and located, ready to tokenize."""

    index: int  # row in the batch
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
        results: list[Encoded | Rejection | None] = [None] * len(rows)
        rendered: list[_Rendered] = []
        for index, (messages, tools) in enumerate(rows):
            outcome = self._render_row(index, messages, tools)
            if isinstance(outcome, Rejection):
                results[index] = outcome
            else:
                rendered.append(outcome)

        # One batch call per encoder: the Rust tokenizer encodes the whole batch at once.
        plain = [r for r in rendered if not r.has_control_text]
        hidden = [r for r in rendered if r.has_control_text]
        encoded = []
        if plain:
            encodings = self.backend.encode_batch([r.marked_text for r in plain], add_special_tokens=False)
            encoded += [(r, e, np.asarray(e.ids, dtype=np.int32)) for r, e in zip(plain, encodings)]
        if hidden:
            encodings, ids = self._control_encoder().encode_batch([r.marked_text for r in hidden])
            encoded += list(zip(hidden, encodings, ids))

        checks = []  # (row index, turn, the turn's message as rendered)
        staged = {}
        for row, encoding, ids in encoded:
            outcome = self._label_row(row, encoding, ids)
            if isinstance(outcome, Rejection):
                results[row.index] = outcome
                continue
            staged[row.index] = outcome
            checks += [(row.index, turn, row.messages[turn.message_index]) for turn in outcome[2]]

        decoded = self.backend.decode_batch(
            [staged[index][0][t.first_token : t.last_token + 1].tolist() for index, t, _ in checks],
            skip_special_tokens=False,
        )
        for (index, turn, message), text in zip(checks, decoded):
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
        return _Rendered(index, marked, turns, true_messages, train_flags, has_control_text)

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
    def _label_row(self, row: _Rendered, encoding, ids: np.ndarray):
        turns, train_flags = row.turns, row.train_flags
        for turn in turns:
            first = _token_at_or_after(encoding, turn.char_start, turn.char_end)
            last = _token_at_or_before(encoding, turn.char_end - 1, turn.char_start)
            if first is None or last is None or last < first:
                return Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    f"assistant turn {turn.message_index} covers no tokens of the rendered text",
                )
            # A token that merges template text with the turn (e.g. "][" across "[/INST][TOOL_CALLS]")
            # would train prompt characters: only whitespace may lie outside the turn's span.
            # token_to_chars, not offsets[i]: the offsets property builds the whole row's list per call.
            token_start, token_end = encoding.token_to_chars(first)[0], encoding.token_to_chars(last)[1]
            text = row.marked_text
            if text[token_start : turn.char_start].strip() or text[turn.char_end : token_end].strip():
                return Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    f"assistant turn {turn.message_index}: a token straddles the turn's boundary "
                    f"({text[min(token_start, turn.char_start) : turn.char_start + 8]!r}), so the "
                    "response cannot be trained without training template text",
                )
            turn.first_token, turn.last_token = first, last
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

"""The Masker: rendered conversation -> ``input_ids`` and ``labels``, in three phases.

``render`` (Python: the template, each assistant turn located in the text, :mod:`.locate`),
``tokenize`` (the Rust tokenizer, without the GIL) and ``finish`` (each turn's tokens,
:mod:`.token_spans`; labels and length, :mod:`.labels`; verification, :mod:`.verify`; the
render-vs-inference check). See the package docstring for what it guarantees.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pipeline import schema
from pipeline.deadline import RenderTimeout, release, time_limit
from pipeline.masking.byte_table import ByteTable
from pipeline.masking.control import (
    _PLACEHOLDER_CHARS,
    _PlainControlEncoder,
    _private_copy,
    _row_strings,
    control_tokens,
)
from pipeline.masking.labels import build_labels, fit_length, selected_turns
from pipeline.masking.locate import LocateError, locate_turns, prompt_closes_think, prompt_opens_think, realise
from pipeline.masking.piece_table import PieceOffsets, PieceTable
from pipeline.masking.policies import (
    TRAIN_ON,
    ReasoningShape,
    RolePolicy,
    call_leads,
    kept_reasoning_frame,
    lead_key,
    next_message_stops,
    prompt_in_generation_blocks,
    reasoning_into_empty_block,
    turn_markup,
)
from pipeline.masking.results import Encoded
from pipeline.masking.token_spans import token_start_from_bytes, tokens_from_bytes, tokens_from_offsets
from pipeline.masking.verify import bare, call_name, clip, metaspace, span_matches
from pipeline.stage import Drop
from pipeline.templates import KNOWN_END_TOKENS, Renderer, RenderTooLarge, Template, builtin_prompt_end, template_variables

SPAN_METHODS = ("auto", "generation", "locate", "prefix")  # "prefix": the old name of "locate"


@dataclass
class _Turn:
    """One assistant turn located in the rendered text."""

    message_index: int  # index into the rendered message list
    char_start: int
    char_end: int
    end_token: str | None
    first_token: int = -1
    last_token: int = -1  # inclusive
    opened_think: bool = False  # its generation prompt ends inside a think block it opened: "<think>" is not its text


@dataclass
class RenderedBatch:
    """A batch between the phases of :meth:`Masker.encode_batch`."""

    results: list  # per row: a Drop as soon as one is known, else None until finish
    by_bytes: list[_Rendered] = field(default_factory=list)  # rows for the byte-table path
    by_offsets: list[_Rendered] = field(default_factory=list)  # rows that need the tokenizer's offsets
    by_pieces: list[_Rendered] = field(default_factory=list)  # rows whose offsets the piece table rebuilds
    encoded_by_bytes: list[_Tokenized] = field(default_factory=list)  # once tokenized
    encoded_by_offsets: list[_Tokenized] = field(default_factory=list)
    encoded_by_pieces: list[_Tokenized] = field(default_factory=list)
    spelled_bytes: _Spelled | None = None  # the ids of encoded_by_bytes spelled through the byte table
    spelled_pieces: _Spelled | None = None  # those of encoded_by_pieces through the piece table


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
    # The generation prompt of the last trained turn when its text differs from the row's text
    # before that turn; None when it agrees, then ``prompt_length`` is its length.
    prompt: str | None = None
    prompt_length: int = -1


class _Spelled(NamedTuple):
    """Rows' ids, one row after the other, spelled through a token table (``decode_bytes``)."""

    blob: bytes
    bounds: np.ndarray  # every token's first byte in ``blob``, plus the end
    unknown_before: np.ndarray | None  # per token, the ids before it the table does not know (None: none)


class _Tokenized(NamedTuple):
    """A rendered row and its tokens; ``encoding`` has character offsets on the offset-mapping path only."""

    row: _Rendered
    encoding: Any  # the tokenizers Encoding
    ids: np.ndarray  # int32, control placeholders mapped back to the tokenizer's ids


class _Labelled(NamedTuple):
    """A row whose turns are located in its tokens, with its labels (verification still to come)."""

    rendered: _Rendered
    ids: np.ndarray
    labels: np.ndarray
    token_start: Callable[[int], int]  # token index -> its first character in ``rendered.marked_text``


class _SpanCheck(NamedTuple):
    """One trained turn's tokens decoded, to be checked against the turn's message."""

    index: int  # row in the batch
    turn: _Turn
    message: dict[str, Any]  # the turn's message as rendered
    decoded: str


class _PromptTail(NamedTuple):
    """The tokens of a row from its last control token before its last trained turn (that token
    included; the row's start if there is none) up to that turn, and the generation prompt's text
    there: encoded on its own it must give the same tokens."""

    index: int  # row in the batch
    turn: _Turn
    tokens: np.ndarray  # int32, the row's tokens there
    text: str | None  # None: the prompt ends before those tokens start


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
        reasoning: str = "template",
        system: str = "keep",
        strict_render: bool = False,
        render_timeout: float | None = 5.0,
        max_render_chars: int | None = 8_000_000,
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if span_method not in SPAN_METHODS:
            raise ValueError(f"span_method must be one of {SPAN_METHODS}, got {span_method!r}")
        if span_method == "generation" and not template.has_generation_tags:
            raise ValueError(f"chat template {template.name!r} has no {{% generation %}} blocks to find spans with")
        self.tokenizer = tokenizer
        self.backend = _private_copy(tokenizer.backend_tokenizer)
        tokenizer_json = json.loads(self.backend.to_str())  # read once: the byte table and the decoder
        self.token_bytes = ByteTable.build(tokenizer_json)  # None: every row goes the offset-mapping path
        # SentencePiece: the offset-mapping path's results, rebuilt from the ids (None: not such a tokenizer)
        self.token_pieces = PieceTable.build(tokenizer_json) if self.token_bytes is None else None
        self.template = template
        self.max_length = max_length
        self.train_on = train_on
        self.truncate = truncate
        self.variables = template_variables(tokenizer)
        limits = (render_timeout, max_render_chars)
        self.reasoning = ReasoningShape(template, reasoning, self.variables, limits)
        self.roles = RolePolicy(template, self.variables, system, limits=limits)
        self.strict_render = strict_render
        self.render_timeout = render_timeout
        self.renderer = Renderer(template, self.variables, max_render_chars)
        self.use_generation = self._uses_generation_blocks(span_method, limits)
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
        decoder = tokenizer_json.get("decoder") or {}
        self.as_decoded = metaspace if "\u2581" in json.dumps(decoder, ensure_ascii=False) else (lambda s: s)
        control_ids = [i for i in (self.backend.token_to_id(c) for c in self.controls) if i is not None]
        # is_control[id]: the template's control tokens (they cut the tokenization of a text in two)
        self.is_control = np.zeros(max([self.backend.get_vocab_size(with_added_tokens=True), *control_ids]) + 1, bool)
        self.is_control[control_ids] = True
        self._prompt_tail_ids: dict[str, np.ndarray] = {}  # a prompt's text after its last control token -> ids
        # gpt-oss's <|channel|>final<|message|> …: header text of the template's own that the model writes in a turn
        self.turn_markup = turn_markup(template, self.variables, self.controls, self.reasoning.reads_field, limits)
        # what it writes before a calling turn's first call name: [TOOL_CALLS] [{"name": "
        leads = call_leads(template, self.variables, self.controls, self.reasoning.reads_field, self.roles.arguments_as_text, limits)
        # as decoded; keyed by where a calling turn stands (policies.lead_key)
        self.call_leads = None if leads is None else {k: frozenset(bare(self.as_decoded(t)) for t in v) for k, v in leads.items()}
        # GLM-4.5 writes no end-of-turn token: the next message's role token is where the model stops
        self.stops = (
            {}
            if template.end_token
            else next_message_stops(template, self.variables, self.controls, self.end_tokens, self.roles.arguments_as_text, limits)
        )
        if self.stops:
            self.end_tokens = tuple(sorted({*self.end_tokens, *self.stops.values()}, key=lambda t: (-len(t), t)))
        # per_turn: how the template writes reasoning it keeps (Kimi K2 Thinking's answers render an empty block)
        self.think_frame = (
            kept_reasoning_frame(template, self.variables, limits)
            if self.reasoning.policy == "per_turn" and self.reasoning.reads_field
            else None
        )

    def _uses_generation_blocks(self, span_method: str, limits) -> bool:
        """Whether turns are taken from the template's ``{% generation %}`` blocks: asked for, or
        ``auto`` with blocks that start where the generation prompt ends. Blocks that take in the
        prompt (SmolLM3's hold the assistant header) would train text the model never writes:
        ``auto`` locates the turns instead, and ``generation`` is refused here, not row by row."""
        if span_method not in ("generation", "auto") or not self.template.has_generation_tags:
            return False
        held = prompt_in_generation_blocks(self.template, self.variables, limits)
        if held is None:
            return True
        if span_method == "generation":
            raise ValueError(
                f"chat template {self.template.name!r} puts its generation prompt {held!r} inside its "
                "{% generation %} blocks, so they would train text the model is given, not text it writes; "
                "use tokenize.span_method 'auto' or 'locate' (sftkit then finds each turn itself)"
            )
        return False

    # --- public ------------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]], tools: str | None = None) -> Encoded | Drop:
        return self.encode_batch([(messages, tools)])[0]

    def encode_batch(self, rows: Sequence[tuple[list[dict[str, Any]], str | None]]) -> list[Encoded | Drop]:
        """Canonical conversations (messages, tools JSON) -> an Encoded or a Drop each, in order."""
        return self.finish(self.tokenize(self.render(rows)))

    # The three phases of encode_batch, for callers that overlap them: render and finish are
    # Python, tokenize is the Rust tokenizer (it runs without the GIL).
    def render(self, rows: Sequence[tuple[list[dict[str, Any]], str | None]]) -> RenderedBatch:
        """Phase 1: render every conversation and locate its assistant turns in the text."""
        batch = RenderedBatch([None] * len(rows))
        table, pieces = self.token_bytes, self.token_pieces
        for index, (messages, tools) in enumerate(rows):
            outcome = self._bounded_render_row(index, messages, tools)
            if isinstance(outcome, Drop):
                batch.results[index] = outcome
            elif table is not None and table.covers(outcome.text):
                batch.by_bytes.append(outcome)
            elif pieces is not None and pieces.covers(outcome.text):
                batch.by_pieces.append(outcome)
            else:
                batch.by_offsets.append(outcome)
        return batch

    def tokenize(self, batch: RenderedBatch) -> RenderedBatch:
        """Phase 2: tokenize the rendered texts; rows on the byte- and piece-table paths without
        offsets, their ids spelled through the table here (numpy, mostly without the GIL too)."""
        batch.encoded_by_bytes = self._encode(batch.by_bytes, offsets=False)
        batch.encoded_by_pieces = self._encode(batch.by_pieces, offsets=False)
        batch.encoded_by_offsets = self._encode(batch.by_offsets, offsets=True)
        batch.spelled_bytes = _spell(self.token_bytes, batch.encoded_by_bytes)
        batch.spelled_pieces = _spell(self.token_pieces, batch.encoded_by_pieces)
        return batch

    def finish(self, batch: RenderedBatch) -> list[Encoded | Drop]:
        """Phase 3: locate turns in tokens, build labels, verify every trained span, fit the length."""
        results = batch.results
        labelled: dict[int, _Labelled] = {}  # row in the batch -> its labels, until a check drops it
        checks: list[_SpanCheck] = []
        leftovers = self._label_by_bytes(batch.encoded_by_bytes, batch.spelled_bytes, results, labelled, checks)
        leftovers += self._label_by_pieces(batch.encoded_by_pieces, batch.spelled_pieces, results, labelled, checks)
        by_offsets = batch.encoded_by_offsets + self._encode(leftovers, offsets=True)
        self._label_by_offsets(by_offsets, results, labelled, checks)
        for check in checks:
            if check.index in labelled and not span_matches(
                check.decoded,
                check.message,
                check.turn.end_token,
                self.as_decoded,
                self.turn_markup,
                self._leads(labelled, check),
                check.turn.opened_think,
            ):
                del labelled[check.index]
                results[check.index] = _unverified(check, self.as_decoded)
        mismatched = self._render_mismatches(labelled)
        for index, entry in labelled.items():
            outcome = fit_length(
                entry.ids,
                entry.labels,
                entry.rendered.turns,
                max_length=self.max_length,
                truncate=self.truncate,
                train_on=self.train_on,
            )
            if isinstance(outcome, Encoded):  # no end token known: the model learns no stop from the turn
                selected = self._selected_turns(entry.rendered.turns, entry.rendered.train_flags)
                outcome.turns_without_stop = sum(turn.end_token is None for turn in selected)
            if isinstance(outcome, Encoded) and index in mismatched:
                if self.strict_render:
                    outcome = Drop("render_mismatch", mismatched[index], stage="tokenize")
                else:
                    outcome.render_mismatch = True
            results[index] = outcome
        return results  # type: ignore[return-value]

    # --- finish: each turn's tokens, labels, the render-vs-inference check -------------------
    def _label_by_bytes(
        self,
        tokenized: list[_Tokenized],
        spelled_rows: _Spelled | None,
        results: list,
        labelled: dict[int, _Labelled],
        checks: list[_SpanCheck],
    ) -> list[_Rendered]:
        """Locate and label rows on the byte-table path; return the rows the table does not give
        back exactly, for the offset-mapping path.

        Every row's ids, decoded through the table in one gather, must give back its text byte
        for byte: then a span of the text *is* the decoding of the tokens over it. No row fails
        that with a plain byte-level tokenizer; a pre-tokenizer step that drops characters would
        send every row to the offset-mapping path.
        """
        spelled_rows = spelled_rows or _spell(self.token_bytes, tokenized)
        if spelled_rows is None:
            return []
        leftovers = []
        for item, bounds, base, spelling in _each_spelled(spelled_rows, tokenized):
            row, ids = item.row, item.ids
            raw = row.text.encode("utf-8")
            if spelling is None or spelling != raw:
                leftovers.append(row)
                continue
            outcome = tokens_from_bytes(row.turns, row.text, raw, bounds, base) or self._labels(row, ids)
            if isinstance(outcome, Drop):
                results[row.index] = outcome
                continue
            labelled[row.index] = _Labelled(row, ids, outcome, token_start_from_bytes(raw, row.text, bounds, base))
            checks += [
                _SpanCheck(
                    row.index,
                    turn,
                    row.messages[turn.message_index],
                    raw[bounds[turn.first_token] - base : bounds[turn.last_token + 1] - base].decode("utf-8", "replace"),
                )
                for turn in row.turns
            ]
        return leftovers

    def _label_by_pieces(
        self,
        tokenized: list[_Tokenized],
        spelled_rows: _Spelled | None,
        results: list,
        labelled: dict[int, _Labelled],
        checks: list[_SpanCheck],
    ) -> list[_Rendered]:
        """Locate and label rows on the piece-table path (see :mod:`.piece_table`) exactly as the
        offset-mapping path would; return the rows whose ids do not spell their text, for that path."""
        table = self.token_pieces
        spelled_rows = spelled_rows or _spell(table, tokenized)
        if spelled_rows is None:
            return []
        leftovers: list[_Rendered] = []
        undecoded: list[tuple[_Labelled, _Turn]] = []  # spans only the tokenizer's decoder can spell
        for item, bounds, base, spelling in _each_spelled(spelled_rows, tokenized):
            row, ids = item.row, item.ids
            raw = row.text.encode("utf-8")
            shift = table.shift(spelling, raw) if spelling is not None else None  # type: ignore[union-attr]
            if shift is None:
                leftovers.append(row)
                continue
            offsets = PieceOffsets(raw, row.text, bounds, base, shift)
            outcome = tokens_from_offsets(row.turns, offsets, row.marked_text) or self._labels(row, ids)
            if isinstance(outcome, Drop):
                results[row.index] = outcome
                continue
            entry = labelled[row.index] = _Labelled(row, ids, outcome, offsets.token_start)
            for turn in row.turns:
                decoded = table.decoded(spelled_rows.blob[bounds[turn.first_token] : bounds[turn.last_token + 1]])  # type: ignore[union-attr]
                if decoded is None:
                    undecoded.append((entry, turn))
                else:
                    checks.append(_SpanCheck(row.index, turn, row.messages[turn.message_index], decoded))
        if undecoded:
            checks += self._decoded_spans(undecoded)
        return leftovers

    def _label_by_offsets(
        self, tokenized: list[_Tokenized], results: list, labelled: dict[int, _Labelled], checks: list[_SpanCheck]
    ) -> None:
        """Locate and label rows from the character offsets of their encodings (the offset-mapping path)."""
        located: list[_Labelled] = []
        for item in tokenized:
            row, encoding, ids = item.row, item.encoding, item.ids
            outcome = tokens_from_offsets(row.turns, encoding, row.marked_text) or self._labels(row, ids)
            if isinstance(outcome, Drop):
                results[row.index] = outcome
                continue
            labelled[row.index] = _Labelled(row, ids, outcome, lambda token, encoding=encoding: encoding.token_to_chars(token)[0])
            located.append(labelled[row.index])
        checks += self._decoded_spans([(entry, turn) for entry in located for turn in entry.rendered.turns])

    def _decoded_spans(self, spans: list[tuple[_Labelled, _Turn]]) -> list[_SpanCheck]:
        """Each trained span's text as the tokenizer's own decoder gives it, to check against its message."""
        texts = self.backend.decode_batch(
            [entry.ids[turn.first_token : turn.last_token + 1].tolist() for entry, turn in spans],
            skip_special_tokens=False,
        )
        return [
            _SpanCheck(entry.rendered.index, turn, entry.rendered.messages[turn.message_index], text)
            for (entry, turn), text in zip(spans, texts)
        ]

    def _leads(self, labelled: dict[int, _Labelled], check: _SpanCheck) -> frozenset[str] | None:
        """What the template writes before the first call name of the checked turn, were it a calling turn with no words."""
        if self.call_leads is None or not check.message.get("tool_calls"):
            return None
        return self.call_leads[lead_key(labelled[check.index].rendered.messages, check.turn.message_index)]

    def _render_mismatches(self, labelled: dict[int, _Labelled]) -> dict[int, str]:
        """Rows whose tokens before the last trained turn are not what inference tokenizes there.

        The text was compared when rendering; here only the tokens around the prompt's end can
        differ (a merge across it), and the tokens from the last control token before it are
        encoded again: the control token cuts the tokenization there. The control token itself is
        encoded too, because a SentencePiece tokenizer puts "▁" before a text that starts the string
        and not before one that follows a control token, as the prompt's tail does. (A prompt with no
        control token is encoded whole; when the tokenizer prefixes it with "▁" and the row does not
        start so, it is known to differ without encoding it: :meth:`.PieceTable.starts_otherwise`.)
        With a SentencePiece tokenizer whose spaces cut the tokenization (:meth:`.PieceTable.space_cut`)
        only the prompt's text from its last such space is encoded.
        """
        mismatched: dict[int, str] = {}
        pieces = self.token_pieces
        pending: dict[str | None, list[_PromptTail]] = {}  # text -> plain rows whose prompt ends with it
        hidden: list[_PromptTail] = []  # rows with control-token text, for the control encoder
        for index, entry in labelled.items():
            row = entry.rendered
            turn = next((t for t in reversed(row.turns) if entry.labels[t.first_token] != schema.IGNORE_INDEX), None)
            if turn is None:
                continue
            if row.prompt is not None:
                mismatched[index] = (
                    f"the text before assistant turn {turn.message_index} is not what "
                    f"apply_chat_template(messages[:{turn.message_index}], add_generation_prompt=True) renders: "
                    f"it ends {clip(row.text[max(0, turn.char_start - 60) : turn.char_start])!r}, the prompt ends "
                    f"{clip(row.prompt[-60:])!r}"
                )
                continue
            first = turn.first_token
            start = max(0, self._after_last_control(entry.ids, first) - 1)  # the control token, if any
            while first > start and entry.token_start(first - 1) >= row.prompt_length:
                first -= 1  # tokens of the whitespace between the prompt and the turn belong to neither
            char = entry.token_start(start) if start < first else row.prompt_length
            text = row.marked_text[char : row.prompt_length] if char <= row.prompt_length else None
            if text is not None and pieces is not None and not row.has_control_text:
                # from the last space that cuts the tokenization, not the whole prompt (Mistral's
                # "[INST]" is text: the tail would be the user's message, encoded again)
                cut = pieces.space_cut(row.marked_text, char, row.prompt_length)
                token = _token_starting_at(entry, cut, start, first) if cut is not None else None
                if token is not None:
                    start, char, text = token, cut, row.marked_text[cut : row.prompt_length]
            tail = _PromptTail(index, turn, entry.ids[start:first], text)
            if row.has_control_text:
                hidden.append(tail)
            elif (
                text is not None
                and char == 0
                and len(tail.tokens)
                and not self.is_control[tail.tokens[0]]
                and pieces is not None
                and pieces.starts_otherwise(text, int(tail.tokens[0]))
            ):
                mismatched[index] = _merge_mismatch(tail)  # no need to encode it to know
            else:  # the same few texts ("assistant\n") come back row after row: encode each once
                pending.setdefault(text, []).append(tail)
        new = [text for text in pending if text is not None and text not in self._prompt_tail_ids]
        fresh = (
            {
                text: np.asarray(encoding.ids, dtype=np.int32)
                for text, encoding in zip(new, self.backend.encode_batch_fast(new, add_special_tokens=False))
            }
            if new
            else {}
        )
        if len(self._prompt_tail_ids) < 4096:
            self._prompt_tail_ids.update(fresh)
        compared = [
            (tail, fresh.get(text, self._prompt_tail_ids.get(text)) if text is not None else None)
            for text, waiting in pending.items()
            for tail in waiting
        ]
        if hidden:
            encoded = self._control_encoder().encode_batch([tail.text or "" for tail in hidden], offsets=False)[1]
            compared += zip(hidden, encoded)
        for tail, got in compared:
            if tail.text is None or got is None or tail.tokens.tobytes() != got.tobytes():  # both int32
                mismatched[tail.index] = _merge_mismatch(tail)
        return mismatched

    def _after_last_control(self, ids: np.ndarray, first: int) -> int:
        """The token after the last control token before ``first`` (0 if none)."""
        window = 64  # a control token is almost always a few tokens back (the turn's header)
        while True:
            low = max(0, first - window)
            found = np.flatnonzero(self.is_control[ids[low:first]])
            if len(found):
                return low + int(found[-1]) + 1
            if low == 0:
                return 0
            window *= 8

    # --- rendering ---------------------------------------------------------------------------
    def _control_encoder(self) -> _PlainControlEncoder:
        with self._lock:  # one Masker may serve several tokenizing threads
            if self._plain_control_encoder is None:
                self._plain_control_encoder = _PlainControlEncoder(self.backend, self.controls)
            return self._plain_control_encoder

    def _bounded_render_row(self, index: int, canonical: list[dict[str, Any]], tools: str | None) -> _Rendered | Drop:
        """:meth:`_render_row` within the row's time limit and output size (a template is a program)."""
        try:
            with time_limit(self.render_timeout):
                return self._render_row(index, canonical, tools)
        except RenderTimeout:
            release()  # if it landed as the limit was being left
            return Drop(
                "template_timeout",
                f"chat template {self.template.name!r} took longer than {self.render_timeout:g} s to render the "
                "conversation (template.render_timeout_s)",
                stage="template",
            )
        except RenderTooLarge as exc:
            return Drop(
                "template_output_too_large",
                f"chat template {self.template.name!r}: {exc} (template.max_render_chars)",
                stage="template",
            )

    def _render_row(self, index: int, canonical: list[dict[str, Any]], tools: str | None) -> _Rendered | Drop:
        try:
            true_messages = schema.messages_for_template(canonical)
            tool_schemas = schema.tools_for_template(tools)
        except (ValueError, TypeError) as exc:
            return Drop("template_error", f"tool calls or tools are not valid JSON: {exc}", stage="template")
        has_control_text = self.control_re is not None and any(self.control_re.search(text) for text in _row_strings(canonical, tools))
        messages = true_messages
        if has_control_text:
            if any(_PLACEHOLDER_CHARS.search(text) for text in _row_strings(canonical, tools)):
                return Drop(
                    "mask_unverifiable",
                    "the conversation holds control-token text and private-use characters (U+F0000 and up) "
                    "that sftkit needs as placeholders to keep that text plain",
                    stage="tokenize",
                )
            encoder = self._control_encoder()
            hidden = [
                {
                    **m,
                    "content": encoder.hide(m["content"], self.control_re),
                    "name": encoder.hide(m["name"], self.control_re) if m.get("name") else m.get("name"),
                    "tool_calls": encoder.hide(m["tool_calls"], self.control_re) if m.get("tool_calls") else None,
                    "reasoning": encoder.hide(m["reasoning"], self.control_re) if m.get("reasoning") else None,
                }
                for m in canonical
            ]
            messages = schema.messages_for_template(hidden)
            tool_schemas = schema.tools_for_template(encoder.hide(tools, self.control_re) if tools else tools)
        train_flags = [m.get("train") for m in canonical]
        prepared = self.roles.prepare(messages, true_messages, train_flags)
        if isinstance(prepared, Drop):
            return prepared
        messages, true_messages, train_flags = prepared
        known_prompt = None  # per_turn: the last turn's generation prompt, where rendered already
        if self.reasoning.policy == "per_turn":
            messages, known_prompt = self._without_reasoning_when_thinking_is_off(messages, tool_schemas)
        shaped = self.reasoning.shape(messages)
        plain = realise(shaped, None)
        try:
            rendered, spans = self._render(plain, tool_schemas, with_spans=self.use_generation)
            sentinels = lambda msgs: self._render(msgs, tool_schemas)[0]  # noqa: E731
            # DeepSeek-R1's answers: no stray "\n\n"; Nemotron's last answer: no second <think>
            if placed := self.reasoning.placement(shaped, rendered, sentinels):
                shaped = self.reasoning.shape(messages, placed)
                plain = realise(shaped, None)
                known_prompt = None  # the turns before may render otherwise now
                rendered, spans = self._render(plain, tool_schemas, with_spans=self.use_generation)
        except Exception as exc:  # a template raises whatever its author chose (raise_exception, TypeError …)
            return self.roles.render_failure(messages, exc)
        assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.use_generation:
            if len(spans) != len(assistant_indices):
                return Drop(
                    "mask_unverifiable",
                    f"the template marked {len(spans)} generation blocks for {len(assistant_indices)} assistant turns",
                    stage="tokenize",
                )
            turns = [_Turn(i, *self._trim_span(rendered, start, end)) for i, (start, end) in zip(assistant_indices, spans)]
        else:
            plain_marker = self._end_marker_in_tool_calls(messages)
            if plain_marker is not None:
                return plain_marker
            try:
                located = locate_turns(
                    lambda msgs, prompt: self._render(msgs, tool_schemas, add_generation_prompt=prompt)[0],
                    shaped,
                    rendered,
                    self.end_tokens,
                    self.controls,
                )
            except LocateError as exc:
                return Drop("mask_unverifiable", str(exc), stage="tokenize")
            except Exception as exc:
                return self.roles.render_failure(messages, exc)
            turns = [_Turn(t.message_index, t.start, t.end, t.end_token, opened_think=t.opened_think) for t in located]
        if self.stops and turns:
            rendered, turns = self._close_last_turn(rendered, turns, messages)
        prompt = None  # the last trained turn's generation prompt, where already rendered
        if self.reasoning.policy == "per_turn" and turns:
            composed = self._as_at_inference(rendered, turns[-1], plain, messages, tool_schemas, known_prompt)
            if isinstance(composed, Drop):
                return composed
            rendered, turns, prompt = composed
        if has_control_text:
            text, marked = self._control_encoder().texts(rendered)
        else:
            text = marked = rendered
        checked = _answered_calls_without_text(true_messages) if self.roles.drops_answered_call_text else true_messages
        row = _Rendered(index, text, marked, turns, checked, train_flags, has_control_text)
        row.prompt = self._inference_prompt(row, rendered, plain, tool_schemas, prompt)
        return row

    def _render(self, messages, tools, **options) -> tuple[str, list[tuple[int, int]]]:
        return self.renderer.render(messages, tools, **options)

    def _end_marker_in_tool_calls(self, messages: list[dict[str, Any]]) -> Drop | None:
        """A turn whose tool calls hold its end marker as text cannot be located: the turn's end
        is found as the first marker after its text, and tool calls are rendered, not replaced.
        (A marker that is a control token is hidden before rendering; this is the plain-text one
        of a template whose markers the tokenizer lacks.)"""
        for index, message in enumerate(messages):
            calls = message.get("tool_calls")
            if not calls:
                continue
            text = json.dumps(calls, ensure_ascii=False)
            for token in self.end_tokens:
                if token in text or json.dumps(token, ensure_ascii=False)[1:-1] in text:
                    return Drop(
                        "mask_unverifiable",
                        f"assistant turn {index}: its tool calls hold the end-of-turn marker {token!r} as text, "
                        "so where the turn ends cannot be told (the tokenizer has no such token)",
                        stage="tokenize",
                    )
        return None

    def _close_last_turn(self, rendered: str, turns: list[_Turn], messages: list[dict[str, Any]]) -> tuple[str, list[_Turn]]:
        """A template that writes no end-of-turn token (``self.stops``) leaves a conversation's last
        turn open: the model stops there with the token that opens the next message (GLM-4.5:
        ``<|user|>`` after an answer, ``<|observation|>`` after a call). It is appended and trained."""
        last = turns[-1]
        if last.end_token is not None or last.message_index != len(messages) - 1 or rendered[last.char_end :].strip():
            return rendered, turns
        token = self.stops.get("call" if messages[last.message_index].get("tool_calls") else "answer")
        if token is None:
            return rendered, turns
        rendered += token
        closed = _Turn(last.message_index, last.char_start, len(rendered), token, opened_think=last.opened_think)
        return rendered, [*turns[:-1], closed]

    def _without_reasoning_when_thinking_is_off(
        self, messages: list[dict[str, Any]], tool_schemas
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A per_turn row's last turn without its reasoning where its generation prompt closes the
        think block (Qwen3 and GLM with enable_thinking false, DeepSeek-V3.1 without thinking): the
        model writes none after that prompt, so none is trained after it (a second think block
        after the prompt's empty one would teach it to think when told not to). Also that prompt,
        where it was rendered (for :meth:`_as_at_inference`)."""
        last = len(messages) - 1
        if last < 1 or messages[last]["role"] != "assistant" or not messages[last].get("reasoning_content"):
            return messages, None
        before = realise(self.reasoning.shape(messages[:last]), None)
        try:
            prompt, _ = self._render(before, tool_schemas, add_generation_prompt=True)
            history, _ = self._render(before, tool_schemas)
        except Exception:  # the prompt does not render: _as_at_inference reports it
            return messages, None
        added = prompt[len(history) :] if prompt.startswith(history) else prompt
        if not prompt_closes_think(prompt) or "</think>" not in added:
            return messages, prompt  # the close is the data's own (a question ending in "</think>"), not the prompt's
        return [*messages[:last], {k: v for k, v in messages[last].items() if k != "reasoning_content"}], prompt

    def _as_at_inference(self, rendered: str, turn: _Turn, plain, messages, tool_schemas, prompt: str | None = None):
        """A per_turn row: (text, [its last turn], its generation prompt) as the model sees it at inference.
        ``prompt``: that generation prompt, where the caller has rendered it from the same messages."""
        try:
            if prompt is None:
                prompt, _ = self._render(plain[: turn.message_index], tool_schemas, add_generation_prompt=True)
        except Exception as exc:
            return Drop(
                "template_error",
                f"the generation prompt before assistant turn {turn.message_index} "
                f"does not render with chat template {self.template.name!r}: {exc}",
                stage="template",
            )
        generated = rendered[turn.char_start : turn.char_end]
        opened = prompt_opens_think(prompt)
        reasoning = (messages[turn.message_index].get("reasoning_content") or "").strip()
        filled = None  # the turn with the reasoning its rendering cut out, written where the model writes it
        if not opened:
            # The template renders the turn with an empty think block (Kimi K2 Thinking: every
            # answer, the last one too): the model writes the reasoning into it.
            filled = reasoning_into_empty_block(generated, reasoning, self.think_frame)
        elif reasoning and generated.lstrip().startswith("</think>"):
            # The prompt opens the block and the rendered turn closes it at once (DeepSeek-V3.1 with
            # thinking, Kimi K2.5): the model writes the reasoning before the close.
            filled = reasoning + generated
        if rendered.startswith(prompt) and not rendered[len(prompt) : turn.char_start].strip():
            if filled is None:
                text, composed = rendered, turn
            else:
                text = rendered[: turn.char_start] + filled + rendered[turn.char_end :]
                end = turn.char_start + len(filled)
                composed = _Turn(turn.message_index, turn.char_start, end, turn.end_token, opened_think=opened)
        else:
            if filled is not None:
                generated = filled
            elif opened and "</think>" not in generated:
                # The prompt opens a think block the rendered turn never closes (DeepSeek-R1 strips the
                # block from every turn): the model writes its reasoning, or nothing, and closes it.
                generated = reasoning + ("\n</think>" if generated.startswith("\n") else "\n</think>\n\n") + generated
            text = prompt + generated
            composed = _Turn(turn.message_index, len(prompt), len(text), turn.end_token, opened_think=opened)
        if reasoning and reasoning not in text[composed.char_start : composed.char_end]:
            # per_turn trains a turn with its reasoning. A template that renders it nowhere in the
            # turn, nor an empty think block to write it into, would have it lost without a word:
            # one that cuts it under a think tag of its own, or Llama-3.1's, which writes a calling
            # turn's calls and not its content (where the reasoning goes inline).
            return Drop(
                "template_drops_reasoning",
                f"assistant turn {turn.message_index} has reasoning and chat template {self.template.name!r} renders "
                "none of it in that turn, nor an empty think block to write it into (it would be lost); "
                "tokenize.reasoning: drop trains such turns without it",
                stage="template",
            )
        return text, [composed], prompt

    def _inference_prompt(
        self, row: _Rendered, rendered: str, plain: list[dict[str, Any]], tool_schemas, prompt: str | None = None
    ) -> str | None:
        """What the model sees before the row's last trained turn at inference, when the row
        renders something else there; None when the two agree (as text: tokens are checked later).
        ``prompt`` is that turn's generation prompt when the caller has rendered it already."""
        selected = self._selected_turns(row.turns, row.train_flags)
        if not selected:
            return None
        turn = selected[-1]
        if prompt is None and self.use_generation:
            # a built-in template's prompt is the rendering up to the turn's header: not rendered again
            end = builtin_prompt_end(self.template, rendered, turn.char_start, plain, turn.message_index, bool(tool_schemas))
            if end is not None:
                row.prompt_length = end
                return None
        if prompt is None:
            try:
                prompt, _ = self._render(plain[: turn.message_index], tool_schemas, add_generation_prompt=True)
            except Exception as exc:  # the prompt alone does not render: certainly not what training shows
                return f"<the generation prompt does not render: {exc}>"
        if len(prompt) <= turn.char_start and rendered.startswith(prompt) and not rendered[len(prompt) : turn.char_start].strip():
            row.prompt_length = len(prompt)
            return None
        return prompt

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

    # --- tokenizing and labels ---------------------------------------------------------------
    def _encode(self, rows: list[_Rendered], *, offsets: bool) -> list[_Tokenized]:
        """``rows`` tokenized: one Rust batch call per encoder, plain rows first."""
        plain = [r for r in rows if not r.has_control_text]
        hidden = [r for r in rows if r.has_control_text]
        encoded = []
        if plain:
            encode = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
            encodings = encode([r.marked_text for r in plain], add_special_tokens=False)
            encoded += [_Tokenized(r, e, np.asarray(e.ids, dtype=np.int32)) for r, e in zip(plain, encodings)]
        if hidden:
            encodings, ids = self._control_encoder().encode_batch([r.marked_text for r in hidden], offsets=offsets)
            encoded += [_Tokenized(r, e, i) for r, e, i in zip(hidden, encodings, ids)]
        return encoded

    def _labels(self, row: _Rendered, ids: np.ndarray) -> np.ndarray | Drop:
        """Labels for a row whose turns are located in ``ids`` (see :mod:`.labels`)."""
        per_turn = self.reasoning.policy == "per_turn"
        return build_labels(ids, row.turns, row.train_flags, self.train_on, per_turn=per_turn)

    def _selected_turns(self, turns: list[_Turn], train_flags) -> list[_Turn]:
        return selected_turns(turns, train_flags, self.train_on, per_turn=self.reasoning.policy == "per_turn")


def _unverified(check: _SpanCheck, as_decoded) -> Drop:
    """The refusal of a turn whose trained tokens failed the span check: ``template_splits_turn``
    where its tool calls stand after an end token inside its span, the template having rendered its
    words and its calls as two turns (Nemotron Nano v2 does so with a conversation's last message),
    else ``mask_unverifiable``. Either way the row is refused; this only names why."""
    names = [as_decoded(name) for name in map(call_name, check.message.get("tool_calls") or []) if name]
    end = as_decoded(check.turn.end_token) if check.turn.end_token else None
    at = check.decoded.find(end) if end else -1
    if names and at >= 0 and all(check.decoded[at:].count(name) >= names.count(name) for name in names):
        return Drop(
            "template_splits_turn",
            f"the template renders assistant turn {check.turn.message_index}'s words and its tool calls as two "
            f"turns, the calls after its end token {check.turn.end_token!r}; the model writes them as one, so "
            "the turn cannot be trained as the template renders it",
            stage="tokenize",
        )
    return Drop(
        "mask_unverifiable",
        f"trained tokens of assistant turn {check.turn.message_index} decode to {clip(check.decoded)!r}, "
        f"not to its reasoning, content and end token",
        stage="tokenize",
    )


def _answered_calls_without_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages a row's trained spans are checked against, for a template that writes a
    calling turn's words only until a later turn answers (gpt-oss writes them as the turn's
    analysis, and drops them then, as it drops reasoning; found by a probe, RolePolicy): such a
    turn's content is not looked for in its span once an assistant turn without calls follows."""
    checked = messages
    answered = False
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] != "assistant":
            continue
        if not message.get("tool_calls"):
            answered = True
        elif answered and message.get("content"):
            if checked is messages:
                checked = list(messages)
            checked[index] = {**message, "content": ""}
    return checked


def _token_starting_at(entry: _Labelled, char: int, low: int, high: int) -> int | None:
    """The token in ``low < token < high`` whose first character is ``char``, or None."""
    token = high - 1
    while token > low and entry.token_start(token) > char:
        token -= 1
    return token if token > low and entry.token_start(token) == char else None


def _merge_mismatch(tail: _PromptTail) -> str:
    return (
        f"the tokens before assistant turn {tail.turn.message_index} differ from those of its generation "
        f"prompt: a token merges the prompt's end {clip(tail.text or '')!r} with the response"
    )


def _each_spelled(spelled_rows: _Spelled, tokenized: list[_Tokenized]) -> Iterator[tuple[_Tokenized, np.ndarray, int, memoryview | None]]:
    """Each row with its share of the table's spelling: its token byte bounds (offset by ``base``),
    ``base``, and the bytes its tokens spell (None when a token has no bytes in the table)."""
    blob, all_bounds, unknown_before = spelled_rows
    spelled = memoryview(blob)
    first_token = 0
    for item in tokenized:
        count = len(item.ids)
        bounds = all_bounds[first_token : first_token + count + 1]
        base, end = int(bounds[0]), int(bounds[-1])
        complete = unknown_before is None or unknown_before[first_token + count] == unknown_before[first_token]
        first_token += count
        yield item, bounds, base, spelled[base:end] if complete else None


def _spell(table: ByteTable | PieceTable | None, tokenized: list[_Tokenized]) -> _Spelled | None:
    if table is None or not tokenized:
        return None
    blob, bounds, unknown = table.decode_bytes(np.concatenate([t.ids for t in tokenized]))
    return _Spelled(blob, bounds, np.concatenate([[0], np.cumsum(unknown)]) if unknown.any() else None)

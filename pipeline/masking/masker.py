"""The Masker: rendered conversation -> ``input_ids`` and ``labels``, in three phases.

``render`` (Python: the template, turn location), ``tokenize`` (the Rust tokenizer, without the
GIL) and ``finish`` (token positions of every turn, labels, verification, the render-vs-inference
check, length). See the package docstring for what it guarantees.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline import schema
from pipeline.deadline import RenderTimeout, release, time_limit
from pipeline.masking.byte_table import _TokenBytes
from pipeline.masking.control import (
    _PLACEHOLDER_CHARS,
    _PlainControlEncoder,
    _private_copy,
    _row_strings,
    control_tokens,
)
from pipeline.masking.locate import LocateError, locate_turns, realise
from pipeline.masking.policies import TRAIN_ON, ReasoningShape, RolePolicy, trained_turns
from pipeline.masking.results import Encoded, Rejection
from pipeline.masking.verify import clip, metaspace, no_tokens, span_matches, straddles
from pipeline.templates import KNOWN_END_TOKENS, Renderer, RenderTooLarge, Template, template_variables

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
    # The generation prompt of the last trained turn when its text differs from the row's text
    # before that turn; None when it agrees, then ``prompt_length`` is its length.
    prompt: str | None = None
    prompt_length: int = -1


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
        self.token_bytes = _TokenBytes.build(tokenizer_json)
        self.template = template
        self.max_length = max_length
        self.train_on = train_on
        self.truncate = truncate
        self.use_generation = span_method == "generation" or (span_method == "auto" and template.has_generation_tags)
        self.variables = template_variables(tokenizer)
        self.reasoning = ReasoningShape(template, reasoning)
        self.roles = RolePolicy(template, self.variables, system, limits=(render_timeout, max_render_chars))
        self.strict_render = strict_render
        self.render_timeout = render_timeout
        self.renderer = Renderer(template, self.variables, max_render_chars)
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
        self._piece_ids: dict[str, np.ndarray] = {}  # a prompt's tail after its last control token -> ids

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
            outcome = self._bounded_render_row(index, messages, tools)
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
        starts: dict[int, tuple[_Rendered, Any]] = {}  # row, and where each token starts in its text
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
            starts[row.index] = (row, _byte_start_to_char(raw, row.text, bounds, base))
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
                starts[row.index] = (row, lambda token, encoding=encoding: encoding.token_to_chars(token)[0])
                offset_checks += [(row.index, turn, row.messages[turn.message_index]) for turn in outcome[2]]
        decoded = self.backend.decode_batch(
            [staged[index][0][t.first_token : t.last_token + 1].tolist() for index, t, _ in offset_checks],
            skip_special_tokens=False,
        )
        checks += [(*check, text) for check, text in zip(offset_checks, decoded)]
        for index, turn, message, text in checks:
            if index in staged and not span_matches(text, message, turn.end_token, self.as_decoded):
                del staged[index]
                results[index] = Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    f"trained tokens of assistant turn {turn.message_index} decode to {clip(text)!r}, "
                    f"not to its reasoning, content and end token",
                )
        mismatched = self._render_mismatches({i: starts[i] for i in staged}, staged)
        for index, (ids, labels, _turns) in staged.items():
            outcome = self._fit_length(ids, labels, _turns)
            if isinstance(outcome, Encoded) and index in mismatched:
                if self.strict_render:
                    outcome = Rejection("tokenize", "render_mismatch", mismatched[index])
                else:
                    outcome.render_mismatch = True
            results[index] = outcome
        return results  # type: ignore[return-value]

    def _render_mismatches(self, starts: dict, staged: dict) -> dict[int, str]:
        """Rows whose tokens before the last trained turn are not what inference tokenizes there.

        ``starts[i]`` is (row, a function giving a token's first character in the row's marked
        text). The text was compared when rendering; here only the tokens around the prompt's
        end can differ (a merge across it), and the tokens after the last control token before
        it are encoded again on their own: the control token cuts the tokenization there.
        """
        mismatched: dict[int, str] = {}
        pending: dict[str, list] = {}  # piece text -> rows whose prompt ends with it (plain rows)
        hidden = []
        for index, (row, token_start) in starts.items():
            ids, labels, turns = staged[index]
            turn = next((t for t in reversed(turns) if labels[t.first_token] != schema.IGNORE_INDEX), None)
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
            t0 = self._after_last_control(ids, first)
            c0 = token_start(t0) if t0 < first else row.prompt_length
            piece = row.marked_text[c0 : row.prompt_length] if c0 <= row.prompt_length else None
            if row.has_control_text:
                hidden.append((index, turn, ids[t0:first], piece))
            else:  # the same few pieces ("assistant\n") come back row after row: encode each once
                pending.setdefault(piece, []).append((index, turn, ids[t0:first]))
        new = [p for p in pending if p is not None and p not in self._piece_ids]
        fresh = {
            piece: np.asarray(encoding.ids, dtype=np.int32)
            for piece, encoding in zip(new, self.backend.encode_batch_fast(new, add_special_tokens=False))
        } if new else {}
        if len(self._piece_ids) < 4096:
            self._piece_ids.update(fresh)
        checks = [
            (i, t, e, piece, fresh.get(piece, self._piece_ids.get(piece)) if piece is not None else None)
            for piece, waiting in pending.items()
            for i, t, e in waiting
        ]
        if hidden:
            encoded = self._control_encoder().encode_batch([p or "" for *_, p in hidden], offsets=False)[1]
            checks += [(*h, got) for h, got in zip(hidden, encoded)]
        for index, turn, expected, piece, got in checks:
            if piece is None or got is None or expected.tobytes() != got.tobytes():  # both int32
                mismatched[index] = (
                    f"the tokens before assistant turn {turn.message_index} differ from those of its generation "
                    f"prompt: a token merges the prompt's end {clip(piece or '')!r} with the response"
                )
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

    def _bounded_render_row(self, index: int, canonical: list[dict[str, Any]], tools: str | None) -> "_Rendered | Rejection":
        """:meth:`_render_row` within the row's time limit and output size (a template is a program)."""
        try:
            with time_limit(self.render_timeout):
                return self._render_row(index, canonical, tools)
        except RenderTimeout:
            release()  # if it landed as the limit was being left
            return Rejection(
                "template",
                "template_timeout",
                f"chat template {self.template.name!r} took longer than {self.render_timeout:g} s to render the "
                "conversation (template.render_timeout_s)",
            )
        except RenderTooLarge as exc:
            return Rejection(
                "template",
                "template_output_too_large",
                f"chat template {self.template.name!r}: {exc} (template.max_render_chars)",
            )

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
                    "reasoning": encoder.hide(m["reasoning"], self.control_re) if m.get("reasoning") else None,
                }
                for m in canonical
            ]
            messages = schema.messages_for_template(hidden)
            tool_schemas = schema.tools_for_template(encoder.hide(tools, self.control_re) if tools else tools)
        train_flags = [m.get("train") for m in canonical]
        prepared = self.roles.prepare(messages, true_messages, train_flags)
        if isinstance(prepared, Rejection):
            return prepared
        messages, true_messages, train_flags = prepared
        shaped = self.reasoning.shape(messages)
        plain = realise(shaped, None)
        try:
            rendered, spans = self._render(plain, tool_schemas, with_spans=self.use_generation)
        except Exception as exc:  # a template raises whatever its author chose (raise_exception, TypeError …)
            return self.roles.render_failure(messages, exc)
        assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.use_generation:
            if len(spans) != len(assistant_indices):
                return Rejection(
                    "tokenize",
                    "mask_unverifiable",
                    f"the template marked {len(spans)} generation blocks for {len(assistant_indices)} assistant turns",
                )
            turns = [
                _Turn(i, *self._trim_span(rendered, start, end)) for i, (start, end) in zip(assistant_indices, spans)
            ]
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
                return Rejection("tokenize", "mask_unverifiable", str(exc))
            except Exception as exc:
                return self.roles.render_failure(messages, exc)
            turns = [_Turn(t.message_index, t.start, t.end, t.end_token) for t in located]
        prompt = None  # the last trained turn's generation prompt, where already rendered
        if self.reasoning.policy == "per_turn" and turns:
            composed = self._as_at_inference(rendered, turns[-1], plain, messages, tool_schemas)
            if isinstance(composed, Rejection):
                return composed
            rendered, turns, prompt = composed
        if has_control_text:
            text, marked = self._control_encoder().texts(rendered)
        else:
            text = marked = rendered
        row = _Rendered(index, text, marked, turns, true_messages, train_flags, has_control_text)
        row.prompt = self._inference_prompt(row, rendered, plain, tool_schemas, prompt)
        return row

    def _render(self, messages, tools, **options) -> tuple[str, list[tuple[int, int]]]:
        return self.renderer.render(messages, tools, **options)

    def _end_marker_in_tool_calls(self, messages: list[dict[str, Any]]) -> Rejection | None:
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
                    return Rejection(
                        "tokenize",
                        "mask_unverifiable",
                        f"assistant turn {index}: its tool calls hold the end-of-turn marker {token!r} as text, "
                        "so where the turn ends cannot be told (the tokenizer has no such token)",
                    )
        return None

    def _as_at_inference(self, rendered: str, turn: _Turn, plain, messages, tool_schemas):
        """A per_turn row: (text, [its last turn], its generation prompt) as the model sees it at inference."""
        try:
            prompt, _ = self._render(plain[: turn.message_index], tool_schemas, add_generation_prompt=True)
        except Exception as exc:
            return Rejection(
                "template", "template_error", f"the generation prompt before assistant turn {turn.message_index} "
                f"does not render with chat template {self.template.name!r}: {exc}"
            )
        if rendered.startswith(prompt) and not rendered[len(prompt) : turn.char_start].strip():
            return rendered, [turn], prompt
        generated = rendered[turn.char_start : turn.char_end]
        if _PROMPT_OPENS_THINK.search(prompt) and "</think>" not in generated:
            # The prompt opens a think block the rendered turn never closes (DeepSeek-R1 strips the
            # block from every turn): the model writes its reasoning, or nothing, and closes it.
            reasoning = (messages[turn.message_index].get("reasoning_content") or "").strip()
            generated = reasoning + ("\n</think>" if generated.startswith("\n") else "\n</think>\n\n") + generated
        text = prompt + generated
        return text, [_Turn(turn.message_index, len(prompt), len(text), turn.end_token)], prompt

    def _inference_prompt(
        self, row: "_Rendered", rendered: str, plain: list[dict[str, Any]], tool_schemas, prompt: str | None = None
    ) -> str | None:
        """What the model sees before the row's last trained turn at inference, when the row
        renders something else there; None when the two agree (as text: tokens are checked later).
        ``prompt`` is that turn's generation prompt when the caller has rendered it already."""
        selected = self._selected_turns(row.turns, row.train_flags)
        if not selected:
            return None
        turn = selected[-1]
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
                return no_tokens(turn)
            # A token that merges template text with the turn (e.g. "][" across "[/INST][TOOL_CALLS]")
            # would train prompt characters: only whitespace may lie outside the turn's span.
            # token_to_chars, not offsets[i]: the offsets property builds the whole row's list per call.
            token_start, token_end = encoding.token_to_chars(first)[0], encoding.token_to_chars(last)[1]
            text = row.marked_text
            if text[token_start : turn.char_start].strip() or text[turn.char_end : token_end].strip():
                return straddles(turn, text[min(token_start, turn.char_start) : turn.char_start + 8])
            turn.first_token, turn.last_token = first, last
        return None

    def _locate_by_bytes(self, row: _Rendered, raw: bytes, bounds: np.ndarray, base: int) -> Rejection | None:
        """Set each turn's first and last token from the tokens' byte boundaries (``bounds - base``)."""
        ascii_text = len(raw) == len(row.text)
        for turn in row.turns:
            start = turn.char_start if ascii_text else len(row.text[: turn.char_start].encode("utf-8"))
            end = turn.char_end if ascii_text else start + len(row.text[turn.char_start : turn.char_end].encode("utf-8"))
            if end <= start:
                return no_tokens(turn)
            first = int(bounds.searchsorted(start + base, "right")) - 1  # the token holding byte `start`
            last = int(bounds.searchsorted(end + base, "left")) - 1  # the token holding byte `end - 1`
            token_start, token_end = int(bounds[first]) - base, int(bounds[last + 1]) - base
            if (token_start != start or token_end != end) and (
                raw[token_start:start].decode("utf-8", "replace").strip()
                or raw[end:token_end].decode("utf-8", "replace").strip()
            ):
                return straddles(turn, raw[token_start : start + 8].decode("utf-8", "replace"))
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
        if self.reasoning.policy == "per_turn":  # a row per turn: only the turn it ends at
            return [t for t in turns[-1:] if train_flags[t.message_index] is not False]
        wanted = trained_turns([t.message_index for t in turns], train_flags, self.train_on)
        if len(wanted) == len(turns):
            return turns
        return [t for t in turns if t.message_index in set(wanted)]

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
            return Encoded(ids.astype(np.int32), labels.astype(np.int32), truncated=True, truncated_tokens=length - cut)
        return Encoded(ids.astype(np.int32, copy=False), labels.astype(np.int32, copy=False))


_PROMPT_OPENS_THINK = re.compile(r"<think>\s*$")


def _byte_start_to_char(raw: bytes, text: str, bounds: np.ndarray, base: int):
    ascii_text = len(raw) == len(text)  # then a byte offset is a character offset

    def token_start(token: int) -> int:
        byte = int(bounds[token]) - base
        return byte if ascii_text else len(raw[:byte].decode("utf-8", "replace"))

    return token_start


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

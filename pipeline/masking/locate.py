"""Find each assistant turn in a rendered conversation, for any chat template.

A template without ``{% generation %}`` blocks says nothing about where a turn's trained text
lies, and the templates of today's reasoning models cannot be probed by rendering prefixes:
Qwen3 adds an empty think block to the last turn only, DeepSeek-R1 cuts everything up to
``</think>`` out of every turn, Phi-3 closes the whole conversation with EOS, so a partial
render is not a prefix of the whole one. This module locates turns without that assumption:

1. **Skeleton.** The conversation is rendered a second time with every piece of user text
   (each message's content, each assistant turn's reasoning) replaced by a unique sentinel.
   Whatever the template does with the text — drop it (earlier turns' reasoning), trim it,
   move it (a system prompt folded into the first user turn) — it does to the sentinel, so the
   skeleton shows exactly which pieces the template rendered and the fixed text around them.
2. **Alignment.** The real rendering must equal the skeleton with every sentinel replaced by
   its piece, trimmed of surrounding whitespace at most (``trim``, ``strip('\\n')``), or
   escaped whole by ``tojson`` (gpt-oss writes tool results as JSON strings); anything
   else (a template that branches on what the text says, a content split at ``</think>``) is
   refused, and the caller tries again with fewer sentinels or rejects the row. So every
   position of the skeleton's fixed text maps to one position of the real text.
3. **Turn start.** For assistant turn *i* the generation prompt — the conversation before it
   rendered with ``add_generation_prompt=True`` — is compared with the skeleton right after
   the last piece of text before the turn: the turn starts where the two part, so what is
   trained is what the model generates after the prompt it sees at inference (Qwen3's
   ``<think>\\n`` is trained; Llama-3's ``\\n\\n`` after the header is not). Spaces the
   template writes there (Mistral's after ``[/INST]``) are a separator, as a ``{% generation %}``
   block would treat them; the turn's own leading spaces are its text. Where the two part
   before the prompt ends (DeepSeek-R1 prompts with ``<think>\\n`` but renders past turns
   without one), the turn starts where they part, never inside a control token nor inside a
   think block both opened, and is flagged as rendered unlike inference; its trained text is
   then verified to hold nothing but the turn's own. (With sentinels in assistant turns only,
   the fallback, a partial match is refused: the text between is not known to be fixed.)
4. **Turn end.** The first end-of-turn marker after the turn's last text (content, or the tool
   calls the template renders after it, found by their names followed by their arguments), before
   the next message's text.

Positions are found in the skeleton and mapped to the real text; the caller tokenizes the real
text once and verifies every trained span, as for generation blocks.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.masking.verify import call_name

Render = Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text


@dataclass(frozen=True)
class Piece:
    """User text inside a message field; the template may trim it, and nothing else."""

    text: str


# A field value for rendering: plain text, or literal text and pieces one after the other
# (reasoning put inline as ``<think>\n`` + piece + ``\n</think>\n\n`` + piece).
FieldValue = str | list[str | Piece]


@dataclass(frozen=True)
class LocatedTurn:
    """One assistant turn in the real rendering: ``[start, end)`` is what is trained."""

    message_index: int
    start: int
    end: int
    end_token: str | None
    opened_think: bool = False  # its generation prompt ends inside a think block it opened (Qwen3.5)


class LocateError(ValueError):
    """The turns of this rendering cannot be located exactly (the row must be rejected)."""


PIECE_FIELDS = ("content", "reasoning_content")


def realise(messages: Sequence[dict[str, Any]], sentinel: Callable[[int, str], str | None] | None) -> list[dict[str, Any]]:
    """Messages with piece lists joined: the real text, or each named piece as ``sentinel(i, field)``."""
    if sentinel is None and not any(isinstance(m.get(f), list) for m in messages for f in PIECE_FIELDS):
        return list(messages)  # nothing to join
    out = []
    for index, message in enumerate(messages):
        copy = dict(message)
        for field in PIECE_FIELDS:
            value = message.get(field)
            if isinstance(value, list):
                parts = []
                for part_index, part in enumerate(value):
                    if isinstance(part, Piece):
                        name = sentinel(index, f"{field}.{part_index}") if sentinel is not None else None
                        parts.append(part.text if name is None else name)
                    else:
                        parts.append(part)
                copy[field] = "".join(parts)
            elif isinstance(value, str) and sentinel is not None:
                name = sentinel(index, field)
                if name is not None:
                    copy[field] = name
        out.append(copy)
    return out


def _pieces(messages: Sequence[dict[str, Any]], only_assistant: bool) -> dict[tuple[int, str], str]:
    found = {}
    for index, message in enumerate(messages):
        if only_assistant and message.get("role") != "assistant":
            continue
        for field in PIECE_FIELDS:
            value = message.get(field)
            if isinstance(value, list):
                for part_index, part in enumerate(value):
                    if isinstance(part, Piece) and part.text.strip():
                        found[(index, f"{field}.{part_index}")] = part.text
            elif isinstance(value, str) and value.strip():
                found[(index, field)] = value
    return found


class _Slot(NamedTuple):
    """Where one rendered piece lies: its sentinel in the skeleton, its text in the real rendering."""

    message_index: int
    field: str  # "content", "reasoning_content" or "content.1" (a piece of a list)
    skeleton_start: int
    skeleton_end: int
    real_start: int
    real_end: int

    @property
    def key(self) -> tuple[int, str]:
        return (self.message_index, self.field)


class _Skeleton:
    """The sentinel rendering aligned with the real one."""

    def __init__(self, real: str, skeleton: str, slots: list[_Slot]):
        self.real = real
        self.text = skeleton
        self.slots = slots  # every rendered piece, in order
        # fixed text j starts at skeleton position fixed_s[j] and real position fixed_r[j]
        self.fixed_s = [0] + [slot.skeleton_end for slot in slots]
        self.fixed_r = [0] + [slot.real_end for slot in slots]

    def to_real(self, position: int) -> int:
        """A skeleton position in fixed text (or at a piece's edge) -> the real text's position."""
        j = bisect_right(self.fixed_s, position) - 1
        return self.fixed_r[j] + position - self.fixed_s[j]


def _align(real: str, skeleton: str, pattern: re.Pattern, keys: dict[str, tuple[int, str]], values) -> _Skeleton | None:
    slots = []
    seen = set()
    s_pos = r_pos = 0
    for match in pattern.finditer(skeleton):
        key = keys.get(match.group(0))
        if key is None or key in seen:  # a sentinel rendered twice: its place is ambiguous
            return None
        seen.add(key)
        fixed = skeleton[s_pos : match.start()]
        if not real.startswith(fixed, r_pos):
            return None
        r_pos += len(fixed)
        value = values[key]
        quoted = _json_quoted(value)
        if not real.startswith(value.strip(), r_pos + _whitespace_run(real, r_pos)) and real.startswith(quoted, r_pos):
            # written through tojson (gpt-oss's tool results): the sentinel's quotes are fixed text,
            # the piece is escaped whole, never trimmed
            slots.append(_Slot(*key, match.start(), match.end(), r_pos, r_pos + len(quoted)))
            r_pos += len(quoted)
            s_pos = match.end()
            continue
        core = value.strip()
        lead = len(value) - len(value.lstrip())
        trail = len(value) - len(value.rstrip())
        ws = _whitespace_run(real, r_pos)
        if ws > lead or real[r_pos : r_pos + ws] != value[lead - ws : lead] or not real.startswith(core, r_pos + ws):
            return None
        start = r_pos
        after_core = r_pos + ws + len(core)
        next_fixed = skeleton[match.end() : _next_match_start(pattern, skeleton, match.end())]
        kept = None
        tail = value[len(value) - trail :]
        for b in range(min(_whitespace_run(real, after_core), trail, 256), -1, -1):
            if real[after_core : after_core + b] == tail[:b] and real.startswith(next_fixed, after_core + b):
                kept = b
                break
        if kept is None:
            return None
        r_pos = after_core + kept
        message_index, field = key
        slots.append(_Slot(message_index, field, match.start(), match.end(), start, r_pos))
        s_pos = match.end()
    if real[r_pos:] != skeleton[s_pos:]:
        return None
    return _Skeleton(real, skeleton, slots)


def _json_quoted(text: str) -> str:
    """``text`` as tojson writes it inside its quotes (transformers' tojson: ensure_ascii off)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _next_match_start(pattern: re.Pattern, text: str, position: int) -> int:
    match = pattern.search(text, position)
    return match.start() if match else len(text)


def _whitespace_run(text: str, position: int) -> int:
    end = position
    while end < len(text) and text[end].isspace():
        end += 1
    return end - position


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def locate_turns(
    render: Render,
    messages: Sequence[dict[str, Any]],
    rendered: str,
    end_tokens: Sequence[str],
    markers: Sequence[str] = (),
) -> list[LocatedTurn]:
    """Every assistant turn of ``messages`` in ``rendered`` (their rendering), in order.

    ``messages`` are template-ready dicts whose ``content``/``reasoning_content`` may be piece
    lists (see :data:`FieldValue`); ``render(messages, add_generation_prompt)`` renders plain ones.
    ``markers`` are the control tokens a turn may never start inside of.
    Raises :class:`LocateError` when a turn cannot be placed exactly.
    """
    marker = "@@sk"
    while marker in rendered:
        marker += "k"
    failure = "the template renders the conversation's text in a way sftkit cannot follow"
    for only_assistant in (False, True):
        values = _pieces(messages, only_assistant)
        names = {key: f"{marker}{n}@@" for n, key in enumerate(values)}
        keys = {name: key for key, name in names.items()}

        shaped = realise(messages, lambda index, field, names=names: names.get((index, field)))
        skeleton_text = render(shaped, False)
        pattern = re.compile(re.escape(marker) + r"\d+@@")
        skeleton = _align(rendered, skeleton_text, pattern, keys, values)
        if skeleton is None:
            failure = (
                "the template changes the conversation's text beyond trimming it, or renders it in an order or number sftkit cannot follow"
            )
            continue
        try:
            return _turns(render, shaped, skeleton, pattern, keys, end_tokens, (*markers, "<think>"), strict_prompt=only_assistant)
        except LocateError as exc:
            failure = str(exc)
    raise LocateError(failure)


def _turns(render, shaped, skeleton: _Skeleton, pattern, keys, end_tokens, markers, *, strict_prompt: bool) -> list[LocatedTurn]:
    text = skeleton.text
    by_message: dict[int, list[_Slot]] = {}
    order = []
    for slot in skeleton.slots:
        by_message.setdefault(slot.message_index, []).append(slot)
        order.append(slot.message_index)
    if order != sorted(order):
        raise LocateError("the template renders the messages out of their order")
    turns = []
    for m, message in enumerate(shaped):
        if message.get("role") != "assistant":
            continue
        before = [slot.skeleton_end for i, slots in by_message.items() if i < m for slot in slots]
        after = [slot.skeleton_start for i, slots in by_message.items() if i > m for slot in slots]
        own = by_message.get(m, [])
        base = max(before, default=0)
        limit = min(after, default=len(text))
        anchor = own[0].skeleton_start if own else None

        prompt = render(shaped[:m], True)
        last = None
        for match in pattern.finditer(prompt):
            last = match
        tail = prompt[last.end() :] if last else prompt
        same_anchor = (keys.get(last.group(0)) if last else None) == _key_ending_at(skeleton, base)
        region_end = anchor if anchor is not None else limit
        matched = _common_prefix(tail, text[base:region_end])
        start = base + matched
        if matched < len(tail) or not same_anchor:  # the rendering parts from the generation prompt
            # Where only the assistant turns are marked (the template changes other messages' text,
            # as Nemotron Nano v2 cuts "/no_think" out), a prompt that parts from the conversation
            # only in the think block it ends with is still exact: every message before the turn
            # renders as real text in both, and the block is what the template writes for the
            # model's next turn alone ("<think></think>", thinking off), not for a past one.
            frame = _PROMPT_THINK_FRAME.search(tail)
            only_its_frame = frame is not None and frame.start() <= matched
            if (strict_prompt and not only_its_frame) or not same_anchor:
                raise LocateError(
                    f"assistant turn {m}: its generation prompt ends {_clip(tail)!r} but the conversation "
                    f"renders {_clip(text[base:region_end])!r} there, so where the turn starts is unknown"
                )
            # The turn starts where the conversation parts from its generation prompt (DeepSeek-R1
            # prompts "<｜Assistant｜><think>\n", renders past turns as "<｜Assistant｜>" + content),
            # never inside a marker: "<｜Assistant｜><" of "<think>" vs "<｜tool▁calls▁begin｜>".
            matched = _back_off(tail, text, base, matched, markers)
            start = base + matched
        while start < region_end and text[start] == " ":
            start += 1  # the template's separator space (Mistral's after [/INST]) is not generated text
        search_from = own[-1].skeleton_end if own else start
        for name, arguments in _calls(message):  # the calls rendered after the text (gpt-oss: after an <|end|>)
            search_from = _call_end(text, search_from, limit, name, arguments, end_tokens)
        end, end_token = _first_end_token(text, search_from, limit, end_tokens)
        if end is None and m == len(shaped) - 1 and message.get("tool_calls"):
            # The conversation's last turn, closed by no end token (GLM-4.5 writes none): its calls,
            # rendered after its text, run to the end of the conversation.
            end = len(text.rstrip())
        if end is None:
            if not own:
                raise LocateError(f"assistant turn {m} has no text and no end-of-turn marker to find it by")
            end = own[-1].skeleton_end
        turns.append(
            LocatedTurn(
                m,
                skeleton.to_real(start),
                skeleton.to_real(end),
                end_token,
                prompt_opens_think(prompt),
            )
        )
    return turns


_OPENED_THINK = re.compile(r"<think>\s*$")
# The think block a generation prompt may end with: opened ("<think>\n") or opened and closed.
_PROMPT_THINK_FRAME = re.compile(r"<think>\s*(?:</think>\s*)?$")


def prompt_opens_think(prompt: str) -> bool:
    """Whether a generation prompt ends inside a think block it opened (Qwen3.5's and DeepSeek-R1's
    "<think>\n"): the model then writes the block's close, never "<think>"."""
    return _OPENED_THINK.search(prompt) is not None


_CLOSED_THINK = re.compile(r"</think>\s*$")


def prompt_closes_think(prompt: str) -> bool:
    """Whether a generation prompt ends by closing a think block: thinking is off (Qwen3 and GLM
    with enable_thinking false: "<think>\n\n</think>\n\n"; DeepSeek-V3.1 without thinking:
    "</think>"), and the model writes no reasoning after it."""
    return _CLOSED_THINK.search(prompt) is not None


def parting_point(prompt: str, text: str, markers: Sequence[str]) -> int:
    """Where ``text`` parts from the generation prompt ``prompt`` (its whole length where it is a
    prefix), never inside one of ``markers`` nor inside a think block both opened: a turn's start."""
    matched = _common_prefix(prompt, text)
    return matched if matched == len(prompt) else _back_off(prompt, text, 0, matched, (*markers, "<think>"))


def _back_off(tail: str, text: str, base: int, matched: int, markers: Sequence[str]) -> int:
    """The parting point moved back to the start of any marker it would cut in two, and of a
    think block both had opened (Qwen3 with enable_thinking false prompts with an empty block;
    a turn that renders reasoning in it is trained from "<think>" on)."""
    opened = _OPENED_THINK.search(tail, 0, matched)
    if opened:
        matched = opened.start()
    for marker in markers:
        for source, offset in ((tail, 0), (text, base)):
            first = max(0, offset + matched - len(marker) + 1)
            found = source.find(marker, first, offset + matched + len(marker) - 1)
            if 0 <= found < offset + matched:
                matched = min(matched, found - offset)
    return matched


def _calls(message: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """A message's tool calls, in order: (function name, the forms its arguments are written in)."""
    calls = []
    for call in message.get("tool_calls") or ():
        name = call_name(call)
        if name is None:
            continue
        function = call.get("function", call)
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # JSON text: as it is, or quoted by tojson
            forms = [arguments, _json_quoted(arguments)]
        else:
            try:
                forms = [json.dumps(arguments, ensure_ascii=False)]  # tojson's, and json.dumps's
            except (TypeError, ValueError):
                forms = []
        calls.append((name, forms))
    return calls


def _call_end(text: str, start: int, limit: int, name: str, arguments: list[str], end_tokens: Sequence[str]) -> int:
    """Where the template's rendering of one tool call ends in ``text[start:limit]``: just after
    its arguments, at the first place the call's name is followed by them before any end-of-turn
    marker (the name alone may stand in the template's own text: gpt-oss's
    ``<|channel|>analysis`` before a call to a tool named "analysis"). ``start`` when the call
    is not found written that way."""
    found = text.find(name, start, limit)
    while found >= 0:
        after = found + len(name)
        end, _ = _first_end_token(text, after, limit, end_tokens)
        stop = limit if end is None else end
        for form in arguments:
            at = text.find(form, after, stop)
            if at >= 0:
                return at + len(form)
        found = text.find(name, after, limit)
    return start


def _key_ending_at(skeleton: _Skeleton, position: int):
    for slot in skeleton.slots:
        if slot.skeleton_end == position:
            return slot.key
    return None


def _first_end_token(text: str, start: int, limit: int, end_tokens: Sequence[str]) -> tuple[int | None, str | None]:
    """The end of the first end-of-turn marker in ``text[start:limit]`` (the longest at a tie)."""
    best, best_token = None, None
    for token in end_tokens:
        found = text.find(token, start, limit)
        if found >= 0 and (best is None or found < best or (found == best and len(token) > len(best_token))):
            best, best_token = found, token
    return (None, None) if best is None else (best + len(best_token), best_token)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]

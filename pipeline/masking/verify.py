"""The check every trained span passes: its tokens decode to the turn and nothing else.

The trained tokens of each assistant turn are decoded and must be the turn's reasoning block (if
the template renders one), its content, its rendered tool calls and its end token; otherwise the
row is rejected as ``mask_unverifiable``: a wrong mask is never written.
"""

from __future__ import annotations

import json
import re
from typing import Any

# What may stand before a turn's content in its trained text, once its reasoning is taken out:
# nothing, one pair of tags left empty (Qwen3's "<think>\n\n</think>\n\n" on the last turn), or
# the close of a think block the prompt opened (DeepSeek-R1 per turn: "REASONING\n</think>\n\n").
_BEFORE_CONTENT = re.compile(r"\s*(?:<(\w+)>\s*</\1>|</think>)?\s*")
# The same where the generation prompt opened the think block (Qwen3.5, DeepSeek-R1): the model
# writes only its close, so a span taking in the prompt's "<think>" fails.
_BEFORE_CONTENT_OPENED = re.compile(r"\s*(?:</think>)?\s*")


def span_matches(
    decoded: str,
    message: dict[str, Any],
    end_token: str | None,
    as_decoded=lambda s: s,
    markup: frozenset[str] = frozenset(),
    leads: frozenset[str] | None = None,
    opened_think: bool = False,
) -> bool:
    """Decoded trained tokens == the turn's [reasoning block +] content [+ tool calls] + end token.

    ``as_decoded`` spells a text the way the tokenizer's decoder gives it back (SentencePiece's
    decoders turn every "▁", an added token's included, into a space). ``markup``: the template's
    own header text inside a turn (:func:`~pipeline.masking.policies.turn_markup`), allowed before
    the content as well. ``leads``: what the template writes before a calling turn's first call
    name when the turn has no words (:func:`~pipeline.masking.policies.call_leads`), the only text
    allowed there; ``None``: not known, and such a turn is checked for its names only.
    ``opened_think``: the turn's generation prompt ends inside a think block it opened (the
    locator says so; Qwen3.5's "<think>\n"), so of an empty pair of tags only the close is the turn's.

    A calling turn's span must hold each call's name (as often as its calls have it), and its end
    token may not stand inside it as well beyond its own texts holding it (such a span ran on into
    the next turn). A text may stand in the reasoning, the content and the calls alike: each place
    it stands is tried.
    """
    allowed = _BEFORE_CONTENT_OPENED if opened_think else _BEFORE_CONTENT
    body = decoded.strip()
    end_token = as_decoded(end_token) if end_token else end_token
    if end_token:
        if not body.endswith(end_token):
            return False
        body = body[: -len(end_token)].rstrip()
    content = as_decoded(message["content"]).strip()
    reasoning = as_decoded(message.get("reasoning_content") or "").strip()
    calls = message.get("tool_calls")
    if not calls:
        return body.endswith(content) and _header_only(body[: len(body) - len(content)], reasoning, markup, allowed)
    names = [call_name(call) for call in calls]
    if not all(names):
        return False
    names = [as_decoded(name) for name in names]  # as the decoder spells them ("▁" a space)
    if end_token and body.count(end_token) > _own_count(end_token, content, reasoning, calls, as_decoded):
        return False  # the turn's end token stands inside it too: the span ran on into the next turn
    if not content:
        if leads is None:
            return _holds_calls(body, names)
        at = body.find(names[0])
        while at >= 0:  # each place the first name stands: gpt-oss's header may hold the same word
            if _holds_calls(body[at:], names) and _lead_only(body[:at], reasoning, markup, leads, allowed):
                return True
            at = body.find(names[0], at + 1)
        return False
    at = body.find(content)
    while at >= 0:  # each place the content stands: "analysis" also stands in gpt-oss's header
        rest = body[at + len(content) :]
        if _holds_calls(rest, names) and _header_only(body[:at], reasoning, markup, allowed):
            return True
        at = body.find(content, at + 1)
    return False


def _holds_calls(text: str, names: list[str]) -> bool:
    """Whether ``text`` holds each call's name, as often as the calls have it (two calls to one tool: twice)."""
    return all(text.count(name) >= names.count(name) for name in set(names))


def _own_count(end_token: str, content: str, reasoning: str, calls: Any, as_decoded) -> int:
    """How often ``end_token`` may stand in a calling turn's span before its end: as often as the
    turn's own words, reasoning and calls (their JSON, an upper bound) hold its text."""
    return content.count(end_token) + reasoning.count(end_token) + as_decoded(json.dumps(calls, ensure_ascii=False)).count(end_token)


def call_name(call: Any) -> str | None:
    """A tool call's function name (OpenAI's nested shape or a flat one); None if it has none."""
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


def _header_only(before: str, reasoning: str, markup: frozenset[str], allowed: re.Pattern = _BEFORE_CONTENT) -> bool:
    """Whether ``before``, what stands before a turn's content in its span, is header text only:
    an ``allowed`` form (:data:`_BEFORE_CONTENT`) or the template's own markup, its reasoning taken out."""
    texts = _without(before, reasoning)
    return any((markup and bare(text) in markup) or allowed.fullmatch(text) is not None for text in texts)


def _lead_only(before: str, reasoning: str, markup: frozenset[str], leads: frozenset[str], allowed: re.Pattern) -> bool:
    """Whether ``before``, what stands before the first call's name in a calling turn with no words,
    is a lead the template writes, after header text (:func:`_header_only`) or not, reasoning taken out."""
    for text in _without(before, reasoning):
        spelled = bare(text)
        for lead in leads:
            if spelled.endswith(lead):
                head = spelled[: len(spelled) - len(lead)]
                if not head or head in markup or allowed.fullmatch(head):
                    return True
    return False


def _without(text: str, piece: str) -> list[str]:
    """``text`` with one occurrence of ``piece`` taken out, for each place it occurs, and ``text``
    itself: reasoning that reads "analysis" is not the header's word."""
    if not piece:
        return [text]
    places, at = [], text.find(piece)
    while at >= 0:
        places.append(text[:at] + text[at + len(piece) :])
        at = text.find(piece, at + 1)
    return [*places, text]  # the text whole too: a reasoning not rendered may still read like it


def bare(text: str) -> str:
    """``text`` without whitespace: how header markup is compared."""
    return "".join(text.split())


def metaspace(text: str) -> str:
    return text.replace("\u2581", " ")


def clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

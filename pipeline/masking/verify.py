"""The check every trained span passes: its tokens decode to the turn and nothing else.

The trained tokens of each assistant turn are decoded and must be the turn's reasoning block (if
the template renders one), its content, its rendered tool calls and its end token; otherwise the
row is rejected as ``mask_unverifiable``: a wrong mask is never written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

# What may stand before a turn's content in its trained text, once its reasoning is taken out:
# nothing, one pair of tags left empty (Qwen3's "<think>\n\n</think>\n\n" on the last turn), or
# the close of a think block the prompt opened (DeepSeek-R1 per turn: "REASONING\n</think>\n\n").
_BEFORE_CONTENT = re.compile(r"\s*(?:<(\w+)>\s*</\1>|</think>)?\s*")


def span_matches(
    decoded: str, message: dict[str, Any], end_token: str | None, as_decoded=lambda s: s, markup: frozenset[str] = frozenset()
) -> bool:
    """Decoded trained tokens == the turn's [reasoning block +] content [+ tool calls] + end token.

    ``as_decoded`` spells a text the way the tokenizer's decoder gives it back (SentencePiece's
    decoders turn every "▁", an added token's included, into a space). ``markup``: the template's
    own header text inside a turn (:func:`turn_markup`), allowed before the content as well.
    """
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
        return body.endswith(content) and _header_only(body[: len(body) - len(content)], reasoning, markup)
    names = [_call_name(call) for call in calls]
    if not all(names):
        return False
    if not content:
        return all(name in body for name in names)
    after_reasoning = body.find(reasoning) + len(reasoning) if reasoning and reasoning in body else 0
    at = body.find(content, after_reasoning)
    while at >= 0:  # each place the content stands: "analysis" also stands in gpt-oss's header
        rest = body[at + len(content) :]
        if all(name in rest for name in names) and _header_only(body[:at], reasoning, markup):
            return True
        at = body.find(content, at + 1)
    return False


def _call_name(call: Any) -> str | None:
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _header_only(before: str, reasoning: str, markup: frozenset[str]) -> bool:
    """Whether ``before``, what stands before a turn's content in its span, is header text only:
    an allowed form (:data:`_BEFORE_CONTENT`) or the template's own markup, its reasoning taken out."""
    if markup and any(_bare(text) in markup for text in _without(before, reasoning)):
        return True
    if reasoning and reasoning in before:
        before = before.replace(reasoning, "", 1)
    return _BEFORE_CONTENT.fullmatch(before) is not None


def _without(text: str, piece: str) -> list[str]:
    """``text`` with one occurrence of ``piece`` taken out, for each place it occurs (all of
    ``text`` when it does not): reasoning that reads "analysis" is not the header's word."""
    if not piece:
        return [text]
    places, at = [], text.find(piece)
    while at >= 0:
        places.append(text[:at] + text[at + len(piece) :])
        at = text.find(piece, at + 1)
    return places or [text]


def _bare(text: str) -> str:
    return "".join(text.split())


# Probe texts for turn_markup: what no template writes of its own.
_QUESTION, _ANSWER, _REASONING = "sftkit probe question", "sftkit probe answer", "sftkit probe reasoning"


def turn_markup(render: Callable[[list[dict[str, Any]], bool], str], controls: Sequence[str], reasoning_field: bool) -> frozenset[str]:
    """The header text a template writes inside an assistant turn before its content, where that
    text holds control tokens: gpt-oss's ``<|channel|>final<|message|>`` after the generation
    prompt's ``<|start|>assistant``, and with reasoning
    ``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>``.

    The model writes it, so it is trained; :func:`span_matches` allows exactly these texts
    (whitespace aside, reasoning taken out) before a turn's content, and nothing else made of
    control tokens: a span that starts a token early (taking in ``<|start|>``) still fails.
    Found by rendering short conversations (``render(messages, add_generation_prompt)``; a
    probe the template refuses adds nothing): for each assistant turn, the text between the
    generation prompt of the messages before it and the turn's content. A template whose
    generation prompt adds nothing has none: there the text before a turn's content is its role
    header, which the prompt leaves out, not text the model writes after it.
    """
    if not controls:
        return frozenset()
    user = {"role": "user", "content": _QUESTION}
    try:
        if render([user], True) == render([user], False):
            # No generation prompt: a turn's header is not the prompt's, and would pass for markup
            return frozenset()
    except Exception:
        return frozenset()

    def answer(number: int, reasoning: bool, calls: bool = False) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": f"{_ANSWER} {number}"}
        if reasoning:
            message["reasoning_content"] = f"{_REASONING} {number}"
        if calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": "sftkit_probe_call", "arguments": {}}}]
        return message

    probes = [[user, answer(1, False), user, answer(2, False)], [user, answer(1, False, calls=True)]]
    if reasoning_field:
        probes.append([user, answer(1, True), user, answer(2, True)])
    found = set()
    for messages in probes:
        try:
            full = render(messages, False)
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = render(messages[:index], True)
                at = full.find(message["content"], len(prompt))
                if not full.startswith(prompt) or at < 0:
                    continue
                header = full[len(prompt) : at]
                if reasoning := message.get("reasoning_content"):
                    header = header.replace(reasoning, "", 1)
                if any(control in header for control in controls):
                    found.add(_bare(header))
        except Exception:  # a probe the template refuses (tool calls, a role): it shows nothing
            continue
    return frozenset(found)


def metaspace(text: str) -> str:
    return text.replace("\u2581", " ")


def clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

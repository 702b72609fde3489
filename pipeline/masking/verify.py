"""The check every trained span passes: its tokens decode to the turn and nothing else.

The trained tokens of each assistant turn are decoded and must be the turn's reasoning block (if
the template renders one), its content, its rendered tool calls and its end token; otherwise the
row is rejected as ``mask_unverifiable``: a wrong mask is never written.
"""

from __future__ import annotations

import re
from typing import Any

# What may stand before a turn's content in its trained text, once its reasoning is taken out:
# nothing, one pair of tags left empty (Qwen3's "<think>\n\n</think>\n\n" on the last turn), or
# the close of a think block the prompt opened (DeepSeek-R1 per turn: "REASONING\n</think>\n\n").
_BEFORE_CONTENT = re.compile(r"\s*(?:<(\w+)>\s*</\1>|</think>)?\s*")


def span_matches(decoded: str, message: dict[str, Any], end_token: str | None, as_decoded=lambda s: s) -> bool:
    """Decoded trained tokens == the turn's [reasoning block +] content [+ tool calls] + end token.

    ``as_decoded`` spells a text the way the tokenizer's decoder gives it back (SentencePiece's
    decoders turn every "▁", an added token's included, into a space).
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
        if not body.endswith(content):
            return False
        before, rest = body[: len(body) - len(content)], ""
    else:
        after_reasoning = body.find(reasoning) + len(reasoning) if reasoning and reasoning in body else 0
        at = body.find(content, after_reasoning) if content else -1
        if content and at < 0:
            return False
        before, rest = (body[:at], body[at + len(content) :]) if content else ("", body)
        for call in calls:
            fn = call.get("function", call) if isinstance(call, dict) else {}
            name = fn.get("name") if isinstance(fn, dict) else None
            if not name or name not in rest:
                return False
    if reasoning and reasoning in before:
        before = before.replace(reasoning, "", 1)
    return _BEFORE_CONTENT.fullmatch(before) is not None


def metaspace(text: str) -> str:
    return text.replace("\u2581", " ")


def clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

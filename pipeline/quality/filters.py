"""The content filters: missing instruction, empty response, length, refusal, garbage, repetition.

Each is a :class:`~pipeline.quality.base.Filter` dataclass; its fields are the parameters a config
file may set under ``quality.filters.<name>``, and its docstring gives the reason codes and the
defaults with why they were chosen. All of them judge *trained* assistant turns only (a turn with
``train: false`` is context, not something the model learns), and a tool-calling turn with no
text is never an "empty" response.
"""

from __future__ import annotations

import itertools
import operator
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.quality import text as tx
from pipeline.quality.base import (
    Filter,
    excerpt,
    is_trained_assistant,
    messages,
    prompt_response_pairs,
    prompts,
    responses,
)
from pipeline.stage import Drop


@dataclass
class MissingInstruction(Filter):
    """``missing_instruction``: the first assistant turn answers nothing.

    Dropped when no user turn with non-blank text comes before the first assistant turn (a
    system prompt alone is not an instruction). Records with no assistant turn at all are left to
    ``empty_response``.
    """

    name: ClassVar[str] = "missing_instruction"

    def check(self, record: dict[str, Any]) -> Drop | None:
        for message in messages(record):
            if message["role"] == "user" and (message.get("content") or "").strip():
                return None
            if message["role"] == "assistant":
                return Drop("missing_instruction", "no user turn with text before the first assistant turn")
        return None


# Whole-response placeholders (compared after strip + lowercase, and again without a trailing
# full stop). "none" and "无" can be honest short answers; they are here because in scraped
# instruction data they overwhelmingly mark a missing output. Remove them via the parameter.
DEFAULT_PLACEHOLDERS = (
    "n/a",
    "na",
    "none",
    "null",
    "nil",
    "nan",
    "undefined",
    "...",
    "…",
    "……",
    "-",
    "--",
    "—",
    "?",
    "todo",
    "tbd",
    "<noinput>",
    "<nooutput>",
    "no output",
    "no response",
    "[no response]",
    "无",
    "暂无",
    "空",
    "略",
    "无输出",
    "无回答",
    "没有输出",
)


@dataclass
class EmptyResponse(Filter):
    """``no_response`` / ``empty_response`` / ``placeholder_response``.

    * ``no_response``: the conversation has no assistant turn at all;
    * ``empty_response``: a trained assistant turn is empty or whitespace and makes no tool call;
    * ``placeholder_response``: a trained assistant turn is only a placeholder such as "N/A",
      "none", "...", "无", "暂无" (``placeholders``; ``extra_placeholders`` adds to them).
    """

    name: ClassVar[str] = "empty_response"
    placeholders: list[str] = field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS))
    extra_placeholders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._placeholders = {p.strip().lower() for p in [*self.placeholders, *self.extra_placeholders]}
        self._longest = max(map(len, self._placeholders), default=0)

    def check(self, record: dict[str, Any]) -> Drop | None:
        seen_assistant = False
        for index, message in enumerate(messages(record)):
            if message["role"] != "assistant":
                continue
            seen_assistant = True
            if not is_trained_assistant(message):
                continue
            content = (message.get("content") or "").strip()
            if not content:
                if not message.get("tool_calls"):
                    return Drop("empty_response", f"assistant turn {index} is empty")
                continue
            # Lowercasing never shortens a text nor makes a full stop: a longer text is no placeholder.
            if len(content.rstrip(".。")) > self._longest:
                continue
            normal = content.lower()
            if normal in self._placeholders or normal.rstrip(".。") in self._placeholders:
                return Drop("placeholder_response", f"assistant turn {index} is only {content[:20]!r}")
        if not seen_assistant:
            return Drop("no_response", "the conversation has no assistant turn")
        return None


@dataclass
class Length(Filter):
    """``prompt_too_short`` / ``prompt_too_long`` / ``response_too_short`` / ``response_too_long``
    / ``response_prompt_ratio``.

    Bounds are per turn, in characters after stripping: every user turn is a prompt, every trained
    assistant turn with text is a response. Defaults: a response needs 1 character ("4" and
    "Canberra." are fine answers), a prompt 1; neither may exceed 50,000 characters (beyond any
    sane chat turn; token budgets are the tokenize stage's job).

    Token bounds (``min/max_prompt_tokens``, ``min/max_response_tokens``) apply only when set, and
    need a tokenizer: pass one to ``build_filters`` or name a local folder in ``tokenizer``.

    ``response_prompt_ratio``: a reply of more than ``max_ratio`` times its prompt's characters
    (default 1000, e.g. 6,000+ characters answering "hi") or less than ``min_ratio`` (default
    0.0005, e.g. "Yes" to a 10,000-character prompt) signals a pair that lost its instruction or
    its answer. Only judged when the longer side has at least ``ratio_min_chars`` (default 2000),
    so short exchanges and classification-style answers are never ratio-rejected.
    """

    name: ClassVar[str] = "length"
    min_prompt_chars: int = 1
    max_prompt_chars: int = 50_000
    min_response_chars: int = 1
    max_response_chars: int = 50_000
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_response_tokens: int | None = None
    max_response_tokens: int | None = None
    tokenizer: Any = None
    min_ratio: float | None = 0.0005
    max_ratio: float | None = 1000.0
    ratio_min_chars: int = 2000

    @classmethod
    def from_config(cls, params, config, *, tokenizer=None):
        # The run's tokenizer serves the token bounds unless the config names its own.
        return cls(**{"tokenizer": tokenizer, **params} if tokenizer is not None else params)

    def __post_init__(self) -> None:
        wants_tokens = any(
            v is not None for v in (self.min_prompt_tokens, self.max_prompt_tokens, self.min_response_tokens, self.max_response_tokens)
        )
        if isinstance(self.tokenizer, str) and wants_tokens:  # a folder: loaded only when a bound needs it
            from pipeline.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        if wants_tokens and self.tokenizer is None:
            raise ValueError(
                "quality filter 'length' has token bounds but no tokenizer; set filters.length.tokenizer "
                "to a local tokenizer folder or remove the *_tokens bounds"
            )
        self._wants_tokens = wants_tokens

    def _num_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _bounds(self, kind: str, index: int, text: str, lo_c, hi_c, lo_t, hi_t) -> Drop | None:
        chars = len(text.strip())
        if chars < lo_c:
            return Drop(f"{kind}_too_short", f"{kind} turn {index} has {chars} characters (< {lo_c})")
        if chars > hi_c:
            return Drop(f"{kind}_too_long", f"{kind} turn {index} has {chars} characters (> {hi_c})")
        if self._wants_tokens and (lo_t is not None or hi_t is not None):
            n = self._num_tokens(text)
            if lo_t is not None and n < lo_t:
                return Drop(f"{kind}_too_short", f"{kind} turn {index} has {n} tokens (< {lo_t})")
            if hi_t is not None and n > hi_t:
                return Drop(f"{kind}_too_long", f"{kind} turn {index} has {n} tokens (> {hi_t})")
        return None

    def check(self, record: dict[str, Any]) -> Drop | None:
        for index, prompt in prompts(record):
            drop = self._bounds(
                "prompt",
                index,
                prompt,
                self.min_prompt_chars,
                self.max_prompt_chars,
                self.min_prompt_tokens,
                self.max_prompt_tokens,
            )
            if drop:
                return drop
        for index, response in responses(record):
            drop = self._bounds(
                "response",
                index,
                response,
                self.min_response_chars,
                self.max_response_chars,
                self.min_response_tokens,
                self.max_response_tokens,
            )
            if drop:
                return drop
        for prompt, response, index in prompt_response_pairs(record):
            p, r = len(prompt.strip()), len(response.strip())
            if max(p, r) < self.ratio_min_chars or p == 0:
                continue
            ratio = r / p
            if self.max_ratio is not None and ratio > self.max_ratio:
                return Drop("response_prompt_ratio", f"assistant turn {index}: {r} characters answer a {p}-character prompt")
            if self.min_ratio is not None and ratio < self.min_ratio:
                return Drop("response_prompt_ratio", f"assistant turn {index}: {r} characters answer a {p}-character prompt")
        return None


# --- refusals and AI disclaimers -------------------------------------------------------------
def _normalise(text: str) -> str:
    """Lowercase, straight apostrophes, ASCII commas/colons, single spaces: what phrases match on."""
    return _normalise_lowered(text.lower())


def _normalise_lowered(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\uff0c", ",").replace("\u3001", ",").replace("\uff1a", ":")
    return " ".join(text.split())


def _anchors(phrases: list[str]) -> list[str]:
    """Substrings that the lowercased text must hold for any of the normalised ``phrases`` to match.

    Normalising only maps a few marks to ' , : and collapses white space, so the longest stretch of
    a phrase without those and without spaces stands as it is in the lowercased text. An anchor
    that holds a shorter one is left out: the shorter one is found wherever the longer one is.
    """
    longest = {max(re.split(r"[\s',:]+", phrase), key=len) for phrase in phrases}
    anchors: list[str] = []
    for anchor in sorted(longest, key=len):
        if not any(shorter in anchor for shorter in anchors):
            anchors.append(anchor)
    return anchors


# Phrases that mark an AI disclaimer wherever they appear in a response (after _normalise).
DEFAULT_DISCLAIMER_PHRASES = (
    "as an ai language model",
    "as a large language model",
    "as an ai text-based model",
    "as a text-based ai",
    "i'm an ai language model",
    "i am an ai language model",
    "i'm just an ai language model",
    "i am just an ai language model",
    "as an ai developed by openai",
    "as a language model developed by openai",
    "作为一个人工智能语言模型",
    "作为一个ai语言模型",
    "作为ai语言模型",
    "作为人工智能语言模型",
    "作为一个大型语言模型",
    "作为一个语言模型,我",
    "我是一个人工智能语言模型",
    "我只是一个人工智能语言模型",
    "我只是一个ai语言模型",
    "我只是一个语言模型",
)

# "As an AI, I don't ...": an AI self-reference followed by a statement of inability.
_EN_DISCLAIMER = re.compile(
    r"\bas an? (?:ai|artificial intelligence|language model|chatbot|virtual assistant)"
    r"(?: (?:language )?(?:model|assistant|chatbot|program))?,? (?:developed by \w+,? )?"
    r"i (?:do not|don't|cannot|can't|am not|am unable|'m not|'m unable|have no|lack|do not have|don't have)\b"
)
# What every _EN_DISCLAIMER match holds, found far faster: this pattern starts with a literal,
# which the regex engine searches for directly, while the \b in front of _EN_DISCLAIMER makes it
# try every position. The second form is the same in the lowercased text before normalising.
_EN_DISCLAIMER_HINT = re.compile(r"as an? (?:ai|artificial intelligence|language model|chatbot|virtual assistant)")
_EN_DISCLAIMER_LOWERED_HINT = re.compile(r"as\s+an?\s+(?:ai|artificial\s+intelligence|language\s+model|chatbot|virtual\s+assistant)")
_ZH_DISCLAIMER = re.compile(
    r"作为(?:一个|一名|一款)?(?:ai|人工智能|语言模型|智能助手|ai助手)(?:语言模型|助手|模型|程序)?,?\s*"
    r"我(?:不|无法|没有|并不|并没有|不能)"
)
# Refusal openers: judged only at the start of a response (``refusal_window`` characters).
_EN_INABILITY = (
    r"(?:i|i'm|i am) (?:can't|cannot|can not|won't|will not|am unable to|'m unable to|unable to|"
    r"am not able to|'m not able to|must decline|do not feel comfortable|don't feel comfortable)"
)
_EN_REFUSAL_VERB = (
    r" (?:help|assist|comply|provide|fulfill|fulfil|answer|generate|create|write|complete|engage|"
    r"support|perform|browse|access|share|give|offer|produce|do that|do this)\b"
)
# "I'm sorry, but I can't ..." refuses whatever follows; without the apology the inability must
# be about helping ("I can't help with that"), so "I will not succeed." is not a refusal.
_EN_REFUSAL = re.compile(
    r"^(?:(?:i'm |i am )?(?:sorry|apologies|i apologize|i apologise)[,.!]? ?(?:but )?"
    + _EN_INABILITY
    + r"|"
    + _EN_INABILITY
    + _EN_REFUSAL_VERB
    + r")"
)
_ZH_INABILITY = r"我(?:不能|无法|没办法|没有办法|不可以|不会|拒绝)"
_ZH_REFUSAL_VERB = r"(?:为你|为您|帮你|帮您|帮助|提供|回答|完成|协助|满足|执行|访问|生成|创作)"
# The same rule as in English: after an apology any inability is a refusal.
_ZH_REFUSAL = re.compile(
    r"^(?:(?:很|非常)?(?:抱歉|对不起|不好意思)[,.!。!]?\s*(?:但是?)?\s*" + _ZH_INABILITY + r"|" + _ZH_INABILITY + _ZH_REFUSAL_VERB + r")"
)
# How every _EN_REFUSAL or _ZH_REFUSAL match begins, in the lowercased text before normalising
# (keep in step with them): "i " / "i'm" (any apostrophe), "sorry", "apologies", or the Chinese.
_REFUSAL_OPENING_HINT = re.compile(r"\s*(?:i\s|i['\u2018\u2019]m|sorry|apologies|很|非常|抱歉|对不起|不好意思|我)")


@dataclass
class Refusal(Filter):
    """``ai_disclaimer`` / ``refusal`` in any trained assistant turn.

    * ``ai_disclaimer``: a phrase from ``phrases`` (the built-in list plus ``quality.
      refusal_phrases`` from the config: "as an AI language model", "作为一个人工智能语言模型" ...)
      anywhere in the response, or an AI self-reference followed by a statement of inability
      ("As an AI, I don't have ...", "作为AI，我无法 ...");
    * ``refusal``: the response *opens* with a refusal ("I'm sorry, but I can't help with ...",
      "抱歉，我无法提供 ...") within its first ``refusal_window`` (default 120) characters; later
      in a response such words are usually part of a real answer.

    ``exempt_tool_conversations`` (default true): in conversations that offer tools, declining a
    request the tools cannot serve ("I'm sorry, but as an AI, I can't order a pizza; I can ...")
    is what a tool-using assistant should learn, so only the phrase list applies there.
    Matching ignores case, curly apostrophes and full-width commas.
    """

    name: ClassVar[str] = "refusal"
    phrases: list[str] = field(default_factory=list)
    use_default_phrases: bool = True
    disclaimer_patterns: bool = True
    refusal_openers: bool = True
    refusal_window: int = 120
    exempt_tool_conversations: bool = True

    @classmethod
    def from_config(cls, params, config, *, tokenizer=None):
        return cls(**{**params, "phrases": [*params.get("phrases", []), *config.refusal_phrases]})

    def __post_init__(self) -> None:
        all_phrases = [*(DEFAULT_DISCLAIMER_PHRASES if self.use_default_phrases else ()), *self.phrases]
        cleaned = sorted({_normalise(p) for p in all_phrases if p.strip()}, key=len, reverse=True)
        self._phrases = re.compile("|".join(map(re.escape, cleaned))) if cleaned else None
        self._anchors = _anchors(cleaned)

    def _may_match(self, lowered: str, patterns_apply: bool) -> bool:
        """False when no phrase or pattern can match a response (``lowered``: lowercased, not yet
        normalised): the cheap test that spares most responses the normal form."""
        if any(anchor in lowered for anchor in self._anchors):
            return True
        if not patterns_apply:
            return False
        if self.disclaimer_patterns and ("作为" in lowered or _EN_DISCLAIMER_LOWERED_HINT.search(lowered)):
            return True
        return self.refusal_openers and _REFUSAL_OPENING_HINT.match(lowered) is not None

    def check(self, record: dict[str, Any]) -> Drop | None:
        patterns_apply = not (self.exempt_tool_conversations and record.get("tools"))
        for index, response in responses(record):
            lowered = response.lower()
            if not self._may_match(lowered, patterns_apply):
                continue
            normal = _normalise_lowered(lowered)
            if self._phrases is not None and (hit := self._phrases.search(normal)):
                return Drop("ai_disclaimer", f"assistant turn {index} says {hit.group(0)!r}")
            if not patterns_apply:
                continue
            if self.disclaimer_patterns:
                hit = (_EN_DISCLAIMER_HINT.search(normal) and _EN_DISCLAIMER.search(normal)) or _ZH_DISCLAIMER.search(normal)
                if hit:
                    return Drop("ai_disclaimer", f"assistant turn {index} says {hit.group(0)!r}")
            if self.refusal_openers:
                opening = normal[: self.refusal_window]
                hit = _EN_REFUSAL.search(opening) or _ZH_REFUSAL.search(opening)
                if hit:
                    return Drop("refusal", f"assistant turn {index} opens with a refusal: {excerpt(response, 60)!r}")
        return None


# --- garbage ---------------------------------------------------------------------------------
# UTF-8 bytes decoded as Latin-1/cp1252: a lead byte 0xC2-0xF4 shown as a Latin letter, followed by
# a continuation byte 0x80-0xBF shown as Latin-1 punctuation or its cp1252 stand-in ("Ã©", "â€™",
# "ä¸­"). Such pairs almost never occur in real text.
_MOJIBAKE = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)


@dataclass
class Garbage(Filter):
    """``control_characters`` / ``mojibake`` / ``low_letter_share`` / ``symbol_soup`` in user and
    trained assistant turns (tool results and system prompts are machine text and not judged), and
    ``no_letters`` in trained assistant turns.

    * ``control_characters``: more than ``max_control_chars`` (default 0) C0/C1 control
      characters other than tab/newline/CR, or U+FFFD replacement characters — broken decoding;
    * ``mojibake``: at least ``min_mojibake_pairs`` (default 2) UTF-8-read-as-Latin-1 pairs;
    * ``low_letter_share``: letters (CJK included) are under ``min_letter_share`` (default 0.1)
      of the non-space characters, judged only from ``min_chars`` (default 60) non-space
      characters on, so "42", "0, 1, 1, 2, 3, 5, 8" and short formulas pass;
    * ``symbol_soup``: characters that are neither letters, digits nor space exceed
      ``max_symbol_share`` (default 0.6) of the non-space characters (from ``min_chars`` on);
      JSON, code and LaTeX stay well under that;
    * ``no_letters``: a response with text but not one letter or digit in any script ("...",
      "!!!???", "—", "？！") at any length; it answers nothing. Short real answers have one
      ("42", "$5.00", "是", "OK", "٤٢", "はい"). A response of emoji (pictographs, Unicode
      category So: "🙂", "👍🎉") is kept: an emoji is a word-like symbol, and "answer with an
      emoji" is a real instruction. Prompts are not judged this way ("?" after a shared
      context is a fair question).
    """

    name: ClassVar[str] = "garbage"
    max_control_chars: int = 0
    min_mojibake_pairs: int = 2
    min_letter_share: float = 0.1
    max_symbol_share: float = 0.6
    min_chars: int = 60

    def __post_init__(self) -> None:
        if self.min_mojibake_pairs < 1:
            raise ValueError("quality filter 'garbage' needs min_mojibake_pairs >= 1")

    def check(self, record: dict[str, Any]) -> Drop | None:
        for index, message in enumerate(messages(record)):
            if message["role"] == "user" or is_trained_assistant(message):
                content = message.get("content") or ""
                if content and (drop := self._judge(index, message["role"], content)):
                    return drop
        return None

    def _judge(self, index: int, role: str, text: str) -> Drop | None:
        where = f"{role} turn {index}"
        non_space, letters, digits, control = tx.char_classes(text)
        # Replacement characters and mojibake pairs are not ASCII: ASCII text has neither.
        ascii_text = text.isascii()
        if not ascii_text:
            control += text.count("\ufffd")
        if control > self.max_control_chars:
            return Drop("control_characters", f"{where} has {control} control/replacement characters")
        if not ascii_text and (pairs := len(_MOJIBAKE.findall(text))) >= self.min_mojibake_pairs:
            return Drop("mojibake", f"{where} has {pairs} mis-decoded character pairs such as {_MOJIBAKE.search(text).group(0)!r}")
        if non_space >= self.min_chars:
            symbols = non_space - letters - digits
            if symbols / non_space > self.max_symbol_share:
                return Drop("symbol_soup", f"{where}: symbols are {symbols / non_space:.0%} of {non_space} characters")
            if letters / non_space < self.min_letter_share:
                return Drop("low_letter_share", f"{where}: letters are {letters / non_space:.0%} of {non_space} characters")
        if role == "assistant" and non_space and not letters and not digits and not _has_pictograph(text):
            return Drop("no_letters", f"{where} has no letter or digit: {excerpt(text, 40)!r}")
        return None


def _has_pictograph(text: str) -> bool:
    return any(unicodedata.category(char) == "So" for char in text)


# --- repetition (Gopher, Rae et al. 2021, table A1) ------------------------------------------
def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in repeated items); first occurrences excluded."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by all occurrences of the most frequent word n-gram (0 if none repeats)."""
    counts = Counter(zip(*(words[i:] for i in range(n))))
    if not counts:
        return 0
    gram, count = counts.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters in words covered by n-grams seen before (each word counted once), as in Gopher."""
    grams = list(zip(*(words[i:] for i in range(n))))
    # Each n-gram's first position: built from the end, so the earliest position is written last.
    first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))
    if len(first) == len(grams):
        return 0  # no n-gram repeats
    seen_before = map(operator.ne, map(first.__getitem__, grams), itertools.count())
    covered = bytearray(len(words))
    for i in itertools.compress(itertools.count(), seen_before):
        covered[i : i + n] = b"\x01" * n
    return sum(itertools.compress(map(len, words), covered))


def _repeated_run_chars(words: list[str], n: int) -> int:
    """Characters of the words standing in a run of at least ``n`` words that each occurred earlier.

    Every word of a repeated n-gram's later occurrence occurred earlier, so repeated n-grams (and
    longer ones) cover at most this: a cheap upper bound of :func:`_duplicate_ngram_chars`.
    """
    seen: set[str] = set()
    # 1 where the word occurred earlier (``seen.add`` returns None: 0 for a first occurrence).
    seen_earlier = bytes([word in seen or seen.add(word) or 0 for word in words])
    lengths = list(map(len, words))
    return sum(sum(lengths[run.start() : run.end()]) for run in re.finditer(b"\x01{%d,}" % max(n, 1), seen_earlier))


def _int_keys(mapping: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in mapping.items()}


@dataclass
class Repetition(Filter):
    """``repeated_lines`` / ``repeated_paragraphs`` / ``top_ngram`` / ``repeated_ngrams`` in trained
    assistant turns: Gopher's repetition statistics (Rae et al. 2021, table A1).

    Tokens are lowercase words and single characters of unspaced scripts (:mod:`pipeline.text`;
    char n-grams for Chinese or Thai). Judged only
    for responses of at least ``min_tokens`` (default 50) tokens: the statistics are meaningless
    on "Canberra." and trigger on any short list.

    Gopher's thresholds were set for web pages; instruction responses legitimately repeat more
    (song choruses, screenplay cues, templated list items such as "``<=`` checks if the value of
    the left operand is ..."), and on the 1,799 real demo conversations Gopher's values reject
    3% of clean records. The defaults below sit above the largest value seen there, while
    degenerate loops (the usual failure of generated data) score 0.7 and more:

    * duplicated lines: more than ``max_duplicate_lines`` (0.4, Gopher 0.3) of the lines, or
      their characters more than ``max_duplicate_line_chars`` (0.3, Gopher 0.2), repeat an
      earlier line. Lines without a letter or digit (code braces, fences, table rules) are not
      counted;
    * the same for blank-line separated paragraphs: ``max_duplicate_paragraphs`` (0.4),
      ``max_duplicate_paragraph_chars`` (0.3);
    * ``top_ngram``: the most frequent 2/3/4-gram covers more than 0.25 of the token characters
      (``top_ngram_shares``; Gopher 0.20/0.18/0.16);
    * ``repeated_ngrams``: tokens inside repeated 5..10-grams cover more than 0.50, 0.45, 0.40,
      0.35, 0.30, 0.30 of the token characters (``duplicate_ngram_shares``; Gopher 0.15..0.10).
    """

    name: ClassVar[str] = "repetition"
    min_tokens: int = 50
    max_duplicate_lines: float = 0.4
    max_duplicate_line_chars: float = 0.3
    max_duplicate_paragraphs: float = 0.4
    max_duplicate_paragraph_chars: float = 0.3
    top_ngram_shares: dict = field(default_factory=lambda: {2: 0.25, 3: 0.25, 4: 0.25})
    duplicate_ngram_shares: dict = field(default_factory=lambda: {5: 0.5, 6: 0.45, 7: 0.4, 8: 0.35, 9: 0.3, 10: 0.3})

    def __post_init__(self) -> None:
        self._top = _int_keys(self.top_ngram_shares)
        self._dup = _int_keys(self.duplicate_ngram_shares)

    def check(self, record: dict[str, Any]) -> Drop | None:
        for index, response in responses(record):
            if drop := self._judge(index, response):
                return drop
        return None

    def _repeated_parts(self, where: str, text: str) -> Drop | None:
        if "\n" not in text:
            return None  # one line, one paragraph: nothing to repeat
        for unit, parts, max_share, max_chars in (
            ("paragraphs", re.split(r"\n\s*\n", text), self.max_duplicate_paragraphs, self.max_duplicate_paragraph_chars),
            ("lines", text.split("\n"), self.max_duplicate_lines, self.max_duplicate_line_chars),
        ):
            parts = [p.strip() for p in parts if _HAS_WORD.search(p)]
            if len(parts) < 2:
                continue
            count, chars = _duplicates(parts)
            total_chars = sum(map(len, parts))
            if count / len(parts) > max_share:
                return Drop(f"repeated_{unit}", f"{where}: {count} of {len(parts)} {unit} repeat an earlier one")
            if chars / total_chars > max_chars:
                return Drop(f"repeated_{unit}", f"{where}: repeated {unit} hold {chars / total_chars:.0%} of the characters")
        return None

    def _judge(self, index: int, text: str) -> Drop | None:
        words = tx.tokens(text)
        if len(words) < self.min_tokens:
            return None
        where = f"assistant turn {index}"
        if drop := self._repeated_parts(where, text):
            return drop
        total = sum(map(len, words))
        counts = Counter(words)
        # The most characters one word covers with all its occurrences (length x count).
        heaviest = max(map(operator.mul, map(len, counts), counts.values()), default=0)
        for n, limit in self._top.items():
            # An n-gram occurs at most as often as each of its words, so all its occurrences cover
            # at most n times the heaviest word's characters: under the limit, no need to count.
            if n * heaviest / total <= limit:
                continue
            share = _top_ngram_chars(words, n) / total
            if share > limit:
                return Drop("top_ngram", f"{where}: the most frequent {n}-gram covers {share:.0%} of the text (> {limit:.0%})")
        sizes = sorted(self._dup)
        # Repeated n-grams cover only second and later occurrences of words (first bound, free from
        # the counts) standing in runs of at least n such words (second bound): when a bound is under
        # every limit, no n can fail.
        lowest_limit = min(self._dup.values(), default=1.0)
        if (total - sum(map(len, counts))) / total <= lowest_limit:
            return None
        if _repeated_run_chars(words, sizes[0]) / total <= lowest_limit:
            return None
        for position, n in enumerate(sizes):
            share = _duplicate_ngram_chars(words, n) / total
            limit = self._dup[n]
            if share > limit:
                return Drop("repeated_ngrams", f"{where}: repeated {n}-grams cover {share:.0%} of the text (> {limit:.0%})")
            # Text inside a repeated m-gram (m > n) is inside repeated n-grams too, so the shares
            # only shrink with n: once under every remaining limit, the larger n cannot fail.
            if share <= min((self._dup[m] for m in sizes[position + 1 :]), default=1.0):
                break
        return None


_HAS_WORD = re.compile(r"[^\W_]")

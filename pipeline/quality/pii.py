"""Personal data in conversations: e-mail addresses, phone numbers, IPv4/IPv6 addresses.

Redacted in place (default: the match becomes ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, in
message text and in tool-call arguments alike, so a conversation stays consistent) with a count
per kind, or the record is dropped. Hand-written regular expressions because the kinds are few
and an NER model would be far slower than the rest of the pipeline; IP candidates are confirmed
with :mod:`ipaddress`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.quality.base import Filter, messages
from pipeline.stage import Drop

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![A-Za-z0-9-])")
# Boundaries are ASCII-only on purpose: Chinese text puts addresses right after a character
# ("服务器地址是8.8.8.8"), and \w would count that character as part of a word.
IPV4 = re.compile(r"(?<![A-Za-z0-9_.])(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}(?![A-Za-z0-9_]|\.\d)")
IPV6 = re.compile(r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![A-Za-z0-9_:])")
PHONE = re.compile(
    "|".join(
        [
            # international: +86 138 0013 8000, +1 (415) 555-0132, +44 20 7946 0958
            r"(?<![A-Za-z0-9_+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}(?!\d)",
            # North American with separators: (415) 555-0132, 415-555-0132, 415.555.0132
            r"(?<![A-Za-z0-9_-])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\d-])",
            # Chinese mobile: 13800138000, 138-0013-8000, 138 0013 8000
            r"(?<![\d-])1[3-9]\d(?:\d{8}|[- ]\d{4}[- ]\d{4})(?![\d-])",
            # Chinese landline with area code: 010-12345678, 0755-1234567
            r"(?<![\d-])0\d{2,3}-\d{7,8}(?![\d-])",
        ]
    )
)

# Necessary conditions, checked first because a scan for them is many times faster than one for the
# pattern itself (whose leading lookbehind defeats the regex engine's search for a first character):
# every e-mail address holds "@" label ".", every IPv6 match ":" hex{0,4} ":", every IPv4 match
# ".d.d.d", every phone number "+d" or four digits in a row ...
EMAIL_HINT = re.compile(r"@[A-Za-z0-9-]+\.")
IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
PLUS_DIGIT = re.compile(r"\+\d")
FOUR_DIGITS = re.compile(r"\d\d{3}")  # not \d{4}: a leading single \d lets the engine skip to digits
# ... and, without the "+", three digits, a separator and four more, or eleven digits in a row.
PHONE_SHAPE = re.compile(r"\d{3}[-. ]\d{4}|\d{11}")


# The same necessary conditions as one RE2 pattern per kind, for a whole batch at once in Arrow
# (:meth:`PII.candidates`). Python's \d is any Unicode decimal digit; RE2's is ASCII, so \p{Nd}.
_D = r"\p{Nd}"
BATCH_HINTS = {
    "email": r"@[A-Za-z0-9-]+\.",
    "ip": rf":[0-9A-Fa-f]{{0,4}}:|\.{_D}{{1,3}}\.{_D}{{1,3}}\.{_D}",
    "phone": rf"\+{_D}|{_D}{{3}}[-. ]{_D}{{4}}|{_D}{{11}}",
}


def _may_hold_email(text: str) -> bool:
    return "@" in text and EMAIL_HINT.search(text) is not None


def _may_hold_phone(text: str) -> bool:
    if "+" in text and PLUS_DIGIT.search(text):
        return True
    return FOUR_DIGITS.search(text) is not None and PHONE_SHAPE.search(text) is not None


# Documentation-only e-mail domains (RFC 2606): examples in code answers are not personal data.
DEFAULT_IGNORED_EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "example.edu")


@dataclass
class PII(Filter):
    """``pii``: e-mail addresses, phone numbers and IP addresses in any turn or tool call.

    ``mode`` ``redact`` (default, from ``quality.pii``) replaces each match by its placeholder and
    counts it (``redactions`` per kind in the stage statistics, ``pii_redactions`` in total);
    ``drop`` rejects the record with reason ``pii``. ``kinds`` picks what to look for.

    Not personal data, so never touched: e-mail addresses at the RFC 2606 example domains
    (``ignored_email_domains``) and, with ``public_ips_only`` (default true), private, loopback,
    link-local, documentation and other non-global addresses such as 192.168.1.1 or ::1 — the
    stuff of networking tutorials. Phone numbers need the shape of one (separators, a ``+``
    country code, or the 11-digit Chinese mobile form), so bare long numbers in maths stay.
    """

    name: ClassVar[str] = "pii"
    mode: Literal["redact", "drop"] = "redact"
    kinds: list[str] = field(default_factory=lambda: ["email", "phone", "ip"])
    placeholders: dict = field(default_factory=lambda: {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>"})
    ignored_email_domains: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORED_EMAIL_DOMAINS))
    public_ips_only: bool = True

    @classmethod
    def from_config(cls, params, config, *, tokenizer=None):
        return None if config.pii == "off" else cls(**{"mode": config.pii, **params})

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - {"email", "phone", "ip"}
        if unknown:
            raise ValueError(f"quality filter 'pii' has unknown kinds {sorted(unknown)}; use email, phone, ip")
        if self.mode not in ("redact", "drop"):
            raise ValueError(f"quality filter 'pii' mode must be redact or drop, not {self.mode!r}")
        self._ignored = tuple(d.lower() for d in self.ignored_email_domains)
        # (kind, pattern, which matches count, necessary condition), in the order they run.
        steps = [
            ("email", EMAIL, self._is_email, _may_hold_email),
            ("ip", IPV6, self._is_ip, IPV6_HINT.search),
            ("ip", IPV4, self._is_ip, IPV4_HINT.search),
            ("phone", PHONE, None, _may_hold_phone),
        ]
        self._steps = [step for step in steps if step[0] in self.kinds]
        # Redacting never drops; dropping never changes the record.
        self.transforms = self.mode == "redact"

    def candidates(self, table: pa.Table) -> np.ndarray | None:
        """Rows with a necessary condition of some kind's match in a message's text or tool
        calls: an RE2 scan of the batch's columns in Arrow, instead of one Python scan per message
        and kind (most conversations hold no personal data)."""
        kinds = {kind for kind, *_ in self._steps}
        if not kinds:
            return np.zeros(table.num_rows, bool)
        pattern = "|".join(BATCH_HINTS[kind] for kind in sorted(kinds))
        column = table.column(schema.MESSAGES).combine_chunks()
        flat = pc.list_flatten(column)
        hit = np.zeros(len(flat), bool)
        for key in ("content", "tool_calls"):
            values = pc.struct_field(flat, key)
            hit |= pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(zero_copy_only=False)
        rows = np.zeros(table.num_rows, bool)
        rows[pc.list_parent_indices(column).to_numpy()[hit]] = True
        return rows

    # --- what counts as a match --------------------------------------------------------------
    def _is_email(self, match: re.Match) -> bool:
        domain = match.group(0).rsplit("@", 1)[1].lower()
        return not any(domain == d or domain.endswith("." + d) for d in self._ignored)

    def _is_ip(self, match: re.Match) -> bool:
        try:
            address = ipaddress.ip_address(match.group(0))
        except ValueError:
            return False
        return address.is_global or not self.public_ips_only

    def _scrub(self, text: str, found: dict[str, int]) -> str:
        """``text`` with every match replaced; adds the number of matches per kind to ``found``."""
        for kind, pattern, accept, may_match in self._steps:
            if not may_match(text):  # the text as the steps before left it
                continue
            placeholder = self.placeholders.get(kind, f"<{kind.upper()}>")

            def replace(match: re.Match, kind=kind, accept=accept, placeholder=placeholder) -> str:
                if accept is not None and not accept(match):
                    return match.group(0)
                found[kind] = found.get(kind, 0) + 1
                return placeholder

            text = pattern.sub(replace, text)
        return text

    def check(self, record: dict[str, Any]) -> Drop | None:
        found: dict[str, int] = {}
        changes = []
        for index, message in enumerate(messages(record)):
            for key in ("content", "tool_calls"):
                value = message.get(key)
                if not value:
                    continue
                before = sum(found.values())
                scrubbed = self._scrub(value, found)
                if sum(found.values()) != before:
                    changes.append((message, key, scrubbed, index))
        if not found:
            return None
        if self.mode == "drop":
            first = changes[0]
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(found.items()))
            return Drop("pii", f"{first[0]['role']} turn {first[3]} holds personal data (record: {kinds})")
        for message, key, scrubbed, _ in changes:
            message[key] = scrubbed
        self.counts.update(found)
        return None

    def summary(self) -> dict[str, Any]:
        return {"redactions": dict(sorted(self.counts.items()))}

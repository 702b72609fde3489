"""The one shape of a quality filter, and the machinery that runs a chain of them.

A filter looks at ONE canonical conversation (a dict with ``messages`` and ``tools``) and answers
``None`` (keep) or a :class:`~pipeline.stage.Drop` with a reason code and a human detail. A filter
may also change the record in place (PII redaction); it reports what it changed in its
``counts``. :class:`FilterChain` does the rest for every filter alike: it times each one, counts
what each dropped and why, and stops at the first drop (cf. datatrove's ``BaseFilter``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.stage import Drop

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.config import QualityConfig


@dataclass
class Filter:
    """Base class: subclasses set :attr:`name` and implement :meth:`check`.

    Subclasses are dataclasses whose fields are the filter's parameters, so the parameters a
    config file may set are exactly the dataclass fields, with their defaults.
    """

    name: ClassVar[str] = "filter"
    # True for a filter that changes records in place instead of dropping them (PII redaction);
    # such a filter never drops, so a caller that only wants the verdict may skip it.
    transforms: ClassVar[bool] = False

    counts: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, params: dict[str, Any], config: QualityConfig, *, tokenizer: Any = None) -> Filter | None:
        """The filter the config asks for, or None when the config switches it off.

        ``params`` are the user's ``quality.filters.<name>`` (already checked against the fields).
        The one rule every filter is built by; a filter that also reads a top-level ``quality``
        setting (refusal phrases, PII mode, decontamination files, the tokenizer) overrides it.
        """
        return cls(**params)

    def check(self, record: dict[str, Any]) -> Drop | None:
        raise NotImplementedError

    def candidates(self, table: pa.Table) -> np.ndarray | None:
        """The rows of a batch of canonical conversations (``messages``, ``tools``) this filter
        might act on, as a boolean mask; None (the default) for all of them.

        A vectorised test over the batch's Arrow columns, for a filter whose Python check would
        find nothing on most rows: the chain does not call :meth:`check` on a row left out, so
        the mask must be a necessary condition of every drop and every change the check makes.
        """
        return None

    def summary(self) -> dict[str, Any]:
        """Filter-specific figures for the stage statistics (e.g. redactions by kind)."""
        return {}


@dataclass
class FilterChain:
    """Runs filters in order over records, timing each and counting its drops per reason."""

    filters: list[Filter]
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dropped: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def apply(self, record: dict[str, Any], filters: list[Filter] | None = None) -> Drop | None:
        """The first drop of ``filters`` (default: the whole chain) on ``record``, or None."""
        clock = time.perf_counter
        start = clock()
        for flt in self.filters if filters is None else filters:
            drop = flt.check(record)
            end = clock()
            self.seconds[flt.name] += end - start
            start = end
            if drop is not None:
                self.dropped[flt.name] += 1
                self.reasons[flt.name][drop.reason] += 1
                return drop
        return None

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{filter name: {"seconds", "dropped", "reasons", ...filter figures}}`` in chain order."""
        out = {}
        for flt in self.filters:
            out[flt.name] = {
                "seconds": round(self.seconds[flt.name], 4),
                "dropped": self.dropped[flt.name],
                "reasons": dict(sorted(self.reasons[flt.name].items())),
                **flt.summary(),
            }
        return out


# --- views of a canonical conversation shared by the filters ---------------------------------
def messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    return record.get("messages") or []


def is_trained_assistant(message: dict[str, Any]) -> bool:
    """An assistant turn the model will learn from (``train`` not explicitly false)."""
    return message["role"] == "assistant" and message.get("train") is not False


def responses(record: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(turn index, text) of every trained assistant turn that has text.

    A tool-calling turn may carry no text at all; it is not a response to judge.
    """
    for index, message in enumerate(messages(record)):
        if message["role"] == "assistant" and message.get("train") is not False:  # is_trained_assistant, inlined: hot
            content = message.get("content")
            if content and not content.isspace():
                yield index, content


def prompts(record: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(turn index, text) of every user turn."""
    for index, message in enumerate(messages(record)):
        if message["role"] == "user":
            yield index, message.get("content") or ""


def prompt_response_pairs(record: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    """(latest user text, assistant text, assistant turn index) for each textual trained reply."""
    last_user = None
    for index, message in enumerate(messages(record)):
        if message["role"] == "user":
            last_user = message.get("content") or ""
        elif is_trained_assistant(message) and (message.get("content") or "").strip() and last_user is not None:
            yield last_user, message["content"], index


def excerpt(text: str, limit: int = 80) -> str:
    """A one-line excerpt for drop details."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"

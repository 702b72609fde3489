"""Keeping evaluation sets out of the training data.

A record is dropped when any of its turns shares an n-gram of ``ngram`` tokens (13 by default,
as in the GPT-3 and Llama contamination studies) with any text of the user's evaluation files.
Tokens are lowercase words and single characters of unspaced scripts (:mod:`pipeline.text`), so
punctuation, case and spacing do not hide a copy. The evaluation n-grams are kept as a set of
Python hashes: one int per n-gram, looked up in O(1) per window.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pipeline.quality import text as tx
from pipeline.quality.base import Filter, messages
from pipeline.stage import Drop


def _strings(value: Any) -> Iterator[str]:
    """Every string value inside a JSON document (keys are field names, not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def evaluation_texts(path: Path) -> Iterator[str]:
    """All string values of a ``.json`` or ``.jsonl`` evaluation file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"evaluation file {path} for decontamination does not exist")
    name = path.name.lower()
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            for line_number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"evaluation file {path} line {line_number} is not valid JSON: {exc.msg}") from exc
                yield from _strings(document)
    elif name.endswith(".json"):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"evaluation file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
        yield from _strings(document)
    else:
        raise ValueError(f"evaluation file {path} must be .json or .jsonl")


def _stamp(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise ValueError(f"evaluation file {path} for decontamination does not exist")
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=8)
def _evaluation_ngrams(stamps: tuple[tuple[str, int, int], ...], n: int) -> tuple[frozenset[int], int, int]:
    """Hashed n-grams of the evaluation files (read once per process while the files are unchanged:
    the filter chain is built for every chunk and for dedup's keep policy)."""
    hashes: set[int] = set()
    texts = short = 0
    for path, _mtime, _size in stamps:
        for text in evaluation_texts(Path(path)):
            words = tx.tokens(text)
            texts += 1
            if len(words) < n:
                short += 1
                continue
            hashes.update(ngram_hashes(words, n))
    return frozenset(hashes), texts, short


def ngram_hashes(tokens: list[str], n: int) -> Iterator[int]:
    for i in range(len(tokens) - n + 1):
        yield hash(tuple(tokens[i : i + n]))


@dataclass
class Decontaminate(Filter):
    """``contaminated``: a turn shares an ``ngram``-token span with an evaluation file.

    ``files`` are ``.json``/``.jsonl`` evaluation sets; every string value in them is text (so
    questions, passages, choices and answers all count). An evaluation string shorter than
    ``ngram`` tokens cannot match; ``short_strings`` in the stage statistics says how many were.
    Every turn is checked: a copied question in a prompt contaminates as much as a copied answer.
    """

    name: ClassVar[str] = "decontaminate"
    files: list[Path] = field(default_factory=list)
    ngram: int = 13

    @classmethod
    def from_config(cls, params, config, *, tokenizer=None):
        params = {"files": list(config.decontaminate), "ngram": config.decontaminate_ngram, **params}
        return cls(**params) if params["files"] else None  # nothing to keep out: no filter

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError("quality filter 'decontaminate' needs ngram >= 1")
        stamps = tuple((str(path), *_stamp(Path(path))) for path in self.files)
        self._hashes, self._texts, self._short = _evaluation_ngrams(stamps, self.ngram)

    def check(self, record: dict[str, Any]) -> Drop | None:
        if not self._hashes:
            return None
        n = self.ngram
        for index, message in enumerate(messages(record)):
            words = tx.tokens(message.get("content") or "")
            # Whether any n-gram is an evaluation n-gram, asked in C (map over the n-gram tuples);
            # the Python loop below runs only to name the first one.
            if len(words) < n or not any(map(self._hashes.__contains__, map(hash, zip(*(words[i:] for i in range(n)))))):
                continue
            for i in range(len(words) - n + 1):
                if hash(tuple(words[i : i + n])) in self._hashes:
                    span = tx.join_tokens(words[i : i + n])
                    return Drop(
                        "contaminated",
                        f"{message['role']} turn {index} shares the {n}-token span {span!r} with the evaluation set",
                    )
        return None

    def summary(self) -> dict[str, Any]:
        return {"evaluation_texts": self._texts, "short_strings": self._short, "ngrams": len(self._hashes)}

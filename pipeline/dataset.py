"""The seed's Python API: ``SFTDataset`` and ``create_sft_labels``.

``SFTDataset`` reads a file in any supported layout (Alpaca instruction/input/output, ShareGPT,
OpenAI messages, prompt/completion; JSON, JSONL, Parquet …) through the same readers and
normaliser as ``sftkit prepare``, and builds each item with the same masking code as the shards
(:class:`pipeline.masking.Masker`), so ``ds[i]`` is exactly what a prepared shard row holds.

``create_sft_labels`` is the lesson's marker-based masking for token ids that were made
elsewhere: every instruction segment up to and including the marker is masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema

log = logging.getLogger("sftkit.dataset")


class SFTDataset:
    """Supervised fine-tuning examples: ``ds[i]`` -> ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` are -100 on everything but the trained assistant turns (their content and end
    token). Rows longer than ``max_length`` are truncated at a turn boundary where possible;
    records that cannot be used are listed in ``ds.rejected`` as (record index, reason, detail)
    and reported in a warning, never dropped silently.
    """

    def __init__(
        self,
        data_path: str | Path,
        tokenizer: Any,
        max_length: int = 2048,
        *,
        template: str | None = None,
        train_on: str = "all_assistant",
        truncate: bool = True,
    ):
        from pipeline.config import TemplateConfig
        from pipeline.formats import to_conversation
        from pipeline.masking import Encoded, Masker
        from pipeline.readers import iter_records
        from pipeline.stage import Drop
        from pipeline.templates import resolve_template
        from pipeline.tokenizers import load_tokenizer

        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(str(tokenizer))
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SFTDataset needs a fast (Rust) tokenizer: it places loss masks through offset mappings")
        if template is None:
            template = "auto" if getattr(tokenizer, "chat_template", None) else "alpaca"
        config = TemplateConfig(jinja_file=Path(template)) if template.endswith((".jinja", ".j2")) else TemplateConfig(name=template)
        self.template = resolve_template(tokenizer, config)
        self.tokenizer = tokenizer
        self.max_length = max_length
        masker = Masker(tokenizer, self.template, max_length=max_length, train_on=train_on, truncate=truncate)

        self.rejected: list[tuple[int, str, str]] = []
        self._input_ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        pending: list[tuple[int, list[dict], str | None]] = []

        def flush() -> None:
            results = masker.encode_batch([(messages, tools) for _, messages, tools in pending])
            for (index, _, _), result in zip(pending, results):
                if isinstance(result, Encoded):
                    self._input_ids.append(result.input_ids)
                    self._labels.append(result.labels)
                else:
                    self.rejected.append((index, result.reason, result.detail))
            pending.clear()

        for record in iter_records(Path(data_path)):
            if record.error is not None:
                self.rejected.append((record.index, record.error.reason, record.error.detail))
                continue
            try:
                messages, tools = to_conversation(record.value)
            except Drop as exc:
                self.rejected.append((record.index, exc.reason, exc.detail))
                continue
            pending.append((record.index, messages, tools))
            if len(pending) >= 1000:
                flush()
        flush()
        if self.rejected:
            log.warning(
                "%s: %d of %d records not used (first: record %d, %s: %s)",
                data_path,
                len(self.rejected),
                len(self.rejected) + len(self._input_ids),
                *self.rejected[0],
            )

    def __len__(self) -> int:
        return len(self._input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        input_ids = torch.from_numpy(self._input_ids[index].astype(np.int64))
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.from_numpy(self._labels[index].astype(np.int64)),
        }


def create_sft_labels(input_ids: Any, tokenizer: Any, instruction_template: str) -> Any:
    """Labels for ``input_ids`` with every instruction segment, marker included, set to -100.

    An instruction segment runs from the start (or from just after the EOS that ended the
    previous response) through the last token of ``instruction_template``. The marker is found
    in token space robustly to context-dependent splitting ("▁[/INST]" vs "[/INST]", " ###" vs
    "###"): through the offsets of a re-encoding of the decoded ids when that reproduces them,
    otherwise by searching the marker's tokenizations in several contexts. Returns the same kind
    as given (list, numpy array or torch tensor; 1-D, or 2-D row by row). Raises ``ValueError``
    when the marker is absent.
    """
    if not instruction_template:
        raise ValueError("instruction_template is empty; pass the text that ends each instruction, e.g. '[/INST]'")
    kind = type(input_ids)
    array = np.asarray(input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)
    if array.ndim == 2:
        rows = [_labels_for_row(row.tolist(), tokenizer, instruction_template) for row in array]
        labels = np.array(rows, dtype=np.int64)
    elif array.ndim == 1:
        labels = np.array(_labels_for_row(array.tolist(), tokenizer, instruction_template), dtype=np.int64)
    else:
        raise ValueError(f"input_ids must be 1-D or 2-D, got {array.ndim} dimensions")
    if kind is list:
        return labels.tolist()
    if kind is np.ndarray:
        return labels
    import torch

    if isinstance(input_ids, torch.Tensor):
        return torch.as_tensor(labels, dtype=input_ids.dtype)
    return labels.tolist()


def _labels_for_row(ids: list[int], tokenizer: Any, marker: str) -> list[int]:
    spans = _marker_spans(ids, tokenizer, marker)
    if not spans:
        preview = tokenizer.decode(ids[:60], skip_special_tokens=False)
        raise ValueError(
            f"instruction template {marker!r} does not occur in input_ids (which start {preview!r}); "
            "pass the exact text that ends each instruction in this data"
        )
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    labels = list(ids)
    previous_end = 0
    for start, end in spans:
        segment_start = previous_end
        for position in range(start - 1, previous_end - 1, -1):
            if ids[position] in stops:
                segment_start = position + 1
                break
        for position in range(segment_start, end):
            labels[position] = schema.IGNORE_INDEX
        previous_end = end
    for position in range(len(ids)):
        if ids[position] == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
            labels[position] = schema.IGNORE_INDEX
    return labels


def _marker_spans(ids: list[int], tokenizer: Any, marker: str) -> list[tuple[int, int]]:
    """Token ranges [start, end) that hold ``marker``, in order, not overlapping."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.decode(ids, skip_special_tokens=False)
        encoding = backend.encode(text, add_special_tokens=False)
        if encoding.ids == ids:
            spans = []
            position = text.find(marker)
            while position >= 0:
                first = encoding.char_to_token(position)
                last = encoding.char_to_token(position + len(marker) - 1)
                if first is not None and last is not None:
                    spans.append((first, last + 1))
                position = text.find(marker, position + len(marker))
            if spans:
                return spans
    return _search_token_sequences(ids, _marker_tokenizations(tokenizer, marker))


def _marker_tokenizations(tokenizer: Any, marker: str) -> list[list[int]]:
    """The marker's token ids as it is split at the start of a text and after other text."""
    candidates = set()
    for context in ("", " ", "\n", "a", "a ", "a\n", ".\n\n"):
        context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
        full = tokenizer.encode(context + marker, add_special_tokens=False)
        if full[: len(context_ids)] == context_ids and len(full) > len(context_ids):
            candidates.add(tuple(full[len(context_ids) :]))
    return sorted((list(c) for c in candidates), key=len, reverse=True)


def _search_token_sequences(ids: Sequence[int], needles: list[list[int]]) -> list[tuple[int, int]]:
    spans = []
    position = 0
    while position < len(ids):
        for needle in needles:
            if list(ids[position : position + len(needle)]) == needle:
                spans.append((position, position + len(needle)))
                position += len(needle)
                break
        else:
            position += 1
    return spans

"""Quality filters for instruction data: the chain built from the config, and the stage.

Owns the ``quality`` stage: canonical conversations in, the kept ones out (with personal data
redacted where configured), every dropped one written to ``rejected/`` with stage ``quality``, a
reason code and a detail. The filters, in the order they run (cheap and decisive first; PII
last, so a dropped record is quarantined exactly as it arrived):

==================== =====================================================================
name                 reason codes
==================== =====================================================================
missing_instruction  missing_instruction
empty_response       no_response, empty_response, placeholder_response
length               prompt_too_short/long, response_too_short/long, response_prompt_ratio
garbage              control_characters, mojibake, low_letter_share, symbol_soup, no_letters
refusal              ai_disclaimer, refusal
repetition           repeated_lines, repeated_paragraphs, top_ngram, repeated_ngrams
decontaminate        contaminated (only when ``quality.decontaminate`` names files)
pii                  pii (``quality.pii: drop``); redacts in place with ``redact``
==================== =====================================================================

Each filter's parameters are the fields of its class (see :mod:`pipeline.quality.filters`,
:mod:`~pipeline.quality.pii`, :mod:`~pipeline.quality.decontaminate`); set them under
``quality.filters.<name>`` in the config, or map a name to ``false`` to switch it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import QualityConfig, SFTConfig
from pipeline.fsutil import ParquetSink
from pipeline.quality.base import Filter, FilterChain
from pipeline.quality.decontaminate import Decontaminate
from pipeline.quality.filters import EmptyResponse, Garbage, Length, MissingInstruction, Refusal, Repetition
from pipeline.quality.pii import PII
from pipeline.stage import Drop, StageRun, StageStats, rejected_rows_from_table

__all__ = ["Filter", "FILTERS", "build_filters", "passes", "quality_stage"]

STAGE_NAME = "quality"

FILTERS: dict[str, type[Filter]] = {
    cls.name: cls for cls in (MissingInstruction, EmptyResponse, Length, Garbage, Refusal, Repetition, Decontaminate, PII)
}


def _parameters(cls: type[Filter]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def build_filters(config: QualityConfig, *, tokenizer: Any = None) -> list[Filter]:
    """The filter chain the config asks for, in run order.

    ``config.filters`` maps a filter name to its parameters (``true`` or absent: defaults;
    ``false``: off). ``refusal_phrases``, ``pii`` and ``decontaminate``/``decontaminate_ngram``
    feed the refusal, PII and decontamination filters. ``tokenizer`` enables the length filter's
    token bounds. Unknown names or parameters are an error naming them.
    """
    unknown = sorted(set(config.filters) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown quality filter(s) {unknown} in quality.filters; known: {sorted(FILTERS)}")
    if not config.enabled:
        return []
    chain: list[Filter] = []
    for name, cls in FILTERS.items():
        setting = config.filters.get(name, True)
        if setting is False:
            continue
        params = {} if setting is True else dict(setting)
        bad = sorted(set(params) - set(_parameters(cls)))
        if bad:
            raise ValueError(f"quality filter {name!r} has no parameter(s) {bad}; it takes {_parameters(cls)}")
        if (flt := cls.from_config(params, config, tokenizer=tokenizer)) is not None:
            chain.append(flt)
    return chain


def passes(record: dict[str, Any], filters: list[Filter]) -> bool:
    """Would the chain keep ``record``? Never changes the record (redacting filters are skipped:
    they never drop). Dedup uses it to prefer a copy that survives quality filtering."""
    return all(flt.check(record) is None for flt in filters if not flt.transforms)


@dataclasses.dataclass
class Verdicts:
    """What the chain decided for one batch of records, by row number."""

    kept_rows: list[int] = dataclasses.field(default_factory=list)
    changed_rows: list[int] = dataclasses.field(default_factory=list)  # kept, and changed in place
    dropped_rows: list[int] = dataclasses.field(default_factory=list)
    drops: list[Drop] = dataclasses.field(default_factory=list)


def filter_records(records: list[dict[str, Any]], chain: FilterChain) -> Verdicts:
    """Run the chain over ``records``; kept records may be changed in place (redacted)."""
    verdicts = Verdicts()
    # A filter that changes records counts each change (Filter.counts): that is how a changed
    # record is told from an unchanged one without comparing texts.
    transforming = [flt for flt in chain.filters if flt.transforms]
    for row, record in enumerate(records):
        changes_before = sum(flt.counts.total() for flt in transforming)
        drop = chain.apply(record)
        if drop is not None:
            verdicts.dropped_rows.append(row)
            verdicts.drops.append(drop)
            continue
        verdicts.kept_rows.append(row)
        if transforming and sum(flt.counts.total() for flt in transforming) != changes_before:
            verdicts.changed_rows.append(row)
    return verdicts


def kept_table(table: pa.Table, records: list[dict[str, Any]], verdicts: Verdicts) -> pa.Table:
    """The kept rows of ``table``, with the messages of changed records taken from ``records``.

    Unchanged rows are taken from the Arrow table as they are, which is much faster than
    rebuilding every kept row from Python objects (and writes the same bytes).
    """
    kept = table.take(pa.array(verdicts.kept_rows, pa.int64()))
    if not verdicts.changed_rows:
        return kept
    column = kept.column(schema.MESSAGES)
    pieces, start = [], 0
    positions = {row: position for position, row in enumerate(verdicts.kept_rows)}
    for row in verdicts.changed_rows:
        position = positions[row]
        pieces.extend(column.slice(start, position - start).chunks)
        pieces.append(pa.array([records[row][schema.MESSAGES]], type=column.type))
        start = position + 1
    pieces.extend(column.slice(start).chunks)
    index = kept.schema.get_field_index(schema.MESSAGES)
    # One chunk, as a table built from rows has: the Parquet writer cuts pages at chunk ends.
    return kept.set_column(index, kept.schema.field(index), pa.chunked_array(pieces, column.type)).combine_chunks()


def _open_input(in_path: Path) -> pq.ParquetFile:
    try:
        source = pq.ParquetFile(in_path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"quality stage cannot read {in_path}: {exc}") from exc
    names = source.schema_arrow.names
    if names != schema.CONVERSATION_SCHEMA.names:
        raise ValueError(
            f"quality stage input {in_path} is not a canonical conversation table: columns {names}, "
            f"expected {schema.CONVERSATION_SCHEMA.names}"
        )
    return source


def quality_stage(
    in_path: Path,
    out_path: Path,
    rejected_path: Path,
    config: SFTConfig,
    *,
    tokenizer: str | None = None,
    batch_size: int = 4096,
) -> StageStats:
    """Filter the canonical Parquet ``in_path`` into ``out_path`` (kept) and ``rejected_path``.

    ``config.quality`` picks the filters; ``tokenizer`` (a tokenizer folder) serves the length
    filter's token bounds. Streams record batches, so memory stays flat whatever the input size.
    Both outputs are written atomically; the rejected file exists only when something was
    rejected (a stale one from an earlier run is removed). Kept rows keep their original ``id``
    even when redacted. Statistics: ``extra["filters"]`` holds seconds, drops and reasons per
    filter, ``extra["pii_redactions"]`` the number of redactions.
    """
    from pipeline.tokenizers import load_tokenizer

    chain = FilterChain(build_filters(config.quality, tokenizer=load_tokenizer(tokenizer) if tokenizer else None))
    source = _open_input(Path(in_path))
    with StageRun(STAGE_NAME) as run, contextlib.ExitStack() as stack:
        kept_sink = ParquetSink(out_path, schema.CONVERSATION_SCHEMA, stack, create_when_empty=True)
        rejected_sink = ParquetSink(rejected_path, schema.REJECTED_SCHEMA, stack, create_when_empty=False)
        for batch in source.iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([batch]).cast(schema.CONVERSATION_SCHEMA)
            records = table.select([schema.MESSAGES, schema.TOOLS]).to_pylist()  # what the filters read
            verdicts = filter_records(records, chain)
            kept_sink.write_table(kept_table(table, records, verdicts))
            rejected_sink.write_table(rejected_rows_from_table(table, verdicts.dropped_rows, verdicts.drops, STAGE_NAME))
            run.count(table.num_rows, kept=len(verdicts.kept_rows), drops=verdicts.drops)
        kept_sink.finish()
        rejected_sink.finish()
        summary = chain.summary()
        run.stats.extra = {
            "filters": summary,
            "pii_redactions": sum(summary.get("pii", {}).get("redactions", {}).values()),
        }
    return run.stats

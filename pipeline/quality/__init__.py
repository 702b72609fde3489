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
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import QualityConfig, SFTConfig
from pipeline.fsutil import ParquetSink, compression_of, open_parquet
from pipeline.quality.base import Filter, FilterChain
from pipeline.quality.decontaminate import Decontaminate
from pipeline.quality.filters import EmptyResponse, Garbage, Length, MissingInstruction, Refusal, Repetition
from pipeline.quality.pii import PII
from pipeline.stage import Drop, StageRun, StageStats, rejected_rows_from_table

__all__ = ["Filter", "FILTERS", "Verdict", "build_filters", "passes", "quality_stage"]

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


class Verdict:
    """:func:`passes` for dedup's keep policy, one record at a time or many at once.

    ``verdict(record)`` judges one record; ``verdict.many(tables, count)`` judges the rows of
    ``tables`` (``count`` of them in all), in order: in ``config.quality.num_proc`` worker
    processes (default one per core) when there are enough rows to pay their start back. On
    near-duplicate-heavy data these questions were most of dedup's one global step (41k records,
    4.7 of its 10.6 s at 200k conversations), all on one core. The filters are built on the first
    question, so a step that is already done builds none (the tokenizer folder is loaded only if
    a length bound counts tokens)."""

    def __init__(self, config: SFTConfig, tokenizer: str | None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self._filters: list[Filter] | None = None

    def filters(self) -> list[Filter]:
        if self._filters is None:
            self._filters = build_filters(self.config.quality, tokenizer=self.tokenizer)
        return self._filters

    def __call__(self, record: dict[str, Any]) -> bool:
        return passes(record, self.filters())

    def many(self, tables: Iterator[pa.Table], count: int) -> np.ndarray:
        batches = (batch for table in tables for batch in table.to_batches(max_chunksize=_VERDICT_BATCH_ROWS))
        num_proc = min(self.config.quality.num_proc or os.cpu_count() or 1, -(-count // _VERDICT_BATCH_ROWS))
        if count < _VERDICT_ROWS_FOR_WORKERS or num_proc <= 1:
            answers = (_passes_of(self.filters(), batch) for batch in batches)
            return np.concatenate([np.zeros(0, bool), *answers])
        from pipeline import workers

        # The quality stage's own workers: inside workers.reusing() the ones start_workers started
        # beside dedup (no second set importing and building the filters while dedup waits for
        # their answers), handed on to the quality stage afterwards; elsewhere a set of its own,
        # closed at once.
        with workers.pool(*_pool_arguments(self.config, self.tokenizer, num_proc), at_least=1, keep_new=False) as pool:
            return np.concatenate([np.zeros(0, bool), *pool.map((_PASSES, batch) for batch in batches)])


_VERDICT_BATCH_ROWS = 1024
_VERDICT_ROWS_FOR_WORKERS = 8 * _VERDICT_BATCH_ROWS  # a worker's start (imports) costs about a second


def _passes_of(filters: list[Filter], batch: pa.RecordBatch) -> np.ndarray:
    return np.fromiter((passes(record, filters) for record in batch.to_pylist()), bool, batch.num_rows)


@dataclasses.dataclass
class Verdicts:
    """What the chain decided for one batch of records, by row number."""

    kept_rows: list[int] = dataclasses.field(default_factory=list)
    changed_rows: list[int] = dataclasses.field(default_factory=list)  # kept, and changed in place
    dropped_rows: list[int] = dataclasses.field(default_factory=list)
    drops: list[Drop] = dataclasses.field(default_factory=list)


def filter_records(records: list[dict[str, Any]], chain: FilterChain, table: pa.Table | None = None) -> Verdicts:
    """Run the chain over ``records``; kept records may be changed in place (redacted).

    With ``table`` (the same rows as Arrow) each filter first narrows the rows it checks to its
    :meth:`~pipeline.quality.base.Filter.candidates`; the verdicts are the same either way."""
    verdicts = Verdicts()
    # A filter that changes records counts each change (Filter.counts): that is how a changed
    # record is told from an unchanged one without comparing texts.
    transforming = [flt for flt in chain.filters if flt.transforms]
    row_filters = _row_filters(chain, table, len(records)) if table is not None else None
    for row, record in enumerate(records):
        changes_before = sum(flt.counts.total() for flt in transforming)
        drop = chain.apply(record, row_filters[row] if row_filters is not None else None)
        if drop is not None:
            verdicts.dropped_rows.append(row)
            verdicts.drops.append(drop)
            continue
        verdicts.kept_rows.append(row)
        if transforming and sum(flt.counts.total() for flt in transforming) != changes_before:
            verdicts.changed_rows.append(row)
    return verdicts


def _row_filters(chain: FilterChain, table: pa.Table, num_rows: int) -> list[list[Filter]] | None:
    """For each row, the chain's filters that may act on it (None: all of them, on every row).

    Masks are taken from the batch as read, so only up to the first filter that changes records:
    the filters after it see the changed text."""
    masked: list[tuple[Filter, np.ndarray]] = []
    for flt in chain.filters:
        start = time.perf_counter()
        mask = flt.candidates(table)
        chain.seconds[flt.name] += time.perf_counter() - start
        if mask is not None:
            masked.append((flt, mask))
        if flt.transforms:
            break
    if not masked:
        return None
    # The rows' mask combinations as bit sets: one filter list per combination (a handful).
    keys = np.zeros(num_rows, np.int64)
    for bit, (_, mask) in enumerate(masked):
        keys |= mask.astype(np.int64) << bit
    skipped_by = {id(flt): bit for bit, (flt, _) in enumerate(masked)}
    lists = {
        key: [flt for flt in chain.filters if id(flt) not in skipped_by or key >> skipped_by[id(flt)] & 1]
        for key in np.unique(keys).tolist()
    }
    return [lists[key] for key in keys.tolist()]


def kept_table(table: pa.Table, records: list[dict[str, Any]] | dict[int, dict[str, Any]], verdicts: Verdicts) -> pa.Table:
    """The kept rows of ``table``, with the messages of changed records taken from ``records``
    (every record of the batch, or only the changed ones by row).

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


# --- one batch, in this process or a worker ----------------------------------------------------
def _as_table(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch]).cast(schema.CONVERSATION_SCHEMA)


def _judge(chain: FilterChain, table: pa.Table) -> tuple[Verdicts, dict[int, dict[str, Any]]]:
    """The chain's verdicts on a batch's rows, and the changed (redacted) records by row."""
    table = table.select([schema.MESSAGES, schema.TOOLS])  # what the filters read
    records = table.to_pylist()
    verdicts = filter_records(records, chain, table)
    return verdicts, {row: records[row] for row in verdicts.changed_rows}


def _write_batch(table: pa.Table, verdicts: Verdicts, changed: dict[int, dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    """(kept rows, rejected rows) of a batch's rows after the verdicts."""
    return kept_table(table, changed, verdicts), rejected_rows_from_table(table, verdicts.dropped_rows, verdicts.drops, STAGE_NAME)


_worker_chain: FilterChain | None = None
_BATCHES_FOR_WORKERS = 4


def _init_worker(config_json: str, tokenizer: str | None) -> None:
    global _worker_chain
    _worker_chain = FilterChain(build_filters(SFTConfig.model_validate_json(config_json).quality, tokenizer=tokenizer))


_JUDGE, _PASSES = "judge", "passes"  # what a worker is asked of a batch


def _in_worker(request: tuple[str, pa.RecordBatch]) -> Any:
    """A worker's answer to ``(what, batch)``: for :data:`_JUDGE` (the quality stage) the verdicts
    and changed records only (the caller holds the batch); for :data:`_PASSES` (dedup's keep
    policy, :meth:`Verdict.many`) whether each record passes. One task for both, so that dedup
    and the quality stage after it share one set of workers."""
    assert _worker_chain is not None, "worker was not initialised"
    what, batch = request
    if what == _PASSES:
        return _passes_of(_worker_chain.filters, batch)
    if what != _JUDGE:
        raise ValueError(f"a quality worker is asked {_JUDGE!r} or {_PASSES!r}, not {what!r}")
    verdicts, changed = _judge(_worker_chain, _as_table(batch))
    return verdicts, changed, _take_counts(_worker_chain)


def _take_counts(chain: FilterChain) -> dict:
    """The chain's counters since the last call, and reset them: what one batch added."""
    delta = {
        "seconds": dict(chain.seconds),
        "dropped": Counter(chain.dropped),
        "reasons": {name: Counter(reasons) for name, reasons in chain.reasons.items()},
        "counts": {flt.name: Counter(flt.counts) for flt in chain.filters},
    }
    chain.seconds.clear()
    chain.dropped.clear()
    chain.reasons.clear()
    for flt in chain.filters:
        flt.counts.clear()
    return delta


def _add_counts(chain: FilterChain, delta: dict | None) -> None:
    """Add a worker's counts for one batch to the stage's own chain (whose summary is reported)."""
    if delta is None:
        return
    for name, seconds in delta["seconds"].items():
        chain.seconds[name] += seconds
    chain.dropped.update(delta["dropped"])
    for name, reasons in delta["reasons"].items():
        chain.reasons[name].update(reasons)
    for flt in chain.filters:
        flt.counts.update(delta["counts"].get(flt.name, {}))


def _stage_workers(config: SFTConfig, tokenizer: str | None, num_rows: int, batch_size: int) -> tuple | None:
    """The worker pool (:func:`pipeline.workers.pool`'s arguments) that :func:`quality_stage`
    filters ``num_rows`` rows in; None when it filters them in its own process. Worker processes
    pay their start (a fraction of a second) back from a few batches on."""
    num_batches = -(-num_rows // batch_size)
    num_proc = min(config.quality.num_proc or os.cpu_count() or 1, num_batches)
    if num_batches < _BATCHES_FOR_WORKERS or num_proc <= 1:
        return None
    return _pool_arguments(config, tokenizer, num_proc)


def _pool_arguments(config: SFTConfig, tokenizer: str | None, num_proc: int) -> tuple:
    """:func:`pipeline.workers.pool`'s arguments for ``num_proc`` quality workers (the key under
    which a run's steps find the pool a step before them left idle)."""
    return ("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (config.model_dump_json(), tokenizer), num_proc)


def start_workers(config: SFTConfig, tokenizer: str | None, num_rows: int, batch_size: int = 4096) -> None:
    """Inside :func:`pipeline.workers.reusing`: start the workers a quality stage of about
    ``num_rows`` rows will filter in, so that they import and build their filters while the
    caller works on (dedup's one global step, on one core). Elsewhere, or when that stage would
    filter in its own process, nothing."""
    if config.quality.enabled and (arguments := _stage_workers(config, tokenizer, num_rows, batch_size)) is not None:
        from pipeline import workers

        workers.start(*arguments)


def _judged_in_workers(batches: Iterator[pa.RecordBatch], arguments: tuple) -> Iterator[tuple[Verdicts, dict[int, dict[str, Any]], dict]]:
    """Batches filtered in worker processes (:mod:`pipeline.workers`), results in input order,
    so the output does not depend on the number of workers."""
    from pipeline import workers

    # inside workers.reusing() (a run's quality steps, one per chunk) the workers start once: a
    # chunk takes those started for the first chunk where there are as many as it would start
    with workers.pool(*arguments, at_least=arguments[3]) as pool:
        yield from pool.map((_JUDGE, batch) for batch in batches)


def _open_input(in_path: Path) -> pq.ParquetFile:
    try:
        source = open_parquet(in_path)
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

    The filters are Python, one core each: an input of a few batches or more is filtered in
    ``config.quality.num_proc`` worker processes (default: one per core), results in input order,
    so the output is the same for any number of workers.
    """
    # The folder, not a loaded tokenizer: the length filter loads it only for token bounds.
    chain = FilterChain(build_filters(config.quality, tokenizer=tokenizer))
    source = _open_input(Path(in_path))
    arguments = _stage_workers(config, tokenizer, source.metadata.num_rows, batch_size)
    with StageRun(STAGE_NAME) as run, contextlib.ExitStack() as stack:
        # kept rows in the input's codec (a run's uncompressed work file stays uncompressed)
        kept_sink = ParquetSink(
            out_path, schema.CONVERSATION_SCHEMA, stack, create_when_empty=True, compression=compression_of(source.metadata)
        )
        rejected_sink = ParquetSink(rejected_path, schema.REJECTED_SCHEMA, stack, create_when_empty=False)
        if arguments is not None and chain.filters:
            # The workers get each batch and answer with verdicts; this side keeps its copy of the
            # batch (tee holds the few the workers are ahead by) to write it: cheaper than
            # shipping every kept row back.
            batches, to_workers = itertools.tee(source.iter_batches(batch_size=batch_size))
            judged = _judged_in_workers(to_workers, arguments)
            stack.enter_context(contextlib.closing(judged))  # the workers stop with the stage, error or not
            # judged first: its last next() ends the workers' map, so their pool is left idle
            # (and inside workers.reusing() handed on to the next chunk) rather than abandoned
            results = ((_as_table(batch), *answer) for answer, batch in zip(judged, batches))
        else:
            tables = (_as_table(batch) for batch in source.iter_batches(batch_size=batch_size))
            results = ((table, *_judge(chain, table), None) for table in tables)
        for table, verdicts, changed, delta in results:
            kept, rejected = _write_batch(table, verdicts, changed)
            kept_sink.write_table(kept)
            rejected_sink.write_table(rejected)
            run.count(table.num_rows, kept=kept.num_rows, drops=verdicts.drops)
            _add_counts(chain, delta)
        kept_sink.finish()
        rejected_sink.finish()
        summary = chain.summary()
        run.stats.extra = {
            "filters": summary,
            "pii_redactions": sum(summary.get("pii", {}).get("redactions", {}).values()),
        }
    return run.stats

"""The render+tokenize stage: canonical conversations (Parquet) -> tokenized rows with labels.

Reads the canonical Parquet in row batches (memory stays bounded by the batch size times the
number of workers), renders, tokenizes and masks each batch with :class:`pipeline.masking.Masker`,
and writes the kept rows in :data:`schema.SHARD_SCHEMA` to one Arrow IPC file (atomically) in
input order, and the refused rows to ``rejected/`` with stage ``template`` (the template failed
to render) or ``tokenize`` (``too_long``, ``mask_unverifiable``, ``no_trainable_tokens``).

Parallelism, ``num_proc`` workers (default: one per core). With ``workers: threads`` (the
default) this thread renders and finishes batches while ``num_proc`` threads run the Rust
encoder, which releases the GIL; no worker start-up, no pickling. ``workers: processes`` runs
whole batches in worker processes (:class:`pipeline.workers.WorkerPool`, as the quality stage
does: a caller's script without a main guard is not run again), for templates whose Python
rendering dominates (prefix rendering of long multi-turn conversations). Results come back in
submission order, so the output does not depend on the number or kind of workers.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.config import SFTConfig
from pipeline.fsutil import atomic_path, open_parquet
from pipeline.masking import Encoded, Masker, trained_turns
from pipeline.stage import Drop, StageRun, StageStats, rejected_rows_from_table, write_rejected

_CANONICAL_COLUMNS = [field.name for field in schema.CONVERSATION_SCHEMA]
# A template that fails every one of this many conversations stops the run: it will fail the rest.
EARLY_STOP_SAMPLE = 256


def build_masker(tokenizer, config: SFTConfig) -> Masker:
    """The Masker a run with ``config`` uses for ``tokenizer``."""
    from pipeline.templates import resolve_template

    template = resolve_template(tokenizer, config.template)
    return Masker(
        tokenizer,
        template,
        max_length=config.tokenize.max_length,
        train_on=config.tokenize.train_on,
        truncate=config.tokenize.truncate,
        span_method=config.tokenize.span_method,
        reasoning=config.tokenize.reasoning,
        system=config.template.system,
        strict_render=config.tokenize.strict_render,
        render_timeout=config.template.render_timeout_s,
        max_render_chars=config.template.max_render_chars,
    )


def encode_table(masker: Masker, table: pa.Table | pa.RecordBatch) -> tuple[pa.Table, pa.Table, dict]:
    """Canonical rows -> (kept rows in SHARD_SCHEMA, rejected rows, figures) for one batch."""
    rows = _rows(masker, table)
    return assemble(rows, masker.encode_batch(_conversations(rows.table)))


@dataclass
class _Rows:
    """One batch's rows to encode: the canonical records, cut per turn under ``per_turn``."""

    table: pa.Table  # the canonical columns + ``turn``
    record_of_row: np.ndarray | None  # per row, its record in the batch (None: a row per record)
    records: int
    record_table: pa.Table | None = None  # the records themselves, when cut per turn


def _rows(masker: Masker, table: pa.Table | pa.RecordBatch) -> _Rows:
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    table = table.select(_CANONICAL_COLUMNS).cast(schema.CONVERSATION_SCHEMA)
    records = table.num_rows
    if masker.reasoning.policy != "per_turn":
        return _Rows(table.append_column(_TURN_FIELD, pa.nulls(records, pa.int32())), None, records)
    # One row per trained assistant turn, holding the conversation up to it; a record without
    # any stays one row (and is rejected as no_trainable_tokens, as it would be otherwise).
    take, turns, messages = [], [], []
    for index, conversation in enumerate(table.column(schema.MESSAGES).to_pylist()):
        assistants = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        ends = trained_turns(assistants, [m.get("train") for m in conversation], masker.train_on)
        for end in ends or [None]:
            take.append(index)
            turns.append(end)
            messages.append(conversation if end is None else conversation[: end + 1])
    expanded = table.take(pa.array(take, pa.int64()))
    expanded = expanded.set_column(
        expanded.schema.get_field_index(schema.MESSAGES),
        schema.CONVERSATION_SCHEMA.field(schema.MESSAGES),
        pa.array(messages, schema.CONVERSATION_SCHEMA.field(schema.MESSAGES).type),
    )
    expanded = expanded.append_column(_TURN_FIELD, pa.array(turns, pa.int32()))
    return _Rows(expanded, np.asarray(take, dtype=np.int64), records, table)


_TURN_FIELD = schema.SHARD_SCHEMA.field(schema.TURN)


def _conversations(table: pa.Table) -> list[tuple[list[dict], str | None]]:
    return list(zip(table.column(schema.MESSAGES).to_pylist(), table.column(schema.TOOLS).to_pylist()))


def assemble(rows: _Rows, results: list[Encoded | Drop]) -> tuple[pa.Table, pa.Table, dict]:
    """A batch's rows and the Masker's result for each -> (kept rows, rejected rows, figures).

    Counts are of records: under ``per_turn`` a record with a kept row is kept (a refused turn
    of it is filed in rejected/ with its ``turn``, not counted as a rejected record), and a
    record none of whose rows is kept is rejected once, with its first row's reason.
    """
    table = rows.table
    kept = [i for i, r in enumerate(results) if isinstance(r, Encoded)]
    encoded: list[Encoded] = [results[i] for i in kept]  # type: ignore[misc]
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int32)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([e.input_ids for e in encoded]) if encoded else np.zeros(0, np.int32)
    labels = np.concatenate([e.labels for e in encoded]) if encoded else np.zeros(0, np.int32)
    trainable = np.array([e.num_trainable for e in encoded], dtype=np.int32)
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[kept] = True
    kept_table = table.filter(pa.array(keep))  # cheaper than take on nested columns; no copy when all kept
    kept_table = pa.Table.from_arrays(
        [
            *kept_table.columns,
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int32())),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels, pa.int32())),
            pa.array(lengths, pa.int32()),
            pa.array(trainable, pa.int32()),
        ],
        schema=schema.SHARD_SCHEMA,
    )

    record_kept = np.zeros(rows.records, dtype=bool)
    record_of_row = rows.record_of_row if rows.record_of_row is not None else np.arange(table.num_rows)
    record_kept[record_of_row[kept]] = True
    turns = table.column(schema.TURN).to_pylist()
    filed: set[int] = set()
    rejected_rows, reasons, turns_rejected = [], Counter(), 0
    template_failed, template_example = 0, None
    for i, result in enumerate(results):
        if not isinstance(result, Drop):
            continue
        record = int(record_of_row[i])
        if record_kept[record]:
            turn, turns_rejected = turns[i], turns_rejected + 1
        elif record in filed:
            continue  # the record is rejected once, with its first row's reason
        else:
            filed.add(record)
            turn = None
            reasons[result.reason] += 1
            if result.stage == "template":
                template_failed += 1
                template_example = template_example or result.detail
        rejected_rows.append((i, result, turn))
    # A rejected record is filed whole (its full conversation), a refused turn as its own row:
    # rows i < n are the batch's rows, n + r is record r (when the batch was cut per turn).
    pool = table.select(_CANONICAL_COLUMNS)
    if rows.record_table is not None:
        pool = pa.concat_tables([pool, rows.record_table.select(_CANONICAL_COLUMNS)])
    rejected_parts, positions = [], []
    for stage in ("template", "tokenize"):
        picked = [(i, r, t) for i, r, t in rejected_rows if (r.stage or "tokenize") == stage]
        if picked:
            filed_rows = [
                table.num_rows + int(record_of_row[i]) if rows.record_table is not None and t is None else i for i, _, t in picked
            ]
            part = rejected_rows_from_table(pool, filed_rows, [r for _, r, _ in picked], stage)
            part = part.set_column(
                part.schema.get_field_index(schema.TURN),
                schema.REJECTED_SCHEMA.field(schema.TURN),
                pa.array([t for _, _, t in picked], pa.int32()),
            )
            rejected_parts.append(part)
            positions += [i for i, _, _ in picked]
    rejected = schema.REJECTED_SCHEMA.empty_table()
    if rejected_parts:  # in input order, whatever the stage
        rejected = pa.concat_tables(rejected_parts).take(pa.array(np.argsort(positions, kind="stable")))
    figures = {
        "records_in": rows.records,
        "records_out": int(record_kept.sum()),
        "rejected": reasons,
        "turns_rejected": turns_rejected,
        "tokens": int(lengths.sum()),
        "trainable_tokens": int(trainable.sum()),
        "truncated": sum(e.truncated for e in encoded),
        "truncated_tokens": sum(e.truncated_tokens for e in encoded),
        "render_mismatch": sum(e.render_mismatch for e in encoded),
        "turns_without_stop": sum(e.turns_without_stop for e in encoded),
        "template_failed": template_failed,
        "template_example": template_example,
    }
    return kept_table, rejected, figures


# --- worker processes ------------------------------------------------------------------------
_worker_masker: Masker | None = None


def _init_worker(tokenizer_path: str, config_json: str) -> None:
    # (WorkerPool starts the workers with TOKENIZERS_PARALLELISM=false: one process per core already.)
    from pipeline.tokenizers import load_tokenizer

    global _worker_masker
    _worker_masker = build_masker(load_tokenizer(tokenizer_path), SFTConfig.model_validate_json(config_json))


def _encode_in_worker(batch: pa.RecordBatch) -> tuple[pa.Table, pa.Table, dict]:
    assert _worker_masker is not None, "worker was not initialised"
    return encode_table(_worker_masker, batch)


def _encoded_batches(
    batches: Iterator[pa.RecordBatch], num_batches: int, tokenizer_path: str, config: SFTConfig
) -> Iterator[tuple[pa.Table, pa.Table, dict]]:
    """Encode batches, yielding results in input order, on ``num_proc`` threads or processes."""
    num_proc = min(config.tokenize.num_proc or os.cpu_count() or 1, max(num_batches, 1))
    if num_proc <= 1 or config.tokenize.workers == "threads":
        from pipeline.tokenizers import load_tokenizer

        masker = build_masker(load_tokenizer(tokenizer_path), config)
        if num_proc <= 1:
            for batch in batches:
                yield encode_table(masker, batch)
            return
        yield from _pipelined(masker, batches, num_proc)
        return
    from pipeline.workers import WorkerPool

    init_args = (tokenizer_path, config.model_dump_json())
    with WorkerPool("pipeline.tokenize:_init_worker", "pipeline.tokenize:_encode_in_worker", init_args, num_proc) as pool:
        yield from pool.map(batches)  # one batch per worker in flight


def _pipelined(masker: Masker, batches: Iterator[pa.RecordBatch], num_proc: int) -> Iterator[tuple[pa.Table, pa.Table, dict]]:
    """Threads: this thread renders and finishes batches while ``num_proc`` threads encode others.

    Rendering, labelling and verifying are Python and hold the GIL; the Rust encode does not.
    So one thread does all the Python, in order, and the encoder threads only call the
    tokenizer: the Python of batch k+1 runs while batches k, k-1 … are encoded, instead of every
    thread queueing for the GIL at the same time. Each encoder runs single-threaded (the
    tokenizer's own thread pool, splitting every batch across the cores again, measured about
    10% slower next to this thread's Python).
    """
    in_flight: deque[tuple[pa.Table, Future]] = deque()
    with _TOKENIZER_THREAD_POOL_OFF.held(), ThreadPoolExecutor(num_proc, thread_name_prefix="sftkit-tokenize") as executor:
        for batch in batches:
            table = _rows(masker, batch)
            in_flight.append((table, executor.submit(masker.tokenize, masker.render(_conversations(table.table)))))
            if len(in_flight) > num_proc:  # keep every encoder busy while this thread renders
                table, future = in_flight.popleft()
                yield assemble(table, masker.finish(future.result()))
        while in_flight:
            table, future = in_flight.popleft()
            yield assemble(table, masker.finish(future.result()))


class _ProcessWide:
    """A process-wide setting held while at least one stage needs it (stages may run side by
    side in threads, as Prefect's thread runner does): the first to enter applies it, the last
    to leave restores what was there before."""

    def __init__(self, apply, restore):
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = self._apply()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._restore(self._saved)


def _parallelism_off() -> str | None:
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return previous


def _parallelism_restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = previous


# TOKENIZERS_PARALLELISM=false while sftkit's own threads encode: the Rust tokenizer reads the
# variable at every batch call and offers no other switch.
_TOKENIZER_THREAD_POOL_OFF = _ProcessWide(_parallelism_off, _parallelism_restore)


def _gc_freeze() -> bool:
    if gc.get_freeze_count():
        return False  # the caller freezes its own heap; unfreezing later would undo that
    gc.freeze()
    return True


def _gc_unfreeze(froze: bool) -> None:
    if froze:
        gc.unfreeze()


# The objects that exist before the stage are left out of the collector's full passes: the
# stage allocates millions of short-lived containers (messages, render contexts), and every full
# collection they trigger would otherwise walk the caller's whole heap as well.
_GC_FROZEN = _ProcessWide(_gc_freeze, _gc_unfreeze)


def tokenize_stage(
    in_path: Path,
    out_path: Path,
    rejected_path: Path,
    config: SFTConfig,
    *,
    tokenizer: str,
    on_kept: Callable[[pa.Table], None] | None = None,
) -> StageStats:
    """Render, tokenize and mask every conversation of ``in_path`` with the ``tokenizer`` folder and
    ``config.template``/``config.tokenize``; write kept rows to ``out_path`` and refused ones to
    ``rejected_path``. Records are counted whole: a ``per_turn`` record kept as several rows is one
    record out, and a refused turn of a kept record is in ``extra["turns_rejected"]``.

    ``on_kept`` gets each table of kept rows once it is written (the run's shard files are made
    from them as they come: :class:`pipeline.shards.ShardStream`)."""
    figure_names = (
        "tokens",
        "trainable_tokens",
        "truncated",
        "truncated_tokens",
        "render_mismatch",
        "turns_without_stop",
        "turns_rejected",
    )
    rejected_tables = []
    with StageRun("tokenize") as run, _GC_FROZEN.held():
        stats = run.stats
        stats.extra = dict.fromkeys(figure_names, 0)
        try:
            source = open_parquet(in_path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"cannot read canonical conversations from {in_path}: {exc}") from exc
        batch_size = config.tokenize.batch_size
        num_batches = -(-source.metadata.num_rows // batch_size) if source.metadata.num_rows else 0
        batches = source.iter_batches(batch_size=batch_size, columns=_CANONICAL_COLUMNS)
        with atomic_path(out_path) as tmp:
            # An intermediate that write_shards reads back once, so Arrow IPC rather than Parquet
            # (no encoding of list levels: the same columns in the same buffers), uncompressed so
            # that write_shards memory-maps it instead of decompressing a run's rows into memory.
            # It costs disk, about four times the shards' size, until the run finishes.
            options = pa.ipc.IpcWriteOptions(compression=None)
            with pa.ipc.new_file(tmp, schema.SHARD_SCHEMA, options=options) as writer:
                template_failed, example = 0, None
                for kept, rejected, figures in _encoded_batches(batches, num_batches, tokenizer, config):
                    template_failed += figures["template_failed"]
                    example = example or figures["template_example"]
                    if kept.num_rows:
                        writer.write_table(kept)
                        if on_kept is not None:
                            on_kept(kept)
                    if rejected.num_rows:
                        rejected_tables.append(rejected)
                    run.count(figures["records_in"], kept=figures["records_out"], drops=figures["rejected"].elements())
                    for key in figure_names:
                        stats.extra[key] += figures[key]
                    if stats.records_in >= EARLY_STOP_SAMPLE and template_failed == stats.records_in:
                        raise ValueError(
                            f"chat template {config.template.jinja_file or config.template.name!r} failed on every one "
                            f"of the first {stats.records_in:,} conversations, so nothing would be kept; the first "
                            f"said: {example}"
                        )
        if rejected_tables:
            write_rejected(pa.concat_tables(rejected_tables), rejected_path)
    return run.stats

"""The ingest stage: input paths -> canonical conversation Parquet + quarantined rejects.

This module owns which inputs a run reads (:func:`expand_inputs`) and the per-file stage
(:func:`ingest_file`): records stream from :mod:`pipeline.readers`, become canonical
conversations through :mod:`pipeline.formats`, and leave in record batches through a
``ParquetWriter`` writing to a temporary name that is renamed only when the file is complete.
Memory stays flat whatever the input size; a crash leaves no file under a final name.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline import schema
from pipeline.config import IngestConfig, SFTConfig
from pipeline.formats import INVALID_UTF8, to_conversation, too_deep
from pipeline.fsutil import ParquetSink
from pipeline.readers import PROGRESS_INTERVAL_S, InputError, RawRecord, ReadProgress, container_of, iter_records
from pipeline.stage import Drop, StageRun, StageStats

__all__ = ["InputError", "expand_inputs", "ingest_file"]

STAGE = "ingest"

log = logging.getLogger("sftkit.ingest")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files, globs and save_to_disk folders -> the input paths, sorted and deduplicated.

    Every path is checked up front (exists, readable, a supported container), so a run stops
    before any work with one sentence naming the culprit.
    """
    found: dict[Path, Path] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"{pattern} matches no files")
            paths = [Path(match) for match in matches]
        else:
            paths = [Path(pattern)]
        for path in paths:
            if not path.exists():
                raise InputError(f"{path} does not exist")
            container_of(path)
            if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
                raise InputError(f"{path} is not readable (permission denied)")
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=str)


def ingest_file(
    in_path: Path,
    out_path: Path,
    rejected_path: Path,
    config: SFTConfig,
    *,
    source: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_table: Callable[[pa.Table], None] | None = None,
    on_progress: Callable[[ReadProgress, int], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    compression: str = "zstd",
) -> StageStats:
    """Read one input file; write kept canonical rows and rejected rows; return the counts.

    ``source`` names the file in every row (default: ``in_path`` as given). ``out_path`` is
    always written (an empty Parquet file when nothing was kept) so later stages find it;
    ``rejected_path`` only when something was rejected (a stale one from an earlier run is
    removed). ``on_batch(n)`` is called after every ``n`` records, for progress bars, and
    ``on_table(table)`` with every table of kept rows as it is written (so a consumer, dedup's
    signatures, can work beside the parsing). While a
    text file is read, its progress (bytes read, compressed bytes read, records so far) is logged
    at INFO on ``sftkit.ingest`` and passed to ``on_progress(progress, records)`` every
    ``progress_interval_s`` seconds: a big or compressed file, or one huge line being skipped,
    shows signs of life. ``compression`` is ``out_path``'s Parquet codec (a run's work files,
    read back a few times and then removed, are written uncompressed). Raises
    :class:`InputError` if the file is not a readable container, or if a compressed one expands
    past ``config.ingest.max_expanded_bytes``.
    """
    source = str(in_path) if source is None else source
    limits = config.ingest

    kept_rows: list[dict] = []
    rejected_rows: list[dict] = []

    def progress(read: ReadProgress) -> None:
        if read.done and not read.compressed_bytes:
            return  # a plain file's end says nothing the stage's own counts do not
        records = run.stats.records_in + len(kept_rows) + len(rejected_rows)  # counted, and not yet written
        where = (
            f" from {_mib(read.compressed_bytes)} of {_mib(read.file_bytes)} compressed"
            if read.compressed_bytes is not None
            else f" of {_mib(read.file_bytes)}"
        )
        log.info(
            "%s: %s %s read%s, %d records",
            source,
            "finished," if read.done else "reading,",
            _mib(read.bytes_read),
            where,
            records,
        )
        if on_progress is not None:
            on_progress(read, records)

    with StageRun(STAGE) as run, contextlib.ExitStack() as stack:
        kept = ParquetSink(out_path, schema.CONVERSATION_SCHEMA, stack, create_when_empty=True, compression=compression)
        rejected = ParquetSink(rejected_path, schema.REJECTED_SCHEMA, stack, create_when_empty=False)
        records = iter_records(
            Path(in_path),
            batch_size=limits.batch_size,
            max_record_bytes=limits.max_record_bytes,
            max_nesting=limits.max_nesting,
            max_expanded_bytes=limits.max_expanded_bytes,
            on_progress=progress,
            progress_interval_s=progress_interval_s,
        )

        def flush() -> None:
            if kept_rows:
                table = pa.Table.from_pylist(kept_rows, schema=schema.CONVERSATION_SCHEMA)
                kept.write_table(table)
                if on_table is not None:
                    on_table(table)
            rejected.write(rejected_rows)
            run.count(len(kept_rows) + len(rejected_rows), kept=len(kept_rows), drops=[r[schema.REASON] for r in rejected_rows])
            if on_batch and (kept_rows or rejected_rows):
                on_batch(len(kept_rows) + len(rejected_rows))
            kept_rows.clear()
            rejected_rows.clear()

        # Record by record: a batch of raw records held at once would be garbage-collector work.
        for record in records:
            row, rejected_row = _convert(record, source, limits)
            if row is not None:
                kept_rows.append(row)
            else:
                rejected_rows.append(rejected_row)
            if len(kept_rows) + len(rejected_rows) >= limits.batch_size:
                flush()
        flush()
        kept.finish()
        rejected.finish()
    return run.stats


def _convert(record: RawRecord, source: str, config: IngestConfig) -> tuple[dict | None, dict | None]:
    """A kept canonical row, or a rejected row."""
    error = record.error
    if error is None:
        try:
            messages, tools = to_conversation(
                record.value,
                config.mapping,
                merge_consecutive=config.merge_consecutive_turns,
                max_nesting=config.max_nesting,
            )
            conversation_id = schema.conversation_id(messages, tools)
        except Drop as exc:
            error = exc
        except RecursionError:
            error = too_deep(config.max_nesting)
        except UnicodeEncodeError:
            # json.loads turns an escaped lone surrogate ("\ud800") into text no file can hold.
            error = Drop(INVALID_UTF8, "the record contains a lone surrogate escape, which is not valid Unicode")
        else:
            return {
                schema.ID: conversation_id,
                schema.SOURCE: source,
                schema.SOURCE_INDEX: record.index,
                schema.MESSAGES: messages,
                schema.TOOLS: tools,
            }, None
    return None, schema.rejected_row(source, record.index, STAGE, error.reason, error.detail, record.raw_text())


def _mib(size: int | None) -> str:
    return f"{(size or 0) / (1 << 20):.1f} MiB"

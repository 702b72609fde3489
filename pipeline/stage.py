"""The one shape every pipeline step shares.

A *filter* looks at one conversation and answers ``None`` (keep) or a :class:`Drop` (reason code
and human detail). A *stage* runs over Arrow tables inside a :class:`StageRun`, which counts what
went in, what came out and why the rest was dropped, times the work and checks that no record
vanished; :func:`rejected_rows_from_table` turns drops into rejected rows. A new filter is a few
lines and cannot forget its statistics (cf. datatrove's pipeline steps).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schema


class Drop(ValueError):
    """Why a record (or one turn of it) was not kept: the one type for every dropped record.

    ``reason`` is a short machine code (``invalid_json``, ``near_duplicate``, ``refusal``), ``detail``
    a sentence for humans. A filter or masker *returns* one; a parser deep in a call stack *raises*
    one (it is a ``ValueError``). ``stage`` is set where the stage that files the row is not the one
    that ran (the tokenize step files template failures under ``template``); ``duplicate_of`` and
    ``similarity`` are dedup's. A drop becomes one row of ``rejected/`` (:func:`rejected_rows_from_table`).
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        duplicate_of: str | None = None,
        similarity: float | None = None,
        *,
        stage: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.duplicate_of = duplicate_of
        self.similarity = similarity
        self.stage = stage

    def _fields(self) -> tuple:
        return (self.reason, self.detail, self.duplicate_of, self.similarity, self.stage)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Drop) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (("duplicate_of", self.duplicate_of), ("similarity", self.similarity), ("stage", self.stage))
            if value is not None
        )
        return f"Drop({self.reason!r}, {self.detail!r}{extra})"

    def __reduce__(self):  # exceptions pickle their args only; keep every field across processes
        return (_drop, self._fields())


def _drop(reason, detail, duplicate_of, similarity, stage) -> Drop:
    return Drop(reason, detail, duplicate_of, similarity, stage=stage)


@dataclass
class StageStats:
    """Counts and time of one stage over one or more chunks; adds up with ``+``."""

    name: str
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (e.g. pii_redactions)
    peak_rss_bytes: int | None = None  # the process's peak resident memory while the stage ran (Linux)

    def __add__(self, other: StageStats) -> StageStats:
        if other.name != self.name:
            raise ValueError(f"cannot add stats of stage {other.name!r} to {self.name!r}")
        return StageStats(
            self.name,
            self.records_in + other.records_in,
            self.records_out + other.records_out,
            self.seconds + other.seconds,
            self.rejected + other.rejected,
            _merge_extra(self.extra, other.extra),
            max((p for p in (self.peak_rss_bytes, other.peak_rss_bytes) if p is not None), default=None),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(
            data["name"],
            data["records_in"],
            data["records_out"],
            data["seconds"],
            Counter(data.get("rejected", {})),
            dict(data.get("extra", {})),
            data.get("peak_rss_bytes"),
        )

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def check_conservation(self) -> None:
        """records_in = records_out + rejected, or fail loudly: a record vanished."""
        if self.records_in != self.records_out + self.num_rejected:
            raise AssertionError(
                f"stage {self.name!r} lost records: {self.records_in} in, {self.records_out} out, "
                f"{self.num_rejected} rejected ({dict(self.rejected)})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 4),
            "records_in": self.records_in,
            "records_out": self.records_out,
            "rejected": dict(sorted(self.rejected.items())),
            **({"extra": self.extra} if self.extra else {}),
            **({"peak_rss_bytes": self.peak_rss_bytes} if self.peak_rss_bytes is not None else {}),
        }


def _merge_extra(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """Numbers add up, nested dicts merge key by key, anything else takes the newer value."""
    merged = dict(left)
    for key, value in right.items():
        if key in merged and isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _merge_extra(merged[key], value)
        elif key in merged and isinstance(value, (int, float)) and isinstance(merged[key], (int, float)):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


class StageRun:
    """The runner every stage goes through: it owns the clock, the counts and the conservation check.

    ::

        with StageRun("quality") as run:
            for batch in batches:
                kept, drops = ...
                run.count(len(batch), kept=len(kept), drops=drops)
        return run.stats

    ``count`` adds records in, records kept and the drops' reasons; leaving the block adds the
    seconds spent inside it and, unless the block raised, checks ``in = out + rejected``: a stage
    that loses a record fails loudly instead of writing an incomplete step.

    It also records the process's peak resident memory while the block ran (``peak_rss_bytes``,
    Linux: the kernel's high-water mark is reset when the first of the running stages starts, so
    stages that overlap in threads each report the peak of the overlap, an upper bound).
    """

    def __init__(self, name: str) -> None:
        self.stats = StageStats(name)

    def count(self, records_in: int, *, kept: int, drops: Iterable[Drop] | Iterable[str] = ()) -> None:
        """Add ``records_in`` records read, ``kept`` written on, and one rejection per drop (a
        :class:`Drop` or its reason code)."""
        self.stats.records_in += records_in
        self.stats.records_out += kept
        self.stats.rejected.update(d.reason if isinstance(d, Drop) else d for d in drops)

    def __enter__(self) -> StageRun:
        _peak_rss.enter()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.stats.seconds += time.perf_counter() - self._start
        peak = _peak_rss.leave()
        if peak is not None:
            self.stats.peak_rss_bytes = max(peak, self.stats.peak_rss_bytes or 0)
        if exc_type is None:
            self.stats.check_conservation()


class _PeakRss:
    """The kernel's resident-memory high-water mark (``VmHWM``), reset while no stage runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    def enter(self) -> None:
        with self._lock:
            if self._running == 0:
                release_memory()  # what the last stage freed, before the next one starts
                try:  # "5" resets the peak RSS to the current RSS (proc(5), clear_refs)
                    with open("/proc/self/clear_refs", "w") as refs:
                        refs.write("5")
                except OSError:
                    pass
            self._running += 1

    def leave(self) -> int | None:
        with self._lock:
            self._running -= 1
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


_peak_rss = _PeakRss()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Give the memory freed so far back to the system: Arrow's pool, then the C heap."""
    pa.default_memory_pool().release_unused()
    _malloc_trim()


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Python objects, the tokenizer and Arrow's system-allocator buffers come from glibc's malloc,
    which keeps what is freed in per-thread arenas. Stages run on threads (the tokenizer's
    encoders, Prefect's task runner), so without this a flow run's resident memory grew with each
    stage: 1.13 GiB in tokenize and 1.45 GiB in shards on 200k conversations, against 0.78 and
    0.96 GiB with it (bench/e2e.py, flow mode)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def rejected_rows_from_table(table: pa.Table, row_indices: list[int], drops: list[Drop], stage: str) -> pa.Table:
    """Rejected rows for canonical records ``table[row_indices]`` dropped at ``stage``.

    The ``raw`` column holds the canonical record as JSON, so the quarantine shows exactly what
    the stage saw.
    """
    import json

    if not row_indices:
        return schema.REJECTED_SCHEMA.empty_table()
    picked = table.take(pa.array(row_indices, pa.int64())).to_pylist()
    rows = []
    for rec, drop in zip(picked, drops):
        raw = json.dumps({schema.MESSAGES: rec[schema.MESSAGES], schema.TOOLS: rec.get(schema.TOOLS)}, ensure_ascii=False)
        rows.append(
            schema.rejected_row(
                rec[schema.SOURCE],
                rec[schema.SOURCE_INDEX],
                stage,
                drop.reason,
                drop.detail,
                raw,
                id=rec[schema.ID],
                duplicate_of=drop.duplicate_of,
                similarity=drop.similarity,
            )
        )
    return pa.Table.from_pylist(rows, schema=schema.REJECTED_SCHEMA)


def write_rejected(table: pa.Table, path) -> None:
    """Write rejected rows (already in :data:`schema.REJECTED_SCHEMA`) atomically; skip if empty."""
    from pipeline.fsutil import write_parquet_atomic

    if table.num_rows:
        write_parquet_atomic(table.cast(schema.REJECTED_SCHEMA), path)

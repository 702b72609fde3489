"""The one shape every pipeline step shares.

A *filter* looks at one conversation and answers ``None`` (keep) or a :class:`Drop` (reason code
and human detail). A *stage* runs over Arrow tables, and the shared machinery here counts what
went in, what came out and why the rest was dropped, times the work, and turns drops into
rejected rows. A new filter is a few lines and cannot forget its statistics (cf. datatrove).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schema


@dataclass(frozen=True)
class Drop:
    """Why a record was not kept: a short machine ``reason`` code and a ``detail`` for humans."""

    reason: str
    detail: str
    duplicate_of: str | None = None
    similarity: float | None = None


@dataclass
class StageStats:
    """Counts and time of one stage over one or more chunks; adds up with ``+``."""

    name: str
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (e.g. pii_redactions)

    def __add__(self, other: "StageStats") -> "StageStats":
        if other.name != self.name:
            raise ValueError(f"cannot add stats of stage {other.name!r} to {self.name!r}")
        return StageStats(
            self.name,
            self.records_in + other.records_in,
            self.records_out + other.records_out,
            self.seconds + other.seconds,
            self.rejected + other.rejected,
            _merge_extra(self.extra, other.extra),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageStats":
        return cls(
            data["name"],
            data["records_in"],
            data["records_out"],
            data["seconds"],
            Counter(data.get("rejected", {})),
            dict(data.get("extra", {})),
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


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def rejected_rows_from_table(
    table: pa.Table, row_indices: list[int], drops: list[Drop], stage: str
) -> pa.Table:
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
        raw = json.dumps(
            {schema.MESSAGES: rec[schema.MESSAGES], schema.TOOLS: rec.get(schema.TOOLS)}, ensure_ascii=False
        )
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

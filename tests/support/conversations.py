"""Canonical conversations read from instruction files, for tests and benchmarks that encode them."""

from __future__ import annotations

from pipeline.formats import to_conversation
from pipeline.readers import iter_records


def conversations(paths) -> list[tuple[list[dict], str | None]]:
    """(messages, tools) of every record in ``paths`` that converts; the rest are skipped."""
    rows = []
    for path in paths:
        for record in iter_records(path):
            if record.error is None:
                try:
                    rows.append(to_conversation(record.value))
                except ValueError:
                    continue  # the deliberately bad records of the samples
    return rows

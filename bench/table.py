"""Print the README's benchmark table from the stamped results in bench/results/.

    .venv/bin/python -m bench.table      # markdown: the README's columns and a "measured" one
    make bench                           # runs the quick benchmarks first, then this

The rows are bench/table.yaml: per row the results file it reads, the command that writes it
and its cells as templates over that file. "measured" is the stamp's commit (``+dirty`` when the
tree had changes) and date; "unstamped" for a file written before the scripts stamped results.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench._common import RESULTS, argument_parser, read_results

ROWS = Path(__file__).with_name("table.yaml")
COLUMNS = ("what", "sftkit", "peer", "ratio")

# Figures a row shows that no results file holds, computed from the file's own.
DERIVED: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "shard_memory": lambda r: {
        "anon_growth_ratio": r["results"]["memory-mapped (what sftkit writes)"]["anon_rss_growth_mib"]
        / r["results"]["zstd-compressed IPC (read whole)"]["anon_rss_growth_mib"]
    },
    "quality": lambda r: {
        "throughput_over_datatrove": r["throughput"]["sftkit_filter_chain"]["records_per_s"]
        / r["throughput"]["datatrove_baseline"]["records_per_s"]
    },
    "loader": lambda r: {
        f"mmap_over_{peer}": r["access_one_core"]["mmap_copied"]["tokens_per_s"] / r["access_one_core"][key]["tokens_per_s"]
        for peer, key in (("parquet", "parquet_row_groups"), ("datasets", "datasets_arrow"))
    },
}

UNITS: dict[str, Callable[[float], Any]] = {
    "M": lambda v: v / 1e6,
    "k": lambda v: v / 1e3,
    "MiB": lambda v: v / 2**20,
    "GiB": lambda v: v / 2**30,
    "count": lambda v: _count(v),
}


def _count(n: float) -> str:
    """1M, 100k, 21.6k: how the README writes sizes."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{round(n / size, 1):g}{unit}"
    return f"{n:g}"


class _Missing:
    def __format__(self, spec: str) -> str:
        return "?"


def _lookup(value: Any, parts: list[str]) -> Any:
    """``parts`` of a dotted path into the JSON; a key may itself hold dots (the longest wins)."""
    if not parts:
        return value
    if isinstance(value, list):
        return _lookup(value[int(parts[0])], parts[1:])
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in value:
            return _lookup(value[key], parts[end:])
    raise KeyError(".".join(parts))


class _Cells(string.Formatter):
    """``{a.b.-1.c|unit:spec}``: a value of the results file, in a unit, formatted."""

    def get_field(self, field_name, args, kwargs):
        path, _, unit = field_name.partition("|")
        try:
            value = _lookup(kwargs, path.split("."))
        except (KeyError, IndexError, TypeError, ValueError):
            return _Missing(), field_name
        if value is None:
            return _Missing(), field_name
        return (UNITS[unit](value) if unit else value), field_name


def table_rows(folder: Path = RESULTS) -> list[list[str]]:
    cells = _Cells()
    out = []
    for row in yaml.safe_load(ROWS.read_text(encoding="utf-8")):
        path = folder / f"{row['results']}.json"
        if not path.exists():
            out.append([cells.vformat(row["what"], (), {}), "not run", "", "", row["command"], f"no {path.name}"])
            continue
        results = read_results(path)
        derive = DERIVED.get(row["results"])
        if derive is not None:
            try:
                results = {**results, **derive(results)}
            except (KeyError, TypeError, ZeroDivisionError):
                pass  # a peer that did not run: its cells print "?"
        stamp = results.get("stamp")
        if stamp:
            git = stamp.get("git") or {}
            measured = f"{git.get('commit') or '?'}{'+dirty' if git.get('dirty') else ''}, {stamp.get('date', '?')[:10]}"
        else:
            measured = "unstamped"
        out.append([cells.vformat(row[column], (), results) for column in COLUMNS] + [row["command"], measured])
    return out


def main() -> None:
    parser = argument_parser(__doc__, writes_results=False)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results files (default: bench/results)")
    args = parser.parse_args()
    header = [*COLUMNS, "command", "measured"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in table_rows(args.results):
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

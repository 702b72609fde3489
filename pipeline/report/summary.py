"""The figures of a prepared dataset, read lazily with polars.

Only the narrow columns are read (``source``, ``length``, ``num_trainable`` of the shards;
``stage``, ``reason`` of the rejected rows), never ``input_ids``/``labels``/``messages``, so a
summary of millions of rows costs a few column chunks, not the token arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import schema
from pipeline.manifest import read_manifest, resolve_inside

PERCENTILES = (50, 90, 99)
SOURCE_COLUMNS = ("source", "rows", "train", "val", "tokens", "trained share", "mean length", "max length")


def as_count(n: Any) -> str:
    """A count as the reports print it: ``12,345``."""
    return f"{int(n):,}"


def as_share(share: float) -> str:
    """A share as the reports print it: ``12.3%``."""
    return f"{100 * share:.1f}%"


def source_rows(sources: list[dict[str, Any]]) -> list[list[str]]:
    """The cells of the sources table (:data:`SOURCE_COLUMNS`), for the terminal and the HTML page."""
    counts = ("rows", "train_rows", "val_rows", "tokens")
    return [
        [s[schema.SOURCE], *(as_count(s[key]) for key in counts), as_share(s["trainable_share"])]
        + [f"{s['mean_length']:.0f}", as_count(s["max_length"])]
        for s in sources
    ]


SPLIT = "split"
UNTRAINED = "untrained"  # length - num_trainable: prompt, system and template tokens


@dataclass
class DatasetSummary:
    """Everything ``sftkit inspect DIR`` shows, as plain values (also used by the HTML report)."""

    data_dir: Path
    manifest: dict[str, Any]
    splits: list[dict[str, Any]]  # {split, shards, rows, tokens, trainable_tokens, trainable_share}
    sources: list[dict[str, Any]]  # {source, rows, train_rows, val_rows, tokens, trainable_tokens, ...}
    lengths: dict[str, dict[str, float]]  # "total" | "trainable" | "untrained" -> {p50, p90, p99, max, mean}
    rejected: dict[str, dict[str, int]]  # stage -> reason -> count
    frame: pl.DataFrame = field(repr=False)  # split, source, length, num_trainable: one row per shard row

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.splits)

    @property
    def records(self) -> int:
        """Records kept: the rows, but a record cut into one row per turn (per_turn) counts once."""
        return sum(s.get("records", s["rows"]) for s in self.manifest.get("shards") or [])

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.splits)

    @property
    def trainable_tokens(self) -> int:
        return sum(s["trainable_tokens"] for s in self.splits)

    @property
    def rejected_total(self) -> int:
        return sum(n for reasons in self.rejected.values() for n in reasons.values())

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("history") or [])


def shard_files(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, list[Path]]:
    """split -> the shard files the manifest lists, in order; a listed file that is gone is an error."""
    files: dict[str, list[Path]] = {}
    for entry in manifest["shards"]:
        path = resolve_inside(data_dir, entry["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {data_dir}/manifest.json but does not exist")
        files.setdefault(entry["split"], []).append(path)
    return files


def rejected_files(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[Path]:
    """The rejected files the manifest lists; without such a list, every ``rejected/*.parquet``."""
    if "rejected" in manifest:
        paths = [resolve_inside(data_dir, entry["path"]) for entry in manifest["rejected"]]
    else:
        paths = sorted((Path(data_dir) / "rejected").glob("*.parquet"))
    return [p for p in paths if p.is_file() and not p.name.startswith(".")]


def scan_shards(data_dir: str | os.PathLike, manifest: dict[str, Any], columns: list[str]) -> pl.LazyFrame | None:
    """One lazy frame over every listed shard with ``columns`` plus a ``split`` column."""
    frames = [
        pl.scan_parquet([str(p) for p in paths]).select(columns).with_columns(pl.lit(split).alias(SPLIT))
        for split, paths in shard_files(data_dir, manifest).items()
    ]
    return pl.concat(frames) if frames else None


def _distribution(column: pl.Series) -> dict[str, float]:
    if column.len() == 0:
        return {**{f"p{q}": 0 for q in PERCENTILES}, "max": 0, "mean": 0.0}
    out: dict[str, float] = {f"p{q}": float(column.quantile(q / 100, "linear")) for q in PERCENTILES}
    out["max"] = int(column.max())
    out["mean"] = float(column.mean())
    return out


def rejected_counts(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """stage -> reason -> count, from the rejected files (the manifest's counts if there are none)."""
    files = rejected_files(data_dir, manifest)
    if not files:
        return {stage: dict(reasons) for stage, reasons in (manifest.get("counts", {}).get("rejected") or {}).items()}
    counted = (
        # files written before the turn column read it as null: every row a rejected record
        pl.scan_parquet(
            [str(p) for p in files],
            schema={schema.STAGE: pl.String, schema.REASON: pl.String, schema.TURN: pl.Int32},
            missing_columns="insert",
            extra_columns="ignore",
        )
        .filter(pl.col(schema.TURN).is_null())  # a refused turn of a kept record is no rejected record
        .group_by(schema.STAGE, schema.REASON)
        .agg(pl.len().alias("n"))
        .collect()
    )
    out: dict[str, dict[str, int]] = {}
    stage_order = {stage: i for i, stage in enumerate(schema.STAGES)}
    for row in counted.sort(["n", schema.REASON], descending=[True, False]).iter_rows(named=True):
        out.setdefault(row[schema.STAGE], {})[row[schema.REASON]] = row["n"]
    return dict(sorted(out.items(), key=lambda item: stage_order.get(item[0], len(stage_order))))


def summarize(data_dir: str | os.PathLike) -> DatasetSummary:
    """Read the manifest and the narrow shard columns; compute every figure of the summary."""
    manifest = read_manifest(data_dir)
    lazy = scan_shards(data_dir, manifest, [schema.SOURCE, schema.LENGTH, schema.NUM_TRAINABLE])
    if lazy is None:
        frame = pl.DataFrame(schema={SPLIT: pl.String, schema.SOURCE: pl.String, schema.LENGTH: pl.Int32, schema.NUM_TRAINABLE: pl.Int32})
    else:
        frame = lazy.select(SPLIT, schema.SOURCE, schema.LENGTH, schema.NUM_TRAINABLE).collect()

    shard_counts: dict[str, int] = {}
    for entry in manifest["shards"]:
        shard_counts[entry["split"]] = shard_counts.get(entry["split"], 0) + 1
    split_order = {split: i for i, split in enumerate(schema.SPLITS)}
    per_split = (
        frame.group_by(SPLIT)
        .agg(
            pl.len().alias("rows"),
            pl.col(schema.LENGTH).sum().alias("tokens"),
            pl.col(schema.NUM_TRAINABLE).sum().alias("trainable_tokens"),
        )
        .to_dicts()
    )
    splits = []
    for row in sorted(per_split, key=lambda r: split_order.get(r[SPLIT], len(split_order))):
        splits.append(
            {
                "split": row[SPLIT],
                "shards": shard_counts.get(row[SPLIT], 0),
                "rows": row["rows"],
                "tokens": int(row["tokens"] or 0),
                "trainable_tokens": int(row["trainable_tokens"] or 0),
                "trainable_share": (row["trainable_tokens"] or 0) / row["tokens"] if row["tokens"] else 0.0,
            }
        )

    per_source = (
        frame.group_by(schema.SOURCE)
        .agg(
            pl.len().alias("rows"),
            *[(pl.col(SPLIT) == split).sum().alias(f"{split}_rows") for split in schema.SPLITS],
            pl.col(schema.LENGTH).sum().alias("tokens"),
            pl.col(schema.NUM_TRAINABLE).sum().alias("trainable_tokens"),
            pl.col(schema.LENGTH).mean().alias("mean_length"),
            pl.col(schema.LENGTH).max().alias("max_length"),
        )
        .sort(["rows", schema.SOURCE], descending=[True, False])
        .to_dicts()
    )
    sources = [
        {
            **row,
            "tokens": int(row["tokens"] or 0),
            "trainable_tokens": int(row["trainable_tokens"] or 0),
            "trainable_share": row["trainable_tokens"] / row["tokens"] if row["tokens"] else 0.0,
        }
        for row in per_source
    ]

    lengths = {
        "total": _distribution(frame[schema.LENGTH]),
        "trainable": _distribution(frame[schema.NUM_TRAINABLE]),
        UNTRAINED: _distribution(frame[schema.LENGTH] - frame[schema.NUM_TRAINABLE]),
    }
    return DatasetSummary(
        data_dir=Path(data_dir),
        manifest=manifest,
        splits=splits,
        sources=sources,
        lengths=lengths,
        rejected=rejected_counts(data_dir, manifest),
        frame=frame,
    )


def rejected_examples(data_dir: str | os.PathLike, per_reason: int = 3) -> list[dict[str, Any]]:
    """The first ``per_reason`` rejected rows of every (stage, reason), in file order.

    Two passes so that the large ``raw`` column is read only for the rows shown: first the row
    positions from the narrow columns, then those rows.
    """
    manifest = read_manifest(data_dir)
    files = rejected_files(data_dir, manifest)
    if not files:
        return []
    lazy = pl.scan_parquet([str(p) for p in files], row_index_name="_row")
    picked = (
        lazy.select("_row", schema.STAGE, schema.REASON)
        .group_by(schema.STAGE, schema.REASON, maintain_order=True)
        .head(per_reason)
        .collect()
        .get_column("_row")
    )
    rows = lazy.filter(pl.col("_row").is_in(picked.implode())).drop("_row").collect()
    return rows.to_dicts()

"""Training mixtures: a YAML spec of source groups and weights -> every epoch's row order.

A spec (``sftkit train --mixture FILE``, ``sftkit plan --mixture FILE``)::

    seed: 0                          # the mixture's draws (default: train --seed)
    datasets: [data/nightly, data/team-a]   # prepared folders, relative to this file
    by: trained_tokens               # what a weight is a share of: trained_tokens | rows
    epoch_size: null                 # an epoch in `by` units (default: see below)
    rest: error                      # rows no group matches: error | drop
    groups:
      - {name: chat,  sources: ["*sharegpt*"], weight: 0.6}
      - {name: zh,    sources: ["*zh*"],       weight: 0.3}
      - {name: tools, sources: ["*tool*"],     weight: 0.1, max_tokens: 2000000}
      - {name: ours,  sources: ["team-a/*"],   repeat: 2, train_on: last, loss_weight: 0.5}

A group's ``sources`` are globs (:func:`fnmatch.fnmatchcase`, ``*`` also crosses ``/``) on the
rows' ``source`` column, the input path as given to ``sftkit prepare``. A source belongs to the
first group, in spec order, whose globs match it (like routing rules: ``*sharegpt*`` before
``*tool*`` sends ``sharegpt_tools.jsonl`` to the first); the plan lists every source matched by
more than one group, so the choice is never silent. A source no group matches is an error
unless ``rest: drop``.

How an epoch is drawn (:class:`trainer.sampling.MixtureSampler`): a group with ``repeat: r`` gets r times its own
size; the groups with a ``weight`` share the rest of ``epoch_size`` by their normalised weights,
or, without epoch_size, their own total size (so an epoch holds as much of them as the data
does, and the weights only move it between them). ``max_tokens`` caps a group's trained tokens
(the others are not scaled up: the epoch gets shorter). A budget of k.f times the group's size is k copies of each of its
rows plus a random draw for the fraction (first fit over a shuffle seeded by seed, epoch and
group, then the addition or swap of a row that lands nearest the budget); then all picks are
shuffled by (seed, epoch).
So up-sampled rows repeat spread over the epoch, down-sampled groups are a new subset every
epoch, and the order is a pure function of (spec, seed, epoch): resume and DDP slicing work as
without a mixture. The shards are only read, never rewritten.

Per-group training options act when a row is loaded (:class:`MixtureDataset`) and collated:
``train_on: last`` trains only the row's last contiguous run of trained labels (its last
assistant turn, given the templates' masks; a turn whose own labels have an untrained gap keeps
only the part after the gap) and ``loss_weight`` scales the row's token losses (collate turns it
into ``loss_weights``, see :mod:`trainer.loss`). Validation rows are those of the same folders'
val splits whose sources are in a group, each once, with ``train_on`` but no loss weight, so
the validation loss stays a plain mean per trained token.

Reading a mixture touches only the shards' ``source``, ``length`` and ``num_trainable`` columns
(and ``labels`` for ``train_on: last`` groups), never ``input_ids``. The pre-flight report
(``sftkit plan``) is built in :mod:`trainer.mixture_plan`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.manifest import resolve_inside, shard_entries
from pipeline.report.integrity import load_manifest
from pipeline.schema import IGNORE_INDEX, LABELS, LENGTH, NUM_TRAINABLE, SOURCE
from trainer.sampling import MixtureSampler

BY_TOKENS = "trained_tokens"
BY_ROWS = "rows"
# Rows one epoch may hold: its order, draws and packing plan live in memory (a few GB at this size).
MAX_EPOCH_ROWS = 50_000_000


class MixtureError(ValueError):
    """A mixture spec that cannot be used: invalid, overlapping, unmatched, or mismatched folders."""


# --- the spec --------------------------------------------------------------------------------
class GroupSpec(BaseModel):
    """One group of sources and how much of an epoch it gets."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    sources: list[str] = Field(min_length=1, description="globs on the rows' source column")
    # allow_inf_nan=False: `.inf` passes gt=0 and would turn every budget into NaN.
    weight: float | None = Field(None, gt=0, allow_inf_nan=False, description="share of the epoch (normalised over the weighted groups)")
    repeat: float | None = Field(None, gt=0, allow_inf_nan=False, description="fixed factor of the group's own size per epoch")
    max_tokens: int | None = Field(None, ge=1, description="at most this many trained tokens per epoch")
    train_on: Literal["all", "last"] = Field("all", description="all assistant turns, or only the last one")
    loss_weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="scales the loss of the group's tokens")

    @model_validator(mode="after")
    def _weight_or_repeat(self):
        if (self.weight is None) == (self.repeat is None):
            raise ValueError("give a group either weight (a share of the epoch) or repeat (a fixed factor), exactly one")
        return self


class MixtureSpec(BaseModel):
    """A training mixture as written in its YAML file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, description="seed of the draws; default: train --seed")
    datasets: list[str] = Field(min_length=1, description="prepared folders, relative to the spec file")
    by: Literal["trained_tokens", "rows"] = BY_TOKENS
    epoch_size: int | None = Field(
        None, ge=1, description="an epoch in `by` units; default: the weighted groups' own size plus the repeat groups'"
    )
    rest: Literal["error", "drop"] = Field("error", description="what to do with rows no group matches")
    groups: list[GroupSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self):
        names = [g.name for g in self.groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"group names must be distinct; {', '.join(twice)} appear more than once")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError("a dataset folder is listed twice")
        return self


def _validation_message(path: Path, exc: ValidationError, data: dict) -> str:
    """pydantic's errors as one sentence per mistake, groups named by index and name."""
    parts = []
    for error in exc.errors():
        where, node = [], data
        for key in error["loc"]:
            if isinstance(key, int):
                name = node[key].get("name") if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) else None
                where[-1] += f"[{key}]" + (f" ({name})" if name else "")
                node = node[key] if isinstance(node, list) and key < len(node) else None
            else:
                where.append(str(key))
                node = node.get(key) if isinstance(node, dict) else None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parent = ".".join(where[:-1]) or "the top level"
            model = GroupSpec if len(where) > 1 and where[0].startswith("groups") else MixtureSpec
            parts.append(f"unknown key {where[-1]!r} in {parent} (known keys: {', '.join(model.model_fields)})")
        else:
            parts.append(f"{'.'.join(where) or 'the spec'}: {message}")
    return f"mixture spec {path}: " + "; ".join(parts)


def read_spec(path: str | os.PathLike) -> MixtureSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixtureError(f"mixture spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MixtureError(f"cannot read mixture spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MixtureError(f"mixture spec {path} must hold a mapping (seed, datasets, by, groups)")
    try:
        return MixtureSpec.model_validate(data)
    except ValidationError as exc:
        raise MixtureError(_validation_message(path, exc, data)) from None


# --- the rows of a split ---------------------------------------------------------------------
@dataclass
class SplitRows:
    """Every row of one split of the mixture's folders, in the order of ``ShardDataset.concat``."""

    source: np.ndarray  # int32: index into Mixture.sources
    length: np.ndarray  # int32
    trained: np.ndarray  # int64: trained tokens (the last turn's for train_on: last groups)
    group: np.ndarray  # int16: the row's group, -1 outside the mixture (rest: drop)
    train_from: np.ndarray | None  # int32: labels before it are not trained (train_on: last); None: none
    shard_paths: list[Path]
    shard_starts: np.ndarray  # first row of each shard, and the total at the end

    @property
    def kept(self) -> np.ndarray:
        """Rows in some group (indices into this split), ascending."""
        return np.flatnonzero(self.group >= 0)


def _read_split(folders: list[Path], manifests: list[dict], split: str, sources: dict[tuple[int, str], int]) -> SplitRows:
    """The narrow columns of every shard of ``split`` (``sources`` gains the new source names)."""
    source_parts, length_parts, trained_parts, paths, counts = [], [], [], [], []
    for folder_index, (folder, manifest) in enumerate(zip(folders, manifests)):
        for entry in shard_entries(manifest, split):
            path = resolve_inside(folder, entry["path"])
            try:
                table = pq.read_table(path, columns=[SOURCE, LENGTH, NUM_TRAINABLE], read_dictionary=[SOURCE])
            except (OSError, ValueError) as exc:
                raise MixtureError(f"cannot read shard {path} listed in {folder}/manifest.json: {exc}") from exc
            for chunk in table.column(SOURCE).chunks:
                lookup = np.array(
                    [sources.setdefault((folder_index, name), len(sources)) for name in chunk.dictionary.to_pylist()],
                    dtype=np.int32,
                )
                source_parts.append(lookup[chunk.indices.to_numpy(zero_copy_only=False)] if len(lookup) else np.zeros(0, np.int32))
            length_parts.append(table.column(LENGTH).to_numpy().astype(np.int32))
            trained_parts.append(table.column(NUM_TRAINABLE).to_numpy().astype(np.int64))
            paths.append(path)
            counts.append(table.num_rows)

    def joined(parts, dtype):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    source = joined(source_parts, np.int32)
    return SplitRows(
        source=source,
        length=joined(length_parts, np.int32),
        trained=joined(trained_parts, np.int64),
        group=np.full(len(source), -1, np.int16),
        train_from=None,
        shard_paths=paths,
        shard_starts=np.cumsum([0] + counts),
    )


def last_turn_spans(offsets: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (``offsets`` into the flat ``labels``): where its last contiguous run of trained
    labels starts (relative to the row) and how long that run is. A row with nothing trained
    gets (its length, 0)."""
    starts, ends = offsets[:-1], offsets[1:]
    trained = labels != IGNORE_INDEX
    trained_at = np.flatnonzero(trained)
    untrained_at = np.flatnonzero(~trained)
    k = np.searchsorted(trained_at, ends, side="left") - 1  # the row's last trained position
    last = trained_at[np.clip(k, 0, None)] if len(trained_at) else np.zeros(len(starts), np.int64)
    has = (k >= 0) & (last >= starts) if len(trained_at) else np.zeros(len(starts), bool)
    m = np.searchsorted(untrained_at, last, side="left") - 1  # the last untrained position before it
    before = untrained_at[np.clip(m, 0, None)] if len(untrained_at) else np.full(len(starts), -1)
    run_start = np.maximum(np.where(m >= 0, before + 1, 0), starts)
    start = np.where(has, run_start - starts, ends - starts)
    count = np.where(has, last + 1 - run_start, 0)
    return start.astype(np.int32), count.astype(np.int64)


def _apply_last_turn(rows: SplitRows, last_groups: list[int]) -> None:
    """``train_on: last``: read the labels of the shards holding such rows (only those) and set
    those rows' trained count and ``train_from``."""
    wanted = np.isin(rows.group, last_groups)
    if not wanted.any():
        return
    rows.train_from = np.zeros(len(rows.group), np.int32)
    for shard, path in enumerate(rows.shard_paths):
        first, end = rows.shard_starts[shard], rows.shard_starts[shard + 1]
        if not wanted[first:end].any():
            continue
        column = pq.read_table(path, columns=[LABELS]).column(LABELS)
        at = first
        for chunk in column.chunks:
            start, count = last_turn_spans(chunk.offsets.to_numpy().astype(np.int64), chunk.values.to_numpy())
            here = slice(at, at + len(chunk))
            take = wanted[here]
            rows.train_from[here][take] = start[take]
            rows.trained[here][take] = count[take]
            at += len(chunk)


# --- the mixture -----------------------------------------------------------------------------
@dataclass
class Mixture:
    """A validated spec resolved against its folders: which rows each group holds, and its budget."""

    spec: MixtureSpec
    path: Path
    folders: list[Path]
    manifests: list[dict]
    seed: int
    sha256: str  # of the spec's content (folders resolved): what a resume must keep
    sources: list[tuple[int, str]]  # (folder index, source) of every source id
    source_group: np.ndarray  # the group of every source id, -1: none (rest: drop)
    shared_sources: list[str]  # a sentence per source more than one group matches
    train: SplitRows
    val: SplitRows
    budgets: np.ndarray  # per group, in `by` units, before max_tokens
    caps: list[int | None]  # per group: max trained tokens per epoch

    @property
    def groups(self) -> list[GroupSpec]:
        return self.spec.groups

    @property
    def target_shares(self) -> np.ndarray:
        return self.budgets / self.budgets.sum()

    def sampler(self) -> MixtureSampler:
        kept = self.train.kept
        group = self.train.group[kept]
        trained = self.train.trained[kept]
        cost = trained if self.spec.by == BY_TOKENS else np.ones(len(kept), np.int64)
        members = [np.flatnonzero(group == g) for g in range(len(self.groups))]
        return MixtureSampler(members, cost, trained, self.budgets.tolist(), self.caps, self.seed, self.spec.by == BY_TOKENS)

    def datasets(self, tokenizer=None) -> tuple[MixtureDataset, MixtureDataset]:
        """(train, validation) rows served from the folders' memory-mapped shards."""
        from trainer.data import ShardDataset

        weights = [g.loss_weight for g in self.groups]
        views = []
        for split, rows, sampler, group_weights in (("train", self.train, self.sampler(), weights), ("val", self.val, None, None)):
            base = ShardDataset.concat([ShardDataset(folder, split, tokenizer=tokenizer) for folder in self.folders])
            if not np.array_equal(base.lengths, rows.length):
                raise MixtureError(
                    f"the {split} shards of {', '.join(map(str, self.folders))} changed while the mixture "
                    f"{self.path} was being read; run again"
                )
            views.append(MixtureDataset(base, rows, group_weights, sampler, self.sha256))
        return views[0], views[1]


def _check_same_tokens(folders: list[Path], manifests: list[dict]) -> None:
    for what in ("tokenizer", "template"):
        first = (manifests[0].get(what) or {}).get("fingerprint")
        for folder, manifest in zip(folders[1:], manifests[1:]):
            other = (manifest.get(what) or {}).get("fingerprint")
            if other != first:
                raise MixtureError(
                    f"{folders[0]} and {folder} were prepared with different {what}s (fingerprint {first} vs "
                    f"{other}); a mixture needs folders prepared with the same tokenizer and chat template"
                )


def _match_groups(spec: MixtureSpec, sources: list[tuple[int, str]], folders: list[Path]) -> tuple[np.ndarray, list[str]]:
    """The group of every source id (-1: none) -- the first group whose globs match it -- and a
    sentence for every source that more than one group matches."""
    group_of = np.full(len(sources), -1, np.int16)
    shared = []
    for source_id, (folder_index, name) in enumerate(sources):
        matching = [g for g, group in enumerate(spec.groups) if any(fnmatch.fnmatchcase(name, glob) for glob in group.sources)]
        if not matching:
            continue
        group_of[source_id] = matching[0]
        if len(matching) > 1:
            names = [spec.groups[g].name for g in matching]
            shared.append(
                f"source {name!r} (in {folders[folder_index]}) matches groups {', '.join(map(repr, names))}: "
                f"its rows go to {names[0]!r}, the first in the spec"
            )
    return group_of, shared


def _refuse_unmatched(path: Path, unmatched: list[str]) -> None:
    shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
    raise MixtureError(
        f"mixture spec {path}: {len(unmatched)} source(s) are in no group: {shown}; add them to a group, "
        "or set `rest: drop` to leave their rows out"
    )


def _budgets(spec: MixtureSpec, natural: np.ndarray, path: Path) -> np.ndarray:
    """Each group's share of an epoch in `by` units (see the module docstring)."""
    budgets = np.zeros(len(spec.groups))
    weighted = [g for g, group in enumerate(spec.groups) if group.weight is not None]
    for g, group in enumerate(spec.groups):
        if group.repeat is not None:
            budgets[g] = group.repeat * natural[g]
    if spec.epoch_size and not weighted:
        raise MixtureError(
            f"mixture spec {path}: epoch_size {spec.epoch_size:,} has no effect without a group with a weight (the "
            f"repeat groups alone make an epoch of {budgets.sum():,.0f} {spec.by.replace('_', ' ')}); drop "
            "epoch_size, or give a group a weight to fill the rest"
        )
    # By default the weighted groups share their own size, so an epoch holds as much of them as
    # the data does; epoch_size fixes the whole epoch instead.
    left = spec.epoch_size - budgets.sum() if spec.epoch_size else natural[weighted].sum()
    if weighted and left <= 0:
        raise MixtureError(
            f"mixture spec {path}: the repeat groups alone fill epoch_size ({budgets.sum():,.0f} of "
            f"{spec.epoch_size:,} {spec.by.replace('_', ' ')}), leaving nothing for the weighted groups; "
            "lower their repeat or raise epoch_size"
        )
    total_weight = sum(spec.groups[g].weight for g in weighted)
    for g in weighted:
        budgets[g] = spec.groups[g].weight / total_weight * left
    return budgets


def spec_sha256(spec: MixtureSpec, folders: list[Path]) -> str:
    content = {**spec.model_dump(mode="json"), "datasets": [str(f) for f in folders]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def spec_folders(path: str | os.PathLike, spec: MixtureSpec | None = None) -> list[Path]:
    """The prepared folders a mixture spec names (relative to its own folder), each once and there."""
    path = Path(path)
    spec = spec if spec is not None else read_spec(path)
    folders = [Path(os.path.normpath(path.parent / d)) for d in spec.datasets]
    for index, folder in enumerate(folders):
        if not folder.is_dir():
            raise MixtureError(f"mixture spec {path}: datasets[{index}] {spec.datasets[index]!r} is no folder ({folder} does not exist)")
    # The spec's own check compares the strings; `data`, `data/`, `./data`, an absolute path or a
    # symlink name one folder too, and its rows would be read (and trained) twice.
    first_of: dict[Path, int] = {}
    for index, folder in enumerate(folders):
        earlier = first_of.setdefault(folder.resolve(), index)
        if earlier != index:
            raise MixtureError(
                f"mixture spec {path}: datasets[{earlier}] {spec.datasets[earlier]!r} and datasets[{index}] "
                f"{spec.datasets[index]!r} are the same folder ({folder.resolve()}); list it once"
            )
    return folders


def load_mixture(path: str | os.PathLike, *, default_seed: int = 0) -> Mixture:
    """Read and check a mixture spec and the narrow columns of its folders' shards."""
    path = Path(path)
    spec = read_spec(path)
    folders = spec_folders(path, spec)
    manifests = [load_manifest(folder) for folder in folders]
    _check_same_tokens(folders, manifests)
    source_ids: dict[tuple[int, str], int] = {}
    train = _read_split(folders, manifests, "train", source_ids)
    val = _read_split(folders, manifests, "val", source_ids)
    sources = list(source_ids)
    group_of, shared_sources = _match_groups(spec, sources, folders)
    if spec.rest == "error" and (group_of < 0).any():
        _refuse_unmatched(path, [f"{name} (in {folders[f]})" for (f, name), g in zip(sources, group_of) if g < 0])
    for rows in (train, val):
        rows.group = group_of[rows.source] if len(rows.source) else rows.group
        _apply_last_turn(rows, [g for g, group in enumerate(spec.groups) if group.train_on == "last"])

    kept_group = train.group[train.group >= 0]
    natural_rows = np.bincount(kept_group, minlength=len(spec.groups))
    for g, group in enumerate(spec.groups):
        if natural_rows[g] == 0:
            names = sorted({name for (_, name) in sources})
            raise MixtureError(
                f"mixture spec {path}: group {group.name!r} ({', '.join(map(repr, group.sources))}) matches no "
                f"training row; the sources are: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}"
            )
    if spec.by == BY_TOKENS:
        natural = np.bincount(kept_group, weights=train.trained[train.group >= 0], minlength=len(spec.groups))
    else:
        natural = natural_rows.astype(float)
    budgets = _budgets(spec, natural, path)
    _refuse_huge_epochs(budgets, natural, natural_rows, spec, path)
    return Mixture(
        spec=spec,
        path=path,
        folders=folders,
        manifests=manifests,
        seed=spec.seed if spec.seed is not None else default_seed,
        sha256=spec_sha256(spec, [f.resolve() for f in folders]),
        sources=sources,
        source_group=group_of,
        shared_sources=shared_sources,
        train=train,
        val=val,
        budgets=budgets,
        caps=[g.max_tokens for g in spec.groups],
    )


def _refuse_huge_epochs(budgets: np.ndarray, natural: np.ndarray, natural_rows: np.ndarray, spec, path: Path) -> None:
    """An epoch's order is held in memory (8 bytes a row, more while it is packed): a ``repeat``
    or ``epoch_size`` typo must be one sentence, not an exhausted machine."""
    rows = np.divide(budgets * natural_rows, natural, out=np.zeros_like(budgets), where=natural > 0)
    if rows.sum() > MAX_EPOCH_ROWS:
        biggest = int(np.argmax(rows))
        raise MixtureError(
            f"mixture spec {path}: an epoch would hold about {rows.sum():,.0f} rows, more than the "
            f"{MAX_EPOCH_ROWS:,} sftkit plans at once (group {spec.groups[biggest].name!r} alone "
            f"{rows[biggest]:,.0f}, from {natural_rows[biggest]:,} rows); lower its repeat, weight or epoch_size "
            "and train more epochs instead"
        )


# --- serving rows ----------------------------------------------------------------------------
class MixtureDataset:
    """The mixture's rows of one split: ``ds[j] -> {"input_ids", "labels"[, "train_from", "loss_weight"]}``.

    Row j is the j-th row in some group (``rows.kept``), read from the concatenated folders'
    memory maps; ``input_ids`` and ``labels`` are the stored ones (read-only views). A row of a
    ``train_on: last`` group carries ``train_from``: its labels before that position are not
    trained, and :func:`trainer.batching.collate_packed` leaves them -100 (masking there, where
    the batch is built anyway, costs no copy of the row). A row of a group with ``loss_weight``
    != 1 carries it. ``epoch_order`` is the trainer's source of row order.
    """

    def __init__(self, base, rows: SplitRows, loss_weights: list[float] | None, sampler: MixtureSampler | None, spec_sha256: str):
        kept = rows.kept
        self.base = base
        self.spec_sha256 = spec_sha256
        self.sampler = sampler
        self.group = rows.group[kept]
        self.lengths: np.ndarray = rows.length[kept]
        # Shard and in-shard index of every row, so a read skips the bisect over shard starts.
        starts = np.asarray(base._starts)
        self._shard = (np.searchsorted(starts, kept, side="right") - 1).astype(np.int32)
        self._local = (kept - starts[self._shard]).astype(np.int64)
        self._shards = base.shards
        train_from = rows.train_from[kept] if rows.train_from is not None else None
        self._train_from = train_from if train_from is not None and train_from.any() else None
        weight = np.asarray(loss_weights or [1.0], np.float64)[self.group] if loss_weights else None
        self._weight = weight if weight is not None and (weight != 1.0).any() else None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, j: int) -> dict:
        input_ids, labels = self._shards[self._shard[j]].row(self._local[j])
        row = {"input_ids": input_ids, "labels": labels}
        if self._train_from is not None:
            start = self._train_from[j]
            if start:
                row["train_from"] = int(start)
        if self._weight is not None:
            weight = self._weight[j]
            if weight != 1.0:
                row["loss_weight"] = float(weight)
        return row

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.sampler.epoch_order(epoch)

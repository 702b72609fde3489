"""The steps of a prepare run: plan -> ingest -> dedup -> quality -> tokenize -> shards -> manifest.

The Prefect refresh flow (``flows/refresh.py``) calls these same functions one task each;
:func:`prepare` composes them in one process. Each ``run_*`` step calls its stage function
(``ingest_file``, ``dedup_stage``, ``quality_stage``, ``tokenize_stage``, ``write_shards``: one
signature, ``(inputs, outputs, rejected, config, *, ...)``, each counted and timed by
:class:`pipeline.stage.StageRun`) through :func:`_cached_step`, and returns a :class:`StepResult`.
Every step is keyed by content, not paths:

* a step's outputs live under ``DIR/.work/<stage>/<key>.*`` where ``key`` hashes the step's
  inputs (input file sha256, upstream keys, the stage's config, tokenizer/template fingerprints,
  the code version); a step whose ``<key>.stats.json`` exists is done (:func:`step_done`) and is
  not redone, so a run killed at any point and started again redoes only what was unfinished;
* every file is written under a temporary name and renamed when complete (``pipeline.fsutil``);
* ``manifest.json`` (built and documented in :mod:`pipeline.manifest`) is written last and lists
  the only shards, rejected files and dedup index parts readers trust.

Incremental refresh: inputs whose sha256 the manifest already lists are skipped; new inputs are
deduplicated against everything kept before (the persisted dedup index in ``DIR/dedup_index``)
and appended as new shard files. A changed tokenizer, template or config rebuilds everything:
the old manifest is moved aside first, so no reader ever sees old and new shards mixed.

The output folder (``pipeline.outdir``): a run holds ``DIR/.sftkit.lock`` from start to end, so
a second run into the same folder stops at once; a non-empty folder sftkit did not make is
refused; and sftkit deletes only files its journal says it wrote (old shards, rejected files and
dedup index parts no manifest lists, its ``.work/`` and ``.tmp-*`` temporaries), never a user's.
What a run removed is listed in its manifest history entry (``"removed"``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline import manifest as manifest_io
from pipeline import outdir, schema
from pipeline.config import SFTConfig
from pipeline.fsutil import remove_stale_temporaries, sha256_file, write_json_atomic
from pipeline.manifest import DEDUP_INDEX, REJECTED, SHARDS, ShardEntry
from pipeline.stage import StageRun, StageStats, release_memory

log = logging.getLogger("sftkit.prepare")

WORK = outdir.WORK
PREVIOUS_MANIFEST = outdir.PREVIOUS_MANIFEST
REMOVED_AT_BEGIN = "removed.json"  # in .work/: what begin_run removed, for the history entry


class InputFile(BaseModel):
    path: str
    source: str
    sha256: str


class RunPlan(BaseModel):
    """Everything a step needs, as plain serialisable values (tasks may run in other processes)."""

    data_dir: str
    tokenizer: str
    config: SFTConfig
    config_fingerprint: str
    # None until with_fingerprints() on a first build, which decides nothing by them and so does
    # not wait for its tokenizer to load before ingesting
    tokenizer_fingerprint: str | None
    template_name: str | None
    template_fingerprint: str | None
    code_version: str
    inputs: list[InputFile]  # new this run
    skipped_inputs: list[InputFile]  # already in the dataset
    rebuild: bool
    previous_version: int
    index_parts: list[str]
    start_index: dict[str, int]
    tokenizer_files_digest: str | None = None  # see _tokenizer_files_digest
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex)  # this run's; the shard stream's owner

    @property
    def output_settings(self) -> dict[str, Any]:
        """The config without its speed-only settings: what step keys hash."""
        return self.config.output_settings()

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    @property
    def up_to_date(self) -> bool:
        return not self.inputs and not self.rebuild


def _key(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the pipeline's source: a code change invalidates cached step outputs."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(here.rglob("*.py")):
        h.update(path.relative_to(here).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# --- planning --------------------------------------------------------------------------------
def plan_refresh(input_paths: list[Path], tokenizer: str, data_dir: Path, config: SFTConfig) -> RunPlan:
    """Hash the inputs, read the existing manifest, and decide what this run must do.

    A record's ``source`` is its input path as given (``data/a.jsonl``), so two files of the same
    name in different folders stay apart.
    """
    data_dir = Path(data_dir)
    tokenizer = _tokenizer_name(tokenizer)
    config_fp = config.fingerprint()
    previous = manifest_io.read_manifest_or_none(data_dir)
    files_digest = _tokenizer_files_digest(tokenizer, config)
    recorded = _recorded_fingerprints(previous, files_digest, config_fp)
    if recorded is not None:  # same tokenizer files, template, config and code as the last run
        tokenizer_fp, template_name, template_fp = recorded
    elif previous is None:  # a first build: known before tokenizing (with_fingerprints)
        tokenizer_fp = template_name = template_fp = None
    else:  # whether to rebuild depends on them
        tokenizer_fp, template_name, template_fp = _fingerprints(tokenizer, config)

    inputs = [InputFile(path=str(path), source=str(path), sha256=_hash_input(Path(path))) for path in input_paths]
    rebuild = previous is not None and (
        previous.get("tokenizer", {}).get("fingerprint") != tokenizer_fp
        or previous.get("template", {}).get("fingerprint") != template_fp
        or previous.get("config_fingerprint") != config_fp
    )
    seen = set() if previous is None or rebuild else {i["sha256"] for i in previous.get("inputs", [])}
    new, skipped, this_run = [], [], set()
    for item in inputs:
        # The same content given twice (two names, or a glob overlap) is read once.
        if item.sha256 in seen or item.sha256 in this_run:
            skipped.append(item)
        else:
            new.append(item)
            this_run.add(item.sha256)
    if new:  # this run tokenizes: let its tokenizer load meanwhile, where a process may
        _start_tokenizer_process(tokenizer, config)
    start_index = {split: 0 for split in schema.SPLITS}
    if previous is not None and not rebuild:
        for entry in previous["shards"]:
            start_index[entry["split"]] += 1
    elif rebuild:
        # A rebuild writes its shards beside the old dataset, under new numbers, and the old files
        # go only after the new manifest is in place: a rebuild killed halfway leaves the old
        # dataset whole.
        for path in (data_dir / SHARDS).glob("*-*.parquet") if (data_dir / SHARDS).is_dir() else []:
            split, _, number = path.stem.partition("-")
            if split in start_index and number.isdigit():
                start_index[split] = max(start_index[split], int(number) + 1)
    return RunPlan(
        data_dir=str(data_dir),
        tokenizer=tokenizer,
        config=config,
        config_fingerprint=config_fp,
        tokenizer_fingerprint=tokenizer_fp,
        template_name=template_name,
        template_fingerprint=template_fp,
        code_version=code_version(),
        inputs=new,
        skipped_inputs=skipped,
        rebuild=rebuild,
        previous_version=0 if previous is None else int(previous.get("version", 0)),
        index_parts=[] if previous is None or rebuild else list(previous.get("dedup_index", [])),
        start_index=start_index,
        tokenizer_files_digest=files_digest,
    )


def _tokenizer_name(tokenizer: str) -> str:
    """A local tokenizer by absolute path (the manifest records it, and finds it from elsewhere);
    a hub name as it is."""
    return str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else str(tokenizer)


def run_fingerprints(tokenizer: str, config: SFTConfig) -> tuple[str, str, str]:
    """(tokenizer fingerprint, template name, template fingerprint): loads the tokenizer."""
    from pipeline.templates import resolve_template
    from pipeline.tokenizers import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tokenizer)
    template = resolve_template(tok, config.template)
    return tokenizer_fingerprint(tok), template.name, template.fingerprint


def _fingerprints(tokenizer: str, config: SFTConfig) -> tuple[str, str, str]:
    _start_tokenizer_process(tokenizer, config)
    process = _tokenizer_process_for(tokenizer, config)
    return process.call("run_fingerprints", tokenizer, config) if process else run_fingerprints(tokenizer, config)


def with_fingerprints(plan: RunPlan) -> RunPlan:
    """``plan`` with its tokenizer and template fingerprints, which a first build's plan leaves
    out: the run ingests, deduplicates and filters while its tokenizer loads (see
    :func:`tokenizer_process`), and a tokenizer that does not load stops it here, before the
    tokenize steps (a run started again reuses the steps done)."""
    if plan.tokenizer_fingerprint is not None:
        return plan
    tokenizer_fp, template_name, template_fp = _fingerprints(plan.tokenizer, plan.config)
    return plan.model_copy(
        update={"tokenizer_fingerprint": tokenizer_fp, "template_name": template_name, "template_fingerprint": template_fp}
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def _tokenizer_files_digest(tokenizer: str, config: SFTConfig) -> str | None:
    """A hash of everything the tokenizer and template fingerprints are computed from, read
    without loading the tokenizer (which imports transformers and torch: seconds): the files of a
    local tokenizer folder (not model weights), a custom template file, the config, the versions
    of the libraries that parse them, and sftkit's code. ``None`` for a hub name.

    A refresh whose digest equals the one the manifest records takes the recorded fingerprints,
    so a nightly run that finds nothing new answers in well under a second.
    """
    import importlib.metadata

    folder = Path(tokenizer)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for child in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)):
        h.update(f"{child.name}\0{sha256_file(child)}\0".encode())
    jinja_file = config.template.jinja_file
    if jinja_file is not None:
        h.update(sha256_file(jinja_file).encode() if Path(jinja_file).is_file() else b"missing")
    for package in ("transformers", "tokenizers", "jinja2"):
        try:
            h.update(f"{package}={importlib.metadata.version(package)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{package}=none\0".encode())
    h.update(f"{config.fingerprint()}\0{code_version()}".encode())
    return h.hexdigest()[:20]


def _recorded_fingerprints(previous: dict[str, Any] | None, files_digest: str | None, config_fp: str) -> tuple[str, str, str] | None:
    """(tokenizer fingerprint, template name, template fingerprint) from the last manifest, when
    it was written from the same tokenizer files, template and config."""
    if previous is None or files_digest is None or previous.get("config_fingerprint") != config_fp:
        return None
    tokenizer, template = previous.get("tokenizer") or {}, previous.get("template") or {}
    if tokenizer.get("files_digest") != files_digest:
        return None
    values = (tokenizer.get("fingerprint"), template.get("name"), template.get("fingerprint"))
    return values if all(isinstance(v, str) and v for v in values) else None


def _hash_input(path: Path) -> str:
    if path.is_dir():  # a datasets save_to_disk folder: hash its files in order
        h = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(child.relative_to(path).as_posix().encode())
            h.update(sha256_file(child).encode())
        return h.hexdigest()
    return sha256_file(path)


def begin_run(plan: RunPlan) -> list[str]:
    """Make the folder ready: drop a crashed run's debris (a rebuild leaves the old dataset in
    place; :func:`finalize` removes its files once the new manifest is written).

    Removes only files sftkit wrote (``pipeline.outdir``); returns their relative paths.
    """
    root = plan.root
    outdir.claim(root)
    removed: list[str] = []
    _remove_temporaries(root)
    # Index parts written by a run that crashed before its manifest: drop them, and the dedup
    # step that wrote them, so the step reruns against exactly the listed index. (A rebuild
    # keeps the old dataset's parts until its own manifest replaces the old one.)
    current = manifest_io.read_manifest_or_none(root) if plan.rebuild else None
    kept_parts = [*plan.index_parts, *((current or {}).get("dedup_index") or [])]
    listed = {f"{DEDUP_INDEX}/{part}" for part in kept_parts}
    stale = [r for r in _dataset_files(outdir.written(root)) if r.startswith(f"{DEDUP_INDEX}/") and r not in listed]
    if stale_removed := outdir.remove(root, stale):
        shutil.rmtree(root / WORK / "dedup", ignore_errors=True)
        removed += stale_removed
    if removed:
        note = root / WORK / REMOVED_AT_BEGIN
        earlier = json.loads(note.read_text(encoding="utf-8")) if note.exists() else []
        write_json_atomic(sorted(set(earlier) | set(removed)), note)
    return removed


def _dataset_files(relatives) -> list[str]:
    """Of paths relative to the output folder, those that are sftkit's dataset files by place and
    name: ``shards/*.parquet``, ``rejected/*.parquet``, ``dedup_index/part-*.arrow`` (and
    ``part-*.parquet``, as older versions wrote them)."""
    out = []
    for relative in relatives:
        folder, _, name = relative.partition("/")
        if "/" in name:
            continue
        if (folder in (SHARDS, REJECTED) and name.endswith(".parquet")) or (
            folder == DEDUP_INDEX and name.startswith("part-") and name.endswith((".arrow", ".parquet"))
        ):
            out.append(relative)
    return sorted(out)


def _remove_temporaries(root: Path) -> int:
    """``.tmp-*`` files a killed run left in sftkit's own folders (never in a user's subfolders)."""
    removed = remove_stale_temporaries(root / WORK)
    for folder in (root, root / SHARDS, root / REJECTED, root / DEDUP_INDEX):
        removed += remove_stale_temporaries(folder, recursive=False)
    return removed


# --- steps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    """A finished step: its outputs, its rejected file and its counts (files as absolute paths).

    ``index_part`` is the dedup index part the step wrote (current once the manifest lists it):
    in-process dedup's of every record it kept, or the shards step's of those that reached the
    shards; ``part_source`` what the dedup step left for the shards step to write that part from
    instead (``signatures``: the signature files, ``kept``: which of their rows dedup kept);
    ``shards`` the manifest entries of the files the shards step wrote.
    """

    stage: str
    key: str
    outputs: list[str]
    rejected: str | None
    stats: StageStats
    index_part: str | None = None
    shards: list[ShardEntry] = field(default_factory=list)
    part_source: dict[str, Any] | None = None

    def files(self) -> list[str]:
        """The files this result names that a later step reads (its outputs, its part's sources)."""
        source = self.part_source or {}
        return [*self.outputs, *source.get("signatures", []), *([source["kept"]] if "kept" in source else [])]

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "key": self.key,
            "outputs": self.outputs,
            "rejected": self.rejected,
            "stats": self.stats.to_dict(),
            "index_part": self.index_part,
            "shards": self.shards,
            "part_source": self.part_source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepResult:
        return cls(**{**data, "stats": StageStats.from_dict(data["stats"])})


def _work(plan: RunPlan, stage: str, key: str, suffix: str = ".parquet") -> Path:
    return plan.root / WORK / stage / f"{key}{suffix}"


def _rejected(plan: RunPlan, stage: str, key: str) -> Path:
    return plan.root / REJECTED / f"{stage}-{key}.parquet"


def step_done(plan: RunPlan, stage: str, key: str) -> StepResult | None:
    """The result of step ``stage``/``key`` if an earlier attempt finished it and its outputs are
    still there, else None. (The flow offers a task's cached result only while this says so.)"""
    mark = _work(plan, stage, key, ".stats.json")
    if not mark.exists():
        return None
    result = StepResult.from_json(json.loads(mark.read_text(encoding="utf-8")))
    return result if all(Path(p).exists() for p in result.files()) else None


def _cached_step(
    plan: RunPlan, stage: str, key: str, stage_fn: Callable[..., Any], inputs, outputs, /, *, part_source: dict | None = None, **options
) -> StepResult:
    """Run step ``stage``/``key`` unless :func:`step_done`; record it.

    ``stage_fn`` is a stage function of the one signature, called as
    ``stage_fn(inputs, outputs, rejected_path, plan.config, **options)``; it returns its
    :class:`StageStats` (dedup: an outcome of stats and index part). The result's JSON, written
    last, is the step's completion mark. ``part_source`` goes into the result as it is.
    """
    if (done := step_done(plan, stage, key)) is not None:
        return done
    rejected = _rejected(plan, stage, key)
    outcome = stage_fn(inputs, outputs, rejected, plan.config, **options)
    stats, index_part = (outcome, None) if isinstance(outcome, StageStats) else outcome
    listed = [outputs] if isinstance(outputs, Path) else outputs
    result = StepResult(
        stage, key, [str(p) for p in listed], str(rejected) if rejected.exists() else None, stats, index_part, part_source=part_source
    )
    write_json_atomic(result.to_json(), _work(plan, stage, key, ".stats.json"))
    return result


def _passed_through(in_paths: list[Path], out_paths: list[Path], rejected_path: Path, config: SFTConfig, *, stage: str) -> StageStats:
    """A switched-off stage: every record goes on, untouched (its outputs are its inputs)."""
    with StageRun(stage) as run:
        for path in in_paths:
            records = pq.ParquetFile(path).metadata.num_rows
            run.count(records, kept=records)
    return run.stats


def ingest_key(plan: RunPlan, item: InputFile) -> str:
    return _key("ingest", item.sha256, item.source, plan.output_settings["ingest"], plan.code_version)


def run_ingest(plan: RunPlan, item: InputFile, on_table: Callable[[pa.Table], None] | None = None) -> StepResult:
    """The ingest step of one input; ``on_table`` gets the chunk's kept rows as they are written."""
    from pipeline.ingest import ingest_file

    key = ingest_key(plan, item)
    out = _work(plan, "ingest", key)
    # The canonical chunk is a work file: read back three times (signatures, quality, tokenize;
    # dedup and quality write their kept rows in its codec) and removed with .work/. zstd cost
    # 0.2 CPU-s to write and 0.05 more to read each of its 50k-record chunks; it takes 2.6x less
    # disk, which the tokenize step's uncompressed Arrow files, 5x larger again, dwarf.
    return _cached_step(plan, "ingest", key, ingest_file, Path(item.path), out, source=item.source, compression="none", on_table=on_table)


def dedup_key(plan: RunPlan, ingest_results: list[StepResult]) -> str:
    return _key(
        "dedup",
        [r.key for r in ingest_results],
        plan.index_parts,
        plan.output_settings["dedup"],
        plan.output_settings["quality"],
        plan.code_version,
    )


def dedup_signatures(plan: RunPlan, ingest_result: StepResult) -> str:
    """MinHash signatures and band hashes of one ingested chunk (mappable per chunk)."""
    from pipeline.dedup import compute_signatures

    path = _signature_path(plan, ingest_result.key)
    if not path.exists():
        compute_signatures(Path(ingest_result.outputs[0]), path, plan.config.dedup, num_proc=_signature_procs(plan))
    return str(path)


def _signature_procs(plan: RunPlan) -> int:
    """Worker processes for one chunk's signatures: the cores the other inputs leave free (a
    refresh of one big file signs it on every core, not one; a refresh of as many files as
    cores signs each on its own core, one file per worker, as ingest runs)."""
    return max(1, (os.cpu_count() or 1) // max(1, len(plan.inputs)))


def signatures_done(plan: RunPlan, ingest_result: StepResult) -> str | None:
    """The chunk's signature file when an earlier step already made it, else None."""
    path = _signature_path(plan, ingest_result.key)
    return str(path) if path.exists() else None


def ingest_then_signatures(plan: RunPlan, item: InputFile, signatures: bool) -> StepResult:
    """:func:`run_ingest`, then (``signatures``: when a flow maps them as tasks, see
    :func:`dedup_parts_worth_tasks`) the chunk's dedup signatures, in the same worker process:
    it then starts once per input instead of twice, and reads the chunk back while it is in the
    page cache. The signatures task finds the file made (:func:`signatures_done`).

    When the chunk's signatures get worker processes of their own (fewer inputs than cores: a
    refresh of one file), they sign the rows as ingest writes them, on the cores the parsing
    leaves idle, rather than after it (:func:`pipeline.dedup.lsh.signing_alongside`)."""
    key = ingest_key(plan, item)
    num_proc = _signature_procs(plan)
    path = _signature_path(plan, key)
    if signatures and num_proc > 1 and step_done(plan, "ingest", key) is None and not path.exists():
        from pipeline.dedup.lsh import signing_alongside

        # The ingest step's mark is written before the signature file is complete: killed in
        # between, the signatures task makes the file from the chunk (signatures_done says no).
        with signing_alongside(path, plan.config.dedup, num_proc) as add:
            return run_ingest(plan, item, on_table=add)
    result = run_ingest(plan, item)
    if signatures:
        dedup_signatures(plan, result)
    return result


def _signature_path(plan: RunPlan, chunk_key: str) -> Path:
    key = _key("dedup-signatures", chunk_key, plan.output_settings["dedup"], plan.code_version)
    return _work(plan, "dedup-signatures", key, ".arrow")


def dedup_partition(plan: RunPlan, ingest_results: list[StepResult], signature_paths: list[str], partition: int) -> str:
    """Candidate pairs from one partition of the LSH bands (mappable per partition)."""
    from pipeline.dedup import candidate_pairs, save_edges

    path = _edge_path(plan, ingest_results, partition)
    if not path.exists():
        edges = candidate_pairs(signature_paths, partition, plan.config.dedup, plan.root / DEDUP_INDEX, list(plan.index_parts))
        save_edges(edges, path)
    return str(path)


def _edge_path(plan: RunPlan, ingest_results: list[StepResult], partition: int) -> Path:
    partitions = plan.config.dedup.partitions
    return _work(plan, "dedup-edges", f"{dedup_key(plan, ingest_results)}-{partition:03d}-of-{partitions:03d}", ".npy")


def dedup_parts_worth_tasks(plan: RunPlan) -> bool:
    """Whether a flow should map the dedup signatures and band partitions as tasks of their own:
    for inputs under :data:`_BYTES_FOR_WORKERS` the global step makes them itself, faster than
    an orchestrator schedules some twenty small tasks."""
    return plan.config.dedup.enabled and sum(input_bytes(item.path) for item in plan.inputs) >= _BYTES_FOR_WORKERS


def dedup_partitions(plan: RunPlan) -> list[int]:
    config = plan.config.dedup
    return list(range(config.partitions)) if config.near else []


def run_dedup(
    plan: RunPlan,
    ingest_results: list[StepResult],
    signature_paths: list[str] | None = None,
    edge_paths: list[str] | None = None,
) -> StepResult:
    """Exact and near-duplicate removal over all new chunks, against the persisted index: the
    global step. The flow passes the signature and edge files its mapped tasks made; in one
    process :func:`~pipeline.dedup.dedup_stage` makes whichever are missing."""
    from pipeline.dedup import dedup_stage

    key = dedup_key(plan, ingest_results)
    in_paths = [Path(r.outputs[0]) for r in ingest_results]
    if not plan.config.dedup.enabled:
        return _cached_step(plan, "dedup", key, _passed_through, in_paths, in_paths, stage="dedup")
    out_paths = [_work(plan, "dedup", f"{key}-{i:05d}") for i in range(len(in_paths))]
    signature_paths = signature_paths or [_signature_path(plan, r.key) for r in ingest_results]
    edge_paths = edge_paths or [_edge_path(plan, ingest_results, q) for q in dedup_partitions(plan)]
    options = {"index_dir": plan.root / DEDUP_INDEX, "index_parts": list(plan.index_parts), "is_good": _quality_verdict(plan)}
    options |= {"signature_paths": [Path(p) for p in signature_paths], "edge_paths": [Path(p) for p in edge_paths]}
    options["link_unchanged"] = True  # the chunks are this run's work files, never written again
    # No index part yet: the shards step writes it once, from the signature files, with only the
    # rows that reach the shards (rather than dedup writing every kept row's and a later step
    # rewriting it).
    kept_path = _work(plan, "dedup", key, ".kept.npy")
    part_source = {"signatures": [str(p) for p in options["signature_paths"]], "kept": str(kept_path)}
    return _cached_step(plan, "dedup", key, dedup_stage, in_paths, out_paths, kept_path=kept_path, part_source=part_source, **options)


def reusing_workers() -> contextlib.AbstractContextManager[None]:
    """Within this block, steps run one after another reuse their worker processes
    (:func:`pipeline.workers.reusing`): a run's quality steps, a flow's ingest tasks. Closed
    when it ends, so the workers do not sit beside the tokenizer process."""
    from pipeline import workers

    return workers.reusing()


def release_step_workers() -> None:
    """Inside :func:`reusing_workers`, once every input is ingested: close the ingest steps' idle
    worker processes (one per input beside others), so that they do not wait, each holding what
    its ingest left in memory, beside the quality workers. A single input's signature workers,
    started in this process, stay: the quality stage takes them."""
    from pipeline import workers

    workers.close_idle("pipeline.steps:_run_in_worker")


def _quality_verdict(plan: RunPlan):
    """Would the quality stage keep a record? Dedup keeps such a copy of a duplicate group
    (:class:`pipeline.quality.Verdict`: one record, or many in worker processes)."""
    if not plan.config.quality.enabled:
        return None
    from pipeline.quality import Verdict

    return Verdict(plan.config, plan.tokenizer)


def start_quality_workers(plan: RunPlan, ingest_results: list[StepResult]) -> None:
    """Inside :func:`reusing_workers`, before dedup: start the workers of the run's quality steps
    (sized for its first chunk) so that their start, a CPU-second of imports and filters, runs
    beside dedup's global step, which keeps one core busy. Elsewhere, nothing."""
    if ingest_results:
        from pipeline.quality import start_workers

        start_workers(plan.config, plan.tokenizer, ingest_results[0].stats.records_out)


def quality_key(plan: RunPlan, upstream_key: str, chunk: int) -> str:
    return _key("quality", upstream_key, chunk, plan.output_settings["quality"], plan.code_version)


def run_quality(plan: RunPlan, upstream: StepResult, chunk: int) -> StepResult:
    from pipeline.quality import quality_stage

    in_path = Path(upstream.outputs[chunk])
    key = quality_key(plan, upstream.key, chunk)
    if not plan.config.quality.enabled:
        return _cached_step(plan, "quality", key, _passed_through, [in_path], [in_path], stage="quality")
    return _cached_step(plan, "quality", key, quality_stage, in_path, _work(plan, "quality", key), tokenizer=plan.tokenizer)


def tokenize_key(plan: RunPlan, upstream_key: str) -> str:
    if plan.tokenizer_fingerprint is None or plan.template_fingerprint is None:
        raise RuntimeError("the plan has no tokenizer fingerprints yet: pass it through with_fingerprints()")
    return _key(
        "tokenize",
        upstream_key,
        plan.tokenizer_fingerprint,
        plan.template_fingerprint,
        plan.output_settings["template"],
        plan.output_settings["tokenize"],
        plan.code_version,
    )


def run_tokenize(plan: RunPlan, upstream: StepResult, stream_shards: bool = False) -> StepResult:
    """The tokenize step: in the run's tokenizer process when it has one (see
    :func:`tokenizer_process`), else here. ``stream_shards``: the run's tokenize steps run one
    after another in that process, which then writes the shard files as they make their rows
    (see :class:`_ShardStreams`)."""
    process = _tokenizer_process_for(plan.tokenizer, plan.config)
    if process is not None:
        return process.call("run_tokenize", plan, upstream, stream_shards)
    from pipeline.tokenize import tokenize_stage

    in_path = Path(upstream.outputs[0])
    key = tokenize_key(plan, upstream.key)
    out = _work(plan, "tokenize", key, ".arrow")
    stream = _SHARD_STREAMS.get(plan) if stream_shards else None
    if stream is None:
        return _cached_step(plan, "tokenize", key, tokenize_stage, in_path, out, tokenizer=plan.tokenizer)
    if (done := step_done(plan, "tokenize", key)) is not None:
        stream.abort("a tokenize step was done before this run: its rows are in its work file only")
        return done
    try:
        result = _cached_step(plan, "tokenize", key, tokenize_stage, in_path, out, tokenizer=plan.tokenizer, on_kept=stream.add)
    except BaseException:
        stream.abort("a tokenize step failed")  # a retry's rows would follow this attempt's
        raise
    stream.steps.append(key)
    return result


def run_write_shards(
    plan: RunPlan, tokenize_results: list[StepResult], dedup_result: StepResult | None = None, stream_shards: bool = False
) -> StepResult:
    """Split by id and write this run's shard files after the ones the dataset already has; and
    the dedup index part of what reaches them (``index_part`` of the result; see
    :func:`_write_index_part`).

    ``stream_shards``: the run's tokenize steps were asked to write the shard files as they made
    their rows (:class:`_ShardStreams`); they are moved into place while the part is written, and
    written here only when that stream cannot serve. Here, the part is written beside the shard
    files when they are fewer than the cores (the shard writer gives each file a thread: a run of
    one chunk writes one train file, on one core), else after them, once their memory is given
    back: at 1M conversations (twenty files) writing it beside them only added its memory to
    theirs (the step's peak 557 MiB against 414).

    Not cached: shard files are numbered after the dataset's, so this runs once per run, last.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.shards import read_tokenized, write_shards

    tokenized = [Path(r.outputs[0]) for r in tokenize_results]
    written = index_part = None
    if stream_shards:
        stop = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="sftkit-index-part") as pool:
            part = pool.submit(_write_index_part, plan, dedup_result, tokenized, stop.is_set)
            try:
                written = _streamed_shards(plan, tokenize_results)
            except BaseException:
                stop.set()
                part.exception()
                raise
            index_part = part.result()
    if written is None:
        shards_of = functools.partial(
            write_shards, tokenized, plan.root, plan.config, metadata=_shard_metadata(plan), start_index=dict(plan.start_index)
        )
        rows = sum(read_tokenized(path, [schema.ID]).num_rows for path in tokenized)
        if stream_shards:  # the part is written already
            written = shards_of()
        elif -(-rows // plan.config.shards.target_rows) >= (os.cpu_count() or 1):
            written = shards_of()
            release_memory()  # the shard writer's, before the part's
            index_part = _write_index_part(plan, dedup_result, tokenized)
        else:
            stop = threading.Event()
            with ThreadPoolExecutor(1, thread_name_prefix="sftkit-index-part") as pool:
                part = pool.submit(_write_index_part, plan, dedup_result, tokenized, stop.is_set)
                try:
                    written = shards_of()
                except BaseException:
                    # The part stops at its next batch, its temporary file removed; one finished
                    # already is an orphan (no manifest lists it) that the next run removes.
                    stop.set()
                    part.exception()
                    raise
                index_part = part.result()
    outputs = [str(plan.root / entry["path"]) for entry in written.entries]
    return StepResult("shards", "", outputs, None, written.stats, index_part=index_part, shards=written.entries)


def _shard_metadata(plan: RunPlan) -> dict[bytes, bytes]:
    """What every shard file of the run carries in its Parquet metadata (the split is added per file)."""
    return {
        schema.META_TOKENIZER_NAME: plan.tokenizer.encode(),
        schema.META_TOKENIZER_FINGERPRINT: plan.tokenizer_fingerprint.encode(),
        schema.META_TEMPLATE_NAME: plan.template_name.encode(),
        schema.META_TEMPLATE_FINGERPRINT: plan.template_fingerprint.encode(),
        schema.META_FORMAT_VERSION: schema.FORMAT_VERSION.encode(),
    }


class _ShardStreams:
    """The shard files of a run, written by the process that runs its tokenize steps while they
    make their rows (:class:`pipeline.shards.ShardStream`), at most one run's per process.

    Written after the last tokenize step instead, a run of one chunk (50k conversations) spent
    1.5-2 s encoding its one train file on one core while the other waited. A run whose tokenize
    steps run one after another in one process (a flow on this machine's threads, :func:`prepare`)
    asks for the stream (``stream_shards``); its files go to ``.work/shards-stream/<run id>/``.
    The shards step takes them (:func:`_streamed_shards`) when the stream saw exactly the run's
    tokenize steps, in their order, each one made this run, in key order; otherwise it writes the
    files from the steps' work files as before. Either road gives the same bytes (tested)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: tuple[str, Any] | None = None

    def get(self, plan: RunPlan):
        """This run's stream, started by its first tokenize step (a stream of another run is dropped)."""
        from pipeline.shards import ShardStream

        with self._lock:
            if self._run is not None and self._run[0] == plan.run_id:
                return self._run[1]
            if self._run is not None:
                self._run[1].abort("another run started")
            staging = plan.root / WORK / "shards-stream" / plan.run_id
            stream = ShardStream(staging, plan.config.shards, _shard_metadata(plan), dict(plan.start_index))
            self._run = (plan.run_id, stream)
            return stream

    def take(self, plan: RunPlan):
        """This run's stream, no longer held here (None when there is none)."""
        with self._lock:
            run, self._run = self._run, None
        if run is not None and run[0] != plan.run_id:
            run[1].abort("another run started")
            return None
        return run[1] if run is not None else None


_SHARD_STREAMS = _ShardStreams()


def finish_shard_stream(plan: RunPlan, step_keys: list[str]):
    """The shard files this process wrote beside the run's tokenize steps, moved into place
    (a :class:`pipeline.shards.WrittenShards`), or None when they cannot serve: no stream, a
    broken one, or one that saw other steps than ``step_keys`` (its files are removed)."""
    stream = _SHARD_STREAMS.take(plan)
    if stream is None:
        return None
    if stream.broken is not None or stream.steps != step_keys:
        reason = stream.broken or "it saw other tokenize steps than the shards step was given"
        stream.abort(reason)
        log.info("shard files written again from the tokenize steps' work files: %s", reason)
        return None
    return stream.finish(plan.root)


def _streamed_shards(plan: RunPlan, tokenize_results: list[StepResult]):
    keys = [result.key for result in tokenize_results]
    process = _tokenizer_process_for(plan.tokenizer, plan.config)
    if process is not None:
        return process.call("finish_shard_stream", plan, keys)
    return finish_shard_stream(plan, keys)


def _write_index_part(
    plan: RunPlan, dedup_result: StepResult | None, tokenized: list[Path], stop: Callable[[], bool] | None = None
) -> str | None:
    """The dedup index part of this run's records that reach the shards (every row of the
    tokenize steps' files does): its name, or None when dedup left none to write.

    Remember only what reached the shards: a record that quality or tokenize dropped must not
    make a later, better near-copy of it look like a duplicate. The part is written under its
    final (content-hash) name but is current only once the manifest lists it (two-phase, see
    :mod:`pipeline.dedup.index`)."""
    if not dedup_result or not (dedup_result.index_part or dedup_result.part_source):
        return None
    from pipeline.dedup.index import restrict_part, write_part_from
    from pipeline.dedup.lsh import run_params
    from pipeline.shards import read_tokenized

    kept_ids = pa.chunked_array([read_tokenized(path, [schema.ID]).column(schema.ID) for path in tokenized], pa.string())
    if source := dedup_result.part_source:
        import numpy as np

        kept = np.load(source["kept"], allow_pickle=False)
        return write_part_from(plan.root / DEDUP_INDEX, source["signatures"], kept, kept_ids, run_params(plan.config.dedup), stop)
    return restrict_part(plan.root / DEDUP_INDEX, dedup_result.index_part, kept_ids, stop)


# --- finishing -------------------------------------------------------------------------------
def finalize(
    plan: RunPlan,
    ingest_results: list[StepResult],
    dedup_result: StepResult | None,
    quality_results: list[StepResult],
    tokenize_results: list[StepResult],
    shard_result: StepResult,
) -> dict:
    """Write the new manifest (atomically, last; :func:`pipeline.manifest.build_manifest` checks
    conservation), then remove this run's debris. Returns the manifest."""
    root = plan.root
    previous = None if plan.rebuild else manifest_io.read_manifest_or_none(root)
    step_results = [*ingest_results, *([dedup_result] if dedup_result else []), *quality_results, *tokenize_results]
    manifest = manifest_io.build_manifest(  # refuses, before anything is written, to lose a record
        root,
        previous,
        version=plan.previous_version + 1,
        tokenizer={
            "name": plan.tokenizer,
            "fingerprint": plan.tokenizer_fingerprint,
            **({"files_digest": plan.tokenizer_files_digest} if plan.tokenizer_files_digest else {}),
        },
        template={"name": plan.template_name, "fingerprint": plan.template_fingerprint},
        config=plan.config.model_dump(mode="json"),
        config_fingerprint=plan.config_fingerprint,
        code_version=plan.code_version,
        new_inputs=[{"source": i.source, "sha256": i.sha256, "records": r.stats.records_in} for i, r in zip(plan.inputs, ingest_results)],
        new_shards=shard_result.shards,
        new_rejected=[Path(r.rejected) for r in step_results if r.rejected],
        dedup_index=list(plan.index_parts),
        stages=[r.stats for r in step_results] + [shard_result.stats],
        rebuild=plan.rebuild,
    )
    if shard_result.index_part:  # written by the shards step, beside the shard files
        manifest["dedup_index"].append(shard_result.index_part)
    listed = manifest_io.listed_files(manifest)
    unlisted = _unlisted(root, listed)
    note = root / WORK / REMOVED_AT_BEGIN
    removed_at_begin = json.loads(note.read_text(encoding="utf-8")) if note.exists() else []
    manifest["history"][-1]["removed"] = sorted((set(removed_at_begin) - listed) | set(unlisted))
    manifest_io.write_manifest(root, manifest)
    _clean_up(root, unlisted)
    return manifest


def tidy(data_dir: Path) -> dict:
    """Nothing new to do: remove what a run killed after its manifest left behind; the manifest."""
    root = Path(data_dir)
    manifest = manifest_io.read_manifest(root)
    outdir.claim(root)
    _remove_temporaries(root)
    _clean_up(root, _unlisted(root, manifest_io.listed_files(manifest)))
    return manifest


def _unlisted(root: Path, listed: set[str]) -> list[str]:
    """Dataset files sftkit wrote in ``root`` (its journal says so) that ``listed`` does not hold:
    a crashed run's shards, an earlier dataset's rejected files, replaced index parts."""
    return [r for r in _dataset_files(outdir.written(root)) if r not in listed and (root / r).exists()]


def _clean_up(root: Path, unlisted: list[str]) -> list[str]:
    """After the manifest: remove ``unlisted`` (files sftkit wrote), the work folder and the
    moved-aside manifest; returns what was removed. Files sftkit did not write stay."""
    removed = outdir.remove(root, [*unlisted, PREVIOUS_MANIFEST])
    outdir.remove_work(root)
    outdir.compact(root)
    return removed


# --- in-process composition ------------------------------------------------------------------
def prepare(
    inputs: list[str],
    tokenizer: str,
    data_dir: str | Path,
    config: SFTConfig | None = None,
    progress=None,
) -> dict:
    """Run every stage in this process; returns the manifest (the previous one if nothing was new).

    ``progress``, if given, is called as ``progress(stage, done, total)``.
    """
    from pipeline.ingest import expand_inputs

    config = config or SFTConfig()
    paths = expand_inputs(inputs)
    with outdir.hold(data_dir):
        return _prepare_locked(paths, tokenizer, Path(data_dir), config, progress)


_BYTES_FOR_WORKERS = 32 << 20


def input_bytes(path: str | Path) -> int:
    """Bytes on disk of an input file or folder."""
    path = Path(path)
    if path.is_dir():
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    return path.stat().st_size


# Steps a worker process may run for prepare (pipeline.workers runs only what is named here).
_WORKER_STEPS = ("run_ingest", "dedup_signatures", "ingest_then_signatures", "run_fingerprints", "run_tokenize", "finish_shard_stream")


def _run_in_worker(call: tuple[str, tuple]) -> Any:
    name, args = call
    if name not in _WORKER_STEPS:
        raise ValueError(f"{name!r} is not a step a worker runs")
    return globals()[name](*args)


def in_worker_process(step: Callable[..., Any], *args: Any, input_bytes: int, alone: bool = False) -> Any:
    """``step(*args)`` in a worker process of its own when its input has ``input_bytes`` of
    :data:`_BYTES_FOR_WORKERS` or more, else here. For callers that run steps side by side in
    threads (Prefect's thread task runner), where Python steps would share one core; ``alone``
    (no other step runs beside it: a refresh of one input) runs it here whatever its size, as
    :func:`prepare` does, saving a process start and leaving the worker processes the step
    starts itself (signatures) to this process's :func:`reusing_workers` block."""
    from pipeline import workers

    if input_bytes < _BYTES_FOR_WORKERS or alone:
        return step(*args)
    # inside workers.reusing() (a flow's ingest tasks) a process serves one step after another
    with workers.pool(None, "pipeline.steps:_run_in_worker", (), 1) as pool:
        [result] = pool.map([(step.__name__, args)])
    return result


class _StepWorkers:
    """``map(step, argument tuples)``: in :mod:`pipeline.workers` processes when there are two or
    more (results in order), else in this process. Steps write their outputs to the run's
    ``.work`` folder and return small results, so only file names cross processes."""

    def __init__(self, num_proc: int) -> None:
        self.num_proc = num_proc
        self.pool = None

    def __enter__(self) -> _StepWorkers:
        if self.num_proc > 1:
            from pipeline.workers import WorkerPool

            self.pool = WorkerPool(None, "pipeline.steps:_run_in_worker", (), self.num_proc)
        return self

    def map(self, step: Callable[..., Any], calls: list[tuple]) -> Iterator[Any]:
        if self.pool is None or len(calls) < 2:
            return (step(*args) for args in calls)
        return self.pool.map((step.__name__, args) for args in calls)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the tokenizer process -------------------------------------------------------------------
# Loading a tokenizer imports transformers and torch: 1.5-2 s of one core, which a run otherwise
# spends on its critical path (in its plan, or before its first tokenize step) while the other
# cores wait. Inside tokenizer_process() a run loads it in a process of its own, started as soon
# as the run knows it will need it (the command line starts it before it imports Prefect, see
# warm_tokenizer): that process computes the fingerprints and runs the tokenize steps (their own
# encoder threads or worker processes included), while this one starts the flow, hashes the
# inputs, ingests, deduplicates and filters. Only a plan that decides by the fingerprints waits
# for them (a first build takes them before tokenizing: with_fingerprints). Steps pass file
# names, so the tokenize step writes the same files in either process. A run that finds nothing
# new starts none.
class _TokenizerProcess:
    def __init__(self, tokenizer: str, config_json: str) -> None:
        from pipeline.workers import WorkerPool

        self.key = (tokenizer, config_json)
        self._pool = WorkerPool("pipeline.steps:_load_in_worker", "pipeline.steps:_run_in_worker", self.key, 1)
        self._lock = threading.Lock()

    def call(self, step: str, *args: Any) -> Any:
        from pipeline.workers import WorkerError

        try:
            with self._lock:  # one request at a time on the pipe
                [result] = self._pool.map([(step, args)])
        except WorkerError:  # the process died (killed, out of memory): a retry runs without it
            with _TOKENIZER_PROCESS_LOCK:
                if _TOKENIZER_PROCESSES.get(self.key) is self:
                    del _TOKENIZER_PROCESSES[self.key]
            self.close()
            raise
        return result

    def close(self) -> None:
        self._pool.close()


_TOKENIZER_PROCESSES: dict[tuple[str, str], _TokenizerProcess] = {}
_TOKENIZER_PROCESS_RUNS: Counter[tuple[str, str]] = Counter()  # runs inside tokenizer_process()
_TOKENIZER_PROCESS_LOCK = threading.Lock()


def _process_key(tokenizer: str, config: SFTConfig) -> tuple[str, str]:
    return _tokenizer_name(tokenizer), config.model_dump_json()


@contextlib.contextmanager
def tokenizer_process(tokenizer: str, config: SFTConfig) -> Iterator[None]:
    """Within this block, runs of ``tokenizer`` and ``config`` in this process load the tokenizer
    and tokenize in a process of their own (see above); it is closed when the block ends. The
    command line and the refresh flow use it; :func:`prepare` does not (its callers may patch
    what the tokenize step calls, in this process)."""
    key = _process_key(tokenizer, config)
    with _TOKENIZER_PROCESS_LOCK:
        _TOKENIZER_PROCESS_RUNS[key] += 1
    try:
        yield
    finally:
        with _TOKENIZER_PROCESS_LOCK:
            _TOKENIZER_PROCESS_RUNS[key] -= 1
            last = _TOKENIZER_PROCESS_RUNS[key] <= 0
            if last:
                del _TOKENIZER_PROCESS_RUNS[key]
            process = _TOKENIZER_PROCESSES.pop(key, None) if last else None
        if process is not None:
            process.close()


def warm_tokenizer(tokenizer: str, data_dir: str | Path, config: SFTConfig) -> None:
    """Inside :func:`tokenizer_process`: start the tokenizer process now when the plan will need
    the fingerprints (a first build, or tokenizer files, template or config changed since the last
    run), for a caller with other work to do first. Otherwise the plan starts it once it finds new
    inputs, and a refresh with nothing new starts none."""
    try:
        previous = manifest_io.read_manifest_or_none(Path(data_dir))
        recorded = _recorded_fingerprints(previous, _tokenizer_files_digest(_tokenizer_name(tokenizer), config), config.fingerprint())
    except Exception:  # the plan meets the same problem, and says it in its place
        return
    if recorded is None:
        _start_tokenizer_process(tokenizer, config)


def _start_tokenizer_process(tokenizer: str, config: SFTConfig) -> None:
    key = _process_key(tokenizer, config)
    with _TOKENIZER_PROCESS_LOCK:
        if key in _TOKENIZER_PROCESS_RUNS and key not in _TOKENIZER_PROCESSES:
            _TOKENIZER_PROCESSES[key] = _TokenizerProcess(*key)


def _tokenizer_process_for(tokenizer: str, config: SFTConfig) -> _TokenizerProcess | None:
    with _TOKENIZER_PROCESS_LOCK:
        return _TOKENIZER_PROCESSES.get(_process_key(tokenizer, config)) if _TOKENIZER_PROCESSES else None


def _load_in_worker(tokenizer: str, config_json: str) -> None:
    """The tokenizer process's start: import transformers, load the tokenizer and its template.
    A failure is left to the step that needs them, which raises it with its own message."""
    try:
        run_fingerprints(tokenizer, SFTConfig.model_validate_json(config_json))
    except Exception:
        pass


def _prepare_locked(paths: list[Path], tokenizer: str, data_dir: Path, config: SFTConfig, progress) -> dict:
    plan = plan_refresh(paths, tokenizer, data_dir, config)
    if plan.up_to_date:
        log.info("nothing new to prepare in %s", data_dir)
        return tidy(data_dir)
    begin_run(plan)
    notify = progress or (lambda stage, done, total: None)

    # Ingest and the dedup signatures are Python, per input file: one worker process per core,
    # when the inputs are big enough to pay back the workers' start (about a second). Big ones
    # are signed in the ingest's step, as a flow does: beside the parsing where it leaves cores.
    big = sum(input_bytes(Path(item.path)) for item in plan.inputs) >= _BYTES_FOR_WORKERS
    signing = big and plan.config.dedup.enabled
    quality_results = []
    # One set of quality workers for all the chunks, started beside dedup: a single input's
    # signature workers, switched to the filters (pipeline.workers.pool), else new ones.
    with reusing_workers(), _StepWorkers(min(os.cpu_count() or 1, len(plan.inputs)) if big else 1) as workers:
        ingest_results = []
        calls = [(plan, item, True) if signing else (plan, item) for item in plan.inputs]
        for result in workers.map(ingest_then_signatures if signing else run_ingest, calls):
            ingest_results.append(result)
            notify("ingest", len(ingest_results), len(plan.inputs))
        signature_paths = None
        if plan.config.dedup.enabled:  # (files the ingest steps made are found, not made again)
            signature_paths = list(workers.map(dedup_signatures, [(plan, result) for result in ingest_results]))
        workers.close()  # the step workers go; what they started went with them
        start_quality_workers(plan, ingest_results)
        dedup_result = run_dedup(plan, ingest_results, signature_paths)
        notify("dedup", 1, 1)
        for chunk in range(len(dedup_result.outputs)):
            quality_results.append(run_quality(plan, dedup_result, chunk))
            notify("quality", chunk + 1, len(dedup_result.outputs))
    plan = with_fingerprints(plan)
    tokenize_results = []
    try:
        for i, upstream in enumerate(quality_results):
            tokenize_results.append(run_tokenize(plan, upstream, stream_shards=True))
            notify("tokenize", i + 1, len(quality_results))
        shard_result = run_write_shards(plan, tokenize_results, dedup_result, stream_shards=True)
    finally:
        if (stream := _SHARD_STREAMS.take(plan)) is not None:  # the run stopped before its shards step took it
            stream.abort("the run stopped")
    notify("shards", 1, 1)
    return finalize(plan, ingest_results, dedup_result, quality_results, tokenize_results, shard_result)

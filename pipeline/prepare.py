"""A prepare run, as plain functions: plan -> ingest -> dedup -> quality -> tokenize -> shards -> manifest.

The Prefect refresh flow (``flows/refresh.py``) calls these same functions one task each;
:func:`prepare` composes them in one process. Every step is keyed by content, not paths:

* a step's outputs live under ``DIR/.work/<stage>/<key>.*`` where ``key`` hashes the step's
  inputs (input file sha256, upstream keys, the stage's config, tokenizer/template fingerprints,
  the code version); a step whose ``<key>.stats.json`` exists is done and is not redone, so a
  run killed at any point and started again redoes only what was unfinished;
* every file is written under a temporary name and renamed when complete (``pipeline.fsutil``);
* ``manifest.json`` is written last and lists the only shards and rejected files readers trust.

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

import hashlib
import json
import logging
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import BaseModel

from pipeline import manifest as manifest_io
from pipeline import outdir, schema
from pipeline.config import SFTConfig
from pipeline.fsutil import remove_stale_temporaries, sha256_file, write_json_atomic
from pipeline.stage import StageStats, Timer

log = logging.getLogger("sftkit.prepare")

WORK = outdir.WORK
SHARDS = "shards"
REJECTED = "rejected"
DEDUP_INDEX = "dedup_index"
STAGE_ORDER = ("ingest", "dedup", "quality", "tokenize", "shards")
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
    tokenizer_fingerprint: str
    template_name: str
    template_fingerprint: str
    code_version: str
    inputs: list[InputFile]  # new this run
    skipped_inputs: list[InputFile]  # already in the dataset
    rebuild: bool
    previous_version: int
    index_parts: list[str]
    start_index: dict[str, int]

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
    from pipeline.templates import resolve_template
    from pipeline.tokenizers import load_tokenizer, tokenizer_fingerprint

    data_dir = Path(data_dir)
    # Record a local tokenizer by absolute path, so the manifest still finds it from elsewhere.
    if Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())
    tok = load_tokenizer(tokenizer)
    template = resolve_template(tok, config.template)
    tokenizer_fp = tokenizer_fingerprint(tok)
    config_fp = config.fingerprint()

    inputs = [
        InputFile(path=str(path), source=str(path), sha256=_hash_input(Path(path))) for path in input_paths
    ]
    previous = manifest_io.read_manifest_or_none(data_dir)
    rebuild = previous is not None and (
        previous.get("tokenizer", {}).get("fingerprint") != tokenizer_fp
        or previous.get("template", {}).get("fingerprint") != template.fingerprint
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
        template_name=template.name,
        template_fingerprint=template.fingerprint,
        code_version=code_version(),
        inputs=new,
        skipped_inputs=skipped,
        rebuild=rebuild,
        previous_version=0 if previous is None else int(previous.get("version", 0)),
        index_parts=[] if previous is None or rebuild else list(previous.get("dedup_index", [])),
        start_index=start_index,
    )


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
    name: ``shards/*.parquet``, ``rejected/*.parquet``, ``dedup_index/part-*.parquet``."""
    out = []
    for relative in relatives:
        folder, _, name = relative.partition("/")
        if "/" in name or not name.endswith(".parquet"):
            continue
        if folder in (SHARDS, REJECTED) or (folder == DEDUP_INDEX and name.startswith("part-")):
            out.append(relative)
    return sorted(out)


def _remove_temporaries(root: Path) -> int:
    """``.tmp-*`` files a killed run left in sftkit's own folders (never in a user's subfolders)."""
    removed = remove_stale_temporaries(root / WORK)
    for folder in (root, root / SHARDS, root / REJECTED, root / DEDUP_INDEX):
        removed += remove_stale_temporaries(folder, recursive=False)
    return removed


# --- steps -----------------------------------------------------------------------------------
def _work(plan: RunPlan, stage: str, key: str, suffix: str = ".parquet") -> Path:
    return plan.root / WORK / stage / f"{key}{suffix}"


def _rejected(plan: RunPlan, stage: str, key: str) -> Path:
    return plan.root / REJECTED / f"{stage}-{key}.parquet"


def _step_result(plan: RunPlan, stage: str, key: str, outputs: list[Path], rejected: Path, stats: StageStats) -> dict:
    """Record a finished step (stats JSON written last = the step's completion mark)."""
    stats.check_conservation()
    result = {
        "stage": stage,
        "key": key,
        "outputs": [str(p) for p in outputs],
        "rejected": str(rejected) if rejected.exists() else None,
        "stats": stats.to_dict(),
    }
    write_json_atomic(result, _work(plan, stage, key, ".stats.json"))
    return result


def _done(plan: RunPlan, stage: str, key: str) -> dict | None:
    stats_path = _work(plan, stage, key, ".stats.json")
    if not stats_path.exists():
        return None
    result = json.loads(stats_path.read_text(encoding="utf-8"))
    if all(Path(p).exists() for p in result["outputs"]):
        return result
    return None


def ingest_key(plan: RunPlan, item: InputFile) -> str:
    return _key("ingest", item.sha256, item.source, plan.output_settings["ingest"], plan.code_version)


def run_ingest(plan: RunPlan, item: InputFile) -> dict:
    from pipeline.ingest import ingest_file

    key = ingest_key(plan, item)
    if done := _done(plan, "ingest", key):
        return done
    out, rejected = _work(plan, "ingest", key), _rejected(plan, "ingest", key)
    stats = ingest_file(Path(item.path), item.source, out, rejected, plan.config.ingest)
    return _step_result(plan, "ingest", key, [out], rejected, stats)


def dedup_key(plan: RunPlan, ingest_results: list[dict]) -> str:
    return _key("dedup", [r["key"] for r in ingest_results], plan.index_parts, plan.output_settings["dedup"], plan.output_settings["quality"], plan.code_version)


def _pass_through_dedup(plan: RunPlan, ingest_results: list[dict]) -> dict:
    in_paths = [Path(r["outputs"][0]) for r in ingest_results]
    records = sum(pq.ParquetFile(p).metadata.num_rows for p in in_paths)
    key = dedup_key(plan, ingest_results)
    return _step_result(plan, "dedup", key, in_paths, _rejected(plan, "dedup", key), StageStats("dedup", records, records))


def dedup_signatures(plan: RunPlan, ingest_result: dict) -> str:
    """MinHash signatures and band hashes of one ingested chunk (mappable per chunk)."""
    from pipeline.dedup import compute_signatures

    key = _key("dedup-signatures", ingest_result["key"], plan.output_settings["dedup"], plan.code_version)
    path = _work(plan, "dedup-signatures", key)
    if not path.exists():
        compute_signatures(Path(ingest_result["outputs"][0]), path, plan.config.dedup)
    return str(path)


def dedup_partition(plan: RunPlan, ingest_results: list[dict], signature_paths: list[str], partition: int) -> str:
    """Candidate pairs from one partition of the LSH bands (mappable per partition)."""
    from pipeline.dedup import candidate_pairs, save_edges

    partitions = plan.config.dedup.partitions
    path = _work(plan, "dedup-edges", f"{dedup_key(plan, ingest_results)}-{partition:03d}-of-{partitions:03d}", ".npy")
    if not path.exists():
        edges = candidate_pairs(
            signature_paths, partition, plan.config.dedup, plan.root / DEDUP_INDEX, list(plan.index_parts)
        )
        save_edges(edges, path)
    return str(path)


def dedup_resolve(plan: RunPlan, ingest_results: list[dict], signature_paths: list[str], edge_paths: list[str]) -> dict:
    """The global step: connected components over all candidate pairs, keep policy, outputs."""
    from pipeline.dedup import resolve_clusters

    key = dedup_key(plan, ingest_results)
    if done := _done(plan, "dedup", key):
        return done
    config = plan.config
    is_good = None
    if config.quality.enabled:
        from pipeline.quality import build_filters, passes
        from pipeline.tokenizers import load_tokenizer

        filters = build_filters(config.quality, tokenizer=load_tokenizer(plan.tokenizer))
        is_good = lambda record: passes(record, filters)  # noqa: E731
    in_paths = [Path(r["outputs"][0]) for r in ingest_results]
    out_paths = [_work(plan, "dedup", f"{key}-{i:05d}") for i in range(len(in_paths))]
    rejected = _rejected(plan, "dedup", key)
    stats = resolve_clusters(
        in_paths, signature_paths, edge_paths, out_paths, rejected, plan.root / DEDUP_INDEX,
        config.dedup, is_good, list(plan.index_parts),
    )
    return _step_result(plan, "dedup", key, out_paths, rejected, stats)


def dedup_partitions(plan: RunPlan) -> list[int]:
    config = plan.config.dedup
    return list(range(config.partitions)) if config.near else []


def run_dedup(plan: RunPlan, ingest_results: list[dict]) -> dict:
    """Exact and near-duplicate removal over all new chunks, against the persisted index."""
    if not plan.config.dedup.enabled:
        return _pass_through_dedup(plan, ingest_results)
    if done := _done(plan, "dedup", dedup_key(plan, ingest_results)):
        return done
    signatures = [dedup_signatures(plan, r) for r in ingest_results]
    edges = [dedup_partition(plan, ingest_results, signatures, p) for p in dedup_partitions(plan)]
    return dedup_resolve(plan, ingest_results, signatures, edges)


def quality_key(plan: RunPlan, upstream_key: str, chunk: int) -> str:
    return _key("quality", upstream_key, chunk, plan.output_settings["quality"], plan.code_version)


def run_quality(plan: RunPlan, upstream: dict, chunk: int) -> dict:
    in_path = Path(upstream["outputs"][chunk])
    key = quality_key(plan, upstream["key"], chunk)
    if done := _done(plan, "quality", key):
        return done
    config = plan.config.quality
    rejected = _rejected(plan, "quality", key)
    if not config.enabled:
        records = pq.ParquetFile(in_path).metadata.num_rows
        return _step_result(plan, "quality", key, [in_path], rejected, StageStats("quality", records, records))
    from pipeline.quality import quality_stage
    from pipeline.tokenizers import load_tokenizer

    out = _work(plan, "quality", key)
    # The tokenizer serves the length filter's optional token bounds.
    stats = quality_stage(in_path, out, rejected, config, tokenizer=load_tokenizer(plan.tokenizer))
    return _step_result(plan, "quality", key, [out], rejected, stats)


def tokenize_key(plan: RunPlan, upstream_key: str) -> str:
    return _key(
        "tokenize", upstream_key, plan.tokenizer_fingerprint, plan.template_fingerprint,
        plan.output_settings["template"], plan.output_settings["tokenize"], plan.code_version,
    )


def run_tokenize(plan: RunPlan, upstream: dict) -> dict:
    from pipeline.tokenize import tokenize_stage

    in_path = Path(upstream["outputs"][0])
    key = tokenize_key(plan, upstream["key"])
    if done := _done(plan, "tokenize", key):
        return done
    out, rejected = _work(plan, "tokenize", key, ".arrow"), _rejected(plan, "tokenize", key)
    stats = tokenize_stage(in_path, out, rejected, plan.tokenizer, plan.config)
    return _step_result(plan, "tokenize", key, [out], rejected, stats)


def run_write_shards(plan: RunPlan, tokenize_results: list[dict]) -> dict:
    """Split by id and write this run's shard files after the ones the dataset already has.

    Returns ``{"entries": [manifest shard entries], "stats": shard-stage statistics}``.
    """
    from pipeline.shards import write_shards

    metadata = {
        schema.META_TOKENIZER_NAME: plan.tokenizer.encode(),
        schema.META_TOKENIZER_FINGERPRINT: plan.tokenizer_fingerprint.encode(),
        schema.META_TEMPLATE_NAME: plan.template_name.encode(),
        schema.META_TEMPLATE_FINGERPRINT: plan.template_fingerprint.encode(),
        schema.META_FORMAT_VERSION: schema.FORMAT_VERSION.encode(),
    }
    paths = [Path(r["outputs"][0]) for r in tokenize_results]
    with Timer() as timer:
        entries = write_shards(paths, plan.root, plan.config.shards, metadata, start_index=dict(plan.start_index))
    records = sum(e["records"] for e in entries)
    records_in = sum(r["stats"]["records_out"] for r in tokenize_results)
    stats = StageStats("shards", records_in, records, timer.seconds)
    stats.check_conservation()
    return {"entries": entries, "stats": stats.to_dict()}


# --- finishing -------------------------------------------------------------------------------
def finalize(
    plan: RunPlan,
    ingest_results: list[dict],
    dedup_result: dict | None,
    quality_results: list[dict],
    tokenize_results: list[dict],
    shard_result: dict,
) -> dict:
    """Write the new manifest (atomically, last), check conservation, remove this run's debris."""
    root = plan.root
    previous = None if plan.rebuild else manifest_io.read_manifest_or_none(root)
    new_shards = shard_result["entries"]

    step_results = ingest_results + ([dedup_result] if dedup_result else []) + quality_results + tokenize_results
    stage_totals: dict[str, StageStats] = {}
    for result in step_results:
        stats = StageStats.from_dict(result["stats"])
        name = stats.name
        stage_totals[name] = stage_totals[name] + stats if name in stage_totals else stats
    stage_totals["shards"] = StageStats.from_dict(shard_result["stats"])

    # Counted from the rejected files themselves, by each row's own stage (the tokenize step
    # also files template failures under stage "template"): what inspect shows is what is there.
    rejected_counts = {stage: dict(reasons) for stage, reasons in (previous["counts"]["rejected"] if previous else {}).items()}
    turns_rejected = dict(previous["counts"].get("turns_rejected", {})) if previous else {}
    rejected_files = []
    for result in step_results:
        if not result.get("rejected"):
            continue
        path = Path(result["rejected"])
        table = pq.read_table(path, columns=[schema.STAGE, schema.REASON, schema.TURN])
        records = table.column(schema.TURN).null_count  # a turn refused while its record was kept is no record
        rejected_files.append({"path": path.relative_to(root).as_posix(), "rows": table.num_rows, "records": records})
        for stage, reason, turn in zip(*(table.column(c).to_pylist() for c in (schema.STAGE, schema.REASON, schema.TURN))):
            if turn is None:
                stage_counts = rejected_counts.setdefault(stage, {})
                stage_counts[reason] = stage_counts.get(reason, 0) + 1
            else:
                turns_rejected[reason] = turns_rejected.get(reason, 0) + 1

    read_now = stage_totals["ingest"].records_in if "ingest" in stage_totals else 0
    shards = (previous["shards"] if previous else []) + new_shards
    rejected_listed = (previous.get("rejected", []) if previous else []) + rejected_files
    read_total = (previous["counts"]["read"] if previous else 0) + read_now
    kept_total = sum(s.get("records", s["rows"]) for s in shards)  # records: rows before per_turn
    # Kept rows whose tokens before the last trained turn are not what inference shows there.
    render_mismatch = (previous["counts"].get("render_mismatch", 0) if previous else 0) + (
        stage_totals["tokenize"].extra.get("render_mismatch", 0) if "tokenize" in stage_totals else 0
    )
    rejected_total = sum(f.get("records", f["rows"]) for f in rejected_listed)
    if read_total != kept_total + rejected_total:
        raise AssertionError(
            f"conservation broken in {root}: read {read_total} records but shards hold {kept_total} and "
            f"rejected/ holds {rejected_total}; refusing to write a manifest that loses records"
        )

    version = plan.previous_version + 1
    index_parts = list(plan.index_parts)
    if dedup_result and (part := dedup_result["stats"].get("extra", {}).get("index_part")):
        # Remember only what reached the shards: a record that quality or tokenize dropped must
        # not make a later, better near-copy of it look like a duplicate.
        from pipeline.dedup.index import restrict_part

        kept_ids = [
            i for entry in new_shards
            for i in pq.read_table(root / entry["path"], columns=[schema.ID]).column(schema.ID).to_pylist()
        ]
        if restricted := restrict_part(root / DEDUP_INDEX, part, kept_ids):
            index_parts.append(restricted)
    listed = {s["path"] for s in shards} | {r["path"] for r in rejected_listed} | {f"{DEDUP_INDEX}/{p}" for p in index_parts}
    unlisted = _unlisted(root, listed)
    note = root / WORK / REMOVED_AT_BEGIN
    removed_at_begin = json.loads(note.read_text(encoding="utf-8")) if note.exists() else []
    created = manifest_io.now_iso()
    inputs = (previous.get("inputs", []) if previous else []) + [
        {"source": i.source, "sha256": i.sha256, "records": r["stats"]["records_in"]}
        for i, r in zip(plan.inputs, ingest_results)
    ]
    history = (previous.get("history", []) if previous else []) + [
        {"version": version, "created_at": created, "read": read_now,
         "kept": sum(s.get("records", s["rows"]) for s in new_shards),
         "shards_added": len(new_shards), "rebuild": plan.rebuild,
         "removed": sorted((set(removed_at_begin) - listed) | set(unlisted))}
    ]
    manifest = {
        "version": version,
        "created_at": created,
        "tokenizer": {"name": plan.tokenizer, "fingerprint": plan.tokenizer_fingerprint},
        "template": {"name": plan.template_name, "fingerprint": plan.template_fingerprint},
        "config": plan.config.model_dump(mode="json"),
        "config_fingerprint": plan.config_fingerprint,
        "code_version": plan.code_version,
        "inputs": inputs,
        "shards": shards,
        "rejected": rejected_listed,
        "dedup_index": index_parts,
        "counts": {
            "read": read_total,
            "kept": kept_total,
            "rejected": rejected_counts,
            "render_mismatch": render_mismatch,
            "rows": sum(s["rows"] for s in shards),
            "turns_rejected": turns_rejected,
        },
        "stages": [
            {**stage_totals[name].to_dict(), "name": name} for name in STAGE_ORDER if name in stage_totals
        ],
        "history": history,
    }
    manifest_io.write_manifest(root, manifest)
    _clean_up(root, unlisted)
    return manifest


def tidy(data_dir: Path) -> dict:
    """Nothing new to do: remove what a run killed after its manifest left behind; the manifest."""
    root = Path(data_dir)
    manifest = manifest_io.read_manifest(root)
    outdir.claim(root)
    _remove_temporaries(root)
    listed = (
        {s["path"] for s in manifest["shards"]} | {r["path"] for r in manifest["rejected"]}
        | {f"{DEDUP_INDEX}/{p}" for p in manifest.get("dedup_index", [])}
    )
    _clean_up(root, _unlisted(root, listed))
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


def _prepare_locked(paths: list[Path], tokenizer: str, data_dir: Path, config: SFTConfig, progress) -> dict:
    plan = plan_refresh(paths, tokenizer, data_dir, config)
    if plan.up_to_date:
        log.info("nothing new to prepare in %s", data_dir)
        return tidy(data_dir)
    begin_run(plan)
    notify = progress or (lambda stage, done, total: None)

    ingest_results = []
    for i, item in enumerate(plan.inputs):
        ingest_results.append(run_ingest(plan, item))
        notify("ingest", i + 1, len(plan.inputs))
    dedup_result = run_dedup(plan, ingest_results)
    notify("dedup", 1, 1)
    quality_results = []
    for chunk in range(len(dedup_result["outputs"])):
        quality_results.append(run_quality(plan, dedup_result, chunk))
        notify("quality", chunk + 1, len(dedup_result["outputs"]))
    tokenize_results = []
    for i, upstream in enumerate(quality_results):
        tokenize_results.append(run_tokenize(plan, upstream))
        notify("tokenize", i + 1, len(quality_results))
    shard_result = run_write_shards(plan, tokenize_results)
    notify("shards", 1, 1)
    return finalize(plan, ingest_results, dedup_result, quality_results, tokenize_results, shard_result)

"""The refresh flow: one Prefect task per pipeline step, nothing else.

Each task calls one plain function of ``pipeline.steps`` and passes file paths (small typed
step results), never data frames. Caching, retries and artifacts live here; the logic lives in ``pipeline``.

Cache keys come from content: a task's key is the step's work key (input sha256, upstream keys,
config, tokenizer and template fingerprints, code version) and is offered only while the step's
outputs are still on disk, so a deleted output folder is rebuilt rather than "restored" from a
stale cache entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._env import flow_runs_end_without_joining_heartbeats
from pipeline import outdir, steps
from pipeline.config import SFTConfig
from pipeline.ingest import expand_inputs

IO_RETRIES = dict(retries=2, retry_delay_seconds=[1, 5])

flow_runs_end_without_joining_heartbeats()


def _cache_key(stage: str, key_of):
    def cache_key_fn(context, parameters: dict[str, Any]) -> str | None:
        plan = parameters["plan"]
        key = key_of(plan, parameters)
        if steps.step_done(plan, stage, key) is None:
            return None
        return f"sftkit-{stage}-{key}"

    return cache_key_fn


@task(name="plan", **IO_RETRIES)
def plan_task(inputs: list[str], tokenizer: str, out: str, config: dict[str, Any]) -> steps.RunPlan:
    paths = expand_inputs(inputs)
    return steps.plan_refresh(paths, tokenizer, Path(out), SFTConfig.model_validate(config))


@task(name="begin")
def begin_task(plan: steps.RunPlan) -> None:
    steps.begin_run(plan)


@task(
    name="ingest",
    cache_key_fn=_cache_key("ingest", lambda plan, p: steps.ingest_key(plan, p["item"])),
    persist_result=True,
    **IO_RETRIES,
)
def ingest_task(plan: steps.RunPlan, item: steps.InputFile) -> steps.StepResult:
    # Ingest is Python: a big file beside others gets a process of its own (which makes its
    # signatures too), so mapped tasks use every core.
    signatures = steps.dedup_parts_worth_tasks(plan)
    size = steps.input_bytes(item.path)
    return steps.in_worker_process(steps.ingest_then_signatures, plan, item, signatures, input_bytes=size, alone=len(plan.inputs) == 1)


@task(name="dedup-signatures", **IO_RETRIES)
def dedup_signatures_task(plan: steps.RunPlan, ingest_result: steps.StepResult) -> str:
    if done := steps.signatures_done(plan, ingest_result):  # made with the ingest, or before
        return done
    json_bytes = 3 * steps.input_bytes(ingest_result.outputs[0])  # canonical Parquet: ~3x smaller than JSON
    return steps.in_worker_process(steps.dedup_signatures, plan, ingest_result, input_bytes=json_bytes)


@task(name="dedup-partition", **IO_RETRIES)
def dedup_partition_task(plan: steps.RunPlan, ingest_results: list[steps.StepResult], signature_paths: list[str], partition: int) -> str:
    return steps.dedup_partition(plan, ingest_results, signature_paths, partition)


@task(
    name="dedup-resolve",
    cache_key_fn=_cache_key("dedup", lambda plan, p: steps.dedup_key(plan, p["ingest_results"])),
    persist_result=True,
    **IO_RETRIES,
)
def dedup_resolve_task(
    plan: steps.RunPlan, ingest_results: list[steps.StepResult], signature_paths: list[str], edge_paths: list[str]
) -> steps.StepResult:
    return steps.run_dedup(plan, ingest_results, signature_paths, edge_paths)


def _dedup(plan: steps.RunPlan, ingest_results: list[steps.StepResult]) -> steps.StepResult:
    """Signatures mapped per chunk, band partitions mapped, clustering as the one global reduce.

    On one machine's threads the resolve task makes the partitions itself, on a thread per core
    (:func:`pipeline.dedup.dedup_stage`): a task per partition bought no parallelism those threads
    lack, and each cost the orchestrator a tenth of a second or more (8 partitions at 50k conversations: 0.8 s
    of wall time for 0.26 s of work). The ingest steps made the signatures; a chunk's is mapped
    only when missing (a run killed between the two)."""
    if not steps.dedup_parts_worth_tasks(plan):  # off, or a small run: the resolve task does it all
        return dedup_resolve_task(plan, ingest_results, [], [])
    if _one_machine():
        _mapped(dedup_signatures_task, [r for r in ingest_results if steps.signatures_done(plan, r) is None], plan)
        return dedup_resolve_task(plan, ingest_results, [], [])
    signatures = _mapped(dedup_signatures_task, ingest_results, plan)
    edges = _mapped(dedup_partition_task, steps.dedup_partitions(plan), plan, ingest_results, signatures)
    return dedup_resolve_task(plan, ingest_results, signatures, edges)


def _mapped(task_fn, items: list, *fixed: Any) -> list:
    """``task_fn(*fixed, item)`` for each item as mapped tasks; their results in order.

    On this process's threads (the default task runner) at most one task per core runs at a
    time: each one already keeps a core busy (a worker process, or numpy on every record's band
    hashes), and a thread pool's six or more at once would only hold that many processes or
    partitions in memory together. Other runners place the tasks themselves."""
    width = (os.cpu_count() or 1) if _one_machine() else len(items) or 1
    results = []
    for start in range(0, len(items), width):
        results += [f.result() for f in task_fn.map(*(unmapped(value) for value in fixed), items[start : start + width])]
    return results


@task(
    name="quality",
    cache_key_fn=_cache_key("quality", lambda plan, p: steps.quality_key(plan, p["upstream"].key, p["chunk"])),
    persist_result=True,
    **IO_RETRIES,
)
def quality_task(plan: steps.RunPlan, upstream: steps.StepResult, chunk: int) -> steps.StepResult:
    return steps.run_quality(plan, upstream, chunk)


@task(name="fingerprints")
def fingerprints_task(plan: steps.RunPlan) -> steps.RunPlan:
    return steps.with_fingerprints(plan)


@task(
    name="tokenize",
    cache_key_fn=_cache_key("tokenize", lambda plan, p: steps.tokenize_key(plan, p["upstream"].key)),
    persist_result=True,
    **IO_RETRIES,
)
def tokenize_task(plan: steps.RunPlan, upstream: steps.StepResult, stream_shards: bool = False) -> steps.StepResult:
    return steps.run_tokenize(plan, upstream, stream_shards)


@task(name="write-shards", **IO_RETRIES)
def shards_task(
    plan: steps.RunPlan, tokenize_results: list[steps.StepResult], dedup_result: steps.StepResult | None, stream_shards: bool = False
) -> steps.StepResult:
    return steps.run_write_shards(plan, tokenize_results, dedup_result, stream_shards)


@task(name="manifest", **IO_RETRIES)
def manifest_task(plan, ingest_results, dedup_result, quality_results, tokenize_results, shard_result) -> dict:
    return steps.finalize(plan, ingest_results, dedup_result, quality_results, tokenize_results, shard_result)


@flow(name="sftkit-refresh", description="Refresh a prepared SFT dataset from its inputs (incremental).")
def refresh_flow(inputs: list[str], tokenizer: str, out: str, config: dict[str, Any] | None = None) -> dict:
    # One run at a time per output folder, for the whole flow (pipeline.outdir); a second fails at
    # once. The tokenizer loads and tokenizes in a process of its own (pipeline.steps).
    config = config or SFTConfig().model_dump(mode="json")
    with outdir.hold(out), steps.tokenizer_process(tokenizer, SFTConfig.model_validate(config)):
        return _refresh(inputs, tokenizer, out, config)


def _refresh(inputs: list[str], tokenizer: str, out: str, config: dict[str, Any]) -> dict:
    logger = get_run_logger()
    plan = plan_task(inputs, tokenizer, out, config)
    if plan.up_to_date:
        logger.info("%s is up to date: all %d inputs were prepared before", out, len(plan.skipped_inputs))
        manifest = steps.tidy(Path(out))
        _publish(manifest, new_inputs=0, up_to_date=True)
        return manifest
    logger.info(
        "%s: %d new input(s), %d already prepared%s",
        out,
        len(plan.inputs),
        len(plan.skipped_inputs),
        " (tokenizer, template or config changed: rebuilding)" if plan.rebuild else "",
    )
    begin_task(plan)
    # On this process's threads each chunk's quality and tokenize steps already use every core
    # (worker processes, encoder threads): one chunk at a time, rather than two oversubscribing
    # the cores and holding two chunks' batches in memory. Other runners place the tasks themselves.
    one_machine = _one_machine()
    if one_machine:
        # The ingest tasks' worker processes serve one input after another and go once all are
        # in; a single input is ingested here, and the workers that sign it become the quality
        # workers: one set for all the chunks, ready beside dedup.
        with steps.reusing_workers():
            ingest_results = _mapped(ingest_task, plan.inputs, plan)
            steps.release_step_workers()
            steps.start_quality_workers(plan, ingest_results)
            dedup_result = _dedup(plan, ingest_results)
            quality_results = [quality_task(plan, dedup_result, chunk) for chunk in range(len(dedup_result.outputs))]
    else:
        with steps.reusing_workers():  # the ingest tasks' worker processes serve one input after another
            ingest_results = _mapped(ingest_task, plan.inputs, plan)
        dedup_result = _dedup(plan, ingest_results)
        chunks = list(range(len(dedup_result.outputs)))
        quality_results = [f.result() for f in quality_task.map(unmapped(plan), unmapped(dedup_result), chunks)]
    plan = fingerprints_task(plan)  # a first build's, its tokenizer loaded meanwhile
    if one_machine:
        # one chunk after another in the tokenizer process, which writes the shard files as they come
        tokenize_results = [tokenize_task(plan, upstream, stream_shards=True) for upstream in quality_results]
    else:
        tokenize_results = [f.result() for f in tokenize_task.map(unmapped(plan), quality_results)]
    shard_result = shards_task(plan, tokenize_results, dedup_result, stream_shards=one_machine)
    manifest = manifest_task(plan, ingest_results, dedup_result, quality_results, tokenize_results, shard_result)
    logger.info("manifest version %s: %s", manifest["version"], manifest["counts"])
    _publish(manifest, new_inputs=len(plan.inputs), up_to_date=False)
    return manifest


def _one_machine() -> bool:
    """Whether this flow's tasks run in this process's threads (the default task runner)."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner)


def _publish(manifest: dict, new_inputs: int, up_to_date: bool) -> None:
    """Per-stage table and a markdown summary, as run artifacts."""
    rows = []
    for stage in manifest["stages"]:
        rows.append(
            {
                "stage": stage["name"],
                "records_in": stage["records_in"],
                "records_out": stage["records_out"],
                "seconds": stage["seconds"],
                "rejected": ", ".join(f"{k}={v}" for k, v in stage.get("rejected", {}).items()) or "-",
            }
        )
    if not up_to_date:
        create_table_artifact(table=rows, key="sftkit-stages", description="Per-stage counts and seconds of this refresh")
    counts = manifest["counts"]
    lines = [
        f"# sftkit refresh: version {manifest['version']}",
        "",
        "Nothing new: every input was prepared before." if up_to_date else f"New inputs processed: **{new_inputs}**",
        "",
        f"- records read (all versions): **{counts['read']}**",
        f"- rows kept in shards: **{counts['kept']}**",
        f"- shards: {len(manifest['shards'])} files, "
        f"{sum(s['tokens'] for s in manifest['shards'])} tokens, "
        f"{sum(s['trainable_tokens'] for s in manifest['shards'])} trained",
        "",
        "| stage | reason | rows |",
        "|---|---|---|",
    ]
    for stage, reasons in sorted(counts["rejected"].items()):
        for reason, n in sorted(reasons.items()):
            lines.append(f"| {stage} | {reason} | {n} |")
    create_markdown_artifact(markdown="\n".join(lines), key="sftkit-summary", description="Refresh summary")

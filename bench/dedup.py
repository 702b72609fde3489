"""Dedup benchmark: sftkit vs datasketch, side by side on the same documents.

    .venv/bin/python -m bench.dedup [--pairs 10000] [--rss-docs 200000 1000000] [--refresh-index-docs 1000000]

1. Speed, on the same ``2 x pairs`` documents (a generated near-duplicate set, 80 % English-like
   word text, 20 % Chinese), same num_perm (128) and the same shingles (sftkit's normal form
   and n-grams; datasketch hashes the shingle strings with its default sha1):
   * datasketch: ``MinHash.update`` per shingle, ``MinHashLSH(threshold=0.8).insert`` every
     document, then ``query`` every document (its documented way); also ``update_batch``.
   * sftkit: :func:`pipeline.dedup.dedup_stage` end to end (Parquet in, Parquet out, exact
     dedup, LSH, verification, clustering, index part), and its signature step alone.
2. Accuracy against exact Jaccard: each pair is (base, variant) with a target Jaccard drawn
   uniformly from [0.6, 1.0] (edits at random positions); the truth is the exact Jaccard of the
   two shingle sets, positive when >= 0.8. sftkit runs with its default (exact-Jaccard
   verification) and with ``verify_exact=False`` (MinHash estimate only: what it did against an
   earlier run's index before the index kept shingle sets, and still does against an index part
   of that older format). A pair is predicted a duplicate by sftkit when one member is removed
   as a duplicate of the other, by datasketch when the query of one returns the other (and, for
   "datasketch + verify", its MinHash.jaccard estimate is >= 0.8).
   ``incremental``: the same pairs over two refreshes, every base in the first and every variant
   in the second (deduplicated against the first's index part); and the index part's size.
3. Split refreshes against one full build (``split_vs_full``): ~1,000 records in near-duplicate
   groups (a base and 0-3 variants at Jaccard 0.6-1.0, shuffled), deduplicated in one run and
   as two refreshes of one half each; kept rows of both, and the groups that keep a different
   number of rows, by cause: ``misjudged_pair`` (a pair decided against its exact Jaccard: none
   once every pair is verified exactly), ``bridge`` (a later record links two records the first
   refresh kept apart) and ``chain_through_removed`` (it resembles only a record the first refresh
   removed); see ``pipeline.dedup``. Also with pairs only (a base and one variant), where
   refreshes and the full build must agree.
4. Peak RSS of ``dedup_stage`` over N short synthetic documents (10 % near duplicates), each
   in a fresh subprocess, in chunks of 50k rows; and of a refresh of 20k documents (half of them
   near copies of indexed ones) against the index of ``--refresh-index-docs`` such documents.

Writes bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import (
    argument_parser,
    module_command,
    proc_status_bytes,
    run_child,
    stopwatch,
    two_message_conversations,
    write_results,
)
from pipeline import schema
from pipeline.config import DedupConfig, SFTConfig
from pipeline.dedup import dedup_stage, lsh_shape
from pipeline.dedup.lsh import table_signatures
from pipeline.dedup.minhash import candidate_probability
from pipeline.dedup.normalize import normalize
from pipeline.dedup.shingles import shingle_strings

THRESHOLD = 0.8
NUM_PERM = 128
HANZI = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 3000)])


def s_curve_table(bands: int, rows: int, points=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> str:
    """The S-curve as text: how likely a pair of each Jaccard similarity becomes a candidate."""
    return ", ".join(f"J={j:.2f}: {candidate_probability(j, bands, rows):.3f}" for j in points)


def vocabulary(size: int = 30_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths])


def zipf_words(rng: np.random.Generator, vocab: np.ndarray, n: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.15, n), len(vocab)) - 1
    return vocab[ranks].tolist()


def make_pairs(num_pairs: int, seed: int = 1) -> tuple[list[str], list[tuple[int, int]]]:
    """Documents ``[base_0, variant_0, base_1, variant_1, ...]`` and the pairs."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    docs: list[str] = []
    for _ in range(num_pairs):
        chinese = rng.random() < 0.2
        length = int(rng.integers(120, 300))
        tokens = HANZI[rng.integers(0, len(HANZI), length)].tolist() if chinese else zipf_words(rng, vocab, length)
        target = rng.uniform(0.6, 1.0)
        shingles = max(length - 4, 1)
        edits = int(round(shingles * (1 - target) / (5 * (1 + target))))
        variant = list(tokens)
        for pos in rng.choice(length, size=min(edits, length), replace=False):
            kind = rng.random()
            replacement = HANZI[rng.integers(0, len(HANZI))] if chinese else vocab[rng.integers(0, len(vocab))]
            if kind < 0.7:
                variant[pos] = str(replacement)
            elif kind < 0.85:
                variant[pos] = ""  # deletion
            else:
                variant[pos] = variant[pos] + (" " if not chinese else "") + str(replacement)  # insertion
        sep = "" if chinese else " "
        docs.append(sep.join(tokens))
        docs.append(sep.join(t for t in variant if t))
    return docs, [(2 * i, 2 * i + 1) for i in range(num_pairs)]


def exact_jaccard(a: str, b: str, config: DedupConfig) -> float:
    def shingle_set(text: str) -> set[str]:
        form, cjk = normalize(text)
        count = len(form.split(" ")) if form else 0
        n = config.char_ngram if 2 * cjk > count else config.word_ngram
        return set(shingle_strings(form, n))

    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def canonical_table(docs: list[str], prompt: str = "") -> pa.Table:
    """A canonical-schema table, one user + one assistant message per document (vectorised).

    The prompt is empty so that the dedup key (all contents) is exactly the document and
    sftkit sees the same shingle sets as the ground truth and datasketch."""
    n = len(docs)
    return pa.table(
        {
            schema.ID: pa.array([f"{i:032x}" for i in range(n)]),
            schema.SOURCE: pa.array(["bench.jsonl"] * n),
            schema.SOURCE_INDEX: pa.array(np.arange(n, dtype=np.int64)),
            schema.MESSAGES: two_message_conversations(pa.array([x for d in docs for x in (prompt, d)])),
            schema.TOOLS: pa.nulls(n, pa.string()),
        },
        schema=schema.CONVERSATION_SCHEMA,
    )


def run_datasketch(docs: list[str], config: DedupConfig, batch: bool):
    """((wall s, CPU s), per document the set of other documents its query returned, MinHashes)."""
    with stopwatch() as lap:
        minhashes, found = _datasketch_minhash_lsh(docs, config, batch)
    return (lap.seconds, lap.cpu_seconds), found, minhashes


def _datasketch_minhash_lsh(docs: list[str], config: DedupConfig, batch: bool):
    from datasketch import MinHash, MinHashLSH

    minhashes = []
    for text in docs:
        form, cjk = normalize(text)
        count = len(form.split(" ")) if form else 0
        n = config.char_ngram if 2 * cjk > count else config.word_ngram
        m = MinHash(num_perm=NUM_PERM, seed=config.seed)
        shingles = [s.encode("utf-8") for s in shingle_strings(form, n)]
        if batch:
            m.update_batch(shingles)
        else:
            for s in shingles:
                m.update(s)
        minhashes.append(m)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    found = [set(lsh.query(m)) - {i} for i, m in enumerate(minhashes)]
    return minhashes, found


def run_sftkit(docs: list[str], config: DedupConfig, workdir: Path) -> tuple[tuple[float, float], float, list[dict]]:
    table = canonical_table(docs)
    chunk = 5000
    ins, outs = [], []
    for k, start in enumerate(range(0, len(docs), chunk)):
        ins.append(workdir / f"in-{k}.parquet")
        outs.append(workdir / f"out-{k}.parquet")
        pq.write_table(table.slice(start, chunk), ins[-1])
    # warm-up on 50 documents: one-time imports and table building are not per-document cost
    warm = workdir / "warm"
    warm.mkdir()
    pq.write_table(table.slice(0, 50), warm / "in.parquet")
    dedup_stage([warm / "in.parquet"], [warm / "out.parquet"], warm / "rejected.parquet", SFTConfig(dedup=config), index_dir=warm / "index")
    with stopwatch() as lap:
        dedup_stage(ins, outs, workdir / "rejected.parquet", SFTConfig(dedup=config), index_dir=workdir / "index")
    rejected_path = workdir / "rejected.parquet"
    rejected = pq.read_table(rejected_path).to_pylist() if rejected_path.exists() else []
    with stopwatch() as signatures:
        table_signatures(table, config)
    return (lap.seconds, lap.cpu_seconds), signatures.seconds, rejected


def precision_recall(predicted: set[tuple[int, int]], truth: set[tuple[int, int]], pairs) -> dict:
    tp = len(predicted & truth)
    fp = len(predicted - truth)
    fn = len(truth - predicted)
    return {
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def band(pairs, jaccards, lo, hi):
    return {p for p, j in zip(pairs, jaccards) if lo <= j < hi}


def speed_and_accuracy(num_pairs: int) -> dict:
    config = DedupConfig(threshold=THRESHOLD, num_perm=NUM_PERM)
    docs, pairs = make_pairs(num_pairs)
    print(f"generated {len(docs)} documents ({num_pairs} pairs); exact Jaccard ground truth ...", flush=True)
    jaccards = [exact_jaccard(docs[a], docs[b], config) for a, b in pairs]
    truth = {p for p, j in zip(pairs, jaccards) if j >= THRESHOLD}
    pair_set = set(pairs)

    with tempfile.TemporaryDirectory() as work:
        sft_seconds, sig_seconds, rejected = run_sftkit(docs, config, Path(work))
    print(f"sftkit dedup_stage: {sft_seconds[0]:.1f} s wall, {sft_seconds[1]:.1f} s CPU", flush=True)
    with tempfile.TemporaryDirectory() as work:
        estimate_config = config.model_copy(update={"verify_exact": False})
        _, _, rejected_estimate = run_sftkit(docs, estimate_config, Path(work))
    id_to_row = {f"{i:032x}": i for i in range(len(docs))}

    def removed_pairs(rejected_rows: list[dict]) -> set[tuple[int, int]]:
        return {tuple(sorted((id_to_row[r["id"]], id_to_row[r["duplicate_of"]]))) for r in rejected_rows}

    sft_pred = removed_pairs(rejected)
    stray = sft_pred - pair_set
    sft_pred &= pair_set
    sft_estimate = removed_pairs(rejected_estimate) & pair_set

    run_datasketch(docs[:50], config, batch=False)  # warm-up, as for sftkit
    ds_seconds, found, minhashes = run_datasketch(docs, config, batch=False)
    print(f"datasketch update-per-shingle + LSH: {ds_seconds[0]:.1f} s wall, {ds_seconds[1]:.1f} s CPU", flush=True)
    ds_batch_seconds, _, _ = run_datasketch(docs, config, batch=True)
    print(f"datasketch update_batch + LSH: {ds_batch_seconds[0]:.1f} s wall, {ds_batch_seconds[1]:.1f} s CPU")
    ds_pred = {(a, b) for a, b in pairs if b in found[a] or a in found[b]}
    ds_verified = {(a, b) for a, b in ds_pred if minhashes[a].jaccard(minhashes[b]) >= THRESHOLD}

    bands, rows = lsh_shape(config)
    near = band(pairs, jaccards, 0.75, 0.85)
    incremental = incremental_accuracy(docs, pairs, truth, near, config)
    print(f"sftkit over two refreshes: {json.dumps(incremental)}", flush=True)
    result = {
        "documents": len(docs),
        "num_perm": NUM_PERM,
        "threshold": THRESHOLD,
        "sftkit_lsh": f"{bands} bands x {rows} rows",
        "sftkit_s_curve": s_curve_table(bands, rows),
        "speed_docs_per_s": {
            "sftkit_dedup_stage_end_to_end": round(len(docs) / sft_seconds[0]),
            "sftkit_signatures_only": round(len(docs) / sig_seconds),
            "datasketch_update_per_shingle_lsh": round(len(docs) / ds_seconds[0]),
            "datasketch_update_batch_lsh": round(len(docs) / ds_batch_seconds[0]),
        },
        "cpu_seconds": {
            "sftkit_dedup_stage_end_to_end": round(sft_seconds[1], 2),
            "datasketch_update_per_shingle_lsh": round(ds_seconds[1], 2),
            "datasketch_update_batch_lsh": round(ds_batch_seconds[1], 2),
        },
        # wall clock on a machine shared with other jobs; the CPU-time ratio is less noisy
        "speedup_end_to_end_vs_datasketch_update": round(ds_seconds[0] / sft_seconds[0], 1),
        "speedup_end_to_end_vs_datasketch_update_batch": round(ds_batch_seconds[0] / sft_seconds[0], 1),
        "cpu_speedup_vs_datasketch_update": round(ds_seconds[1] / sft_seconds[1], 1),
        "cpu_speedup_vs_datasketch_update_batch": round(ds_batch_seconds[1] / sft_seconds[1], 1),
        "accuracy_all_pairs": {
            "pairs": len(pairs),
            "positives": len(truth),
            "sftkit": precision_recall(sft_pred, truth, pairs),
            "sftkit_estimate_verify_only": precision_recall(sft_estimate, truth, pairs),
            "datasketch_lsh": precision_recall(ds_pred, truth, pairs),
            "datasketch_lsh_plus_estimate_verify": precision_recall(ds_verified, truth, pairs),
        },
        "accuracy_pairs_with_jaccard_0.75_to_0.85": {
            "pairs": len(near),
            "positives": len(near & truth),
            "sftkit": precision_recall(sft_pred & near, truth & near, near),
            "sftkit_estimate_verify_only": precision_recall(sft_estimate & near, truth & near, near),
            "datasketch_lsh": precision_recall(ds_pred & near, truth & near, near),
            "datasketch_lsh_plus_estimate_verify": precision_recall(ds_verified & near, truth & near, near),
        },
        "sftkit_removals_outside_generated_pairs": len(stray),
        "incremental": incremental,
    }
    return result


def write_chunks(table: pa.Table, folder: Path, chunk: int = 5000) -> tuple[list[Path], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    ins, outs = [], []
    for k, start in enumerate(range(0, table.num_rows, chunk)):
        ins.append(folder / f"in-{k:05d}.parquet")
        outs.append(folder / f"out-{k:05d}.parquet")
        pq.write_table(table.slice(start, chunk), ins[-1])
    return ins, outs


def run_refreshes(tables: list[pa.Table], config: DedupConfig, workdir: Path) -> tuple[list[dict], list[dict]]:
    """Dedup ``tables`` as consecutive refreshes into one index (each against the parts of the
    ones before, as a dataset manifest lists them); (kept rows, rejected rows) of all refreshes."""
    parts: list[str] = []
    kept: list[dict] = []
    rejected: list[dict] = []
    for k, table in enumerate(tables):
        ins, outs = write_chunks(table, workdir / f"refresh-{k}")
        rejected_path = workdir / f"refresh-{k}" / "rejected.parquet"
        outcome = dedup_stage(ins, outs, rejected_path, SFTConfig(dedup=config), index_dir=workdir / "index", index_parts=parts)
        parts += [outcome.index_part] if outcome.index_part else []
        kept += [row for p in outs for row in pq.read_table(p, columns=[schema.ID, schema.SOURCE, schema.SOURCE_INDEX]).to_pylist()]
        rejected += pq.read_table(rejected_path).to_pylist() if rejected_path.exists() else []
    return kept, rejected


def index_bytes_per_1k_records(index_dir: Path) -> float:
    from pipeline.dedup.index import PART_NAME, load_index

    parts = sorted(p for p in index_dir.iterdir() if PART_NAME.match(p.name))
    rows = load_index(index_dir, [p.name for p in parts]).num_rows
    return round(sum(p.stat().st_size for p in parts) / rows * 1000) if rows else 0.0


def incremental_accuracy(docs: list[str], pairs, truth, near, config: DedupConfig) -> dict:
    """Bases in a first refresh, variants in a second: what the second removes."""
    table = canonical_table(docs)
    bases, variants = table.take(pa.array([a for a, _ in pairs])), table.take(pa.array([b for _, b in pairs]))
    with tempfile.TemporaryDirectory() as work:
        with stopwatch() as lap:
            _, rejected = run_refreshes([bases, variants], config, Path(work))
        part_bytes = index_bytes_per_1k_records(Path(work) / "index")
    row_of = {f"{i:032x}": i for i in range(len(docs))}
    predicted = {tuple(sorted((row_of[r["id"]], row_of[r["duplicate_of"]]))) for r in rejected} & set(pairs)
    return {
        "seconds_both_refreshes": round(lap.seconds, 2),
        "index_part_bytes_per_1k_records": part_bytes,
        "all_pairs": precision_recall(predicted, truth, pairs),
        "pairs_with_jaccard_0.75_to_0.85": precision_recall(predicted & near, truth & near, near),
    }


def near_duplicate_groups(bases: int, variants_p: Sequence[float], seed: int = 7) -> tuple[list[str], list[int]]:
    """Shuffled documents, each a base or a variant of one (Jaccard 0.6-1.0 by edits), and their group."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    docs, groups = [], []
    for group in range(bases):
        length = int(rng.integers(60, 140))
        base = zipf_words(rng, vocab, length)
        docs.append(" ".join(base))
        groups.append(group)
        for _ in range(int(rng.choice(len(variants_p), p=list(variants_p)))):
            target = rng.uniform(0.6, 1.0)
            edits = int(round(max(length - 4, 1) * (1 - target) / (5 * (1 + target))))
            variant = list(base)
            for pos in rng.choice(length, size=min(edits, length), replace=False):
                variant[pos] = str(vocab[rng.integers(0, len(vocab))])
            docs.append(" ".join(variant))
            groups.append(group)
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], [groups[i] for i in order]


def split_vs_full(bases: int, variants_p: Sequence[float], config: DedupConfig) -> dict:
    """Kept rows of one run against two refreshes of one half each, and where they differ."""
    docs, groups = near_duplicate_groups(bases, variants_p)
    table = canonical_table(docs)
    half = len(docs) // 2
    with tempfile.TemporaryDirectory() as work:
        kept_full, _ = run_refreshes([table], config, Path(work) / "full")
        kept_split, _ = run_refreshes([table.slice(0, half), table.slice(half)], config, Path(work) / "split")
    full = {r[schema.SOURCE_INDEX] for r in kept_full}
    split = {r[schema.SOURCE_INDEX] for r in kept_split}
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    causes = {"misjudged_pair": 0, "bridge": 0, "chain_through_removed": 0}
    for rows in members.values():
        kept_by_full, kept_by_split = sum(r in full for r in rows), sum(r in split for r in rows)
        if kept_by_full == kept_by_split:
            continue
        linked = {(a, b) for a in rows for b in rows if a < b and exact_jaccard(docs[a], docs[b], config) >= config.threshold}
        if kept_by_split < kept_by_full or len(linked) == len(rows) * (len(rows) - 1) // 2:
            # With every pair judged by its exact Jaccard, refreshes keep at least one row per
            # full-build group, and exactly one of a group whose members are all near duplicates
            # of one another; anything else is a pair decided against its exact Jaccard.
            causes["misjudged_pair"] += 1
        elif _components([r for r in rows if r < half], linked) > 1:
            causes["bridge"] += 1  # the first refresh kept two records that a later one links
        else:
            causes["chain_through_removed"] += 1  # linked through a record the first refresh removed
    return {
        "records": len(docs),
        "groups": len(members),
        "kept_full_build": len(full),
        "kept_split_refreshes": len(split),
        "groups_keeping_a_different_number": sum(causes.values()),
        "by_cause": causes,
    }


def _components(rows: list[int], linked: set[tuple[int, int]]) -> int:
    parent = {r: r for r in rows}

    def root(r: int) -> int:
        while parent[r] != r:
            r = parent[r]
        return r

    for a, b in linked:
        if a in parent and b in parent:
            parent[root(a)] = root(b)
    return len({root(r) for r in rows})


def rss_child(work: Path, index_parts: Sequence[str] = ()) -> dict:
    """In a fresh process (``--rss-child DIR [PART ...]``): dedup the chunks in ``work`` with the
    defaults, against the given parts of ``work/../index`` if any (else into ``work/index``)."""
    ins = sorted(work.glob("in-*.parquet"))
    outs = [work / p.name.replace("in-", "out-") for p in ins]
    index_dir = work.parent / "index" if index_parts else work / "index"
    with stopwatch() as lap:
        outcome = dedup_stage(ins, outs, work / "rejected.parquet", SFTConfig(), index_dir=index_dir, index_parts=list(index_parts))
    stats = outcome.stats
    return {
        "seconds": lap.seconds,
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak RSS (Linux carries it
        # over fork and exec), so it would report this benchmark's own memory, not the dedup's.
        "peak_rss_mb": proc_status_bytes("VmHWM")["VmHWM"] / 2**20,
        "kept": stats.records_out,
        "rejected": dict(stats.rejected),
        "index_part": outcome.index_part,
    }


def write_short_docs(num_docs: int, work: Path, chunk: int = 50_000, seed: int = 3, copies_of: Path | None = None) -> None:
    """Chunks of short documents, 10 % near duplicates of earlier ones; with ``copies_of`` (a
    folder of such chunks) half of them are near copies of that folder's first chunk instead."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    originals = None
    if copies_of:
        first_chunk = pq.read_table(sorted(copies_of.glob("in-*.parquet"))[0], columns=[schema.MESSAGES])
        originals = first_chunk.column(schema.MESSAGES).combine_chunks().flatten().field("content").to_pylist()[1::2]
    work.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, num_docs, chunk)):
        n = min(chunk, num_docs - start)
        lengths = rng.integers(20, 60, n)
        ranks = np.minimum(rng.zipf(1.15, int(lengths.sum())), len(vocab)) - 1
        words = vocab[ranks]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        docs = [" ".join(words[bounds[i] : bounds[i + 1]]) for i in range(n)]
        for i in np.flatnonzero(rng.random(n) < 0.1)[1:]:  # 10 % near duplicates of an earlier doc
            src = docs[int(rng.integers(0, i))].split(" ")
            src[int(rng.integers(0, len(src)))] = "edit"
            docs[i] = " ".join(src)
        if originals is not None:
            for i in range(0, n, 2):
                src = originals[int(rng.integers(0, len(originals)))].split(" ")
                src[-1] = "edit"  # one shingle of ~35 changed: Jaccard ~0.94, a candidate verified against the index
                docs[i] = " ".join(src)
        table = canonical_table(docs)
        offset = start + (10**9 if copies_of else 0)  # ids and indices apart from the indexed documents'
        ids = pa.array([f"{offset + i:032x}" for i in range(n)])
        table = table.set_column(0, schema.ID, ids).set_column(
            2, schema.SOURCE_INDEX, pa.array(np.arange(offset, offset + n, dtype=np.int64))
        )
        pq.write_table(table, work / f"in-{k:05d}.parquet")


def peak_rss(num_docs: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        write_short_docs(num_docs, Path(work))
        out = run_child(module_command(__spec__.name, "--rss-child", work)).last_json()
    out["documents"] = num_docs
    out["docs_per_s"] = round(num_docs / out["seconds"])
    return out


def refresh_peak_rss(index_docs: int, new_docs: int = 20_000) -> dict:
    """Peak RSS of a refresh of ``new_docs`` against the index of ``index_docs`` (built first, in
    another process); the index part's size."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_short_docs(index_docs, work / "old")
        built = run_child(module_command(__spec__.name, "--rss-child", work / "old")).last_json()
        (work / "old" / "index").rename(work / "index")
        write_short_docs(new_docs, work / "new", seed=4, copies_of=work / "old")
        out = run_child(module_command(__spec__.name, "--rss-child", work / "new", built["index_part"])).last_json()
        part = work / "index" / built["index_part"]
        out |= {
            "index_documents": built["kept"],
            "index_part_bytes": part.stat().st_size,
            "index_part_bytes_per_1k_records": round(part.stat().st_size / built["kept"] * 1000),
            "documents": new_docs,
        }
    return out


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=10_000, help="near-duplicate pairs (documents = 2 x pairs)")
    parser.add_argument("--rss-docs", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--refresh-index-docs", type=int, default=1_000_000, help="index size for the refresh's peak RSS (0: skip)")
    parser.add_argument("--rss-child", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child[0], [str(p) for p in args.rss_child[1:]])))
        return

    results = speed_and_accuracy(args.pairs)
    speed = results["speed_docs_per_s"]
    print(json.dumps(results, indent=2))
    print(
        f"\nspeed: sftkit {speed['sftkit_dedup_stage_end_to_end']} docs/s end to end vs datasketch "
        f"{speed['datasketch_update_per_shingle_lsh']} docs/s -> {results['speedup_end_to_end_vs_datasketch_update']}x "
        f"({results['speedup_end_to_end_vs_datasketch_update_batch']}x vs update_batch); by CPU time "
        f"{results['cpu_speedup_vs_datasketch_update']}x and {results['cpu_speedup_vs_datasketch_update_batch']}x",
        flush=True,
    )
    config = DedupConfig(threshold=THRESHOLD, num_perm=NUM_PERM)
    results["split_vs_full"] = {
        "groups_of_1_to_4": split_vs_full(452, (0.25, 0.35, 0.25, 0.15), config),
        "pairs_only": split_vs_full(515, (0.0, 1.0), config),
    }
    print(json.dumps(results["split_vs_full"], indent=2), flush=True)
    results["peak_rss"] = []
    for num_docs in args.rss_docs:
        print(f"peak RSS run: {num_docs} documents ...", flush=True)
        measured = peak_rss(num_docs)
        print(json.dumps(measured), flush=True)
        results["peak_rss"].append(measured)
    if args.refresh_index_docs:
        print(f"peak RSS of a refresh against an index of {args.refresh_index_docs} documents ...", flush=True)
        results["refresh_peak_rss"] = refresh_peak_rss(args.refresh_index_docs)
        print(json.dumps(results["refresh_peak_rss"]), flush=True)
    write_results("dedup", results, args.out, packages=["datasketch"])


if __name__ == "__main__":
    main()

"""Dedup's global step in bulk (issue 16, items 1 and 2): candidates from whole band columns,
similarities of many pairs at once from values spilled to disk, clusters as arrays, the quality
predicate asked lazily. The decisions must be the ones the per-pair rules give, whatever the
block sizes the work is cut into."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import DedupConfig
from pipeline.dedup import cluster, compute_signatures, lsh, nodes, outputs
from pipeline.dedup import index as dedup_index
from pipeline.dedup.minhash import estimated_jaccard
from tests.pipeline.dedup.test_dedup import conv, id_of, kept_ids, run, words, write_chunk


def reference_bucket_pairs(keys: np.ndarray, nodes_: np.ndarray) -> set[tuple[int, int]]:
    """The per-bucket rule: all pairs of a bucket of up to 32 nodes, a star plus a chain above."""
    buckets: dict[int, list[int]] = {}
    for key, node in zip(keys.tolist(), nodes_.tolist()):
        buckets.setdefault(key, []).append(node)
    pairs = set()
    for members in buckets.values():
        members.sort()
        if len(members) <= 32:
            pairs |= {(a, b) for i, a in enumerate(members) for b in members[i + 1 :]}
        else:
            pairs |= {(members[0], b) for b in members[1:]} | set(zip(members[1:-1], members[2:]))
    return pairs


def test_candidates_from_all_buckets_at_once_follow_the_per_bucket_rule():
    rng = np.random.default_rng(5)
    sizes = [1] * 50 + [2] * 20 + [3, 5, 17, 32, 33, 40, 100]
    keys = np.concatenate([np.full(size, rng.integers(0, 2**63), dtype=np.uint64) for size in sizes])
    node_ids = rng.permutation(len(keys)).astype(np.int64)
    order = rng.permutation(len(keys))
    got = lsh._bucket_pairs(keys[order], node_ids[order])
    assert got.dtype == np.int64 and np.all(got[:, 0] < got[:, 1])
    assert len(got) == len({tuple(p) for p in got.tolist()}) == len(reference_bucket_pairs(keys, node_ids))
    assert {tuple(p) for p in got.tolist()} == reference_bucket_pairs(keys, node_ids)


def signature_files(tmp_path: Path, docs: list[list[dict]], per_chunk: int) -> list[Path]:
    paths = []
    for k, start in enumerate(range(0, len(docs), per_chunk)):
        chunk = write_chunk(tmp_path / f"in-{k}.parquet", docs[start : start + per_chunk])
        paths.append(tmp_path / f"sig-{k}.arrow")
        compute_signatures(chunk, paths[-1], DedupConfig())
    return paths


def test_pair_similarities_in_blocks_equal_the_per_pair_values(tmp_path, monkeypatch):
    monkeypatch.setattr(lsh, "_BATCH_ROWS", 7)  # signature files of many small row groups
    monkeypatch.setattr(nodes, "_ESTIMATE_BLOCK_PAIRS", 5)
    monkeypatch.setattr(nodes, "_JACCARD_BLOCK_VALUES", 300)
    rng = random.Random(3)
    docs = [conv("q", " ".join(words(rng.randrange(8), 80) + words(100 + i, rng.randrange(0, 30)))) for i in range(40)]
    docs += [conv("", "!!"), conv("", "?")]  # no shingles at all: the Jaccard of two empty sets is 1
    paths = signature_files(tmp_path, docs, per_chunk=15)
    tables = [lsh.read_signature_file(p).select([dedup_index.SIGNATURE, dedup_index.SHINGLES]) for p in paths]
    signatures = np.concatenate([t.column(0).combine_chunks().flatten().to_numpy().reshape(-1, 128) for t in tables])
    sets = [set(s) for t in tables for s in t.column(1).to_pylist()]
    a = np.array([rng.randrange(35) for _ in range(200)] + [40], dtype=np.int64)
    b = np.array([rng.randrange(35) for _ in range(200)] + [41], dtype=np.int64)
    used = np.unique(np.concatenate([a, b]))
    rows = nodes.NewRows(paths)

    store = nodes.SignatureStore(tmp_path / "sig.u32", used, rows, None, [], 128)
    assert np.array_equal(store.estimates(a, b), estimated_jaccard(signatures[a], signatures[b]))

    shingles = nodes.ShingleStore(tmp_path / "sets.u32", used, rows, None, [])
    jaccard, known = shingles.jaccards(a, b)
    expected = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 1.0 for i, j in zip(a, b)]
    assert known.all() and jaccard.tolist() == expected and jaccard[-1] == 1.0
    with pytest.raises(KeyError):  # a node whose values were not gathered is an error, not a wrong row
        store.estimates(np.array([36]), a[:1])


def corpus() -> tuple[list[list[dict]], list[list[dict]]]:
    """Records with exact copies, near copies, chains and a large template group: a first
    refresh, and a second one that meets the first's index."""
    rng = random.Random(11)
    first, second = [], []
    for group in range(30):
        base = words(1000 + group, 60)
        for _ in range(rng.choice([1, 1, 2, 3, 5])):
            text = list(base)
            for _edit in range(rng.randrange(0, 4)):
                text[rng.randrange(len(text))] = rng.choice(["edit", "other", "word"])
            record = conv(rng.choice(["Explain.", "explain", "Explain!"]), " ".join(text) + " end" * rng.randrange(3))
            (first if rng.random() < 0.6 else second).append(record)
    first += [conv("Template:", " ".join(words(7, 40) + [f"n{i}"])) for i in range(45)]  # a bucket of more than 32
    rng.shuffle(first)
    rng.shuffle(second)
    return first, second


def dedup_twice(tmp_path: Path, name: str, is_good):
    first, second = corpus()
    index_dir = tmp_path / name / "index"
    one, kept1, rejected1, _ = run(tmp_path / name, [first[:40], first[40:]], name="one", index_dir=index_dir, is_good=is_good)
    _, kept2, rejected2, _ = run(tmp_path / name, [second], name="two", index_dir=index_dir, index_parts=[one.index_part], is_good=is_good)
    return kept_ids(kept1), rejected1, kept_ids(kept2), rejected2, (index_dir / one.index_part).read_bytes()


def test_small_blocks_and_batches_decide_exactly_as_large_ones(tmp_path, monkeypatch):
    def is_good(record):
        return "other" not in record[schema.MESSAGES][1]["content"]

    for name in ("large", "small"):
        (tmp_path / name).mkdir()
    large = dedup_twice(tmp_path, "large", is_good)
    assert large[1] and large[3]  # both refreshes removed something
    for module, constant, value in [
        (lsh, "_BATCH_ROWS", 4),
        (nodes, "_ESTIMATE_BLOCK_PAIRS", 3),
        (nodes, "_JACCARD_BLOCK_VALUES", 50),
        (cluster, "_CROSS_PAIRS", 2),
        (outputs, "_BATCH_ROWS", 5),
        (dedup_index, "_ROW_GROUP_ROWS", 6),
    ]:
        monkeypatch.setattr(module, constant, value)
    small = dedup_twice(tmp_path, "small", is_good)
    assert small[:4] == large[:4]
    assert pa.ipc.open_file(pa.BufferReader(small[4])).read_all().equals(pa.ipc.open_file(pa.BufferReader(large[4])).read_all())


def test_quality_is_asked_about_duplicates_only_until_one_passes(tmp_path):
    base = " ".join(words(70, 80))
    group = [conv("Explain.", base + " more" * (12 - i)) for i in range(12)]  # longest first in keep order
    loners = [conv("Explain.", " ".join(words(80 + i, 80))) for i in range(5)]
    asked = []
    failing = {id_of(group[0]), id_of(group[1])}

    def is_good(record):
        asked.append(record[schema.ID])
        return record[schema.ID] not in failing

    _, kept, rejected, _ = run(tmp_path, [group[6:] + loners, group[:6]], is_good=is_good)
    assert set(kept_ids(kept)) == {id_of(group[2])} | {id_of(d) for d in loners}
    assert {r["duplicate_of"] for r in rejected} == {id_of(group[2])}
    # never about a record without duplicates; not about every member of the group either
    assert set(asked) <= {id_of(d) for d in group} and len(asked) < len(group)
    assert asked[0] == id_of(group[0])


def test_a_new_record_near_several_old_ones_goes_as_a_copy_of_the_most_similar(tmp_path):
    index_dir = tmp_path / "index"
    base = words(90, 100)
    close, far = list(base), list(base)
    close[80] = "x1"  # one edit: Jaccard to the base ~0.90
    far[10], far[30] = "x2", "x3"  # two edits: ~0.81, and ~0.73 to `close`, so both are kept at first
    first, _, _, _ = run(tmp_path, [[conv("Say.", " ".join(far))], [conv("Say.", " ".join(close))]], name="first", index_dir=index_dir)
    old = dedup_index.load_index(index_dir, [first.index_part], columns=[schema.ID]).column(0).to_pylist()
    assert len(old) == 2  # the two differ enough to both be kept
    _, kept, rejected, _ = run(
        tmp_path, [[conv("Say.", " ".join(base))]], name="second", index_dir=index_dir, index_parts=[first.index_part]
    )
    assert kept_ids(kept) == [] and rejected[0]["duplicate_of"] == id_of(conv("Say.", " ".join(close)))


def test_signatures_signed_in_worker_processes_are_the_same_file(tmp_path, monkeypatch):
    """A refresh of fewer files than cores signs a chunk's batches in worker processes: the
    signature file is byte for byte the one a single process writes, and so is an empty one."""
    monkeypatch.setattr(lsh, "_ROW_GROUP_ROWS", 16)
    monkeypatch.setattr(lsh, "_BATCHES_FOR_WORKERS", 2)
    first, second = corpus()
    chunk = write_chunk(tmp_path / "in.parquet", first + second)  # a few row groups of 16
    assert pq.ParquetFile(chunk).metadata.num_rows > 3 * 16
    one, two = tmp_path / "one.arrow", tmp_path / "two.arrow"
    assert compute_signatures(chunk, one, DedupConfig()) == compute_signatures(chunk, two, DedupConfig(), num_proc=2)
    assert pa.ipc.open_file(two).num_record_batches > 3
    assert one.read_bytes() == two.read_bytes()
    empty = write_chunk(tmp_path / "empty.parquet", [])
    compute_signatures(empty, tmp_path / "e1.arrow", DedupConfig())
    compute_signatures(empty, tmp_path / "e2.arrow", DedupConfig(), num_proc=2)
    assert (tmp_path / "e1.arrow").read_bytes() == (tmp_path / "e2.arrow").read_bytes()
    assert lsh.read_signature_file(tmp_path / "e1.arrow").num_rows == 0


def test_signatures_made_while_ingest_writes_the_chunk_are_the_same_file(tmp_path, monkeypatch):
    """A refresh of one input signs its rows while ingest parses them (issue 16, item 1): the
    signature file is byte for byte the one signing the finished chunk gives, whatever sizes
    ingest's batches come in (rejected lines make them uneven), and so is an empty one."""
    import json

    from pipeline.config import SFTConfig
    from pipeline.ingest import ingest_file

    monkeypatch.setattr(lsh, "_ROW_GROUP_ROWS", 16)
    first, second = corpus()
    lines = []
    for i, messages in enumerate(first + second):
        lines.append(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}))
        if i % 5 == 0:
            lines.append('{"messages": "not a list"}')  # rejected by ingest: a short batch
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    config = SFTConfig.model_validate({"ingest": {"batch_size": 7}})
    for name, lines_of in (("full", lines), ("empty", ['{"messages": "not a list"}'])):
        source.write_text("\n".join(lines_of) + "\n")
        chunk = tmp_path / f"{name}-chunk.parquet"
        streamed, signed = (tmp_path / f"{name}-{part}.arrow" for part in ("streamed", "signed"))
        with lsh.signing_alongside(streamed, config.dedup, 2) as add:
            stats = ingest_file(source, chunk, tmp_path / f"{name}-rejected.parquet", config, on_table=add)
        assert stats.records_in > stats.records_out or name == "full" and stats.records_out > 3 * 16
        compute_signatures(chunk, signed, config.dedup)
        assert streamed.read_bytes() == signed.read_bytes()
    assert pa.ipc.open_file(tmp_path / "full-streamed.arrow").num_record_batches > 3


def test_signing_alongside_leaves_no_file_when_the_writer_or_a_worker_fails(tmp_path, monkeypatch):
    """Signatures are made beside ingest: an ingest that fails halfway, or a batch a worker
    cannot sign, ends the block with the error (no hang on the queue between them), and no
    signature file, complete-looking or temporary, is left."""
    chunk = pq.read_table(write_chunk(tmp_path / "in.parquet", corpus()[0]))
    sig = tmp_path / "sig" / "signatures.arrow"
    with pytest.raises(RuntimeError, match="ingest stopped"):
        with lsh.signing_alongside(sig, DedupConfig(), 2) as add:
            add(chunk.slice(0, 10))
            raise RuntimeError("ingest stopped")
    assert list(sig.parent.iterdir()) == []

    monkeypatch.setattr(lsh, "_ROW_GROUP_ROWS", 4)  # every add a batch for the workers
    broken = chunk.set_column(chunk.schema.get_field_index(schema.MESSAGES), schema.MESSAGES, pa.array(["text"] * chunk.num_rows))
    with pytest.raises(AttributeError):  # the worker's error, with its type
        with lsh.signing_alongside(sig, DedupConfig(), 2) as add:
            for start in range(0, chunk.num_rows, 4):  # more than the queue holds: the writer must not block
                add(broken.slice(start, 4))
    assert list(sig.parent.iterdir()) == []


@pytest.mark.parametrize("link", [False, True])
def test_a_chunk_that_keeps_every_row_is_copied_or_for_a_run_s_work_files_linked(tmp_path, link):
    """A chunk dedup leaves whole goes on as its own bytes: a copy by default (the input may be a
    caller's file, which the caller may write over later), a hard link for a run's work files."""
    from pipeline.config import SFTConfig
    from pipeline.dedup import dedup_stage

    first, second = corpus()
    whole = write_chunk(tmp_path / "whole.parquet", first[:5])
    out = tmp_path / "out.parquet"
    outcome = dedup_stage([whole], [out], tmp_path / "rejected.parquet", SFTConfig(), index_dir=tmp_path / "index", link_unchanged=link)
    assert outcome.stats.records_out == 5
    assert out.read_bytes() == whole.read_bytes()
    assert out.samefile(whole) is link
    assert not list(tmp_path.glob(".tmp-*"))


def test_connected_components_number_the_components_as_scipy_does(monkeypatch):
    """dedup's clusters: the same components and the same numbering (by each component's
    smallest node) as scipy's, which larger graphs go to."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    def scipys(a, b, n):
        return connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)[1]

    rng = np.random.default_rng(5)
    graphs = []
    for _ in range(200):
        n = int(rng.integers(1, 300))
        e = int(rng.integers(0, 3 * n))
        graphs.append((rng.integers(0, n, e), rng.integers(0, n, e), n))
    path = np.arange(999)
    shuffled = rng.permutation(1000)
    graphs += [(path, path + 1, 1000), (path[::-1] + 1, path[::-1], 1000), (shuffled[path], shuffled[path + 1], 1000)]
    graphs += [(np.zeros(0, np.int64), np.zeros(0, np.int64), 7), (np.array([3, 3]), np.array([3, 5]), 6)]
    for a, b, n in graphs:
        assert cluster.components(a, b, n).tolist() == scipys(a, b, n).tolist()
    monkeypatch.setattr(cluster, "_SCIPY_NODES", 10)  # the larger graphs' road
    for a, b, n in graphs[-5:]:
        assert cluster.components(a, b, n).tolist() == scipys(a, b, n).tolist()


def test_rows_of_signature_files_are_read_batch_by_batch_as_the_whole_files_hold_them(tmp_path, monkeypatch):
    """dedup's stores take the rows candidate pairs name from the signature files one record
    batch at a time (each mapped only while its rows are taken): the same values, in order, as
    the whole files hold, for rows in any batch of any file."""
    monkeypatch.setattr(lsh, "_ROW_GROUP_ROWS", 8)
    first, second = corpus()
    paths = signature_files(tmp_path, first + second, per_chunk=50)
    whole = pa.concat_tables([lsh.read_signature_file(p) for p in paths])
    assert len(paths) > 2 and pa.ipc.open_file(paths[0]).num_record_batches > 3
    rows = nodes.NewRows(paths)
    rng = np.random.default_rng(0)
    for picked in (np.arange(whole.num_rows), np.sort(rng.choice(whole.num_rows, 30, replace=False)), np.array([whole.num_rows - 1])):
        columns = [schema.ID, dedup_index.SHINGLES, dedup_index.SIGNATURE]
        got = pa.concat_tables(list(rows.iter_rows(picked, columns)))
        assert got.equals(whole.select(columns).take(pa.array(picked)))
    with pytest.raises(IndexError):
        list(rows.iter_rows(np.array([whole.num_rows]), [schema.ID]))

"""Incremental dedup equals a full build (issue 16, item 5).

What "equal" means here (see ``pipeline.dedup``): every candidate pair is judged by the same rule
whether its two records come in one run or in different refreshes, so for near-duplicate groups
whose members are all near duplicates of one another (a pair, in particular), refreshes into one
folder keep exactly the rows one prepare of all inputs keeps, and remove the others for the same
reason, as duplicates of the same record, as long as the full build's keep policy prefers the
earlier refresh's member (here: equal response lengths, so the earlier file wins the tie).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import DedupConfig, SFTConfig
from pipeline.dedup import dedup_stage, load_index
from pipeline.dedup import index as dedup_index
from pipeline.dedup.lsh import table_signatures
from pipeline.dedup.minhash import estimated_jaccard
from pipeline.dedup.normalize import normalize
from pipeline.dedup.shingles import shingle_strings
from pipeline.manifest import read_manifest
from pipeline.steps import prepare

THRESHOLD = DedupConfig().threshold
# Five-letter pseudo-words: a substitution keeps the response length, so ties in the keep policy
# go to the earlier file, the refresh that came first.
WORDS = [a + b + c + d + e for a in "bdfgklmnprstvz" for b in "aeiou" for c in "bdfgklmnprstvz" for d in "aeiou" for e in "klmnrst"]


def exact_jaccard(a: str, b: str) -> float:
    """Reference: the Jaccard of the two word 5-gram sets of the dedup key (prompt + response)."""
    sa, sb = (set(shingle_strings(normalize(t)[0], DedupConfig().word_ngram)) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


class Corpus:
    """Groups of records (prompt, response) with known exact Jaccard, placed in refresh files."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = self.rng.sample(WORDS, len(WORDS))  # each text takes fresh words: no overlap between groups
        self.files: dict[str, list[tuple[str, str]]] = {"a": [], "b": [], "c": []}

    def _take(self, count: int) -> list[str]:
        taken, self.words = self.words[:count], self.words[count:]
        return taken

    def add(self, file: str, prompt: str, response: list[str]) -> tuple[str, int]:
        self.files[file].append((prompt, " ".join(response)))
        return file, len(self.files[file]) - 1

    def text(self, where: tuple[str, int]) -> str:
        prompt, response = self.files[where[0]][where[1]]
        return f"{prompt}\n{response}"

    def group(self, files: list[str], length: int, edits: list[list[int]]) -> list[tuple[str, int]]:
        """A base in ``files[0]`` and one variant per ``edits`` entry (positions substituted)."""
        prompt = " ".join(self._take(6))
        base = self._take(length)
        members = [self.add(files[0], prompt, base)]
        for file, positions in zip(files[1:], edits):
            variant = list(base)
            for position, word in zip(positions, self._take(len(positions))):
                variant[position] = word
            members.append(self.add(file, prompt, variant))
        return members


def near_threshold_corpus() -> tuple[Corpus, tuple[str, int]]:
    """The corpus, and where its exact duplicate across refreshes is."""
    corpus = Corpus(seed=16)
    # Pairs with two substitutions 30 words apart: exact Jaccard (m-10)/(m+10) for m shingles,
    # 0.78 .. 0.82 for lengths 79 .. 99; the MinHash estimate (std ~0.035) errs on many.
    for k, (first, later) in enumerate([("a", "b"), ("a", "c"), ("b", "c")] * 14):
        length = 79 + (k * 7) % 21
        corpus.group([first, later], length, [[20, 50]])
    # A clique of three across all refreshes (each variant one substitution from the base).
    corpus.group(["a", "b", "c"], 100, [[30], [70]])
    # Pairs inside one refresh, for comparison, and an exact duplicate across refreshes.
    for length in (80, 90, 99):
        corpus.group(["b", "b"], length, [[20, 50]])
    prompt, response = corpus.files["a"][0]
    exact_copy = corpus.add("c", prompt.upper(), response.split(" "))
    for file in "abc":
        corpus.group([file], 60, [])
    return corpus, exact_copy


def write_inputs(corpus: Corpus, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in corpus.files.items():
        lines = [json.dumps({"instruction": prompt, "input": "", "output": response}) for prompt, response in records]
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def outcome(data_dir: Path) -> tuple[set[tuple[str, int]], dict[tuple[str, int], tuple[str, str]]]:
    """Kept records and removed ones (reason, duplicate_of), by (file name, index in the file)."""
    manifest = read_manifest(data_dir)
    kept = set()
    for shard in manifest["shards"]:
        for row in pq.read_table(data_dir / shard["path"], columns=[schema.SOURCE, schema.SOURCE_INDEX]).to_pylist():
            kept.add((Path(row[schema.SOURCE]).stem, row[schema.SOURCE_INDEX]))
    removed = {}
    for entry in manifest["rejected"]:
        for row in pq.read_table(data_dir / entry["path"]).to_pylist():
            removed[(Path(row["source"]).stem, row["source_index"])] = (row["reason"], row["duplicate_of"])
    return kept, removed


def test_refreshes_keep_what_one_full_build_keeps_near_the_threshold(tmp_path, bpe_tokenizer_path):
    corpus, exact_copy = near_threshold_corpus()
    inputs = write_inputs(corpus, tmp_path / "in")
    config = SFTConfig()

    # The data exercises the fix: across refreshes, the MinHash estimate alone would decide
    # several of these pairs on the wrong side of the threshold.
    records = [(name, i) for name in "abc" for i in range(len(corpus.files[name]))]
    conversations = [
        [schema.make_message("user", p), schema.make_message("assistant", r)] for p, r in (corpus.files[n][i] for n, i in records)
    ]
    table = pa.Table.from_pylist(
        [
            {schema.ID: str(i), schema.SOURCE: "x", schema.SOURCE_INDEX: i, schema.MESSAGES: m, schema.TOOLS: None}
            for i, m in enumerate(conversations)
        ],
        schema=schema.CONVERSATION_SCHEMA,
    )
    _, signature, _, _ = table_signatures(table, config.dedup)
    row = {r: k for k, r in enumerate(records)}
    pairs = [(a, b) for a in records for b in records if a[0] < b[0] and corpus.files[a[0]][a[1]][0] == corpus.files[b[0]][b[1]][0]]
    truth = {(a, b): exact_jaccard(corpus.text(a), corpus.text(b)) for a, b in pairs}
    near = [p for p, j in truth.items() if 0.78 <= j <= 0.82]
    assert len(near) >= 40 and min(truth[p] for p in near) < THRESHOLD <= max(truth[p] for p in near)
    wrong = [p for p in near if (estimated_jaccard(signature[row[p[0]]], signature[row[p[1]]]) >= THRESHOLD) != (truth[p] >= THRESHOLD)]
    assert len(wrong) >= 5

    full = tmp_path / "full"
    prepare([str(inputs[n]) for n in "abc"], str(bpe_tokenizer_path), full, config)
    split = tmp_path / "split"
    for refresh in ("a", "ab", "abc"):
        manifest = prepare([str(inputs[n]) for n in refresh], str(bpe_tokenizer_path), split, config)
    assert len(manifest["history"]) == 3 and len(manifest["dedup_index"]) == 3

    kept_full, removed_full = outcome(full)
    kept_split, removed_split = outcome(split)
    assert kept_split == kept_full
    assert removed_split == removed_full
    # ... and both are right: a later member goes exactly when its Jaccard with the kept one reaches the threshold.
    for (earlier, later), jaccard in truth.items():
        if earlier in kept_full:
            assert (later not in kept_full) == (jaccard >= THRESHOLD), (earlier, later, jaccard)
    assert removed_full[exact_copy][0] == "exact_duplicate"


# --- the index part that makes it possible ---------------------------------------------------


def write_chunk(path: Path, texts: list[str], source: str) -> Path:
    rows = []
    for i, text in enumerate(texts):
        messages = [schema.make_message("user", "Tell me."), schema.make_message("assistant", text)]
        rows.append(
            {
                schema.ID: schema.conversation_id(messages),
                schema.SOURCE: source,
                schema.SOURCE_INDEX: i,
                schema.MESSAGES: messages,
                schema.TOOLS: None,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return path


def dedup(tmp_path: Path, name: str, texts: list[str], index_parts=(), config: DedupConfig | None = None):
    folder = tmp_path / name
    folder.mkdir()
    chunk = write_chunk(folder / "in.parquet", texts, f"{name}.jsonl")
    result = dedup_stage(
        [chunk],
        [folder / "out.parquet"],
        folder / "rejected.parquet",
        SFTConfig(dedup=config or DedupConfig()),
        index_dir=tmp_path / "index",
        index_parts=list(index_parts),
    )
    kept = pq.read_table(folder / "out.parquet").column(schema.SOURCE_INDEX).to_pylist()
    return result, kept


def near_pairs(count: int, seed: int = 5) -> tuple[list[str], list[str], list[float]]:
    """Bases and variants whose exact Jaccard is 0.78 .. 0.82."""
    rng = random.Random(seed)
    words = rng.sample(WORDS, len(WORDS))
    bases, variants, truth = [], [], []
    for k in range(count):
        length = 79 + (k * 7) % 21
        base, words = words[:length], words[length:]
        variant = list(base)
        (variant[20], variant[50]), words = words[:2], words[2:]
        bases.append(" ".join(base))
        variants.append(" ".join(variant))
        truth.append(exact_jaccard("Tell me.\n" + bases[-1], "Tell me.\n" + variants[-1]))
    return bases, variants, truth


def as_older_format(path: Path, part_format: int) -> str:
    """An index part rewritten as sftkit wrote it before format 3: Parquet, and at format 1 without
    the shingles column (and no format key); its new name."""
    table = dedup_index.load_index(path.parent, [path.name])
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != dedup_index.FORMAT_KEY}
    if part_format == 1:
        table = table.drop_columns([dedup_index.SHINGLES])
    else:
        meta[dedup_index.FORMAT_KEY] = str(part_format).encode()
    older = path.with_suffix(".parquet")
    pq.write_table(table.replace_schema_metadata(meta), older, compression="zstd")
    path.unlink()
    return older.name


def arrow_ipc(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def test_a_part_stores_the_kept_rows_shingle_sets_and_says_its_format(tmp_path):
    bases, variants, _ = near_pairs(3)
    first, _ = dedup(tmp_path, "first", bases + [variants[0].replace("Tell", "tell")])
    path = tmp_path / "index" / first.index_part
    assert path.suffix == ".arrow" and dedup_index.part_format(path) == dedup_index.FORMAT == 3
    assert arrow_ipc(path).schema.metadata[dedup_index.FORMAT_KEY] == b"3"  # an uncompressed Arrow IPC file
    sets = arrow_ipc(path).column(dedup_index.SHINGLES).to_pylist()
    expected = [len(set(shingle_strings(normalize("Tell me.\n" + b)[0], 5))) for b in bases]
    assert [len(s) for s in sets[:3]] == expected and all(s == sorted(set(s)) for s in sets)


def test_refresh_against_an_older_part_falls_back_to_the_estimate(tmp_path, caplog):
    bases, variants, truth = near_pairs(30)
    first, _ = dedup(tmp_path, "first", bases)
    exact_outcome, kept_exact = dedup(tmp_path, "exact", variants, [first.index_part])
    assert kept_exact == [i for i, j in enumerate(truth) if j < THRESHOLD]
    assert "pairs_judged_by_estimate" not in exact_outcome.stats.extra

    format_1 = as_older_format(tmp_path / "index" / first.index_part, 1)
    assert dedup_index.part_format(tmp_path / "index" / format_1) == 1
    assert load_index(tmp_path / "index", [format_1]).column(dedup_index.SHINGLES).null_count == 30
    with caplog.at_level("WARNING", logger="sftkit.dedup"):
        old_outcome, kept_old = dedup(tmp_path, "old", variants, [format_1])
    # what sftkit decided before the column existed: the estimate, wrong on some of these pairs
    _, estimate_only = dedup(tmp_path, "estimate", variants, [format_1], DedupConfig(verify_exact=False))
    assert kept_old == estimate_only != kept_exact
    assert old_outcome.stats.extra["pairs_judged_by_estimate"] > 0
    assert "older sftkit" in caplog.text


def test_a_format_2_part_decides_a_refresh_as_the_part_it_became(tmp_path):
    """A dataset whose index an older sftkit wrote as Parquet (format 2) refreshes as before:
    exactly, against its shingle sets; the new part is format 3."""
    bases, variants, truth = near_pairs(12)
    first, _ = dedup(tmp_path, "first", bases)
    _, kept_now = dedup(tmp_path, "now", variants, [first.index_part])
    format_2 = as_older_format(tmp_path / "index" / first.index_part, 2)
    assert dedup_index.part_format(tmp_path / "index" / format_2) == 2
    second, kept_then = dedup(tmp_path, "then", variants, [format_2])
    assert kept_then == kept_now == [i for i, j in enumerate(truth) if j < THRESHOLD]
    assert second.index_part.endswith(".arrow")
    ids = load_index(tmp_path / "index", [format_2]).column(schema.ID).to_pylist()
    smaller = dedup_index.restrict_part(tmp_path / "index", format_2, ids[:5])  # an old part keeps its format
    assert smaller.endswith(".parquet") and dedup_index.part_format(tmp_path / "index" / smaller) == 2
    assert load_index(tmp_path / "index", [smaller]).column(schema.ID).to_pylist() == ids[:5]


def test_a_part_of_a_newer_format_is_refused(tmp_path):
    bases, _, _ = near_pairs(2)
    first, _ = dedup(tmp_path, "first", bases)
    path = tmp_path / "index" / first.index_part
    table = arrow_ipc(path)
    with pa.ipc.new_file(
        path.with_suffix(".tmp"), table.schema.with_metadata({**table.schema.metadata, dedup_index.FORMAT_KEY: b"4"})
    ) as w:
        w.write_table(table)
    path.with_suffix(".tmp").replace(path)
    with pytest.raises(ValueError, match="newer than this sftkit"):
        dedup(tmp_path, "second", bases, [first.index_part])


def test_old_rows_are_read_one_row_group_at_a_time_and_restricted_parts_keep_their_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup_index, "_ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(dedup_index, "_RESTRICT_BATCH_ROWS", 3)  # batches that straddle row groups
    bases, variants, truth = near_pairs(18)
    first, _ = dedup(tmp_path, "first", bases)
    index_dir = tmp_path / "index"
    path = index_dir / first.index_part
    assert pa.ipc.open_file(pa.memory_map(str(path))).num_record_batches == 5
    whole = arrow_ipc(path)
    rows = np.array([0, 3, 4, 9, 17])
    got = dedup_index.index_rows(index_dir, [first.index_part], rows, dedup_index.SHINGLES)
    assert got.to_pylist() == [whole.column(dedup_index.SHINGLES)[int(r)].as_py() for r in rows]
    # one piece per row group (record batch) the rows fall in, never the requested rows at once
    pieces = list(dedup_index.iter_index_rows(index_dir, [first.index_part], rows, dedup_index.SHINGLES))
    assert [len(piece) for piece in pieces] == [2, 1, 1, 1]

    ids = whole.column(schema.ID).to_pylist()
    smaller = dedup_index.restrict_part(index_dir, first.index_part, ids[::2])
    restricted = arrow_ipc(index_dir / smaller)
    assert restricted.column(schema.ID).to_pylist() == ids[::2]
    assert restricted.column(dedup_index.SHINGLES).to_pylist() == whole.column(dedup_index.SHINGLES).to_pylist()[::2]
    assert dedup_index.part_format(index_dir / smaller) == 3
    # its name hashes its content, however it was written: the same as a run that kept just those
    assert dedup(tmp_path, "evens", bases[::2])[0].index_part == smaller

    # a refresh against the restricted part decides the remaining bases' variants exactly
    _, kept = dedup(tmp_path, "second", [variants[i] for i in range(0, 18, 2)], [smaller])
    assert kept == [k for k, i in enumerate(range(0, 18, 2)) if truth[i] < THRESHOLD]

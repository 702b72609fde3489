"""Dedup behaviour users rely on: what is removed, what is kept, and why (issue 4)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from pipeline import schema
from pipeline.config import DedupConfig, SFTConfig
from pipeline.dedup import dedup_stage, load_index
from pipeline.dedup.lsh import exact_hashes
from pipeline.dedup.minhash import EMPTY, candidate_probability, choose_bands, signatures
from pipeline.dedup.normalize import normalize, normalize_all, normalize_all_utf8
from pipeline.dedup.shingles import hash32, ngram_sizes, shingle_hashes, shingle_strings

VOCAB = [f"w{i}" for i in range(3000)]
HANZI = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]


def words(seed: int, n: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def hanzi(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(HANZI) for _ in range(n))


def conv(prompt: str, response: str) -> list[dict]:
    return [schema.make_message("user", prompt), schema.make_message("assistant", response)]


def write_chunk(path: Path, conversations: list[list[dict]], source: str = "data.jsonl") -> Path:
    rows = [
        {
            schema.ID: schema.conversation_id(messages),
            schema.SOURCE: source,
            schema.SOURCE_INDEX: i,
            schema.MESSAGES: messages,
            schema.TOOLS: None,
        }
        for i, messages in enumerate(conversations)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return path


def run(tmp_path: Path, chunks: list[list[list[dict]]], config: DedupConfig | None = None, name="run", **kwargs):
    """Dedup the given chunks; returns (outcome, kept tables, rejected rows as dicts, input tables).

    ``index_parts`` (keyword) are the current index parts, as a dataset manifest lists them."""
    config = config or DedupConfig()
    folder = tmp_path / name
    folder.mkdir()
    ins = [write_chunk(folder / f"in-{i}.parquet", c, source=f"src{i}.jsonl") for i, c in enumerate(chunks)]
    outs = [folder / f"out-{i}.parquet" for i in range(len(chunks))]
    rejected = folder / "rejected.parquet"
    outcome = dedup_stage(ins, outs, rejected, SFTConfig(dedup=config), index_dir=kwargs.pop("index_dir", tmp_path / "index"), **kwargs)
    kept = [pq.read_table(p) for p in outs]
    rejected_rows = pq.read_table(rejected).to_pylist() if rejected.exists() else []
    return outcome, kept, rejected_rows, [pq.read_table(p) for p in ins]


def kept_ids(kept: list[pa.Table]) -> list[str]:
    return [i for t in kept for i in t.column(schema.ID).to_pylist()]


def id_of(messages: list[dict]) -> str:
    return schema.conversation_id(messages)


# --- normal form and shingles ---------------------------------------------------------------


def test_normal_form_ignores_case_width_punctuation_and_spacing():
    assert normalize("Hello,  WORLD!\n\tＨｏｗ are   you?")[0] == normalize("hello world how are you")[0]
    assert normalize("你好，世界！")[0] == normalize("你好 世界")[0] == "你 好 世 界"
    assert normalize("hello world")[0] != normalize("hello word")[0]


def test_ascii_text_takes_a_short_cut_to_the_same_normal_form():
    """NFKC, casefold, Unicode punctuation (category P) to spaces, spaces collapsed: written out
    with unicodedata here, for every ASCII character and random ASCII text."""
    import unicodedata

    def by_definition(text: str) -> str:
        text = unicodedata.normalize("NFKC", text).casefold()
        return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c for c in text).split())

    rng = random.Random(7)
    ascii_chars = [chr(code) for code in range(128)]
    texts = [*ascii_chars, *("".join(rng.choices(ascii_chars, k=rng.randint(0, 80))) for _ in range(3000))]
    texts += ["Hello, WORLD!  It's  a_b (x@y.com) #1 $5 {ok}", "snake_case-and-kebab", "tab\there\r\nnew\x0bline"]
    for text in texts:
        assert normalize(text) == (by_definition(text), 0), repr(text)
    # the signing path's forms, kept as UTF-8 bytes, are the same forms
    forms, unspaced = normalize_all_utf8(texts)
    assert [form.decode("ascii") for form in forms] == [by_definition(text) for text in texts]
    assert not unspaced.any()
    # ASCII and non-ASCII spellings of one text still meet (the short cut is only for ASCII)
    assert normalize("Ｈｅｌｌｏ，ｗｏｒｌｄ！")[0] == normalize("Hello, world!")[0] == "hello world"


def test_signing_takes_its_hashes_of_the_normal_forms_utf8():
    """table_signatures hashes normal forms kept as UTF-8 bytes (an ASCII text's never decoded):
    they are normalize()'s forms, so exact and shingle hashes are the ones stored indexes hold."""
    rng = random.Random(3)
    texts = ["", "!!!", "Hello,  WORLD!", "我爱北京天安门广场", "สวัสดีครับทุกคน", "Mixed 中文 and English, here"]
    texts += [" ".join(words(seed, rng.randint(0, 40))) for seed in range(200)]
    texts += [hanzi(seed, rng.randint(1, 30)) for seed in range(50)]
    forms, cjk = normalize_all_utf8(texts)
    assert forms == [normalize(text)[0].encode("utf-8") for text in texts]
    assert cjk.tolist() == [normalize(text)[1] for text in texts]
    expected = [int.from_bytes(hashlib.blake2b(form, digest_size=8).digest(), "little") for form in forms]
    assert exact_hashes(forms).tolist() == expected


def test_cjk_thai_and_mixed_text_use_character_ngrams_short_texts_get_one_shingle():
    texts = ["我爱北京天安门广场", "สวัสดีครับทุกคน", "I love 北京 very much indeed", "hi there"]
    forms, cjk = normalize_all(texts)
    counts = np.array([len(f.split(" ")) for f in forms])
    sizes = ngram_sizes(counts, cjk, word_ngram=5, char_ngram=3)
    assert sizes.tolist() == [3, 3, 5, 5]
    assert shingle_strings(forms[0], 3)[:2] == ["我 爱 北", "爱 北 京"]
    assert shingle_strings(forms[3], 5) == ["hi there"]  # fewer tokens than n: still one shingle
    hashes, offsets = shingle_hashes([f.encode("utf-8") for f in forms], cjk, 5, 3)
    assert np.diff(offsets).tolist() == [7, 13, 3, 1]  # 9-2, 15-2, 7-4 tokens; 1
    sig = signatures(hashes, offsets, 64, 1)
    assert (sig[3] != EMPTY).all()


def test_signatures_are_bit_identical_to_datasketch_minhash():
    texts = [" ".join(words(1, 80)), hanzi(2, 60), "short", "Mixed 中文 and English words in one text here"]
    forms, cjk = normalize_all(texts)
    hashes, offsets = shingle_hashes([f.encode("utf-8") for f in forms], cjk, 5, 5)
    sig = signatures(hashes, offsets, 128, 7)
    for row, form in enumerate(forms):
        n = int(ngram_sizes(np.array([len(form.split(" "))]), cjk[row : row + 1], 5, 5)[0])
        reference = MinHash(num_perm=128, seed=7, hashfunc=hash32, scheme="affine32")
        for shingle in shingle_strings(form, n):
            reference.update(shingle.encode("utf-8"))
        np.testing.assert_array_equal(sig[row], reference.hashvalues)


@pytest.mark.parametrize("num_perm", [1, 16, 128, 256, 257])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_permutations_are_datasketchs_own(num_perm, seed):
    from pipeline.dedup.minhash import permutations

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    ours = permutations(num_perm, seed)
    assert [x.dtype for x in ours] == [np.uint32, np.uint32]
    np.testing.assert_array_equal(ours[0], a.astype(np.uint32))
    np.testing.assert_array_equal(ours[1], b.astype(np.uint32))


def test_band_choice_catches_pairs_at_the_threshold():
    bands, rows = choose_bands(0.8, 128)
    assert bands * rows <= 128
    assert candidate_probability(0.8, bands, rows) >= 0.99
    assert candidate_probability(0.4, bands, rows) < 0.1
    assert choose_bands(0.8, 128, bands=16, rows=8) == (16, 8)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        choose_bands(0.8, 128, bands=20, rows=8)


# --- what is removed ------------------------------------------------------------------------


def test_formatting_only_variants_are_exact_duplicates(tmp_path):
    a = conv("What is the capital of France?", "The capital of France is Paris.")
    b = conv("what is the capital of france", "THE CAPITAL OF FRANCE IS PARIS!")
    other = conv("Name a prime number.", "Seven is prime.")
    outcome, kept, rejected, _ = run(tmp_path, [[a, other, b]])
    stats = outcome.stats
    assert kept_ids(kept) == [id_of(a), id_of(other)]  # same row order, first source order wins the tie
    assert len(rejected) == 1
    row = rejected[0]
    assert (row["stage"], row["reason"], row["id"]) == ("dedup", "exact_duplicate", id_of(b))
    assert row["duplicate_of"] == id_of(a) and row["similarity"] == 1.0
    assert stats.rejected == {"exact_duplicate": 1} and stats.records_in == 3 and stats.records_out == 2


def test_small_edits_and_truncations_are_near_duplicates_far_variants_kept(tmp_path):
    base = words(10, 120)
    edited = list(base)
    edited[40] = "z"  # shorter than the original word: the original stays the longest
    edited[90] = "y"
    truncated = base[:110]
    far = base[:50] + words(11, 70)  # shares 50 of 120 words: Jaccard ~0.35
    unrelated = words(12, 120)
    original = conv("Summarise this.", " ".join(base))
    docs = [
        original,
        conv("Summarise this.", " ".join(edited)),
        conv("Summarise this.", " ".join(truncated)),
        conv("Summarise this.", " ".join(far)),
        conv("Summarise this.", " ".join(unrelated)),
    ]
    outcome, kept, rejected, _ = run(tmp_path, [docs])
    stats = outcome.stats
    assert kept_ids(kept) == [id_of(docs[0]), id_of(docs[3]), id_of(docs[4])]
    by_id = {r["id"]: r for r in rejected}
    for removed in (docs[1], docs[2]):
        row = by_id[id_of(removed)]
        assert row["reason"] == "near_duplicate"
        assert row["duplicate_of"] == id_of(original)  # the longest response is kept
        assert 0.7 < row["similarity"] < 1.0
    assert stats.rejected == {"near_duplicate": 2}


def test_chinese_near_duplicates_removed_different_chinese_kept(tmp_path):
    text = hanzi(20, 300)
    edited = text[:100] + "的" + text[101:200] + "了" + text[201:]
    docs = [conv("请总结。", text), conv("请总结。", edited), conv("请总结。", hanzi(21, 300))]
    _, kept, rejected, _ = run(tmp_path, [docs])
    assert kept_ids(kept) == [id_of(docs[0]), id_of(docs[2])]
    assert [(r["reason"], r["duplicate_of"]) for r in rejected] == [("near_duplicate", id_of(docs[0]))]


def test_pair_just_below_threshold_is_kept_just_above_removed(tmp_path):
    # 100 distinct words; replacing k words spaced apart breaks 5k of the 96 five-grams.
    base = words(30, 100)

    def variant(positions):
        out = list(base)
        for p in positions:
            out[p] = f"x{p}"
        return out

    above = variant([10, 30])  # J = 86/106 = 0.81
    below = variant([10, 30, 50])  # J = 81/111 = 0.73
    docs = [conv("q", " ".join(base)), conv("q", " ".join(above))]
    _, kept, _, _ = run(tmp_path, [docs], name="above")
    assert kept_ids(kept) == [id_of(docs[0])]
    docs = [conv("q", " ".join(base)), conv("q", " ".join(below))]
    _, kept, _, _ = run(tmp_path, [docs], name="below", index_dir=tmp_path / "index2")
    assert kept_ids(kept) == [id_of(docs[0]), id_of(docs[1])]


# --- keep policy ----------------------------------------------------------------------------


def test_keep_choice_is_deterministic_and_prefers_quality_then_length_then_order(tmp_path):
    base = " ".join(words(40, 100))
    short = conv("Explain.", base)
    longer = conv("Explain.", base + " extra words at the end")
    twin = conv("Explain!", base)  # exact duplicate of `short`
    _, kept, rejected, _ = run(tmp_path, [[short, twin], [longer]], name="a")
    assert kept_ids(kept) == [id_of(longer)]
    assert {r["id"]: r["duplicate_of"] for r in rejected} == {id_of(short): id_of(longer), id_of(twin): id_of(longer)}
    # same records in another chunk order: same decision
    _, kept_again, _, _ = run(tmp_path, [[longer], [twin, short]], name="b", index_dir=tmp_path / "i2")
    assert kept_ids(kept_again) == [id_of(longer)]
    # quality first: the longest one fails the quality predicate, so the earliest good one stays
    bad_id = id_of(longer)
    _, kept_q, rejected_q, _ = run(
        tmp_path,
        [[short, twin], [longer]],
        name="c",
        index_dir=tmp_path / "i3",
        is_good=lambda record: record[schema.ID] != bad_id,
    )
    assert kept_ids(kept_q) == [id_of(short)]
    reasons = {r["id"]: (r["reason"], r["duplicate_of"]) for r in rejected_q}
    assert reasons == {id_of(twin): ("exact_duplicate", id_of(short)), bad_id: ("near_duplicate", id_of(short))}


def test_prompt_key_removes_same_prompt_with_other_answer_keeping_longest(tmp_path):
    prompt = " ".join(words(50, 40))
    a = conv(prompt, "Short answer.")
    b = conv(prompt, "A much longer and more helpful answer to the question.")
    _, kept, rejected, _ = run(tmp_path, [[a, b]], config=DedupConfig(key="prompt"), name="prompt")
    assert kept_ids(kept) == [id_of(b)]
    assert rejected[0]["reason"] == "exact_duplicate" and rejected[0]["duplicate_of"] == id_of(b)
    _, kept, _, _ = run(tmp_path, [[a, b]], name="whole", index_dir=tmp_path / "i2")
    assert kept_ids(kept) == [id_of(a), id_of(b)]


# --- outputs, conservation, partitions ------------------------------------------------------


def test_outputs_keep_schema_and_order_and_every_record_is_accounted_for(tmp_path):
    docs = [conv(f"question {i}", " ".join(words(100 + i % 7, 60))) for i in range(40)]
    outcome, kept, rejected, inputs = run(tmp_path, [docs[:25], docs[25:]])
    stats = outcome.stats
    assert sum(t.num_rows for t in kept) + len(rejected) == 40 == stats.records_in
    stats.check_conservation()
    for table_in, table_out in zip(inputs, kept):
        assert table_out.schema.equals(table_in.schema)
        order = {i: k for k, i in enumerate(table_in.column(schema.ID).to_pylist())}
        positions = [order[i] for i in table_out.column(schema.ID).to_pylist()]
        assert positions == sorted(positions)
    kept_set = set(kept_ids(kept))
    assert len(kept_set) == 7  # seven distinct responses (the prompts differ by one word only)
    assert all(r["duplicate_of"] in kept_set for r in rejected)
    assert pq.read_schema(tmp_path / "run" / "rejected.parquet").equals(schema.REJECTED_SCHEMA)


def test_partitioning_does_not_change_the_result(tmp_path):
    docs = [conv("q", " ".join(words(200 + i % 9, 50) + words(300 + i, 3))) for i in range(30)]
    _, kept_one, rej_one, _ = run(tmp_path, [docs], config=DedupConfig(partitions=1), name="p1")
    _, kept_many, rej_many, _ = run(tmp_path, [docs], config=DedupConfig(partitions=5), name="p5", index_dir=tmp_path / "i2")
    assert kept_ids(kept_one) == kept_ids(kept_many)
    assert rej_one == rej_many


# --- incremental ----------------------------------------------------------------------------


def test_refresh_dedups_new_records_against_committed_index_only(tmp_path):
    index_dir = tmp_path / "index"
    old_docs = [conv("Describe.", " ".join(words(60 + i, 100))) for i in range(5)]
    first, kept1, _, _ = run(tmp_path, [old_docs], name="first", index_dir=index_dir)
    part = first.index_part
    assert part and (index_dir / part).exists()
    assert load_index(index_dir, [part]).num_rows == 5

    near = words(62, 100)
    near[50] = "edited"
    new_docs = [
        conv("Describe.", " ".join(near)),  # near duplicate of old_docs[2]
        conv("describe", " ".join(words(63, 100))),  # exact duplicate of old_docs[3] after normalisation
        conv("Describe.", " ".join(words(99, 100))),  # new
        conv("Describe.", " ".join(words(99, 100)) + " tail"),  # near duplicate of the new one
    ]
    # not listed yet (a crash before the manifest): run 1's part on disk must not count as kept
    _, kept_uncommitted, _, _ = run(tmp_path, [new_docs], name="uncommitted", index_dir=index_dir)
    assert len(kept_ids(kept_uncommitted)) == 3

    second, kept2, rejected2, _ = run(tmp_path, [new_docs], name="second", index_dir=index_dir, index_parts=[part])
    assert kept_ids(kept2) == [id_of(new_docs[3])]
    by_id = {r["id"]: r for r in rejected2}
    assert (by_id[id_of(new_docs[0])]["reason"], by_id[id_of(new_docs[0])]["duplicate_of"]) == (
        "near_duplicate",
        id_of(old_docs[2]),
    )
    assert by_id[id_of(new_docs[0])]["similarity"] > 0.8
    assert (by_id[id_of(new_docs[1])]["reason"], by_id[id_of(new_docs[1])]["duplicate_of"]) == (
        "exact_duplicate",
        id_of(old_docs[3]),
    )
    assert by_id[id_of(new_docs[2])]["duplicate_of"] == id_of(new_docs[3])
    assert second.index_part not in (None, part)

    # a later run against both parts sees the record kept in run 2 and never removes old ones
    again = conv("Describe.", " ".join(words(99, 100)) + " tail!")
    _, kept3, rejected3, _ = run(tmp_path, [[again]], name="third", index_dir=index_dir, index_parts=[part, second.index_part])
    assert kept_ids(kept3) == [] and rejected3[0]["duplicate_of"] == id_of(new_docs[3])


def test_index_built_with_other_settings_is_refused(tmp_path):
    index_dir = tmp_path / "index"
    first, _, _, _ = run(tmp_path, [[conv("a b c", "d e f g h i")]], name="first", index_dir=index_dir)
    with pytest.raises(ValueError, match="different dedup settings"):
        run(
            tmp_path,
            [[conv("x", "y")]],
            config=DedupConfig(num_perm=64),
            name="second",
            index_dir=index_dir,
            index_parts=[first.index_part],
        )


def test_mapped_steps_compose_to_the_same_result_as_dedup_stage(tmp_path):
    """What a scaled-out flow does: signatures per chunk, one task per band partition passing
    edges as files, one global reduce."""
    from pipeline.dedup import candidate_pairs, compute_signatures, resolve_clusters, save_edges

    docs = [conv("q", " ".join(words(500 + i % 6, 60) + words(600 + i, 2))) for i in range(24)]
    config = DedupConfig(partitions=4)
    _, kept_ref, rejected_ref, _ = run(tmp_path, [docs[:12], docs[12:]], config=config, name="ref")

    folder = tmp_path / "mapped"
    folder.mkdir()
    chunks = [docs[:12], docs[12:]]
    ins = [write_chunk(folder / f"in-{i}.parquet", c, source=f"src{i}.jsonl") for i, c in enumerate(chunks)]
    sigs = [folder / f"sig-{i}.arrow" for i in range(2)]
    for in_path, sig_path in zip(ins, sigs):
        compute_signatures(in_path, sig_path, config)
    edge_files = [
        save_edges(candidate_pairs(sigs, p, config, tmp_path / "index2"), folder / f"edges-{p}.npy") for p in range(config.partitions)
    ]
    outs = [folder / f"out-{i}.parquet" for i in range(2)]
    outcome = resolve_clusters(ins, sigs, edge_files, outs, folder / "rejected.parquet", tmp_path / "index2", config)
    assert kept_ids([pq.read_table(p) for p in outs]) == kept_ids(kept_ref)
    assert pq.read_table(folder / "rejected.parquet").to_pylist() == rejected_ref
    assert outcome.stats.records_out == 6


def test_japanese_and_korean_near_duplicates(tmp_path):
    rng = random.Random(7)
    kana = [chr(c) for c in range(0x3041, 0x3097)] + HANZI[:200]
    hangul = [chr(c) for c in range(0xAC00, 0xAC00 + 500)]
    ja = "".join(rng.choice(kana) for _ in range(250))
    ko = " ".join("".join(rng.choice(hangul) for _ in range(3)) for _ in range(80))  # spaced words
    docs = [
        conv("要約してください。", ja),
        conv("要約してください。", ja[:120] + "を" + ja[121:]),
        conv("요약해 주세요.", ko),
        conv("요약해 주세요.", ko[:-8]),
    ]
    _, kept, rejected, _ = run(tmp_path, [docs])
    assert kept_ids(kept) == [id_of(docs[0]), id_of(docs[2])]
    duplicate_of = {r["id"]: r["duplicate_of"] for r in rejected}
    assert duplicate_of == {id_of(docs[1]): id_of(docs[0]), id_of(docs[3]): id_of(docs[2])}


def test_disabled_dedup_passes_every_row_through(tmp_path):
    a = conv("same", "same")
    outcome, kept, rejected, _ = run(tmp_path, [[a, a]], config=DedupConfig(enabled=False))
    stats = outcome.stats
    assert kept_ids(kept) == [id_of(a), id_of(a)] and rejected == []
    assert (stats.records_in, stats.records_out) == (2, 2)


def test_exact_only_and_near_only(tmp_path):
    base = " ".join(words(70, 80))
    twin = conv("Q", base)
    same = conv("q!", base)
    near = conv("Q", base + " more")
    _, kept, rejected, _ = run(tmp_path, [[twin, same, near]], config=DedupConfig(near=False), name="exact")
    assert kept_ids(kept) == [id_of(twin), id_of(near)]
    _, kept, rejected, _ = run(tmp_path, [[twin, same, near]], config=DedupConfig(exact=False), name="near", index_dir=tmp_path / "i2")
    assert kept_ids(kept) == [id_of(near)]
    assert {r["reason"] for r in rejected} == {"near_duplicate"}


def test_mismatched_inputs_and_outputs_are_refused(tmp_path):
    path = write_chunk(tmp_path / "in.parquet", [conv("a", "b")])
    with pytest.raises(ValueError, match="one output per input chunk"):
        dedup_stage([path], [], tmp_path / "rejected.parquet", SFTConfig(), index_dir=tmp_path / "index")


def test_index_can_be_restricted_to_what_reached_the_shards(tmp_path):
    from pipeline.dedup import restrict_part

    index_dir = tmp_path / "index"
    kept_doc = conv("Tell me.", " ".join(words(80, 100)))
    dropped_doc = conv("Tell me.", " ".join(words(81, 100)))  # kept by dedup, dropped by a later stage
    first, _, _, _ = run(tmp_path, [[kept_doc, dropped_doc]], name="first", index_dir=index_dir)
    part = first.index_part
    assert restrict_part(index_dir, part, [id_of(kept_doc), id_of(dropped_doc)]) == part
    smaller = restrict_part(index_dir, part, [id_of(kept_doc)])
    assert smaller != part and load_index(index_dir, [smaller]).column(schema.ID).to_pylist() == [id_of(kept_doc)]
    assert restrict_part(index_dir, part, []) is None

    copy_of_kept = conv("Tell me.", " ".join(words(80, 100)) + " again")
    copy_of_dropped = conv("Tell me.", " ".join(words(81, 100)) + " again")
    _, kept, rejected, _ = run(tmp_path, [[copy_of_kept, copy_of_dropped]], name="second", index_dir=index_dir, index_parts=[smaller])
    assert kept_ids(kept) == [id_of(copy_of_dropped)]
    assert rejected[0]["duplicate_of"] == id_of(kept_doc)


def test_a_part_written_later_from_the_signatures_equals_the_restricted_part(tmp_path):
    """dedup_stage(kept_path=...) writes no part, only which signature rows it kept; the part
    write_part_from makes of them and the ids that reached the shards is the part dedup would
    have written, restricted to those ids: the same rows, columns and name. A removed row stays
    out even when its id is among the shards' (an exact copy shares its original's id)."""
    from pipeline.dedup import restrict_part
    from pipeline.dedup.index import Stopped, write_part_from
    from pipeline.dedup.lsh import run_params

    short = conv("Tell me.", " ".join(words(80, 100)))
    longer_copy = conv("Tell me.", " ".join(words(80, 100)) + " again")  # the near copy dedup keeps
    dropped = conv("Tell me.", " ".join(words(81, 100)))  # kept by dedup, dropped by a later stage
    other = conv("Other.", " ".join(words(82, 100)))
    chunks = [[short, dropped, short], [longer_copy, other]]
    shard_ids = pa.chunked_array([pa.array([id_of(short), id_of(longer_copy), id_of(other)])])

    written, _, _, _ = run(tmp_path, chunks, name="written", index_dir=tmp_path / "i1")
    expected = restrict_part(tmp_path / "i1", written.index_part, shard_ids)

    sigs = [tmp_path / f"sig-{i}.arrow" for i in range(len(chunks))]
    with pytest.raises(ValueError, match="needs signature_paths"):
        run(tmp_path, chunks, name="refused", index_dir=tmp_path / "i0", kept_path=tmp_path / "kept.npy")
    later, kept, _, _ = run(
        tmp_path, chunks, name="later", index_dir=tmp_path / "i2", signature_paths=sigs, kept_path=tmp_path / "kept.npy"
    )
    assert later.index_part is None and not list((tmp_path / "i2").glob("part-*"))
    mask = np.load(tmp_path / "kept.npy")
    assert mask.tolist() == [False, True, False, True, True]  # short and its exact copy removed
    assert kept_ids(kept) == [id_of(dropped), id_of(longer_copy), id_of(other)]

    params = run_params(DedupConfig())
    part = write_part_from(tmp_path / "i2", sigs, mask, shard_ids, params)
    assert part == expected
    with pytest.raises(Stopped):  # asked to stop (its run's shard writer failed): nothing is left
        write_part_from(tmp_path / "i3", sigs, mask, shard_ids, params, stop=lambda: True)
    assert list((tmp_path / "i3").iterdir()) == []
    assert load_index(tmp_path / "i2", [part]).equals(load_index(tmp_path / "i1", [expected]))
    assert load_index(tmp_path / "i2", [part]).column(schema.ID).to_pylist() == [id_of(longer_copy), id_of(other)]
    assert write_part_from(tmp_path / "i2", sigs, mask, pa.chunked_array([], pa.string()), params) is None
    with pytest.raises(ValueError, match="kept rows name 4 rows, the signature files hold 5"):
        write_part_from(tmp_path / "i2", sigs, mask[:4], shard_ids, params)


def test_a_killed_runs_signature_folder_is_cleared(tmp_path):
    leftover = tmp_path / "index" / ".tmp-dedup-crashed"
    leftover.mkdir(parents=True)
    (leftover / "sig-00000.arrow").write_bytes(b"half written")
    run(tmp_path, [[conv("a", "b")]])
    assert not leftover.exists()
    assert [p.name for p in (tmp_path / "index").iterdir() if p.name.startswith(".tmp-")] == []


def test_a_chunk_that_loses_no_row_keeps_every_row_as_it_came_and_one_that_loses_rows_loses_only_those(tmp_path):
    """A chunk without duplicates is copied rather than rewritten: its output holds its rows, in
    order, with the same row groups; the chunk beside it still loses its duplicate."""
    unique = [conv(f"q{i}", " ".join(words(i))) for i in range(40)]
    with_copy = [conv(f"p{i}", " ".join(words(100 + i))) for i in range(30)] + [unique[5]]
    outcome, kept, rejected, ins = run(tmp_path, [unique, with_copy])
    assert kept[0].equals(ins[0].cast(kept[0].schema))
    assert (tmp_path / "run" / "out-0.parquet").read_bytes() == (tmp_path / "run" / "in-0.parquet").read_bytes()  # a copy
    assert (
        pq.ParquetFile(tmp_path / "run" / "out-0.parquet").metadata.num_row_groups
        == pq.ParquetFile(tmp_path / "run" / "in-0.parquet").metadata.num_row_groups
    )
    assert kept[1].num_rows == 30 and [r[schema.ID] for r in rejected] == [id_of(unique[5])]
    assert (outcome.stats.records_in, outcome.stats.records_out) == (71, 70)

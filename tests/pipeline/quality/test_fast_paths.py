"""The quality filters' shortcuts decide exactly what the plain definitions decide.

For speed the filters classify characters with lookup tables, split ASCII words with
``bytes.translate``, test cheap necessary conditions before expensive patterns and skip n-gram
counting when an upper bound is under the limit. Each test holds one shortcut against the plain
definition it stands for, on every code point or on many random texts, so a shortcut that would
change a decision fails here.
"""

from __future__ import annotations

import io
import random
import re
import unicodedata
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import SFTConfig
from pipeline.quality import filters as flt
from pipeline.quality import pii, quality_stage
from pipeline.quality import text as tx
from pipeline.text import ASTRAL

CONTROL = set(map(chr, [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]))
SPACE_BUT_CONTROL = set("\x0b\x0c\x1c\x1d\x1e\x1f\x85")


def plain_char_classes(text: str) -> tuple[int, int, int, int]:
    """(non-space, letters, digits, control) by the definitions: \\s, [^\\W\\d_] plus marks, \\d."""
    spaces = sum(1 for c in text if c.isspace() and c not in SPACE_BUT_CONTROL)
    marks = sum(1 for c in text if unicodedata.category(c).startswith("M"))
    letters = len(re.findall(r"[^\W\d_]", text)) + marks
    return len(text) - spaces, letters, len(re.findall(r"\d", text)), sum(c in CONTROL for c in text)


def random_texts(pool: str | list[str], count: int, longest: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(longest))) for _ in range(count)]


MIXED = list("aZ09 \t\n.,'’，：中文はいนี้ी\u0301İKΣ\x00\x1c\x85\ufffd\u00c3\u00a9") + ["\U0001f642", "\U00020000", "𝟘"]


# --- character classes (garbage) -------------------------------------------------------------
def test_char_classes_match_the_definitions_on_every_bmp_code_point():
    wrong = [hex(cp) for cp in range(0x10000) if tx.char_classes(chr(cp) + "é") != plain_char_classes(chr(cp) + "é")]
    assert wrong == []


def test_char_classes_match_the_definitions_beyond_the_bmp_and_on_mixed_text():
    for cp in range(0x10000, 0x110000, 0x100):
        chunk = "".join(map(chr, range(cp, cp + 0x100)))
        assert tx.char_classes(chunk) == plain_char_classes(chunk), hex(cp)
    for text in random_texts(MIXED, 3000, 40):
        assert tx.char_classes(text) == plain_char_classes(text), repr(text)


# --- tokens (repetition, decontamination) ----------------------------------------------------
def plain_tokens(text: str) -> list[str]:
    text = text.lower()
    return tx._token_pattern(bool(ASTRAL.search(text))).findall(text)


def test_tokens_match_the_full_pattern():
    for text in random_texts(MIXED, 3000, 40, seed=1):
        assert tx.tokens(text) == plain_tokens(text), repr(text)
    for cp in range(0x10000):
        text = f"Ab{chr(cp)}c d{chr(cp)}"
        assert tx.tokens(text) == plain_tokens(text), hex(cp)


# --- n-gram statistics (repetition) ----------------------------------------------------------
def gopher_duplicate_ngram_chars(words: list[str], n: int) -> int:
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c)


def random_word_lists(count: int, seed: int = 2) -> list[list[str]]:
    rng = random.Random(seed)
    vocabulary = "a bb ccc d ee ffff g hh iii j kk l".split()
    lists = []
    for _ in range(count):
        words = [rng.choice(vocabulary[: rng.randrange(1, 12)]) for _ in range(rng.randrange(60))]
        if words and rng.random() < 0.3:
            words += words[: rng.randrange(1, 8)] * rng.randrange(1, 5)
        lists.append(words)
    return lists


def test_duplicate_ngram_chars_and_its_bound():
    for words in random_word_lists(4000):
        for n in range(1, 11):
            exact = gopher_duplicate_ngram_chars(words, n)
            assert flt._duplicate_ngram_chars(words, n) == exact, (words, n)
            assert flt._repeated_run_chars(words, n) >= exact, (words, n)


def plain_repetition_ngrams(words: list[str], where: str, top: dict, dup: dict) -> tuple[str, str] | None:
    """The n-gram part of the repetition filter with no bound: every statistic counted."""
    total = sum(map(len, words))
    for n, limit in top.items():
        counts = Counter(zip(*(words[i:] for i in range(n))))
        gram, count = counts.most_common(1)[0] if counts else ((), 0)
        share = (sum(map(len, gram)) * count if count > 1 else 0) / total
        if share > limit:
            return "top_ngram", f"{where}: the most frequent {n}-gram covers {share:.0%} of the text (> {limit:.0%})"
    for n, limit in sorted(dup.items()):
        share = gopher_duplicate_ngram_chars(words, n) / total
        if share > limit:
            return "repeated_ngrams", f"{where}: repeated {n}-grams cover {share:.0%} of the text (> {limit:.0%})"
    return None


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"top_ngram_shares": {}},  # the duplicate n-grams decide
        {"top_ngram_shares": {2: 0.1, 3: 0.08}, "duplicate_ngram_shares": {3: 0.2, 6: 0.1}},
    ],
)
def test_repetition_bounds_never_change_a_verdict(limits):
    repetition = flt.Repetition(min_tokens=1, **limits)
    verdicts = Counter()
    # Also a phrase repeated between words seen once: runs of exactly its length, the edge of
    # the run bound ("a b c d e x0 a b c d e x1 ...").
    crafted = [
        [*(f"p{k}" for k in range(size)), *(w for i in range(copies) for w in (f"x{i}", *(f"p{k}" for k in range(size))))]
        for size in range(3, 8)
        for copies in range(1, 6)
    ]
    for words in random_word_lists(3000, seed=3) + crafted:
        if not words:
            continue
        text = " ".join(words)  # one line: only the n-gram statistics can fire
        drop = repetition.check({"messages": [schema.make_message("user", "q"), schema.make_message("assistant", text)]})
        expected = plain_repetition_ngrams(tx.tokens(text), "assistant turn 1", repetition._top, repetition._dup)
        assert (drop.reason, drop.detail) == expected if drop else expected is None, text
        verdicts[drop.reason if drop else None] += 1
    assert verdicts[None] > 100 and verdicts.total() - verdicts[None] > 100  # both verdicts, many times


# --- necessary conditions in front of patterns (PII, refusal) --------------------------------
@pytest.mark.parametrize(
    "pattern, hint",
    [
        (pii.EMAIL, pii._may_hold_email),
        (pii.IPV4, pii.IPV4_HINT.search),
        (pii.IPV6, pii.IPV6_HINT.search),
        (pii.PHONE, pii._may_hold_phone),
    ],
)
def test_pii_hints_hold_wherever_the_pattern_matches(pattern, hint):
    pool = list("0123456789abcdefABCDEF@.:-+() _x\n") + [
        "٣",
        "１",
        "example.com",
        "gmail.com",
        "138",
        "0755-",
        "+44 ",
        "8.8.",
        "25",
        "1.",
        ".192.168.",
        ".255.",
    ]
    matched = 0
    for text in random_texts(pool, 20000, 30, seed=4):
        if pattern.search(text):
            matched += 1
            assert hint(text), repr(text)
    assert matched > 50


ROWS_SCHEMA = pa.schema([schema.CONVERSATION_SCHEMA.field("messages"), schema.CONVERSATION_SCHEMA.field("tools")])


@pytest.mark.parametrize("kinds", [["email", "phone", "ip"], ["phone"], ["email", "ip"]])
def test_pii_batch_candidates_hold_every_row_the_check_changes(kinds):
    """The Arrow (RE2) scan that spares most rows the Python check leaves out no row the check
    would redact: Unicode digits, tool calls and later turns included."""
    pool = list("0123456789abcdefABCDEF@.:-+() _x\n") + [
        "٣",
        "١٣٨",
        "１",
        "example.com",
        "gmail.com",
        "+44 ",
        "8.8.",
        ".255.",
        "1.",
        "0755-",
    ]
    rng = random.Random(7)
    texts = iter(random_texts(pool, 40000, 24, seed=8))
    records = []
    for _ in range(4000):
        turns = [("user", next(texts)), ("assistant", next(texts)), ("user", next(texts))]
        messages = [schema.make_message(*turn) for turn in turns]
        if rng.random() < 0.5:
            messages[1]["tool_calls"] = '[{"name": "f", "arguments": {"to": "' + next(texts).replace("\\", "") + '"}}]'
        records.append({"messages": messages, "tools": None})
    table = pa.Table.from_pylist(records, schema=ROWS_SCHEMA)
    redact = pii.PII(kinds=kinds)
    mask = redact.candidates(table)
    changed = 0
    for row, record in enumerate(records):
        if redact.check(record) is None and redact.counts.total() > changed:  # redacted something
            changed = redact.counts.total()
            assert mask[row], records[row]
    assert changed > 50 and 0 < mask.sum() < len(records)  # both kinds of rows, many times


def test_quality_verdicts_and_redactions_are_the_same_with_and_without_the_batch_scan():
    from pipeline.quality import FilterChain, build_filters, filter_records

    rng = random.Random(9)
    replies = ["Mail me at ann.lee@gmail.com.", "Call +44 20 7946 0958 now.", "The server is 8.8.8.8.", "هاتف ٤١٥-٥٥٥-٠١٣٢", "Fine."]
    records = []
    for i in range(600):
        reply = " ".join(rng.choices(replies, k=3)) + f" Answer number {i}."
        records.append(
            {"messages": [schema.make_message("user", f"Question {i}?"), schema.make_message("assistant", reply)], "tools": None}
        )
    table = pa.Table.from_pylist(records, schema=ROWS_SCHEMA)
    plain, scanned = FilterChain(build_filters(SFTConfig().quality)), FilterChain(build_filters(SFTConfig().quality))
    plain_records, scanned_records = table.to_pylist(), table.to_pylist()
    expected = filter_records(plain_records, plain)
    got = filter_records(scanned_records, scanned, table)
    assert got == expected and scanned_records == plain_records
    assert scanned.summary()["pii"]["redactions"] == plain.summary()["pii"]["redactions"]
    redacted = " ".join(r["messages"][1]["content"] for r in scanned_records)
    assert len(expected.changed_rows) > 300 and "هاتف <PHONE>" in redacted and "٤١٥" not in redacted


def plain_refusal_match(refusal: flt.Refusal, text: str) -> bool:
    normal = flt._normalise(text)
    opening = normal[: refusal.refusal_window]
    return any(
        (
            refusal._phrases.search(normal),
            flt._EN_DISCLAIMER.search(normal),
            flt._ZH_DISCLAIMER.search(normal),
            flt._EN_REFUSAL.search(opening),
            flt._ZH_REFUSAL.search(opening),
        )
    )


def test_refusal_prefilter_passes_every_response_a_pattern_matches():
    refusal = flt.Refusal(phrases=["my custom: phrase", "自定义，短语"])
    fragments = [
        "As an AI language model",
        "as an  AI,",
        "As a large\nlanguage model",
        "I'm sorry, but I can't",
        "I\u2019m sorry",
        "I\tcannot help",
        "Apologies, but I cannot",
        "Sorry, I can't help with that.",
        "作为一个人工智能语言模型，我无法",
        "作为AI，我没有",
        "很抱歉，我不能帮你",
        "我不能",
        "As an artificial   intelligence, I don't",
        "My Custom：  phrase",
        "自定义，短语",
        "Here is the answer.",
        "  \n",
        "，",
        "\u2018",
        "x" * 50,
    ]
    matched = 0
    for text in random_texts(fragments, 20000, 5, seed=5):
        if plain_refusal_match(refusal, text):
            matched += 1
            assert refusal._may_match(text.lower(), True), repr(text)
    assert matched > 1000


# --- the stage writes the bytes it wrote when it rebuilt every kept row ----------------------
def test_kept_rows_taken_from_arrow_write_the_same_bytes_as_rebuilt_rows(tmp_path):
    # Long distinct replies, so that a batch's text outgrows the Parquet dictionary page: the
    # writer's page cuts then depend on how the column is chunked.
    rng = random.Random(6)
    words = [f"w{i}" for i in range(5000)]
    rows = []
    for i in range(300):
        reply = " ".join(rng.choices(words, k=3000))
        if i % 7 == 0:
            reply += f" Call me at +44 20 7946 {1000 + i}."
        prompt = f"Question {i}: please write down a long list of words for me."
        messages = [schema.make_message("user", prompt), schema.make_message("assistant", "" if i % 11 == 0 else reply)]
        rows.append({"id": f"id{i}", "source": "s.jsonl", "source_index": i, "messages": messages, "tools": None})
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), source, compression="zstd")
    quality_stage(source, tmp_path / "kept.parquet", tmp_path / "rejected.parquet", SFTConfig(), batch_size=100)

    kept = pq.read_table(tmp_path / "kept.parquet").to_pylist()
    assert len(kept) == 300 - 28 and sum("<PHONE>" in r["messages"][1]["content"] for r in kept) == 43 - 4
    rebuilt = io.BytesIO()
    with pq.ParquetWriter(rebuilt, schema.CONVERSATION_SCHEMA, compression="zstd") as writer:  # the input's codec
        for start in range(0, 300, 100):  # one table per batch, as the stage writes them
            batch = [r for r in kept if start <= r["source_index"] < start + 100]
            writer.write_table(pa.Table.from_pylist(batch, schema=schema.CONVERSATION_SCHEMA))
    assert (tmp_path / "kept.parquet").read_bytes() == rebuilt.getvalue()

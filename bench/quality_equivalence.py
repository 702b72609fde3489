"""The quality filter chain side by side with the chain of an earlier git revision.

``python -m bench.quality --against REV`` runs this after the usual benchmark; the figures go under
``against`` in bench/results/quality.json. REV's ``pipeline/quality/*.py`` and ``pipeline/text.py``
are copied out of git into a temporary package (``quality_at_REV``) whose imports point at that
copy; everything else they import (schema, stage, config) is this checkout's.

**Same decisions.** Every record goes through both chains, each from its own deep copy, and must
come out the same: kept, or dropped with the same reason and detail, and when kept, the same
record after PII redaction. The only difference allowed is :data:`NEW_DROPS` (a reason the new
chain has and REV's has not), and only for a record REV kept or dropped in a later filter.
The records: the benchmark's own (real data and generated bad records of every kind), more
generated bad records, the five real files ingested with ``pipeline.ingest.ingest_file``, and
mutated copies of the real records (control and replacement characters, mojibake, combining
marks, CJK and Thai, emoji, other scripts' digits, curly quotes, full-width punctuation, personal
data, repeated lines, letters removed), under three configurations (defaults; decontamination;
decontamination with ``pii: drop``).

**Speed.** One Parquet file of ``stage_records`` conversations: the real ones cycled, every 20th a
generated bad one, each made unique by a tag in its first prompt. ``quality_stage`` of both over
it, alternately in one process, best of ``repeats``, with the kept and rejected files compared byte
for byte; and both chains over its first 50,000 records the same way (records/s), and over the
generated bad records alone.
"""

from __future__ import annotations

import copy
import filecmp
import importlib
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import REPO
from pipeline import quality, schema
from pipeline.config import QualityConfig, SFTConfig
from pipeline.ingest import ingest_file
from pipeline.quality.base import FilterChain

# Reasons the new chain may give where REV's kept the record (or dropped it in a later filter).
NEW_DROPS = {"no_letters"}
# The reasons of the filters that run after garbage (where no_letters is decided).
LATER_REASONS = {
    "ai_disclaimer",
    "refusal",
    "repeated_lines",
    "repeated_paragraphs",
    "top_ngram",
    "repeated_ngrams",
    "contaminated",
    "pii",
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def load_revision(rev: str, workdir: Path) -> ModuleType:
    """REV's ``pipeline.quality``, importable next to this checkout's."""
    name = "quality_at_" + re.sub(r"\W", "_", rev)
    package = workdir / name
    package.mkdir(parents=True)
    paths = _git("ls-tree", "--name-only", rev, "pipeline/quality/").split()
    for path in [*paths, "pipeline/text.py"]:
        source = _git("show", f"{rev}:{path}")
        source = re.sub(r"\bpipeline\.quality\b", name, source)
        source = source.replace("from pipeline.text import", f"from {name}.pipeline_text import")
        (package / ("pipeline_text.py" if path == "pipeline/text.py" else Path(path).name)).write_text(source, encoding="utf-8")
    sys.path.insert(0, str(workdir))
    module = importlib.import_module(name)
    importlib.import_module(f"{name}.base")
    return module


# --- records ---------------------------------------------------------------------------------
def ingested_real(workdir: Path) -> list[dict]:
    """Every real file, through the ingest stage: canonical conversations as the quality stage sees them."""
    from bench.quality import REAL

    records = []
    for path in sorted(REAL.iterdir()):
        out = workdir / f"ingested-{path.stem}.parquet"
        ingest_file(path, out, workdir / f"ingest-rejected-{path.stem}.parquet", SFTConfig(), source=path.name)
        records.extend(pq.read_table(out).cast(schema.CONVERSATION_SCHEMA).to_pylist())
    return records


# Characters and strings the fast paths treat specially: control and replacement characters,
# mojibake, combining marks, scripts written without spaces, astral characters, other scripts'
# digits, space and punctuation variants, case mappings that change length.
ODD = [
    "\x00", "\x07", "\x1c", "\x85", "\ufffd", "Ã©", "â€™", "\u0301", "\u0e34", "中文", "ก", "は", "한국어", "\U0001f642", "\U00020000",
    "𝟘", "٤٢", "１２", "’", "‘", "，", "：", "、", "\u3000", "\xa0", "\u200b", "K", "İ", "Σ", "ß", "\t", "\n\n", "@", ":", ".", "+",
]  # fmt: skip


def mutate(record: dict, rng: random.Random) -> dict:
    """A copy of ``record`` with one to three random changes to one message's text."""
    record = copy.deepcopy(record)
    messages = [m for m in record[schema.MESSAGES] if m["content"]]
    if not messages:
        return record
    message = rng.choice(messages)
    text = message["content"]
    for _ in range(rng.randrange(1, 4)):
        change = rng.randrange(7)
        if change <= 1:  # odd characters at random places
            for _ in range(rng.randrange(1, 6)):
                at = rng.randrange(len(text) + 1)
                text = text[:at] + rng.choice(ODD) + text[at:]
        elif change == 2:  # only the symbols left
            text = "".join(c for c in text if not c.isalnum())[:40] or "?!"
        elif change == 3:  # personal data
            text += rng.choice([" mail me at a.b@corp.io", " +44 20 7946 0958", " 8.8.4.4", " 2a03:2880:f12f::1", " 138-0013-8000"])
        elif change == 4:  # repeated lines
            line = rng.choice(text.splitlines() or [text])
            text += ("\n" + line) * rng.randrange(2, 12)
        elif change == 5:
            text = text.upper() if rng.random() < 0.5 else text.replace(" ", rng.choice(["  ", "\n", "\t", "\u3000"]))
        else:  # a refusal or disclaimer at the start or the end
            phrase = rng.choice(
                ["I'm sorry, but I can't help with that.", "As an AI language model, I cannot", "抱歉，我无法提供", "作为AI，我没有"]
            )
            text = phrase + " " + text if rng.random() < 0.5 else text + " " + phrase
    message["content"] = text
    return record


def stage_input(records: list[dict], bad: list[dict], count: int, path: Path) -> None:
    """``count`` conversations (real ones, every 20th a bad one), each unique by a tag in its first prompt."""
    rows = []
    for i in range(count):
        row = copy.deepcopy(bad[(i // 20) % len(bad)] if i % 20 == 0 else records[i % len(records)])
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        tag, rest = "", i
        while True:
            tag, rest = tag + "abcdefghijklmnopqrstuvwxyz"[rest % 26], rest // 26
            if not rest:
                break
        for message in row[schema.MESSAGES]:
            if message["role"] == "user" and message["content"]:
                message["content"] += f" ({tag})"
                break
        row[schema.SOURCE], row[schema.SOURCE_INDEX] = "stage-input", len(rows)
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)


# --- decisions -------------------------------------------------------------------------------
def _decide(chain, record: dict) -> tuple[tuple[str, str] | None, dict]:
    record = copy.deepcopy(record)
    drop = chain.apply(record)
    return (None if drop is None else (drop.reason, drop.detail)), record


def compare_decisions(old: ModuleType, sets: dict[str, list[dict]], configs: dict[str, QualityConfig]) -> dict:
    """Run both chains over every record of ``sets`` under every config; count what differs."""
    same = differences = 0
    new_drops: Counter = Counter()
    examples: dict[str, list] = {"new_drops": [], "differences": []}
    for config_name, config in configs.items():
        old_chain, new_chain = old.base.FilterChain(old.build_filters(config)), FilterChain(quality.build_filters(config))
        for set_name, records in sets.items():
            for record in records:
                old_verdict, old_record = _decide(old_chain, record)
                new_verdict, new_record = _decide(new_chain, record)
                if old_verdict == new_verdict and old_record == new_record:
                    same += 1
                    continue
                where = {
                    "config": config_name,
                    "set": set_name,
                    "source": record.get(schema.SOURCE),
                    "index": record.get(schema.SOURCE_INDEX),
                }
                if new_verdict and new_verdict[0] in NEW_DROPS and (old_verdict is None or old_verdict[0] in LATER_REASONS):
                    new_drops[(config_name, set_name, new_verdict[0])] += 1
                    if len(examples["new_drops"]) < 12 and config_name == "defaults":
                        examples["new_drops"].append({**where, "was": old_verdict and old_verdict[0], "now": list(new_verdict)})
                    continue
                differences += 1
                if len(examples["differences"]) < 20:
                    examples["differences"].append({**where, "old": old_verdict, "new": new_verdict})
    return {
        "records_per_config": sum(map(len, sets.values())),
        "records_by_set": {name: len(records) for name, records in sets.items()},
        "configs": list(configs),
        "same": same,
        "new_drops": {"/".join(key): count for key, count in sorted(new_drops.items())},
        "differences": differences,
        "examples": examples,
    }


# --- speed -----------------------------------------------------------------------------------
def chain_speed(old: ModuleType, records: list[dict], config: QualityConfig, repeats: int) -> dict:
    """Records per second of both chains over the same records, alternately, best of ``repeats``."""
    best = {"old": float("inf"), "new": float("inf")}
    for _ in range(repeats):
        for name, build, chain_class in (("old", old.build_filters, old.base.FilterChain), ("new", quality.build_filters, FilterChain)):
            batch = copy.deepcopy(records)  # redaction changes records; each run starts from the same ones
            chain = chain_class(build(config))
            start = time.perf_counter()
            for record in batch:
                chain.apply(record)
            best[name] = min(best[name], time.perf_counter() - start)
    return {
        "records": len(records),
        "old_seconds": round(best["old"], 3),
        "new_seconds": round(best["new"], 3),
        "old_records_per_s": round(len(records) / best["old"], 1),
        "new_records_per_s": round(len(records) / best["new"], 1),
        "speedup": round(best["old"] / best["new"], 2),
    }


def stage_speed(old: ModuleType, source: Path, workdir: Path, repeats: int) -> dict:
    """Seconds of both ``quality_stage``s over one Parquet file, best of ``repeats``, and whether
    their outputs are the same bytes."""
    best = {"old": float("inf"), "new": float("inf")}
    for _ in range(repeats):
        for name, stage in (("old", old.quality_stage), ("new", quality.quality_stage)):
            start = time.perf_counter()
            stats = stage(source, workdir / f"{name}-kept.parquet", workdir / f"{name}-rejected.parquet", SFTConfig())
            best[name] = min(best[name], time.perf_counter() - start)
    return {
        "records": pq.ParquetFile(source).metadata.num_rows,
        "kept": stats.records_out,
        "old_seconds": round(best["old"], 2),
        "new_seconds": round(best["new"], 2),
        "speedup": round(best["old"] / best["new"], 2),
        "kept_files_identical": filecmp.cmp(workdir / "old-kept.parquet", workdir / "new-kept.parquet", shallow=False),
        "rejected_files_identical": filecmp.cmp(workdir / "old-rejected.parquet", workdir / "new-rejected.parquet", shallow=False),
    }


def compare_with(
    rev: str,
    clean: list[dict],
    bad: list[dict],
    eval_items: list[dict],
    config: QualityConfig,
    workdir: Path,
    *,
    stage_records: int,
    repeats: int,
    bad_per_kind: int = 2500,
    seed: int = 11,
) -> dict:
    """Everything the module docstring promises, as one results dict (also printed)."""
    from bench.quality import make_bad, score, verdicts

    workdir = workdir / "against"
    old = load_revision(rev, workdir / "packages")
    rng = random.Random(seed)
    real = ingested_real(workdir)
    sets = {
        "bench records": clean + bad,
        "generated bad records": make_bad(clean, bad_per_kind, rng, eval_items),
        "real files, ingested": real,
        "real records, mutated": [mutate(record, rng) for record in real for _ in range(4)],
    }
    configs = {
        "defaults": QualityConfig(),
        "decontamination": config,
        "decontamination, pii drop": config.model_copy(update={"pii": "drop"}),
    }
    decisions = compare_decisions(old, sets, configs)

    old_scores = score(clean, bad, verdicts(clean, config, old), verdicts(bad, config, old))
    new_scores = score(clean, bad, verdicts(clean, config), verdicts(bad, config))
    # Timing input: real conversations with every 20th a generated bad one, each unique (no letterless
    # records, so that both stages must write the same bytes).
    source = workdir / "stage-input.parquet"
    stage_input(real, [r for r in sets["generated bad records"] if r["_kind"] != "letterless"], stage_records, source)
    timing_records = pq.read_table(source).slice(0, 50_000).to_pylist()
    result = {
        "revision": rev,
        "commit": _git("rev-parse", "--short", rev).strip(),
        "decisions": decisions,
        "real_records_newly_dropped": sum(
            n for key, n in decisions["new_drops"].items() if "/real files" in key and key.startswith("defaults/")
        ),
        "recall": {"old": round(old_scores["recall"], 4), "new": round(new_scores["recall"], 4)},
        "false_rejection_rate": {"old": round(old_scores["false_rejection_rate"], 4), "new": round(new_scores["false_rejection_rate"], 4)},
        "chain_speed_defaults": chain_speed(old, timing_records, QualityConfig(), repeats),
        "chain_speed_generated_bad_records": chain_speed(old, sets["generated bad records"], QualityConfig(), repeats),
        "quality_stage_speed_defaults": stage_speed(old, source, workdir, repeats),
    }
    _print(result)
    return result


def _print(result: dict) -> None:
    decisions, chain, stage = result["decisions"], result["chain_speed_defaults"], result["quality_stage_speed_defaults"]
    print(f"against {result['revision']} ({result['commit']}):")
    print(
        f"  decisions: {decisions['records_per_config']:,} records x {len(decisions['configs'])} configs: {decisions['same']:,} the same, "
        f"{sum(decisions['new_drops'].values()):,} newly dropped ({', '.join(sorted(NEW_DROPS))}), {decisions['differences']} other differences"
    )
    for key, count in decisions["new_drops"].items():
        print(f"    {key}: {count}")
    for example in decisions["examples"]["new_drops"][:6]:
        print(f"    e.g. {example}")
    for example in decisions["examples"]["differences"][:10]:
        print(f"    DIFFERENT: {example}")
    print(f"  recall {result['recall']['old']:.4f} -> {result['recall']['new']:.4f}; false rejections ", end="")
    print(f"{result['false_rejection_rate']['old']:.2%} -> {result['false_rejection_rate']['new']:.2%}")
    print(
        f"  filter chain, {chain['records']:,} records: {chain['old_records_per_s']:,.0f} -> {chain['new_records_per_s']:,.0f} records/s "
        f"({chain['speedup']:.2f}x)"
    )
    bad = result["chain_speed_generated_bad_records"]
    print(
        f"  (on the generated bad records alone: {bad['old_records_per_s']:,.0f} -> {bad['new_records_per_s']:,.0f} records/s, {bad['speedup']:.2f}x)"
    )
    print(
        f"  quality_stage, {stage['records']:,} conversations: {stage['old_seconds']:.2f} s -> {stage['new_seconds']:.2f} s "
        f"({stage['speedup']:.2f}x); kept file identical: {stage['kept_files_identical']}, rejected: {stage['rejected_files_identical']}"
    )

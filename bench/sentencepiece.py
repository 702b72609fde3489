"""The tokenize stage with a SentencePiece tokenizer, next to the raw batch tokenizer.

    python -m bench.sentencepiece [--conversations 20000] [--data generated,real] [--tokenizers mistral,bundled]
                                  [--repeats 3] [--baseline TREE] [--profile]

Two tokenizers: Mistral-7B's real SentencePiece model (``tokenizer.model.v1`` of the
``mistral-common`` wheel, with the built-in ``mistral`` template; skipped when the wheel is
absent) and the bundled byte-level BPE (data_samples/tokenizer, its own ChatML template). Two
kinds of data, ``--conversations`` each: ``generated`` (bench/e2e.py's unique conversations) and
``real`` (the instruction files in ../shared/data/real, repeated), as canonical Parquet. For every
tokenizer and data, in a fresh process per round (rounds interleaved, the fastest counts):

* **raw**: ``tokenizer(texts)`` in batches of 1,000 over the already rendered texts, with the
  tokenizer's own thread pool over all cores (the ceiling);
* **sftkit**: ``tokenize_stage`` (render, tokenize, mask, verify, write the work file) with
  ``num_proc`` = cores, then ``write_shards`` (timed apart).

The ratio is sftkit's tokens per second over the raw tokenizer's: of the fastest run of each, the
median of the rounds' own ratios (a shared machine's load moves it less), and per CPU second.
With ``--baseline TREE`` (a ``git worktree`` of an earlier commit) that tree's stages run too, in
their own process on the same Parquet, and every file both write (work file, rejected rows,
shards) is compared byte for byte. ``--profile`` prints where the tokenize stage's Python time
goes (cProfile, one worker).
Writes bench/results/sentencepiece.json.
"""

from __future__ import annotations

import argparse
import cProfile
import filecmp
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench._common import REPO, argument_parser, module_command, print_table, run_child, stopwatch, write_results

BUNDLED = REPO / "data_samples" / "tokenizer"
MAX_LENGTH = 4096
BATCH = 1000


# --- inputs (this tree) -----------------------------------------------------------------------
def mistral_folder(folder: Path) -> Path | None:
    """Mistral-7B's SentencePiece model as a tokenizer folder, or None without the wheel."""
    try:
        import mistral_common
    except ImportError:
        return None
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.exists():
        return None
    from pipeline.tokenizers import sentencepiece_folder

    return sentencepiece_folder(model, folder)


def canonical_parquet(kind: str, count: int, workdir: Path) -> Path:
    """``count`` canonical conversations of ``kind`` (generated | real) as the tokenize stage's input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.prepare_vs_trl import load_conversations
    from pipeline import schema

    if kind == "real":
        rows = load_conversations(count)[:count]
    else:
        from bench.e2e import write_inputs
        from pipeline.formats import to_conversation
        from pipeline.readers import iter_records

        rows = []
        for path in write_inputs(workdir / "generated", "unique", count):
            for record in iter_records(path):
                if record.error is None:
                    messages, tools = to_conversation(record.value)
                    rows.append(
                        {
                            schema.ID: schema.conversation_id(messages, tools),
                            schema.SOURCE: path.name,
                            schema.SOURCE_INDEX: record.index,
                            schema.MESSAGES: messages,
                            schema.TOOLS: tools,
                        }
                    )
    path = workdir / f"{kind}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return path


# --- the measurements (in a child process, with the tree it was given) -------------------------
def _config(template: str, cores: int):
    from pipeline.config import SFTConfig

    config = SFTConfig()
    config.template.name = template
    config.tokenize.max_length = MAX_LENGTH
    config.tokenize.num_proc = cores
    return config


def measure_raw(job: dict) -> dict:
    import pyarrow.parquet as pq

    from pipeline import schema
    from pipeline.templates import render, resolve_template, template_variables
    from pipeline.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(job["tokenizer"])
    config = _config(job["template"], job["cores"])
    template = resolve_template(tokenizer, config.template)
    variables = template_variables(tokenizer)
    table = pq.read_table(job["canonical"], columns=[schema.MESSAGES, schema.TOOLS])
    texts = []
    for messages, tools in zip(table.column(schema.MESSAGES).to_pylist(), table.column(schema.TOOLS).to_pylist()):
        try:
            texts.append(render(template, variables, schema.messages_for_template(messages), schema.tools_for_template(tools))[0])
        except Exception:  # a conversation the template refuses (a role it lacks) is not tokenized by either
            continue
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tokens = 0
    with stopwatch() as lap:
        for start in range(0, len(texts), BATCH):
            tokens += sum(len(ids) for ids in tokenizer(texts[start : start + BATCH])["input_ids"])
    return {"seconds": lap.seconds, "cpu_seconds": lap.cpu_seconds, "rows": len(texts), "tokens": tokens}


def measure_sftkit(job: dict) -> dict:
    import pyarrow as pa

    from pipeline.shards import write_shards
    from pipeline.tokenize import tokenize_stage
    from pipeline.tokenizers import load_tokenizer
    from pipeline.workers import arrow_without_pandas

    load_tokenizer(job["tokenizer"])  # loaded before the clock, as a run has by then
    # pyarrow's first conversion, before the clock, as in a run (its ingest stage has made it)
    # and as in measure_raw (its read_table has); a run's processes make it without importing
    # pandas, as this one now does (pipeline.workers.arrow_without_pandas)
    arrow_without_pandas()
    pa.table({"warm": [0]})
    config = _config(job["template"], job["cores"])
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    with stopwatch() as lap:
        stats = tokenize_stage(Path(job["canonical"]), out / "tok.arrow", out / "rejected.parquet", config, tokenizer=job["tokenizer"])
    with stopwatch() as shards_lap:
        entries = write_shards([out / "tok.arrow"], out / "data", config, metadata={}).entries
    return {
        "seconds": lap.seconds,
        "cpu_seconds": lap.cpu_seconds,
        "shards_seconds": shards_lap.seconds,
        "rows": stats.records_out,
        "rejected": dict(stats.rejected),
        "tokens": stats.extra["tokens"],
        "trainable_tokens": stats.extra["trainable_tokens"],
        "render_mismatch": stats.extra["render_mismatch"],
        "shard_files": len(entries),
    }


def profile_sftkit(job: dict) -> dict:
    """Where the stage's Python time goes: one worker, under cProfile; the top functions by own time."""
    from pipeline.tokenize import tokenize_stage
    from pipeline.tokenizers import load_tokenizer

    load_tokenizer(job["tokenizer"])
    config = _config(job["template"], 1)
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    tokenize_stage(Path(job["canonical"]), out / "tok.arrow", out / "rejected.parquet", config, tokenizer=job["tokenizer"])
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {"profile": text.getvalue()}


MEASURES = {"raw": measure_raw, "sftkit": measure_sftkit, "profile": profile_sftkit}


def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec["tree"]:  # that tree's pipeline, not this one's (the editable install is on the path too)
        sys.path.insert(0, spec["tree"])
        import pipeline

        if not Path(pipeline.__file__).resolve().is_relative_to(Path(spec["tree"]).resolve()):
            raise SystemExit(f"pipeline imported from {pipeline.__file__}, not from {spec['tree']}")
    print(json.dumps([MEASURES[job["measure"]](job) for job in spec["jobs"]]))


def run_jobs(jobs: list[dict], tree: Path | None, workdir: Path, what: str) -> list[dict]:
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"tree": str(tree) if tree else None, "jobs": jobs}))
    return run_child(module_command("bench.sentencepiece", "--child", spec), what=what).last_json()


# --- comparing two trees' files ---------------------------------------------------------------
def same_files(left: Path, right: Path) -> tuple[bool, list[str]]:
    """Whether the two folders hold the same files with the same bytes; the names that differ."""
    names = sorted({p.relative_to(left).as_posix() for p in left.rglob("*") if p.is_file()})
    other = sorted({p.relative_to(right).as_posix() for p in right.rglob("*") if p.is_file()})
    differ = sorted(set(names) ^ set(other))
    differ += [n for n in names if n in other and not filecmp.cmp(left / n, right / n, shallow=False)]
    return not differ and bool(names), differ


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--data", default="generated,real", help="generated, real or both")
    parser.add_argument("--tokenizers", default="mistral,bundled", help="mistral, bundled or both")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest counts")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--baseline", type=Path, default=None, help="another sftkit tree (git worktree) to time and compare")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the tokenize stage")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child)
        return

    workdir = Path(tempfile.mkdtemp(prefix="sftkit-bench-sp-"))
    try:
        figures = _run(options, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results("sentencepiece", figures, options.out)


def _run(options, workdir: Path) -> dict:
    tokenizers = {}
    mistral = mistral_folder(workdir / "mistral-tokenizer")
    if mistral is not None:
        tokenizers["mistral"] = (mistral, "mistral")
    else:
        print("mistral-common is not installed: the Mistral SentencePiece tokenizer is skipped")
    tokenizers["bundled"] = (BUNDLED, "auto")
    tokenizers = {name: value for name, value in tokenizers.items() if name in options.tokenizers.split(",")}
    data = {kind: canonical_parquet(kind, options.conversations, workdir) for kind in options.data.split(",")}
    combos = [(name, kind) for name in tokenizers for kind in data]

    def jobs(measures: list[str], tree_name: str, cores: int = options.cores) -> list[dict]:
        return [
            {
                "measure": measure,
                "tokenizer": str(tokenizers[name][0]),
                "template": tokenizers[name][1],
                "canonical": str(data[kind]),
                "cores": cores,
                "out": str(workdir / "out" / tree_name / f"{name}-{kind}"),
                "combo": f"{name}/{kind}",
            }
            for name, kind in combos
            for measure in measures
        ]

    baseline = options.baseline.resolve() if options.baseline else None
    runs: dict[str, dict[str, list[dict]]] = {combo: {} for combo in (f"{n}/{k}" for n, k in combos)}
    for round_number in range(options.repeats):
        batches = [("this", None, ["raw", "sftkit"])]
        if baseline:
            batches.append(("baseline", baseline, ["sftkit"]))
        for tree_name, tree, measures in batches:
            listed = jobs(measures, tree_name)
            for job, result in zip(listed, run_jobs(listed, tree, workdir, f"{tree_name} tree")):
                label = "raw" if job["measure"] == "raw" else f"sftkit_{tree_name}" if baseline else "sftkit"
                runs[job["combo"]].setdefault(label, []).append(result)
        print(f"round {round_number + 1} of {options.repeats} done")

    results, table = {}, []
    for combo, by_label in runs.items():
        best = {label: min(values, key=lambda r: r["seconds"]) for label, values in by_label.items()}
        raw_speed = best["raw"]["tokens"] / best["raw"]["seconds"]
        raw_seconds = [v["seconds"] for v in by_label["raw"]]
        # Per CPU second (the least CPU of the rounds each): what a shared machine's load moves least.
        raw_per_cpu = best["raw"]["tokens"] / min(v["cpu_seconds"] for v in by_label["raw"])
        entry = {}
        for label, figures in best.items():
            figures = dict(figures, all_seconds=[round(v["seconds"], 3) for v in by_label[label]])
            figures["all_cpu_seconds"] = [round(v["cpu_seconds"], 3) for v in by_label[label]]
            figures["tokens_per_second"] = figures["tokens"] / figures["seconds"]
            if label != "raw":
                figures["ratio_to_raw"] = figures["tokens_per_second"] / raw_speed
                figures["ratio_to_raw_with_shards"] = figures["tokens"] / (figures["seconds"] + figures["shards_seconds"]) / raw_speed
                figures["ratio_to_raw_per_cpu_second"] = figures["tokens"] / min(figures["all_cpu_seconds"]) / raw_per_cpu
                # Each round's own ratio (the two ran back to back), the median of the rounds: a load
                # that comes and goes moves it less than the fastest runs picked apart.
                paired = [
                    (figures["tokens"] / own) / (best["raw"]["tokens"] / raw) for own, raw in zip(figures["all_seconds"], raw_seconds)
                ]
                figures["ratio_to_raw_median_of_rounds"] = statistics.median(paired)
            entry[label] = figures
        results[combo] = entry
        row = [combo, f"{best['raw']['seconds']:.2f}"]
        for label in [label for label in entry if label != "raw"]:
            figures = entry[label]
            row += [
                f"{figures['seconds']:.2f}",
                f"{figures['ratio_to_raw']:.0%}",
                f"{figures['ratio_to_raw_median_of_rounds']:.0%}",
                f"{figures['ratio_to_raw_per_cpu_second']:.0%}",
            ]
        table.append(row)
    header = ["tokenizer/data", "raw s"]
    for label in [label for label in next(iter(results.values())) if label != "raw"]:
        header += [f"{label} s", "of raw", "median", "per CPU s"]
    print(
        f"{options.conversations:,} conversations each, {options.cores} cores; tokens/s as a share of the raw tokenizer's "
        "(fastest runs; median of the rounds' own ratios; per CPU second):"
    )
    print_table(header, table)

    figures: dict = {"conversations": options.conversations, "cores": options.cores, "max_length": MAX_LENGTH, "results": results}
    if baseline:
        identical = {}
        for name, kind in combos:
            same, differ = same_files(workdir / "out" / "this" / f"{name}-{kind}", workdir / "out" / "baseline" / f"{name}-{kind}")
            identical[f"{name}/{kind}"] = same
            print(
                f"{name}/{kind}: files {'byte-identical to' if same else 'DIFFER from'} the baseline tree's"
                + (f": {differ}" if differ else "")
            )
        figures["baseline"] = {"tree": str(baseline), "identical_files": identical}
    if options.profile:
        for job, result in zip(jobs(["profile"], "profile"), run_jobs(jobs(["profile"], "profile"), None, workdir, "profile")):
            print(f"--- {job['combo']}: tokenize stage, one worker, by own time\n{result['profile']}")
    return figures


if __name__ == "__main__":
    main()

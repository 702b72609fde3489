"""sftkit's render+tokenize+mask+write against TRL's SFTTrainer dataset preparation.

Same data (the real instruction files in ../shared/data/real, repeated to >= 20k conversations),
same tokenizer (the bundled byte-level BPE, whose chat template has the {% generation %} blocks
TRL's ``assistant_only_loss`` needs), same cores. Three measurements, tokens per second:

* **sftkit**: ``tokenize_stage`` (render, tokenize, mask, verify, write the work file) +
  ``write_shards`` (split, write the Parquet shards) over the canonical Parquet, ``num_proc`` = cores;
* **TRL**: ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True`` and
  ``dataset_num_proc`` = cores, on a trainer built around trainer.models' tiny random model;
* **raw tokenizer** (the ceiling): ``tokenizer(batch)`` over the already rendered texts, in
  batches of 1000, with the tokenizer's own thread pool over all cores.

TRL is installed only in the bench environment, never in sftkit's dependencies:

    .venv/bin/python -m venv .bench/venv      # plus a .pth pointing at .venv's site-packages
    .bench/venv/bin/pip install trl -c .bench/constraints.txt   # pins torch/transformers to .venv's
    .bench/venv/bin/python -m bench.prepare_vs_trl [--conversations 20000] [--repeats 3] [--vocab 32000]

Prints the ratios and writes bench/results/prepare_vs_trl[-processes][-vocabN].json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import REPO, argument_parser, stopwatch, write_results
from pipeline import schema
from pipeline.config import SFTConfig
from pipeline.formats import to_conversation
from pipeline.readers import iter_records

TOKENIZER = REPO / "data_samples" / "tokenizer"
REAL = Path(os.environ.get("SFTKIT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
MAX_LENGTH = 4096


def load_conversations(target: int) -> list[dict]:
    """Canonical rows of the real data, repeated (with distinct source indices) to ``target`` rows."""
    base = []
    for path in sorted(REAL.glob("*.json")):
        for record in iter_records(path):
            if record.error is None:
                messages, tools = to_conversation(record.value)
                base.append((path.name, messages, tools))
    rows = []
    while len(rows) < target:
        for source, messages, tools in base:
            rows.append(
                {
                    schema.ID: schema.conversation_id(messages, tools),
                    schema.SOURCE: source,
                    schema.SOURCE_INDEX: len(rows),
                    schema.MESSAGES: messages,
                    schema.TOOLS: tools,
                }
            )
    return rows


def bench_sftkit(rows: list[dict], workdir: Path, cores: int, workers: str = "threads", tokenizer: Path = TOKENIZER) -> dict:
    from pipeline.shards import write_shards
    from pipeline.tokenize import tokenize_stage

    canonical = workdir / "canonical.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), canonical)
    config = SFTConfig()
    config.tokenize.max_length = MAX_LENGTH
    config.tokenize.num_proc = cores
    config.tokenize.workers = workers
    out = workdir / "sftkit"
    shutil.rmtree(out, ignore_errors=True)
    with stopwatch() as lap:
        stats = tokenize_stage(canonical, out / "tok.arrow", out / "rejected.parquet", config, tokenizer=str(tokenizer))
        entries = write_shards([out / "tok.arrow"], out / "data", config, metadata={}).entries
    return {
        "seconds": lap.seconds,
        "cpu_seconds": lap.cpu_seconds,
        "rows": stats.records_out,
        "rejected": dict(stats.rejected),
        "tokens": stats.extra["tokens"],
        "trainable_tokens": stats.extra["trainable_tokens"],
        "shard_files": len(entries),
    }


def train_tokenizer(rows: list[dict], out: Path, vocab_size: int) -> Path:
    """The bundled tokenizer's recipe (data_samples/make_tokenizer.py) with a real model's vocabulary size."""
    from data_samples.make_tokenizer import build  # the repository's folder, on the path under `python -m`

    seen, lines = set(), []
    for row in rows:
        for message in row[schema.MESSAGES]:
            if message["content"] not in seen:
                seen.add(message["content"])
                lines.append(message["content"])
    build(lines, out, vocab_size)
    return out


def trl_rows(rows: list[dict]) -> list[dict]:
    """The same conversations in the layout TRL reads: messages + tools (JSON text)."""
    out = []
    for row in rows:
        messages = []
        for message in schema.messages_for_template(row[schema.MESSAGES]):
            if "tool_calls" in message:
                # arguments as JSON text: one Arrow type for every row's calls
                message["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {
                            "name": call["function"]["name"],
                            "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False),
                        },
                    }
                    for call in message["tool_calls"]
                ]
            messages.append(message)
        out.append({"messages": messages, "tools": row[schema.TOOLS]})
    return out


def bench_trl(rows: list[dict], workdir: Path, cores: int, tokenizer_path: Path = TOKENIZER) -> dict:
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer

    from trainer.models import tiny_model

    datasets.disable_caching()
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    model = tiny_model(tokenizer, seed=0, max_positions=MAX_LENGTH)  # only TRL's dataset preparation is timed
    args = trl.SFTConfig(
        output_dir=str(workdir / "trl"),
        assistant_only_loss=True,
        dataset_num_proc=cores,
        max_length=MAX_LENGTH,
        report_to=[],
        use_cpu=True,
    )
    data = datasets.Dataset.from_list(trl_rows(rows))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data.select(range(8)), processing_class=tokenizer)
    with stopwatch() as lap:
        prepared = trainer._prepare_dataset(data, tokenizer, args, False, None, "train")
    lengths = prepared.map(
        lambda batch: {"n": [len(x) for x in batch["input_ids"]], "t": [sum(y != -100 for y in x) for x in batch["labels"]]},
        batched=True,
        remove_columns=prepared.column_names,
    )
    return {
        "seconds": lap.seconds,
        "cpu_seconds": lap.cpu_seconds,
        "rows": len(prepared),
        "tokens": int(sum(lengths["n"])),
        "trainable_tokens": int(sum(lengths["t"])),
        "trl_version": trl.__version__,
    }


def bench_raw_tokenizer(rows: list[dict], tokenizer_path: Path = TOKENIZER) -> dict:
    from pipeline.config import TemplateConfig
    from pipeline.templates import render, resolve_template, template_variables
    from pipeline.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_path))
    template = resolve_template(tokenizer, TemplateConfig())
    variables = template_variables(tokenizer)
    texts = [
        render(template, variables, schema.messages_for_template(r[schema.MESSAGES]), schema.tools_for_template(r[schema.TOOLS]))[0]
        for r in rows
    ]
    tokens = 0
    with stopwatch() as lap:
        for start in range(0, len(texts), 1000):
            tokens += sum(len(ids) for ids in tokenizer(texts[start : start + 1000])["input_ids"])
    return {"seconds": lap.seconds, "cpu_seconds": lap.cpu_seconds, "rows": len(texts), "tokens": tokens}


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the fastest counts")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--workers", choices=["threads", "processes"], default="threads", help="sftkit's workers")
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="instead of the bundled tokenizer (1.5k tokens), train a byte-level BPE of this many tokens on the "
        "benchmark's own text, same pre-tokenizer and ChatML template (real models' vocabularies are 32k-150k)",
    )
    options = parser.parse_args()

    rows = load_conversations(options.conversations)
    workdir = Path(tempfile.mkdtemp(prefix="sftkit-bench-"))
    tokenizer = TOKENIZER
    if options.vocab:
        tokenizer = train_tokenizer(rows, workdir / "tokenizer", options.vocab)
    print(f"{len(rows)} conversations from {REAL}, {options.cores} cores, tokenizer {tokenizer}")
    try:
        runs: dict[str, list[dict]] = {"raw_tokenizer": [], "sftkit": []}
        if not options.skip_trl:
            runs["trl"] = []
        # Interleaved rounds, fastest of each counts: a shared machine's load drifts over minutes.
        for round_number in range(options.repeats):
            # The tokenizer's own Rust thread pool may use every core, for all three. Set before
            # each run: datasets.map(num_proc>1), inside TRL, sets it to false for good.
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            runs["raw_tokenizer"].append(bench_raw_tokenizer(rows, tokenizer))
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            runs["sftkit"].append(bench_sftkit(rows, workdir, options.cores, options.workers, tokenizer))
            if "trl" in runs:
                os.environ["TOKENIZERS_PARALLELISM"] = "true"
                runs["trl"].append(bench_trl(rows, workdir, options.cores, tokenizer))
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{k} {v[-1]['seconds']:.2f} s ({v[-1]['cpu_seconds']:.2f} s CPU)" for k, v in runs.items())
            )
        results = {
            name: dict(
                best(values),
                all_seconds=[round(v["seconds"], 3) for v in values],
                all_cpu_seconds=[round(v["cpu_seconds"], 3) for v in values],
            )
            for name, values in runs.items()
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for name, result in results.items():
        result["tokens_per_second"] = result["tokens"] / result["seconds"]
        print(
            f"{name:>14}: {result['tokens']:>11,} tokens in {result['seconds']:7.2f} s = "
            f"{result['tokens_per_second']:>12,.0f} tokens/s  ({result['rows']} rows); "
            f"least CPU of the runs {min(result['all_cpu_seconds']):.2f} s"
        )
    sftkit = results["sftkit"]["tokens_per_second"]
    ratios = {"sftkit_vs_raw_tokenizer": sftkit / results["raw_tokenizer"]["tokens_per_second"]}
    if "trl" in results:
        ratios["sftkit_vs_trl"] = sftkit / results["trl"]["tokens_per_second"]
        print(f"sftkit / TRL SFTTrainer prep:  {ratios['sftkit_vs_trl']:.2f}x   (target >= 4x)")
    print(f"sftkit / raw tokenizer(batch): {ratios['sftkit_vs_raw_tokenizer']:.0%}    (target >= 75%)")
    # Per CPU second (least CPU of the runs each): what the shared machine's load cannot move much.
    per_cpu = {name: r["tokens"] / min(r["all_cpu_seconds"]) for name, r in results.items()}
    ratios["sftkit_vs_raw_tokenizer_per_cpu_second"] = per_cpu["sftkit"] / per_cpu["raw_tokenizer"]
    if "trl" in per_cpu:
        ratios["sftkit_vs_trl_per_cpu_second"] = per_cpu["sftkit"] / per_cpu["trl"]
    print("per CPU second: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if k.endswith("cpu_second")))

    suffix = "" if options.workers == "threads" and not options.skip_trl else f"-{options.workers}"
    if options.vocab:
        suffix += f"-vocab{options.vocab}"
    write_results(
        f"prepare_vs_trl{suffix}",
        {
            "conversations": len(rows),
            "cores": options.cores,
            "sftkit_workers": options.workers,
            "max_length": MAX_LENGTH,
            "tokenizer": "bundled" if tokenizer == TOKENIZER else f"byte-level BPE, {options.vocab} tokens, trained on the benchmark text",
            "results": results,
            "ratios": ratios,
        },
        options.out,
        packages=["trl", "datasets"],
    )


if __name__ == "__main__":
    main()

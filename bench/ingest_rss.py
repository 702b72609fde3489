"""Peak memory and speed of ingest on a 1M-record JSONL, side by side with `datasets.load_dataset`.

Generates a synthetic JSONL of mixed formats (Alpaca, ShareGPT with tool calls, OpenAI
messages, prompt/completion; English and Chinese; ~1% records that ingest must reject) in a
temporary folder, then runs, each in a fresh subprocess so peak RSS is that run's alone:

* ``sftkit``: ``pipeline.ingest.ingest_file`` (parse, detect, convert, validate, write Parquet);
* ``datasets``: ``datasets.load_dataset("json", data_files=..., split="train")`` into an empty
  cache folder (parse and write its Arrow cache; no format conversion).

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``. The acceptance bar is sftkit < 1 GiB.

    .venv/bin/python -m bench.ingest_rss [--records 1000000] [--workdir DIR]

Results go to bench/results/ingest_rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench._common import argument_parser, module_command, run_child, write_results

RSS_LIMIT_BYTES = 1 << 30

EN = [
    ("How do I reverse a list in Python?", "Use slicing: items[::-1] returns a reversed copy; items.reverse() works in place."),
    ("Give me three tips for better sleep.", "Keep a regular schedule, avoid screens before bed, and keep the room cool and dark."),
    ("What does HTTP 404 mean?", "The server could not find the requested resource."),
]
ZH = [
    ("请解释什么是机器学习。", "机器学习让计算机从数据中自动学习规律，而不是依靠人工编写的规则。"),
    ("番茄炒蛋怎么做？", "先炒鸡蛋盛出，再炒番茄出汁，最后把鸡蛋倒回去翻炒，加盐调味。"),
]


def synthetic_record(i: int) -> dict:
    question, answer = (EN + ZH)[i % 5]
    question = f"{question} (#{i})"
    kind = i % 4
    if i % 97 == 0:  # rejected at ingest: an empty response, in whichever layout
        answer = ""
    if kind == 0:
        return {"instruction": question, "input": "", "output": answer}
    if kind == 1:
        call = json.dumps({"name": "lookup", "arguments": {"query": question}}, ensure_ascii=False)
        return {
            "conversations": [
                {"from": "human", "value": question},
                {"from": "function_call", "value": call},
                {"from": "observation", "value": json.dumps({"result": answer}, ensure_ascii=False)},
                {"from": "gpt", "value": answer},
            ],
            "tools": '[{"name": "lookup", "description": "search notes", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]',
        }
    if kind == 2:
        return {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Thanks, and in one word?"},
                {"role": "assistant", "content": answer.split()[0] if answer else ""},
            ]
        }
    return {"prompt": question, "completion": answer}


def generate(path: Path, records: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            fh.write(json.dumps(synthetic_record(i), ensure_ascii=False))
            fh.write("\n")


# --- children --------------------------------------------------------------------------------
def child_sftkit(data: Path, out: Path) -> dict:
    from pipeline.config import SFTConfig
    from pipeline.ingest import ingest_file

    stats = ingest_file(data, out / "kept.parquet", out / "rejected.parquet", SFTConfig(), source=data.name)
    return {"records_in": stats.records_in, "kept": stats.records_out, "rejected": dict(stats.rejected)}


def child_datasets(data: Path, out: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "hf-cache"))
    return {"records_in": dataset.num_rows}


def measure(which: str, data: Path, out: Path) -> dict:
    """Run one side in a fresh interpreter; wall time and peak RSS are that child's alone."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    child = run_child(module_command(__spec__.name, "--child", which, "--data", data, "--workdir", out), env=env, what=which)
    result, seconds = child.last_json(), child.seconds
    return {
        **result,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": child.peak_rss_bytes,
        "records_per_s": round(result["records_in"] / seconds),
    }


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the synthetic file (default: a temp folder)")
    parser.add_argument("--child", choices=["sftkit", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # --workdir is the child's output folder
        result = child_sftkit(args.data, args.workdir) if args.child == "sftkit" else child_datasets(args.data, args.workdir)
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="sftkit-ingest-bench-", dir=args.workdir))
    try:
        data = workdir / "mixed.jsonl"
        start = time.perf_counter()
        generate(data, args.records)
        size = data.stat().st_size
        print(f"generated {args.records:,} records, {size / 2**20:.0f} MiB, in {time.perf_counter() - start:.0f}s")

        results = {}
        for which in ("sftkit", "datasets"):
            results[which] = measure(which, data, workdir / which)
            r = results[which]
            print(f"{which:>9}: {r['seconds']:7.1f}s  {r['records_per_s']:>9,} records/s  peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB")
        ours, peer = results["sftkit"], results["datasets"]
        assert ours["records_in"] == args.records == peer["records_in"]
        assert ours["records_in"] == ours["kept"] + sum(ours["rejected"].values())
        ratios = {
            "peak_rss_sftkit_over_datasets": round(ours["peak_rss_bytes"] / peer["peak_rss_bytes"], 3),
            "seconds_sftkit_over_datasets": round(ours["seconds"] / peer["seconds"], 3),
        }
        print(
            f"ratios (sftkit / datasets): peak RSS {ratios['peak_rss_sftkit_over_datasets']:.2f}x, "
            f"time {ratios['seconds_sftkit_over_datasets']:.2f}x"
        )
        print(f"sftkit kept {ours['kept']:,}, rejected {ours['rejected']}")
        verdict = "PASS" if ours["peak_rss_bytes"] < RSS_LIMIT_BYTES else "FAIL"
        print(f"{verdict}: sftkit peak RSS {ours['peak_rss_bytes'] / 2**20:.0f} MiB vs the 1024 MiB bar")

        write_results(
            "ingest_rss",
            {
                "records": args.records,
                "input_bytes": size,
                "results": results,
                "ratios": ratios,
                "verdict": verdict,
            },
            args.out,
            packages=["datasets"],
        )
        if verdict != "PASS":
            raise SystemExit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

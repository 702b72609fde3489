"""Orchestration overhead of the Prefect refresh flow, and the speed-up of its scale-out runners.

Same inputs (>= 100k records in N files), same tokenizer, same config, fresh output folder each:

  direct     pipeline.steps.prepare() in one process (the plain functions, no Prefect)
  serial     the refresh flow, ThreadPoolTaskRunner with one worker: the same work in the same
             order as direct, so the difference is what Prefect costs
  threads    the refresh flow, ThreadPoolTaskRunner (one worker per core)
  processes  the refresh flow, ProcessPoolTaskRunner
  dask       the refresh flow on a local Dask cluster (one process per core)

Overhead = serial / direct - 1 (target <= 10%). Speed-up = direct / threads|processes|dask.
Tokenization inside a step runs single-process here (tokenize.num_proc=1), so the runner is
what spreads the work over the cores.

    .venv/bin/python -m bench.flow_overhead [--records 100000] [--files 8] [--runners direct,serial,threads,processes,dask]

Writes bench/results/flow_overhead.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import flows  # noqa: F401  (Prefect defaults, ./.prefect among them, before Prefect is imported)
from bench._common import REPO, argument_parser, stopwatch, write_results

WORDS = (
    "model data train token learn answer question explain write list simple careful example result "
    "value number system language context response prompt format quality shard length batch step"
).split()


def make_inputs(folder: Path, records: int, files: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per_file = records // files
    for f in range(files):
        path = folder / f"part-{f:03d}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for i in range(per_file):
                n = f * per_file + i
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
                answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
                fh.write(json.dumps({"instruction": f"{prompt} #{n}", "input": "", "output": f"{answer} ({n})."}) + "\n")
        paths.append(str(path))
    return paths


def run(kind: str, inputs: list[str], tokenizer: str, out: Path, config) -> float:
    shutil.rmtree(out, ignore_errors=True)
    with stopwatch() as lap:
        if kind == "direct":
            from pipeline.steps import prepare

            manifest = prepare(inputs, tokenizer, out, config)
        else:
            from flows.refresh import refresh_flow
            from flows.runner import make_task_runner

            runner = make_task_runner("threads", max_workers=1) if kind == "serial" else make_task_runner(kind)
            flow = refresh_flow.with_options(task_runner=runner)
            manifest = flow(inputs=inputs, tokenizer=tokenizer, out=str(out), config=config.model_dump(mode="json"))
    print(f"{kind:>10}: {lap.seconds:7.1f} s  kept {manifest['counts']['kept']} of {manifest['counts']['read']}", flush=True)
    return lap.seconds


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runners", default="direct,serial,threads,processes,dask")
    parser.add_argument("--tokenizer", default=str(REPO / "data_samples" / "tokenizer"))
    args = parser.parse_args()

    from pipeline.config import SFTConfig

    config = SFTConfig.model_validate({"tokenize": {"num_proc": 1}})
    work = Path(tempfile.mkdtemp(prefix="sftkit-flow-bench-"))
    inputs = make_inputs(work / "in", args.records, args.files)
    print(f"{args.records} records in {args.files} files; {os.cpu_count()} cores", flush=True)

    # Start Prefect's temporary server before timing, so start-up is not counted as overhead.
    from prefect import flow

    @flow
    def warm_up() -> int:
        return 1

    warm_up()

    seconds = {}
    for kind in args.runners.split(","):
        seconds[kind] = run(kind, inputs, args.tokenizer, work / kind, config)
    results = {"records": args.records, "files": args.files, "cores": os.cpu_count(), "seconds": seconds}
    if "direct" in seconds:
        direct = seconds["direct"]
        if "serial" in seconds:
            results["flow_overhead"] = seconds["serial"] / direct - 1
            print(f"orchestration overhead (one-worker flow vs direct): {results['flow_overhead']:+.1%}")
        for kind in ("threads", "processes", "dask"):
            if kind in seconds:
                results[f"speedup_{kind}"] = direct / seconds[kind]
                print(f"speed-up of {kind} runner over direct: {results[f'speedup_{kind}']:.2f}x")
    write_results("flow_overhead", results, args.out, packages=["prefect", "prefect-dask", "dask"])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

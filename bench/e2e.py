"""The whole ``sftkit prepare``, as a user runs it, next to the raw batch tokenizer on the same text.

For each size (conversations) and kind of data this generates the inputs, runs ``sftkit prepare``
in a fresh process (flow mode by default, as a user runs it), and times the raw tokenizer alone
on the same rendered text in another fresh process:

* **unique**: every conversation different (sentences drawn from the real instruction data in
  ../shared/data/real, a built-in word list where that is absent);
* **dups**: a near-duplicate-heavy refresh: about 45 % of the conversations are copies or
  near copies (a sentence or a few words changed) of earlier ones.

Inputs are JSON Lines files of 50,000 records each, in three layouts (alpaca, messages, sharegpt).
Next to the wall-time ratio it reports the CPU ratio (sftkit's CPU seconds, its worker processes'
included, over the raw tokenizer's) and the CPU bound: sftkit's CPU seconds over the cores times
the raw tokenizer's wall seconds, the least wall ratio any overlap of the steps could reach on
this machine. "CPU s by process" splits sftkit's CPU seconds (sampled with the memory) by
process: the command's own (main), the tokenizer process (its Rust encoder threads included),
the step workers (ingest and signatures), the signature workers and the quality workers (a
worker keeps the command line it started with: in a run of one input the signature workers go on
as the quality workers, and their CPU seconds hold both). Per stage it reports the seconds and the peak RSS the manifest records (``stages[].seconds``,
``stages[].peak_rss_bytes``), the process's own peak RSS, and the peak of its memory together
with its worker processes' (the proportional set size of the process tree, sampled once a
second: shared pages count once). The raw tokenizer's process is sampled the same way, so the
sampling (reading ``smaps_rollup`` walks page tables: ``sampler_cpu_seconds``) weighs on both sides.

Flow mode is measured as a team runs it: against a Prefect server that is already up (this
script starts a real ``prefect server start`` first, unless ``PREFECT_API_URL`` is set, and does
not count its start-up). ``--no-flow`` measures the in-process run instead. The start-up table
times a small run (the sample data) and a refresh that finds nothing new, in both modes; the
overhead is the wall time minus the seconds the stages report.

``--bracket`` times the raw call again after each sftkit run and compares sftkit with the mean of
the two: on a shared machine the speed of the same work drifts by 10-20 % within an hour, and a
single pair of runs minutes apart shows that drift as a change of the ratio. ``--repeat N``
measures each workload N times (each bracketed on its own with ``--bracket``) and reports the
median ratio beside every one: the bracketed unique 50k runs stored in bench/results came out
between 1.62x and 2.45x, their raw calls between 8.9 and 27.9 s.

    python -m bench.e2e [--sizes 50000,200000,1000000] [--kinds unique,dups] [--no-flow]
                        [--tokenizer data_samples/tokenizer] [--keep DIR] [--no-startup] [--bracket]
                        [--repeat N]

Writes bench/results/e2e.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench._common import REPO, argument_parser, module_command, print_table, run_child, write_results

REAL = Path(os.environ.get("SFTKIT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
TOKENIZER = REPO / "data_samples" / "tokenizer"
RECORDS_PER_FILE = 50_000
DUP_SHARE = 0.45
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


# --- inputs -----------------------------------------------------------------------------------
def sentence_pool() -> list[str]:
    """Sentences from the real instruction data (answers and questions), deduplicated."""
    sentences: set[str] = set()
    for path in sorted(REAL.glob("*.json*")) if REAL.is_dir() else []:
        text = path.read_text(encoding="utf-8")
        for value in re.findall(r'"(?:output|value|content|instruction)": "((?:[^"\\]|\\.)*)"', text):
            try:
                value = json.loads(f'"{value}"')
            except json.JSONDecodeError:
                continue
            for sentence in _SENTENCE_END.split(value.replace("\n", " ")):
                if 20 <= len(sentence) <= 400 and "{{" not in sentence:
                    sentences.add(sentence.strip())
    if len(sentences) < 1000:  # no real data here: sentences of common English words
        words = (
            "the of and to in is you that it for was on are as with his they at be this have from or one had by word but "
            "not what all were we when your can said there use an each which she do how their if will up other about out "
            "many then them these so some her would make like him into time has look two more write go see number no way "
            "could people my than first water been call who oil its now find long down day did get come made may part"
        ).split()
        rng = random.Random(0)
        sentences = {" ".join(rng.choices(words, k=rng.randint(6, 20))).capitalize() + "." for _ in range(20_000)}
    return sorted(sentences)


def _conversation(rng: random.Random, pool: list[str], serial: int) -> dict:
    prompt = " ".join(rng.choices(pool, k=rng.randint(1, 4)))
    answer = " ".join(rng.choices(pool, k=rng.randint(3, 12)))
    # A serial number makes an exact repeat of the same draw impossible: "unique" is unique.
    return {"prompt": f"{prompt} (request {serial})", "answer": answer, "multi": rng.random() < 0.2}


def _near_copy(rng: random.Random, pool: list[str], base: dict) -> dict:
    copy = dict(base)
    roll = rng.random()
    if roll < 0.3:  # an exact copy
        return copy
    sentences = _SENTENCE_END.split(copy["answer"])
    if roll < 0.7:  # one sentence replaced
        sentences[rng.randrange(len(sentences))] = rng.choice(pool)
    else:  # a few words changed
        i = rng.randrange(len(sentences))
        words = sentences[i].split()
        for _ in range(min(3, len(words))):
            words[rng.randrange(len(words))] = rng.choice(("really", "quite", "very", "also"))
        sentences[i] = " ".join(words)
    copy["answer"] = " ".join(sentences)
    return copy


def _record(conversation: dict, layout: int) -> dict:
    prompt, answer = conversation["prompt"], conversation["answer"]
    if layout == 0:
        return {"instruction": prompt, "input": "", "output": answer}
    if layout == 1:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if conversation["multi"]:
            messages += [{"role": "user", "content": "Can you say that more briefly?"}, {"role": "assistant", "content": answer[:200]}]
        return {"messages": messages}
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def conversations(kind: str, count: int, seed: int = 0) -> Iterator[dict]:
    rng, pool = random.Random(seed), sentence_pool()
    earlier: list[dict] = []  # a bounded reservoir of bases to copy from
    for serial in range(count):
        if kind == "dups" and earlier and rng.random() < DUP_SHARE:
            yield _near_copy(rng, pool, rng.choice(earlier))
            continue
        conversation = _conversation(rng, pool, serial)
        if len(earlier) < 20_000:
            earlier.append(conversation)
        else:
            earlier[rng.randrange(len(earlier))] = conversation
        yield conversation


def write_inputs(folder: Path, kind: str, count: int, seed: int = 0) -> list[Path]:
    """``count`` conversations as JSON Lines files of :data:`RECORDS_PER_FILE` records."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    handle = None
    for i, conversation in enumerate(conversations(kind, count, seed)):
        if i % RECORDS_PER_FILE == 0:
            if handle:
                handle.close()
            paths.append(folder / f"{kind}-{len(paths):03d}.jsonl")
            handle = open(paths[-1], "w", encoding="utf-8")
        handle.write(json.dumps(_record(conversation, i % 3), ensure_ascii=False) + "\n")
    if handle:
        handle.close()
    return paths


# --- the runs ---------------------------------------------------------------------------------
@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """The API URL of a running Prefect server: ``PREFECT_API_URL`` if set, else one started here."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the Prefect server did not start") from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_sftkit(inputs: list[Path], out: Path, tokenizer: Path, api_url: str | None) -> dict:
    """``sftkit prepare`` in a fresh process: as a flow against ``api_url``, in-process without one."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(out.parent / "prefect-home"), "DO_NOT_TRACK": "1"}
    command = module_command("flows.cli", "prepare", *inputs, "--tokenizer", tokenizer, "--out", out)
    if api_url:
        env["PREFECT_API_URL"] = api_url
        command.append("--flow")
    else:
        command.append("--no-flow")
    child = run_child(command, env=env, what="sftkit prepare", tree_memory=True)
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: {"seconds": s["seconds"], "peak_rss_bytes": s.get("peak_rss_bytes")} for s in manifest.get("stages", [])}
    return {
        "seconds": child.seconds,
        "cpu_seconds": child.cpu_seconds,
        "stage_seconds": sum(s["seconds"] for s in manifest.get("stages", [])),
        "version": manifest["version"],
        "peak_rss_bytes": child.peak_rss_bytes,
        "tree_peak_pss_bytes": child.tree_peak_pss_bytes,
        "cpu_by_role": child.cpu_by_role,
        "sampler_cpu_seconds": child.sampler_cpu_seconds,
        "kept": manifest["counts"]["kept"],
        "read": manifest["counts"]["read"],
        "tokens": sum(s["tokens"] for s in manifest["shards"]),
        "stages": stages,
    }


def run_raw_tokenizer(inputs: list[Path], tokenizer: Path) -> dict:
    child = run_child(module_command("bench.raw_tokenizer", tokenizer, *inputs), what="raw tokenizer", tree_memory=True)
    figures = child.last_json()
    return {
        **figures,
        "wall_seconds": child.seconds,
        "peak_rss_bytes": child.peak_rss_bytes,
        "tree_peak_pss_bytes": child.tree_peak_pss_bytes,
        "sampler_cpu_seconds": child.sampler_cpu_seconds,
    }


def startup(work: Path, tokenizer: Path, api_url: str | None) -> list[dict]:
    """A small run (the sample data) and then a refresh that finds nothing new, flow and in-process."""
    inputs = sorted((REPO / "data_samples" / "inputs").glob("*"))
    figures = []
    for mode, url in (("flow", api_url), ("in-process", None)):
        if mode == "flow" and not url:
            continue
        out = work / f"startup-{mode}"
        for run in ("small run", "nothing new"):
            result = run_sftkit(inputs, out, tokenizer, url)
            overhead = result["seconds"] - (result["stage_seconds"] if run == "small run" else 0.0)
            figures.append({"mode": mode, "run": run, "seconds": result["seconds"], "overhead_seconds": overhead})
        shutil.rmtree(out, ignore_errors=True)
    print_table(
        ["start-up", "wall s", "overhead s"],
        [[f"{f['mode']}: {f['run']}", f"{f['seconds']:.2f}", f"{f['overhead_seconds']:.2f}"] for f in figures],
    )
    return figures


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--sizes", default="50000,200000,1000000")
    parser.add_argument("--kinds", default="unique,dups")
    parser.add_argument("--no-flow", action="store_true", help="in-process runs, no Prefect server")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--keep", type=Path, default=None, help="generate the inputs here and keep them")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up table")
    parser.add_argument(
        "--bracket",
        action="store_true",
        help="time the raw tokenizer before and after each sftkit run and compare with their mean "
        "(the machine's speed can drift by 10-20 %% within an hour)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="measure each workload this many times; report the median ratio")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sftkit-e2e-"))
    data_root = args.keep or work / "inputs"
    tokenizer = args.tokenizer.resolve()
    rows, figures, startup_figures, medians = [], [], [], []
    try:
        with contextlib.ExitStack() as stack:
            api_url = None if args.no_flow else stack.enter_context(prefect_server(work / "prefect-server"))
            if not args.no_startup:
                startup_figures = startup(work, tokenizer, api_url)
            for size in [int(s) for s in args.sizes.split(",") if s]:
                for kind in args.kinds.split(","):
                    entries = []
                    for attempt in range(1, args.repeat + 1):
                        entry = measure(
                            data_root / f"{kind}-{size}",
                            work,
                            kind,
                            size,
                            tokenizer,
                            api_url,
                            keep=args.keep is not None or attempt < args.repeat,
                            bracket=args.bracket,
                        )
                        entry["attempt"] = attempt
                        entries.append(entry)
                        figures.append(entry)
                        rows.append(table_row(entry, attempt if args.repeat > 1 else None))
                    if args.repeat > 1:
                        medians.append(median_of(entries))
                    print_table(
                        [
                            "workload",
                            "raw tok s",
                            "sftkit s",
                            "ratio",
                            "CPU ratio",
                            "CPU bound",
                            "CPU s by process",
                            "stage seconds",
                            "peak GiB",
                            "with workers GiB",
                            "stage peak MiB",
                        ],
                        rows,
                    )
                    if medians:
                        print_table(
                            ["workload", "ratios", "median ratio", "median CPU bound"],
                            [
                                [
                                    f"{m['kind']} {m['conversations']:,}",
                                    " ".join(f"{r:.2f}x" for r in m["ratios"]),
                                    f"{m['median_ratio']:.2f}x",
                                    f"{m['median_cpu_bound_ratio']:.2f}x",
                                ]
                                for m in medians
                            ],
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"flow": not args.no_flow, "tokenizer": str(args.tokenizer), "startup": startup_figures, "runs": figures}
    if medians:
        results["medians"] = medians
    write_results("e2e", results, args.out)


def measure(
    folder: Path, work: Path, kind: str, size: int, tokenizer: Path, api_url: str | None, *, keep: bool, bracket: bool = False
) -> dict:
    inputs = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if len(inputs) != -(-size // RECORDS_PER_FILE):
        shutil.rmtree(folder, ignore_errors=True)
        inputs = write_inputs(folder, kind, size)
    raw = run_raw_tokenizer(inputs, tokenizer)
    out = work / f"out-{kind}-{size}"
    sftkit = run_sftkit(inputs, out, tokenizer, api_url)
    shutil.rmtree(out, ignore_errors=True)
    if bracket:  # the raw call again: sftkit is compared with the mean of the runs on either side
        raw = bracketed(raw, run_raw_tokenizer(inputs, tokenizer))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {
        "kind": kind,
        "conversations": size,
        "raw_tokenizer": raw,
        "sftkit": sftkit,
        "ratio": sftkit["seconds"] / raw["seconds"],
        # sftkit's CPU seconds (its workers' included) over the raw tokenizer's, and the least wall
        # ratio that CPU allows on this machine's cores, however well the steps overlapped
        "cpu_ratio": sftkit["cpu_seconds"] / raw["cpu_seconds"],
        "cpu_bound_ratio": sftkit["cpu_seconds"] / (cores * raw["seconds"]),
    }


def bracketed(before: dict, after: dict) -> dict:
    """The raw call's figures as the mean of a run before and a run after sftkit's, with both runs."""
    mean = {key: (before[key] + after[key]) / 2 for key in ("seconds", "cpu_seconds", "wall_seconds", "sampler_cpu_seconds")}
    # (no tree peak where /proc has no smaps_rollup)
    peaks = {
        key: max((v for v in (before[key], after[key]) if v is not None), default=None) for key in ("peak_rss_bytes", "tree_peak_pss_bytes")
    }
    return {**before, **mean, **peaks, "runs": [before, after]}


def median_of(entries: list[dict]) -> dict:
    """One workload measured several times: its ratios in order, and their medians."""
    ratios = [e["ratio"] for e in entries]
    return {
        "kind": entries[0]["kind"],
        "conversations": entries[0]["conversations"],
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "median_cpu_bound_ratio": statistics.median(e["cpu_bound_ratio"] for e in entries),
    }


def table_row(entry: dict, attempt: int | None = None) -> list[str]:
    sftkit, stages, raw = entry["sftkit"], entry["sftkit"]["stages"], entry["raw_tokenizer"]
    runs = "/".join(f"{run['seconds']:.1f}" for run in raw.get("runs", []))
    return [
        f"{entry['kind']} {entry['conversations']:,}" + (f" #{attempt}" if attempt else ""),
        f"{raw['seconds']:.1f}" + (f" ({runs})" if runs else ""),
        f"{sftkit['seconds']:.1f}",
        f"{entry['ratio']:.2f}x",
        f"{entry['cpu_ratio']:.2f}x",
        f"{entry['cpu_bound_ratio']:.2f}x",
        " ".join(f"{role.split()[0]} {seconds:.1f}" for role, seconds in (sftkit.get("cpu_by_role") or {}).items()),
        " ".join(f"{name} {s['seconds']:.1f}" for name, s in stages.items()),
        f"{sftkit['peak_rss_bytes'] / 2**30:.2f}",
        f"{(sftkit.get('tree_peak_pss_bytes') or 0) / 2**30:.2f}",
        " ".join(f"{name} {(s['peak_rss_bytes'] or 0) / 2**20:.0f}" for name, s in stages.items()),
    ]


if __name__ == "__main__":
    main()

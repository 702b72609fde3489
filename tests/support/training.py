"""Small, real prepared-dataset folders for the trainer tests, and short training runs on them.

``write_dataset`` lays out exactly what ``sftkit prepare`` promises (CONTRACT.md): SHARD_SCHEMA
rows written by the real shard writer (pipeline.shards.write_shards) under ``DIR/shards/`` and a
``manifest.json`` listing them with their sha256 (pipeline.manifest). ``corpus_rows``
turns the bundled corpus into prompt/response rows tokenized by the bundled BPE tokenizer, with
the prompt masked out of the labels. ``cpu_config`` configures a short CPU run in this process,
``train_command`` one through the real `sftkit train`, which ``run_train``, ``kill_mid_run`` and
``sigterm_mid_run`` run in a subprocess (one thread each).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SFTConfig, ShardConfig
from pipeline.manifest import now_iso, write_manifest
from pipeline.schema import (
    FORMAT_VERSION,
    IGNORE_INDEX,
    META_FORMAT_VERSION,
    META_TOKENIZER_FINGERPRINT,
    META_TOKENIZER_NAME,
    SHARD_SCHEMA,
    conversation_id,
    make_message,
)
from pipeline.shards import split_of, write_shards
from pipeline.tokenizers import tokenizer_fingerprint
from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data_samples" / "tokenizer_corpus.txt"
Row = tuple[Sequence[int], Sequence[int]]
SPLIT_FRACTION = 0.5


def corpus_rows(tokenizer, repeat: int = 1) -> list[Row]:
    """(input_ids, labels) for every pair of consecutive corpus lines: prompt masked, response trained."""
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[Row] = []
    for copy in range(repeat):
        for prompt, response in zip(lines, lines[1:]):
            prompt_ids = tokenizer.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
            response_ids = tokenizer.encode(f"{response}<|im_end|>", add_special_tokens=False)
            if copy:  # distinct rows when repeating: vary the prompt a little
                prompt_ids = prompt_ids + tokenizer.encode(f" ({copy})", add_special_tokens=False)
            rows.append((prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids))
    return rows


def _shard_table(rows: Sequence[Row], split: str, start_index: int) -> pa.Table:
    """Shard rows whose ids (content hashes) fall in ``split`` under ``SPLIT_FRACTION``."""
    records = []
    for offset, (input_ids, labels) in enumerate(rows):
        input_ids, labels = [int(t) for t in input_ids], [int(t) for t in labels]
        assert len(input_ids) == len(labels)
        for attempt in range(1000):  # the writer splits by a hash of the id: pick content that lands in `split`
            messages = [make_message("user", f"row {start_index + offset} try {attempt}"), make_message("assistant", "x")]
            if split_of(conversation_id(messages), SPLIT_FRACTION) == split:
                break
        records.append(
            {
                "id": conversation_id(messages),
                "source": "fixture.jsonl",
                "source_index": start_index + offset,
                "messages": messages,
                "tools": None,
                "input_ids": input_ids,
                "labels": labels,
                "length": len(input_ids),
                "num_trainable": sum(1 for t in labels if t != IGNORE_INDEX),
            }
        )
    return pa.Table.from_pylist(records, schema=SHARD_SCHEMA)


def write_dataset(
    out: str | Path,
    train_rows: Sequence[Row],
    val_rows: Sequence[Row] = (),
    *,
    tokenizer,
    tokenizer_name: str | Path,
    rows_per_shard: int = 1000,
) -> Path:
    """A dataset folder (shards + manifest) holding these rows, written by the real shard writer."""
    out = Path(out)
    fingerprint = tokenizer_fingerprint(tokenizer)
    metadata = {
        META_TOKENIZER_NAME: str(tokenizer_name).encode(),
        META_TOKENIZER_FINGERPRINT: fingerprint.encode(),
        META_FORMAT_VERSION: FORMAT_VERSION.encode(),
    }
    table = pa.concat_tables([_shard_table(train_rows, "train", 0), _shard_table(val_rows, "val", len(train_rows))])
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, staging / "rows.parquet")
    entries = write_shards(
        [staging / "rows.parquet"],
        out,
        SFTConfig(shards=ShardConfig(val_fraction=SPLIT_FRACTION, target_rows=rows_per_shard)),
        metadata=metadata,
    ).entries
    shutil.rmtree(staging)
    kept = len(train_rows) + len(val_rows)
    write_manifest(
        out,
        {
            "version": 1,
            "created_at": now_iso(),
            "tokenizer": {"name": str(tokenizer_name), "fingerprint": fingerprint},
            "template": {"name": "fixture", "fingerprint": "none"},
            "config": {},
            "shards": entries,
            "counts": {"read": kept, "kept": kept, "rejected": {}},
            "stages": [],
        },
    )
    return out


def corpus_dataset(out: str | Path, tokenizer, tokenizer_name: str | Path, *, repeat: int = 4, rows_per_shard: int = 40) -> Path:
    """The bundled corpus as a dataset: every 8th row in val, the rest in train, several shards."""
    rows = corpus_rows(tokenizer, repeat=repeat)
    val = rows[::8]
    train = [row for i, row in enumerate(rows) if i % 8]
    return write_dataset(out, train, val, tokenizer=tokenizer, tokenizer_name=tokenizer_name, rows_per_shard=rows_per_shard)


# --- small CPU runs of the tiny model, in this process or as real `sftkit train` processes ----
def cpu_config(**options) -> TrainConfig:
    """A TrainConfig for a short run on CPU: 512-token micro-batches, lr 3e-3, no progress bar; ``options`` add or override."""
    return TrainConfig(**{"device": "cpu", "batch_tokens": 512, "lr": 3e-3, "progress": False, **options})


# One thread per process: CPU results are then bit-for-bit reproducible run to run. PYTHONPATH:
# torchrun runs a probe script from the script's own folder, where the repository is not importable.
TRAIN_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}
PYTHON = (sys.executable,)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")  # two ranks, gloo on CPU
# The same run as cpu_config's, with an evaluation every 10 steps and seed 1.
TRAIN_OPTIONS = ["--model", "tiny", "--batch-tokens", "512", "--lr", "3e-3", "--device", "cpu", "--eval-every", "10", "--seed", "1"]


def train_args(data, out, *extra, data_option: str = "--data") -> list[str]:
    """`sftkit train` arguments for a small reproducible CPU run on ``data`` (a dataset folder, or
    a mixture spec with ``data_option="--mixture"``) into ``out``; an option in ``extra`` wins over
    the same one in TRAIN_OPTIONS (the last one given counts)."""
    return ["train", data_option, str(data), "--out", str(out), *TRAIN_OPTIONS, *map(str, extra)]


def train_command(data, out, *extra, data_option: str = "--data", launcher=PYTHON) -> list[str]:
    """``train_args`` as a command line: `python -m flows.cli train ...`, or under ``launcher=TORCHRUN``."""
    return [*launcher, "-m", "flows.cli", *train_args(data, out, *extra, data_option=data_option)]


def run_train(command: list[str], *, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` (a training process) in the repository to its end and check that it exited
    with ``expect``; stdout and stderr are kept as text."""
    result = subprocess.run(command, cwd=REPO, env=TRAIN_ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def train_losses(run_dir) -> list[float]:
    """The train-step losses a run has logged so far (metrics.jsonl)."""
    from trainer.metrics import read_metrics

    return [row["loss"] for row in read_metrics(run_dir) if row["type"] == "train"]


def start_train(command: list[str], **popen) -> subprocess.Popen:
    """Start ``command`` (a training process) in the repository: stdout discarded, stderr kept as
    text, unless ``popen`` says otherwise."""
    options = {"cwd": REPO, "env": TRAIN_ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, **{**options, **popen})


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> int:
    """Wait (5 minutes at most) until the run into ``run_dir`` has logged ``steps`` train steps or
    its process ended; returns how many steps it has logged."""
    deadline = time.time() + 300
    while len(train_losses(run_dir)) < steps and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    return len(train_losses(run_dir))


def kill_mid_run(command: list[str], run_dir: Path, *, after_steps: int) -> int:
    """Start ``command`` (a `sftkit train` run into ``run_dir``), SIGKILL it and every process it
    started (torchrun's workers too, like a lost node) once it has logged ``after_steps`` steps;
    returns how many steps it had logged."""
    process = start_train(command, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_steps(process, run_dir, after_steps)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return len(train_losses(run_dir))


def sigterm_mid_run(command: list[str], run_dir: Path, *, after_steps: int = 3, signals: int = 1) -> tuple[int, str]:
    """Start ``command`` (a `sftkit train` run into ``run_dir``), send it SIGTERM ``signals`` times
    once it has logged ``after_steps`` steps, and wait for it; returns its exit code and stderr."""
    process = start_train(command)
    wait_for_steps(process, run_dir, after_steps)
    for _ in range(signals):
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def assert_stopped_by_sigterm(run_dir: Path) -> int:
    """The run logged a stop for SIGTERM, its last checkpoint is of that step and it wrote no
    final/ folder; returns the step."""
    from trainer.metrics import read_metrics

    stop = [r for r in read_metrics(run_dir) if r["type"] == "stop"]
    assert stop and stop[-1]["reason"] == "sigterm"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == stop[-1]["step"]
    assert not (run_dir / "final").exists()
    return stop[-1]["step"]


CURVES = (("train", "loss"), ("train", "trained_tokens"), ("eval", "eval_loss"))


def assert_same_curves(run_a: Path, run_b: Path, curves=CURVES, rel: float = 1e-4) -> None:
    """Two runs' metrics.jsonl agree, curve by curve, to ``rel`` (and neither is empty)."""
    from trainer.metrics import read_metrics

    rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
    for kind, key in curves:
        values_a = [r[key] for r in rows_a if r["type"] == kind]
        values_b = [r[key] for r in rows_b if r["type"] == kind]
        assert len(values_a) == len(values_b) > 0, key
        assert values_a == pytest.approx(values_b, rel=rel), key

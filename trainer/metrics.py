"""Telemetry of a run: ``RUN/metrics.jsonl`` rows, the progress bar, and the loss-curve PNG.

Every row is one JSON object with a ``type``: ``train`` (step, epoch, loss, lr, grad_norm,
tokens, trained_tokens, tokens_per_s, data_wait — the share of the step spent waiting for
batches), ``eval`` (step, eval_loss, eval_tokens, best), or ``stop`` (step, reason). Only rank 0
writes. A resumed run first drops rows past its checkpoint, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_path

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            continue
    return rows


class MetricsLog:
    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(run_dir) if resume_step is not None and r.get("step", 0) <= resume_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def plot_loss(run_dir: str | Path) -> Path | None:
    """``RUN/loss.png``: training loss per step and validation loss per evaluation."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("type") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("type") == "eval" and math.isfinite(r["eval_loss"])]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / LOSS_PNG
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out

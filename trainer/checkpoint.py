"""Checkpoints: everything an exact resume needs, written atomically, pruned to best + last k.

Layout of ``RUN/checkpoints/step-00000120/``::

    state.pt         {"model", "optimizer", "scheduler", "train_state", "config"}
    rng-rank{R}.pt   {"python", "numpy", "torch", "cuda"} of rank R (every rank has its own)

A checkpoint is assembled in ``RUN/checkpoints/.tmp-step-…`` and renamed into place once every
rank's files are in it, so a folder named ``step-*`` is always complete; a crash leaves only a
``.tmp-`` folder that the next run deletes. Everything is stored as tensors and plain Python
types so ``torch.load(..., weights_only=True)`` can read it: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.fsutil import TMP_PREFIX, atomic_path
from trainer import distributed

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """The run's position: plain integers and floats, nothing hidden in iterators."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    micro_index: int = 0  # index of the next micro-batch in this epoch's per-rank plan
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    best_eval_loss: float = float("inf")
    best_step: int = -1
    evals_since_best: int = 0
    world_size: int = 1  # the per-rank plans, hence micro_index, depend on it


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_partial(run_dir: Path) -> None:
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for leftover in folder.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


# --- RNG states as weights_only-loadable values ----------------------------------------------
def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
         numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load -----------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write step ``state.step``'s checkpoint (a collective: every rank must call it)."""
    info = distributed.current()
    final = step_dir(run_dir, state.step)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if final.exists():  # already saved at this step (e.g. SIGTERM right after a periodic save)
        return final
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    with atomic_path(tmp / f"rng-rank{info.rank}.pt") as part:
        torch.save(rng_state(), part)
    distributed.barrier()
    if info.is_main:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "train_state": asdict(state),
            "config": config,
        }
        with atomic_path(tmp / "state.pt") as part:
            torch.save(payload, part)
        os.replace(tmp, final)
        prune(run_dir, keep_last=keep_last, best_step=state.best_step)
    distributed.barrier()
    return final


def prune(run_dir: Path, *, keep_last: int, best_step: int) -> None:
    """Delete all checkpoints but the newest ``keep_last`` and the best one."""
    found = list_checkpoints(run_dir)
    keep = {step for step, _ in found[-keep_last:]} | {best_step}
    for step, path in found:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint folder whose files cannot be read back (damaged on disk or by hand)."""


def _load(file: Path, **kwargs) -> Any:
    """``torch.load`` of a checkpoint file; an unreadable one is a CheckpointError naming what to do."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        folder = file.parent
        older = [p for step, p in list_checkpoints(folder.parent.parent) if p != folder and p.name < folder.name]
        hint = (
            f"move it aside to resume from the previous checkpoint {older[-1].name}" if older
            else "move it aside to start over"
        )
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {folder} is damaged: {file.name} cannot be read ({first_line}); {hint}") from exc


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The training config a checkpoint was written with (to refuse resuming with another plan)."""
    payload = _load(path / "state.pt", mmap=True)
    try:
        return {**payload["config"], "world_size": payload["train_state"].get("world_size", 1)}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: state.pt lacks its config or train state") from exc


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None) -> TrainState:
    """Restore a checkpoint into these objects (and this rank's RNGs); returns the run position."""
    payload = _load(path / "state.pt")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:  # other shapes or names: another --model than the run was started with
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} holds weights of another model than the one given ({first_line}); "
            "resume with the --model the run was started with"
        ) from exc
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    rng_file = path / f"rng-rank{distributed.current().rank}.pt"
    if optimizer is not None and rng_file.is_file():
        set_rng_state(_load(rng_file))
    return TrainState(**payload["train_state"])

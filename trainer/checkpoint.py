"""Checkpoints: everything an exact resume needs, written atomically, pruned to best + last k.

Layout of ``RUN/checkpoints/step-00000120/``::

    state.pt         {"model", "optimizer", "scheduler", "train_state", "config"}
                     (a LoRA run's "model" holds only its adapters: the base is frozen)
    rng-rank{R}.pt   {"python", "numpy", "torch", "cuda"} of rank R (every rank has its own)

and with ``--fsdp``, where no rank ever holds the whole model or optimizer::

    state.pt         {"scheduler", "train_state", "config"}
    sharded/         torch.distributed.checkpoint folder of {"model", "optimizer"}, keyed by
                     parameter name: ``.metadata`` + one ``__R_0.distcp`` per saving rank R
    rng-rank{R}.pt   as above

A sharded checkpoint can be read back by any number of ranks (DCP reshards weights and AdamW
moments), sharded or not; the data position is converted by :meth:`TrainState.on_ranks`.

A checkpoint is assembled in ``RUN/checkpoints/.tmp-step-…`` and renamed into place once every
rank's files are in it, so a folder named ``step-*`` is always complete; a crash leaves only a
``.tmp-`` folder that the next run deletes. Everything is stored as tensors and plain Python
types so ``torch.load(..., weights_only=True)`` can read it: no pickled code is ever executed.
DCP reads its ``.metadata`` with plain ``pickle``, so that file is first checked to name only
DCP's own metadata classes, dtypes and paths (:func:`_check_metadata`).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import CheckpointException

from pipeline.fsutil import TMP_PREFIX, atomic_path
from trainer import distributed, lora, sharding

STEP_DIR = re.compile(r"^step-(\d+)$")
SHARDED_DIR = "sharded"


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

    def on_ranks(self, world_size: int) -> tuple[TrainState, int]:
        """This position for a run on ``world_size`` ranks, and how many micro-batches that skips.

        Rank r's plan is ``plan[r::world_size]`` (:func:`trainer.sampling.rank_slice`), so
        ``micro_index * self.world_size`` global micro-batches are consumed. The new ranks go on
        at the first one none of them has consumed; when the count does not divide, fewer than
        ``world_size`` micro-batches of this epoch are skipped.
        """
        consumed = self.micro_index * self.world_size
        micro_index = -(-consumed // world_size)
        return replace(self, micro_index=micro_index, world_size=world_size), micro_index * world_size - consumed


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
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
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
    sharded: bool = False,
) -> Path:
    """Write step ``state.step``'s checkpoint (a collective: every rank must call it); ``sharded``
    writes model and optimizer with DCP, each rank its own shards."""
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
    if sharded:
        _save_sharded(tmp / SHARDED_DIR, model, optimizer)
    distributed.barrier()
    if info.is_main:
        payload = {"scheduler": scheduler.state_dict(), "train_state": asdict(state), "config": config}
        if not sharded:
            payload.update(model=_model_state(model), optimizer=optimizer.state_dict())
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
        raise _damaged(file.parent, file.name, exc) from exc


def _damaged(folder: Path, name: str, exc: BaseException) -> CheckpointError:
    older = [p for step, p in list_checkpoints(folder.parent.parent) if p != folder and p.name < folder.name]
    hint = f"move it aside to resume from the previous checkpoint {older[-1].name}" if older else "move it aside to start over"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"checkpoint {folder} is damaged: {name} cannot be read ({first_line}); {hint}")


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The training config a checkpoint was written with (to refuse resuming with another plan)."""
    payload = _load(path / "state.pt", mmap=True)
    try:
        return {**payload["config"], "world_size": payload["train_state"].get("world_size", 1)}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: state.pt lacks its config or train state") from exc


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None) -> TrainState:
    """Restore a checkpoint into these objects (and this rank's RNGs); returns the run position.
    A collective when the checkpoint is sharded: every rank must call it."""
    payload = _load(path / "state.pt")
    try:
        if (path / SHARDED_DIR).is_dir():
            _load_sharded(path / SHARDED_DIR, model, optimizer)
        elif sharding.is_sharded(model):
            raise CheckpointError(f"checkpoint {path} was saved without --fsdp; resume it without --fsdp")
        else:
            _load_model_state(model, payload["model"])
            if optimizer is not None:
                optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, CheckpointException) as exc:  # other shapes or names: another --model than the run's
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} holds weights of another model than the one given ({first_line}); "
            "resume with the --model the run was started with"
        ) from exc
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    rng_file = path / f"rng-rank{distributed.current().rank}.pt"
    if optimizer is not None and rng_file.is_file():
        set_rng_state(_load(rng_file))
    return TrainState(**payload["train_state"])


def _model_state(model) -> dict[str, torch.Tensor]:
    """The whole model, or only what trains when the rest is frozen: a LoRA run's checkpoints hold
    its adapters (megabytes), since the frozen base is the --model the run is resumed with."""
    return lora.trainable_state(model) if lora.is_lora(model) else model.state_dict()


def _load_model_state(model, saved: dict[str, torch.Tensor]) -> None:
    if not lora.is_lora(model):
        model.load_state_dict(saved)
        return
    expected = set(lora.trainable_state(model))
    if set(saved) != expected:
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise RuntimeError(f"the adapters differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(saved, strict=False)


# --- sharded (DCP) model + optimizer ---------------------------------------------------------
def _save_sharded(folder: Path, model, optimizer) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def _load_sharded(folder: Path, model, optimizer=None) -> None:
    """Read ``folder`` into the model (and optimizer) in place, whatever their sharding is now."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    _check_metadata(folder)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# What a DCP ``.metadata`` pickle may name: DCP's metadata dataclasses and enums, torch dtypes,
# layouts, memory formats and sizes, and the checkpoint's path. Nothing else is ever imported.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")


def _check_metadata(folder: Path) -> None:
    """Unpickle DCP's ``.metadata`` with only the allowed globals, before DCP unpickles it for real."""
    file = folder / ".metadata"
    try:
        with open(file, "rb") as stream:
            _MetadataUnpickler(stream).load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise _damaged(folder.parent, f"{SHARDED_DIR}/.metadata", exc) from exc

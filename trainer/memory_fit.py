"""What fits a GPU: ``--gpu-memory`` sizes, the flags that bring a memory estimate under them, and
the report of ``sftkit train --dry-run``.

:func:`suggest_fits` tries every combination of the memory-saving changes below on top of the
current settings, keeps those whose estimate (:mod:`trainer.memory`) fits the GPU with
:data:`~trainer.memory.HEADROOM` to spare, drops any that merely add flags to a smaller fitting
set, and orders the rest cheapest first. What a change costs:

| change | cost | why |
|---|---|---|
| ``--loss-chunk-tokens 1024`` | 0 | the same loss and gradients, no slower (0.70x the plain loss on CPU, bench/loss_memory.py) |
| ``--activation-checkpointing`` | 1 | one more forward pass per step, about a third more compute |
| ``--batch-tokens N/2 --grad-accum 2x`` | 1 per halving | the same tokens per step in smaller, less efficient kernels |
| ``--fsdp`` over the GPUs you have | 1 | all-gathers and reduce-scatters every step |
| ``--dtype bf16`` on a LoRA run | 1 | the frozen base in bf16 (the adapters stay fp32) |
| ``--lora-r 16`` | 3 | trains adapters instead of the weights: another, smaller fine-tune |
| ``--fsdp`` over more GPUs than you have | 4 | more hardware |

``--dtype bf16`` is never suggested for full fine-tuning: the trainer then updates bf16 weights
directly, and an update below 1/256 of a weight rounds away (most of them at lr 1e-5).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import DEFAULT_CHUNK_TOKENS
from trainer.memory import HEADROOM, MemoryEstimate, ModelShape, Strategy, estimate, load_model_config, model_shape

SUGGESTED_LORA_R = 16
MIN_BATCH_TOKENS = 1024  # below this a step is mostly kernel launches
FSDP_SIZES = (2, 4, 8)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``80GB``, ``80GiB`` or ``80G`` (all 80 x 2^30), ``81559MiB``, or a plain number of bytes.

    Units are binary even when written GB: GPU memory is sold that way (an "80GB" A100 holds
    81,920 MiB, an "80GB" H100 81,559 MiB), so reading 80GB as 80 x 10^9 would plan for 7 %
    less memory than the card has."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read the memory size {text!r}; write it like 80GB, 24GiB or 24G")
    number, unit = match.groups()
    if not unit:
        size = int(float(number))
    else:
        size = int(float(number) * 1024 ** ("kmgt".index(unit.lower()) + 1))
    if size < 1:
        raise ValueError(f"the memory size {text!r} is no memory at all; write the GPU's size, like 80GB, 24GiB or 24G")
    return size


def usable_bytes(gpu_bytes: int) -> int:
    return int(gpu_bytes * (1 - HEADROOM))


@dataclass(frozen=True)
class Change:
    args: tuple[str, ...]  # what to add to `sftkit train`
    cost: int
    fields: dict  # the Strategy fields it sets
    launch: str = ""  # how to start it, when that changes too


@dataclass(frozen=True)
class Suggestion:
    changes: tuple[Change, ...]
    estimate: MemoryEstimate

    @property
    def args(self) -> tuple[str, ...]:
        return tuple(arg for change in self.changes for arg in change.args)

    @property
    def cost(self) -> int:
        return sum(change.cost for change in self.changes)

    @property
    def strategy(self) -> Strategy:
        return self.estimate.strategy

    @property
    def launch(self) -> str:
        return next((change.launch for change in self.changes if change.launch), "")


def _knobs(current: Strategy, gpus: int, grad_accum: int) -> list[list[Change | None]]:
    """Per kind of change, its levels (None = leave it); a higher level saves more and costs more."""
    knobs: list[list[Change | None]] = []
    if not current.loss_chunk_tokens:
        chunk = str(DEFAULT_CHUNK_TOKENS)
        knobs.append([None, Change(("--loss-chunk-tokens", chunk), 0, {"loss_chunk_tokens": DEFAULT_CHUNK_TOKENS})])
    if not current.activation_checkpointing:
        knobs.append([None, Change(("--activation-checkpointing",), 1, {"activation_checkpointing": True})])
    halvings: list[Change | None] = [None]
    for times in (1, 2, 3):
        tokens = current.batch_tokens >> times
        if tokens < MIN_BATCH_TOKENS:
            break
        pack_length = min(current.pack_length, tokens) if current.pack_length else None
        args = ("--batch-tokens", str(tokens), "--grad-accum", str(grad_accum << times))
        halvings.append(Change(args, times, {"batch_tokens": tokens, "pack_length": pack_length}))
    knobs.append(halvings)
    lora = ("--lora-r", str(SUGGESTED_LORA_R))
    if not current.lora_r:
        knobs.append(
            [
                None,
                Change(lora, 3, {"lora_r": SUGGESTED_LORA_R}),
                Change((*lora, "--dtype", "bf16"), 3, {"lora_r": SUGGESTED_LORA_R, "dtype": "bf16"}),
            ]
        )
    elif current.dtype == "fp32":
        knobs.append([None, Change(("--dtype", "bf16"), 1, {"dtype": "bf16"})])
    if current.fsdp_gpus <= 1:
        sharded: list[Change | None] = [None]
        for count in sorted({gpus, *FSDP_SIZES}):
            if count > 1 and count >= gpus:
                launch = f"torchrun --nproc-per-node {count}" + ("" if count == gpus else f": {count} GPUs")
                sharded.append(Change(("--fsdp",), 1 if count == gpus else 4, {"fsdp_gpus": count, "world_size": count}, launch))
        knobs.append(sharded)
    return knobs


def suggest_fits(
    shape: ModelShape, current: Strategy, gpu_bytes: int, *, gpus: int = 1, grad_accum: int = 1, limit: int = 5
) -> list[Suggestion]:
    """The smallest sets of changes that bring ``current`` under ``gpu_bytes`` (less the headroom),
    cheapest first; empty when it already fits or nothing does."""
    budget = usable_bytes(gpu_bytes)
    if estimate(shape, current).total <= budget:
        return []
    knobs = _knobs(current, gpus, grad_accum)
    fitting: list[tuple[tuple[int, ...], Suggestion]] = []
    for levels in itertools.product(*(range(len(knob)) for knob in knobs)):
        changes = tuple(knob[level] for knob, level in zip(knobs, levels) if level)
        strategy = replace(current, **{key: value for change in changes for key, value in change.fields.items()})
        if strategy.lora_r and strategy.fsdp_gpus > 1:
            continue  # the trainer does not shard LoRA runs yet (trainer/sharding.py)
        result = estimate(shape, strategy)
        if changes and result.total <= budget:
            fitting.append((levels, Suggestion(changes, result)))
    # Drop a set that only adds to (or raises a level of) another fitting set.
    minimal = [
        suggestion
        for levels, suggestion in fitting
        if not any(other != levels and all(mine <= theirs for mine, theirs in zip(other, levels)) for other, _ in fitting)
    ]
    minimal.sort(key=lambda suggestion: (suggestion.cost, suggestion.estimate.total))
    return minimal[:limit]


# --- sftkit train --dry-run ----------------------------------------------------------------
def strategy_from_config(config, gpus: int) -> Strategy:
    """The memory-relevant settings of a TrainConfig on ``gpus`` GPUs (per GPU, on CUDA)."""
    return Strategy(
        batch_tokens=config.batch_tokens,
        lora_r=config.lora_r,
        fsdp_gpus=gpus if config.fsdp and gpus > 1 else 0,
        activation_checkpointing=config.activation_checkpointing,
        loss_chunk_tokens=config.loss_chunk_tokens,
        dtype=config.dtype,
        pack_length=config.pack_length,
        world_size=gpus,
        lora_targets=tuple(config.lora_targets) if config.lora_targets else None,
        attn_implementation=config.attn_implementation or "sdpa",
        device="cuda",
    )


def default_gpus() -> int:
    """torchrun's WORLD_SIZE when launched by it, else 1."""
    return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


@dataclass(frozen=True)
class DryRun:
    model: str
    shape: ModelShape
    estimate: MemoryEstimate
    gpus: int
    gpu_bytes: int | None
    suggestions: list[Suggestion]

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.estimate.total <= usable_bytes(self.gpu_bytes)


def dry_run(config, *, gpus: int | None = None, gpu_memory: str | None = None) -> DryRun:
    """The estimate for a TrainConfig, from the model's config alone (``tiny``: the dataset's
    tokenizer, for the vocabulary); no weights, no dataset rows."""
    gpus = gpus or default_gpus()
    gpu_bytes = parse_size(gpu_memory) if gpu_memory is not None else None
    tokenizer = None
    from trainer.models import TINY

    if config.model == TINY:
        from trainer.models import resolve_tokenizer

        # An explicit --tokenizer needs no data folder (resolve_tokenizer does not read it then).
        data = _data_folder(config) if not config.tokenizer else None
        tokenizer = resolve_tokenizer(data, config.model, config.tokenizer)
    shape = model_shape(load_model_config(config.model, tokenizer))
    current = strategy_from_config(config, gpus)
    suggestions = suggest_fits(shape, current, gpu_bytes, gpus=gpus, grad_accum=config.grad_accum) if gpu_bytes is not None else []
    return DryRun(config.model, shape, estimate(shape, current), gpus, gpu_bytes, suggestions)


def _data_folder(config) -> Path:
    if config.data is not None:
        return Path(config.data)
    if getattr(config, "mixture", None) is not None:
        from trainer.mixture import read_spec

        return Path(config.mixture).parent / read_spec(config.mixture).datasets[0]
    raise ValueError("--model tiny takes its vocabulary from the data's tokenizer: pass --data DIR (or --tokenizer)")


def gib(value: int) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{value / 2**30:,.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:,.1f} MiB"


def memory_table(result: MemoryEstimate, title: str):
    """A rich table of the estimate's rows and total."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("per GPU")
    table.add_column("memory", justify="right")
    table.add_column("how", style="dim")
    for name, value, how in result.rows():
        table.add_row(name, ("−" + gib(-value)) if value < 0 else gib(value), how)
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{gib(result.total)}[/]", "the sum: a little above the true peak")
    return table


def print_dry_run(report: DryRun, console) -> None:
    s = report.estimate.strategy
    setting = (
        f"{report.model}: {report.shape.num_params:,} params, {s.batch_tokens} tokens per GPU, dtype {s.dtype}"
        + (f", LoRA r={s.lora_r}" if s.lora_r else ", full fine-tune")
        + (f", FSDP over {s.fsdp_gpus} GPUs" if s.fsdp_gpus > 1 else (f", DDP over {report.gpus} GPUs" if report.gpus > 1 else ""))
        + (", activation checkpointing" if s.activation_checkpointing else "")
        + (f", loss in chunks of {s.loss_chunk_tokens}" if s.loss_chunk_tokens else ", plain loss")
    )
    console.print(memory_table(report.estimate, setting))
    if report.gpu_bytes is None:
        console.print("add --gpu-memory SIZE (e.g. 80GB) to see whether it fits and what would make it fit")
        return
    limit = f"{gib(report.gpu_bytes)} GPU ({gib(usable_bytes(report.gpu_bytes))} usable, {HEADROOM:.0%} kept free)"
    if report.fits:
        console.print(f"[green]fits[/] a {limit}")
        return
    if not report.suggestions:
        console.print(f"[red]does not fit[/] a {limit}, and no combination of the memory-saving flags makes it fit")
        return
    from rich.table import Table

    table = Table(title=f"does not fit a {limit}; each of these would, cheapest first:", title_justify="left")
    table.add_column("add to the command")
    table.add_column("launch with")
    table.add_column("estimate", justify="right")
    for suggestion in report.suggestions:
        table.add_row(" ".join(suggestion.args), suggestion.launch, gib(suggestion.estimate.total))
    console.print(table)

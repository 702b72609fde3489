"""The ``sftkit`` command line: thin typer wrappers around flows and plain library functions."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer

# The one source of the training defaults (see _trained); it imports no torch, so the CLI starts fast.
from trainer.config import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="sftkit: turn messy instruction data into training-ready SFT shards, and fine-tune on them.",
)


class TaskRunner(str, Enum):
    threads = "threads"
    processes = "processes"
    dask = "dask"
    ray = "ray"


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Exit codes scripts can rely on (tests/faults/test_exit_codes.py holds them to it).
EXIT_FAILED = 1  # the command ran but produced nothing usable (prepare kept no record)
EXIT_USAGE = 2  # bad options or inputs: nothing was done
EXIT_INTEGRITY = 3  # a dataset's files are missing or differ from their manifest sha256
EXIT_SIGTERM = 128 + 15  # train stopped by SIGTERM after saving its checkpoint (the shell's 143)


def _say(message: str, label: str = "error") -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: a long path in the sentence is never broken by an inserted newline.
    Console(stderr=True, soft_wrap=True).print(f"[bold red]{label}:[/] {escape(message)}", highlight=False)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    _say(message)
    raise typer.Exit(code=code)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that come from the user's inputs, not from a bug: one sentence, never a traceback.

    OSError covers unreadable or vanished files (and pyarrow's IO errors); ValueError covers our
    own refusals, pydantic's validation and pyarrow's ArrowInvalid (a damaged Parquet file).
    """
    errors: list[type[BaseException]] = [ValueError, OSError]
    try:
        from polars.exceptions import PolarsError

        errors.append(PolarsError)
    except ImportError:  # pragma: no cover - polars is a dependency
        pass
    return tuple(errors)


def _validation_sentence(exc: Exception) -> str:
    """A pydantic ValidationError as one sentence ("lr: Input should be ...; ..."), else str(exc)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    try:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors()]
    except Exception:  # noqa: BLE001 - anything odd: the plain text is still a sentence
        return str(exc)
    return "invalid settings: " + "; ".join(parts)


def _at_least(low: float, *, strict: bool = False):
    """A typer callback refusing values below ``low`` (or not above it, with ``strict``), and
    ``inf``/``nan`` (which compare past the bound: ``--epochs inf`` overflowed into a traceback);
    None passes."""

    def check(value):
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number (got {value})")
        if value is not None and (value <= low if strict else value < low):
            bound = f"> {low:g}" if strict else f"≥ {low:g}"
            raise typer.BadParameter(f"must be {bound} (got {value:g})")
        return value

    return check


def _trained(field: str):
    """TrainConfig's default for ``field``: what ``sftkit train --<field>`` means when not given."""
    return TrainConfig.model_fields[field].default


@app.command()
def prepare(
    inputs: list[str] = typer.Argument(..., help="files or globs: .json, .jsonl(.gz|.zst), .parquet, or a save_to_disk folder"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="local Hugging Face tokenizer folder (or hub name when online)"),
    out: Path = typer.Option(..., "--out", help="dataset folder (created; a later run refreshes it)"),
    config: Path | None = typer.Option(None, "--config", help="YAML config file"),
    template: str | None = typer.Option(None, "--template", help="auto | chatml | llama3 | mistral | alpaca | FILE.jinja"),
    max_length: int | None = typer.Option(None, "--max-length", help="longest row in tokens", callback=_at_least(1)),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="share of rows in the validation split (0 to < 1)", callback=_at_least(0)
    ),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="skip exact and near-duplicate removal"),
    reasoning: str | None = typer.Option(
        None, "--reasoning", help="template | per_turn | drop: how assistant reasoning is rendered and trained"
    ),
    strict_render: bool = typer.Option(False, "--strict-render", help="reject rows whose prompt tokens differ from what inference renders"),
    task_runner: TaskRunner = typer.Option(TaskRunner.threads, "--task-runner", help="where flow tasks run"),
    flow: bool | None = typer.Option(
        None,
        "--flow/--no-flow",
        help="run as a Prefect flow, or the same steps in this process; default: a flow when a Prefect server is configured",
        show_default=False,
    ),
) -> None:
    """Read, dedup, filter, render, tokenize and write Parquet shards with label arrays."""
    from flows.runner import run_prepare
    from pipeline.workers import WorkerError, arrow_without_pandas

    arrow_without_pandas()  # a run hands pyarrow no pandas object: 0.2-0.3 s not spent importing it
    try:
        manifest = run_prepare(
            inputs=inputs,
            tokenizer=tokenizer,
            out=out,
            config_file=config,
            template=template,
            max_length=max_length,
            val_fraction=val_fraction,
            no_dedup=no_dedup,
            task_runner=task_runner.value,
            use_flow=flow,
            reasoning=reasoning,
            strict_render=strict_render,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(_validation_sentence(exc))
    except WorkerError as exc:
        _fail(f"{exc}. The run stopped and published nothing; the same command goes on from the steps it had done", code=EXIT_FAILED)
    counts = manifest.get("counts") or {}
    if not counts.get("kept"):
        _fail(
            f"nothing was kept: {out} holds no training row (all {counts.get('read', 0)} records read were "
            f"rejected; see the reasons above or `sftkit inspect {out} --rejected`)",
            code=EXIT_FAILED,
        )


@app.command()
def train(
    data: Path | None = typer.Option(_trained("data"), "--data", help="a dataset folder made by `sftkit prepare`"),
    mixture: Path | None = typer.Option(
        _trained("mixture"), "--mixture", help="a training mixture spec (YAML: folders, source groups, weights) instead of --data"
    ),
    # Required although TrainConfig has a default: a run from the command line names its folder.
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints, metrics.jsonl, loss.png, final/"),
    model: str = typer.Option(_trained("model"), "--model", help="tiny | local HF model folder | hub name"),
    tokenizer: str | None = typer.Option(
        _trained("tokenizer"), "--tokenizer", help="override the tokenizer named in the dataset's manifest"
    ),
    max_steps: int | None = typer.Option(
        _trained("max_steps"), "--max-steps", help="optimizer steps (≥ 1); overrides --epochs", callback=_at_least(1)
    ),
    epochs: float = typer.Option(_trained("epochs"), "--epochs", callback=_at_least(0, strict=True)),
    lr: float = typer.Option(_trained("lr"), "--lr", callback=_at_least(0, strict=True)),
    batch_tokens: int = typer.Option(_trained("batch_tokens"), "--batch-tokens", help="tokens per micro-batch", callback=_at_least(1)),
    grad_accum: int = typer.Option(_trained("grad_accum"), "--grad-accum", callback=_at_least(1)),
    packing: bool = typer.Option(_trained("packing"), "--packing/--no-packing"),
    eval_every: int = typer.Option(_trained("eval_every"), "--eval-every", callback=_at_least(1)),
    patience: int | None = typer.Option(
        _trained("patience"), "--patience", help="evaluations without improvement before stopping", callback=_at_least(0)
    ),
    save_every: int = typer.Option(_trained("save_every"), "--save-every", callback=_at_least(1)),
    resume: bool = typer.Option(_trained("resume"), "--resume"),
    seed: int = typer.Option(_trained("seed"), "--seed"),
    device: Device = typer.Option(Device(_trained("device")), "--device"),
    dtype: DType = typer.Option(
        DType(_trained("dtype")), "--dtype", help="dtype of the model's weights (bf16 halves them; for LoRA's frozen base)"
    ),
    lora_r: int = typer.Option(_trained("lora_r"), "--lora-r", help="LoRA rank (0 = full fine-tuning)", callback=_at_least(0)),
    lora_alpha: float | None = typer.Option(_trained("lora_alpha"), "--lora-alpha", help="LoRA alpha (default 2 x rank)"),
    lora_dropout: float = typer.Option(_trained("lora_dropout"), "--lora-dropout", callback=_at_least(0)),
    lora_targets: str | None = typer.Option(
        _trained("lora_targets"),
        "--lora-targets",
        help="comma-separated layer names for adapters (default: attention and MLP projections)",
    ),
    merge: bool = typer.Option(_trained("merge"), "--merge", help="LoRA: also write final/merged, a plain transformers model"),
    loss_chunk_tokens: int = typer.Option(
        _trained("loss_chunk_tokens"),
        "--loss-chunk-tokens",
        help="trained positions whose logits exist at once (0 = full logits)",
        callback=_at_least(0),
    ),
    attn_implementation: str | None = typer.Option(
        _trained("attn_implementation"),
        "--attn-implementation",
        help="sdpa (default) | flash_attention_2 | flex_attention | eager; flash attention runs packed rows as varlen "
        "calls without a (row x row) mask",
    ),
    fsdp: bool = typer.Option(
        _trained("fsdp"), "--fsdp", help="under torchrun: shard weights, gradients and optimizer state (FSDP2; not with --lora-r)"
    ),
    activation_checkpointing: bool = typer.Option(
        _trained("activation_checkpointing"),
        "--activation-checkpointing",
        help="recompute each decoder layer's activations in backward (less memory)",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the per-GPU memory estimate and exit (reads the model's config.json only)"
    ),
    gpu_memory: str | None = typer.Option(
        None, "--gpu-memory", help="--dry-run: memory of one GPU (80GB, 24GiB); prints the flags that fit it"
    ),
    gpus: int | None = typer.Option(
        None, "--gpus", help="--dry-run: number of GPUs (default torchrun's WORLD_SIZE, else 1)", callback=_at_least(1)
    ),
) -> None:
    """Fine-tune a causal LM on prepared shards (memory-mapped, packed, masked loss)."""
    # Every option is named after the TrainConfig field it sets (and takes its default from it).
    options = {name: value for name, value in locals().items() if name in TrainConfig.model_fields}
    options |= {"device": device.value, "dtype": dtype.value}
    options["lora_targets"] = [name.strip() for name in lora_targets.split(",") if name.strip()] if lora_targets else None
    from trainer.loop import run_training

    try:
        config = TrainConfig(**options)
    except ValueError as exc:
        _fail(_validation_sentence(exc))
    if dry_run:
        from rich.console import Console

        from trainer.memory_fit import dry_run as estimate_run
        from trainer.memory_fit import print_dry_run

        try:
            print_dry_run(estimate_run(config, gpus=gpus, gpu_memory=gpu_memory), Console(soft_wrap=True))
        except _expected_errors() as exc:
            _fail(str(exc))
        return
    if gpu_memory is not None or gpus is not None:
        _fail("--gpu-memory and --gpus go with --dry-run (a training run takes its GPUs from torchrun)")
    try:
        summary = run_training(config)
    except _expected_errors() as exc:
        _fail(str(exc))
    from rich.console import Console

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one summary (rank 0's), not one per rank
        raise typer.Exit(code=EXIT_SIGTERM if summary["stop_reason"] == "sigterm" else 0)
    if summary["stop_reason"] == "sigterm":
        _say(
            f"stopped by SIGTERM at step {summary['steps']}; the checkpoint is saved in {out}/checkpoints/, "
            "continue with the same command and --resume",
            label="interrupted",
        )
        raise typer.Exit(code=EXIT_SIGTERM)

    best = f", best val loss {summary['best_eval_loss']:.4f} at step {summary['best_step']}" if summary["best_step"] else ""
    Console().print(f"[bold]trained[/] {summary['steps']} steps ({summary['stop_reason']}){best}")
    if summary["final_dir"]:
        Console().print(f"final model + tokenizer: {summary['final_dir']}")
    Console().print(f"metrics: {out}/metrics.jsonl, loss curve: {out}/loss.png, checkpoints: {out}/checkpoints/")


@app.command()
def plan(
    mixture: Path = typer.Option(..., "--mixture", help="a training mixture spec (YAML)"),
    batch_tokens: int = typer.Option(_trained("batch_tokens"), "--batch-tokens", help="tokens per micro-batch", callback=_at_least(1)),
    epochs: float = typer.Option(_trained("epochs"), "--epochs", callback=_at_least(0, strict=True)),
    max_steps: int | None = typer.Option(_trained("max_steps"), "--max-steps", callback=_at_least(1)),
    grad_accum: int = typer.Option(_trained("grad_accum"), "--grad-accum", callback=_at_least(1)),
    world_size: int = typer.Option(1, "--world-size", help="ranks the run will use (torchrun processes)", callback=_at_least(1)),
    packing: bool = typer.Option(_trained("packing"), "--packing/--no-packing"),
    seed: int = typer.Option(_trained("seed"), "--seed", help="train --seed (the spec's own seed, when it has one, decides the draws)"),
    json_output: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Pre-flight report of a training mixture: per group target vs delivered share, repeats, steps."""
    import json

    from pipeline.report.plan import print_plan
    from trainer.mixture_plan import plan_mixture

    try:
        report = plan_mixture(
            mixture,
            batch_tokens=batch_tokens,
            packing=packing,
            grad_accum=grad_accum,
            world_size=world_size,
            seed=seed,
            epochs=epochs,
            max_steps=max_steps,
        ).to_json()
    except _expected_errors() as exc:
        _fail(str(exc))
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_plan(None, report)


@app.command()
def inspect(
    data: Path | None = typer.Argument(None, help="a dataset folder made by `sftkit prepare`"),
    row: int | None = typer.Option(None, "--row", help="show row N of the train split"),
    id: str | None = typer.Option(None, "--id", help="show the row with this id"),
    sample: int | None = typer.Option(None, "--sample", help="show K random rows"),
    tokens: bool = typer.Option(False, "--tokens", help="show token boundaries"),
    rejected: bool = typer.Option(False, "--rejected", help="rejected counts per stage and reason, with examples"),
    html: Path | None = typer.Option(None, "--html", help="write a self-contained HTML report"),
    split: str = typer.Option("train", "--split", help="split that --row and --sample read"),
    seed: int | None = typer.Option(None, "--seed", help="seed for --sample (random when not given)"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="decode with this tokenizer instead of the manifest's"),
    mixture: Path | None = typer.Option(
        None, "--mixture", help="a training mixture spec: its plan (at the train defaults; `sftkit plan` takes others)"
    ),
) -> None:
    """Summarise a prepared dataset, show rows with trained tokens highlighted, or write a report.

    Every file the manifest lists is first checked against its sha256 (cached by size and
    modification time, so an unchanged dataset is hashed once): a missing or altered file is
    reported in red on stderr and the command exits 3. With ``--mixture FILE`` the mixture's
    plan is shown too (with --html: as a section of the page; without DIR: on its own).
    """
    from pipeline.report import check_integrity, inspect_dataset
    from pipeline.report.integrity import load_manifest

    mixture_plan = None
    if mixture is not None:
        from trainer.mixture_plan import plan_mixture

        try:
            mixture_plan = plan_mixture(mixture).to_json()
        except _expected_errors() as exc:
            _fail(str(exc))
    if data is None:
        if mixture_plan is None:
            _fail("give a dataset folder made by `sftkit prepare`, or --mixture FILE")
        from rich.console import Console

        from pipeline.report.plan import print_plan, write_plan_page

        if html is not None:
            Console().print(f"wrote {write_plan_page(html, mixture_plan)}")
        else:
            print_plan(None, mixture_plan)
        return
    try:
        manifest = load_manifest(data)
        problems = check_integrity(data, manifest)
    except _expected_errors() as exc:
        _fail(str(exc))
    view_error = None
    if not any(p.kind == "missing" for p in problems):  # with a file gone there is no whole view
        try:
            inspect_dataset(
                data,
                row=row,
                row_id=id,
                sample=sample,
                tokens=tokens,
                rejected=rejected,
                html=html,
                split=split,
                seed=seed,
                tokenizer=tokenizer,
                mixture_plan=mixture_plan,
            )
        except _expected_errors() as exc:
            if not problems:
                _fail(str(exc))
            view_error = exc  # most likely the damage reported below
    if problems:
        for problem in problems:
            _say(problem.message(), label="INTEGRITY")
        if view_error is not None:
            _say(f"could not show {data}: {view_error}", label="INTEGRITY")
        _fail(
            f"{len(problems)} file(s) of {data} are not what its manifest.json records; do not train on it "
            f"(restore the files, or re-run `sftkit prepare` into a new folder)",
            code=EXIT_INTEGRITY,
        )


@app.command()
def deploy(
    inputs: list[str] = typer.Argument(..., help="inputs to refresh from on every run"),
    cron: str = typer.Option(..., "--cron", help='schedule, e.g. "0 3 * * *"'),
    tokenizer: str = typer.Option(..., "--tokenizer"),
    out: Path = typer.Option(..., "--out"),
    config: Path | None = typer.Option(None, "--config"),
    name: str = typer.Option("sftkit-refresh", "--name", help="deployment name"),
) -> None:
    """Serve the refresh flow on a schedule (needs a running `prefect server start`)."""
    from flows.deploy import serve_refresh

    try:
        serve_refresh(inputs=inputs, cron=cron, tokenizer=tokenizer, out=out, config_file=config, name=name)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def main() -> None:
    """The ``sftkit`` command: :data:`app`, then :func:`exit_without_teardown`."""
    try:
        app()
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    if code is not None and not isinstance(code, int):  # what sys.exit("message") does
        print(code, file=sys.stderr)
        code = 1
    exit_without_teardown(code or 0)


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End the process the way a normal exit does, without the interpreter's teardown.

    With torch, transformers and Prefect loaded, the teardown (freeing every module, then the
    libraries' static destructors) takes about a second after the work is done and the exit
    handlers have run, and in a torchrun process it can abort: gloo's threads may still hold
    tensors whose release needs the interpreter being torn down ("terminate called without an
    active exception", exit -6; pytorch/pytorch#179291). So this runs what a normal exit runs (it
    waits for non-daemon threads, runs the ``atexit`` handlers: Prefect drains its log and event
    queues, logging flushes, multiprocessing stops its children), flushes stdout and stderr, and
    ends the process with ``code``. ``sftkit`` ends this way; so can a script of one's own that
    trains under torchrun.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

"""The ``sftkit`` command line: thin typer wrappers around flows and plain library functions."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

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


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: a long path in the sentence is never broken by an inserted newline.
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def prepare(
    inputs: list[str] = typer.Argument(..., help="files or globs: .json, .jsonl(.gz|.zst), .parquet, or a save_to_disk folder"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="local Hugging Face tokenizer folder (or hub name when online)"),
    out: Path = typer.Option(..., "--out", help="dataset folder (created; a later run refreshes it)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    template: Optional[str] = typer.Option(None, "--template", help="auto | chatml | llama3 | mistral | alpaca | FILE.jinja"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="longest row in tokens"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="share of rows in the validation split"),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="skip exact and near-duplicate removal"),
    reasoning: Optional[str] = typer.Option(
        None, "--reasoning", help="template | per_turn | drop: how assistant reasoning is rendered and trained"
    ),
    strict_render: bool = typer.Option(
        False, "--strict-render", help="reject rows whose prompt tokens differ from what inference renders"
    ),
    task_runner: TaskRunner = typer.Option(TaskRunner.threads, "--task-runner", help="where flow tasks run"),
    no_flow: bool = typer.Option(False, "--no-flow", help="run the stages in this process, without Prefect"),
) -> None:
    """Read, dedup, filter, render, tokenize and write Parquet shards with label arrays."""
    from flows.runner import run_prepare

    try:
        run_prepare(
            inputs=inputs,
            tokenizer=tokenizer,
            out=out,
            config_file=config,
            template=template,
            max_length=max_length,
            val_fraction=val_fraction,
            no_dedup=no_dedup,
            task_runner=task_runner.value,
            use_flow=not no_flow,
            reasoning=reasoning,
            strict_render=strict_render,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="a dataset folder made by `sftkit prepare`"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints, metrics.jsonl, loss.png, final/"),
    model: str = typer.Option("tiny", "--model", help="tiny | local HF model folder | hub name"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="override the tokenizer named in the dataset's manifest"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    epochs: float = typer.Option(3.0, "--epochs"),
    lr: float = typer.Option(1e-5, "--lr"),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="tokens per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    packing: bool = typer.Option(True, "--packing/--no-packing"),
    eval_every: int = typer.Option(200, "--eval-every"),
    patience: Optional[int] = typer.Option(3, "--patience", help="evaluations without improvement before stopping"),
    save_every: int = typer.Option(500, "--save-every"),
    resume: bool = typer.Option(False, "--resume"),
    seed: int = typer.Option(0, "--seed"),
    device: Device = typer.Option(Device.auto, "--device"),
) -> None:
    """Fine-tune a causal LM on prepared shards (memory-mapped, packed, masked loss)."""
    from trainer.loop import TrainConfig, run_training

    config = TrainConfig(
        data=data,
        out=out,
        model=model,
        tokenizer=tokenizer,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        batch_tokens=batch_tokens,
        grad_accum=grad_accum,
        packing=packing,
        eval_every=eval_every,
        patience=patience,
        save_every=save_every,
        resume=resume,
        seed=seed,
        device=device.value,
    )
    try:
        summary = run_training(config)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    from rich.console import Console

    best = f", best val loss {summary['best_eval_loss']:.4f} at step {summary['best_step']}" if summary["best_step"] else ""
    Console().print(f"[bold]trained[/] {summary['steps']} steps ({summary['stop_reason']}){best}")
    if summary["final_dir"]:
        Console().print(f"final model + tokenizer: {summary['final_dir']}")
    Console().print(f"metrics: {out}/metrics.jsonl, loss curve: {out}/loss.png, checkpoints: {out}/checkpoints/")


@app.command()
def inspect(
    data: Path = typer.Argument(..., help="a dataset folder made by `sftkit prepare`"),
    row: Optional[int] = typer.Option(None, "--row", help="show row N of the train split"),
    id: Optional[str] = typer.Option(None, "--id", help="show the row with this id"),
    sample: Optional[int] = typer.Option(None, "--sample", help="show K random rows"),
    tokens: bool = typer.Option(False, "--tokens", help="show token boundaries"),
    rejected: bool = typer.Option(False, "--rejected", help="rejected counts per stage and reason, with examples"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report"),
    split: str = typer.Option("train", "--split", help="split that --row and --sample read"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for --sample (random when not given)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="decode with this tokenizer instead of the manifest's"),
) -> None:
    """Summarise a prepared dataset, show rows with trained tokens highlighted, or write a report."""
    from pipeline.report import inspect_dataset

    try:
        inspect_dataset(
            data, row=row, row_id=id, sample=sample, tokens=tokens, rejected=rejected, html=html,
            split=split, seed=seed, tokenizer=tokenizer,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def deploy(
    inputs: list[str] = typer.Argument(..., help="inputs to refresh from on every run"),
    cron: str = typer.Option(..., "--cron", help='schedule, e.g. "0 3 * * *"'),
    tokenizer: str = typer.Option(..., "--tokenizer"),
    out: Path = typer.Option(..., "--out"),
    config: Optional[Path] = typer.Option(None, "--config"),
    name: str = typer.Option("sftkit-refresh", "--name", help="deployment name"),
) -> None:
    """Serve the refresh flow on a schedule (needs a running `prefect server start`)."""
    from flows.deploy import serve_refresh

    try:
        serve_refresh(inputs=inputs, cron=cron, tokenizer=tokenizer, out=out, config_file=config, name=name)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


if __name__ == "__main__":
    app()

"""Glue between the CLI and the refresh flow: options -> config, task runner choice, summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import SFTConfig

console = Console(stderr=True)


def build_config(
    config_file: Path | None = None,
    template: str | None = None,
    max_length: int | None = None,
    val_fraction: float | None = None,
    no_dedup: bool = False,
    reasoning: str | None = None,
    strict_render: bool = False,
) -> SFTConfig:
    """The YAML config (or defaults) with command-line options applied on top."""
    config = SFTConfig.from_yaml(config_file) if config_file else SFTConfig()
    data = config.model_dump()
    if template is not None:
        if template.endswith((".jinja", ".j2")) or Path(template).is_file():
            data["template"]["jinja_file"] = template
        else:
            data["template"]["name"] = template
    if max_length is not None:
        data["tokenize"]["max_length"] = max_length
    if val_fraction is not None:
        data["shards"]["val_fraction"] = val_fraction
    if no_dedup:
        data["dedup"]["enabled"] = False
    if reasoning is not None:
        data["tokenize"]["reasoning"] = reasoning
    if strict_render:
        data["tokenize"]["strict_render"] = True
    return SFTConfig.model_validate(data)


def make_task_runner(name: str, max_workers: int | None = None):
    """threads | processes | dask | ray -> a Prefect task runner (dask/ray need their extras)."""
    import os

    workers = max_workers or os.cpu_count() or 2
    if name == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ValueError("the dask task runner needs the extra: pip install 'sftkit[dask]'") from exc
        address = os.environ.get("SFTKIT_DASK_ADDRESS")
        if address:  # an existing cluster, e.g. tcp://scheduler:8786
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    if name == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ValueError("the ray task runner needs the extra: pip install 'sftkit[ray]'") from exc
        address = os.environ.get("SFTKIT_RAY_ADDRESS")
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ValueError(f"unknown task runner {name!r}; expected threads, processes, dask or ray")


def show_sftkit_logs() -> None:
    """sftkit's own INFO lines on stderr (a big compressed input's progress, files a run removed)."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("sftkit")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, markup=False))
        logger.setLevel(logging.INFO)


def run_prepare(
    inputs: list[str],
    tokenizer: str,
    out: Path,
    config_file: Path | None = None,
    template: str | None = None,
    max_length: int | None = None,
    val_fraction: float | None = None,
    no_dedup: bool = False,
    task_runner: str = "threads",
    use_flow: bool | None = None,
    reasoning: str | None = None,
    strict_render: bool = False,
) -> dict[str, Any]:
    """Prepare ``out`` from ``inputs``: as the Prefect refresh flow or, with ``use_flow=False``,
    the same steps in this process. ``use_flow=None`` chooses: a flow when a Prefect server is
    configured (:func:`prefect_server_configured`), in-process otherwise, since without a server
    Prefect would first start a temporary one (15-30 s on a small machine) for a run that leaves
    no record anywhere once it ends."""
    from pipeline import outdir
    from pipeline.ingest import expand_inputs

    config = build_config(config_file, template, max_length, val_fraction, no_dedup, reasoning, strict_render)
    show_sftkit_logs()
    expand_inputs(inputs)  # fail fast, before any engine starts, on a path that is not there
    outdir.check_free(out)  # ... and on a folder that is not sftkit's or that another run is writing
    refuse_missing_tokenizer_folder(tokenizer)
    if use_flow is False and task_runner != "threads":
        raise ValueError(f"--task-runner {task_runner} runs Prefect tasks; it needs a flow (drop --no-flow)")
    if use_flow is None:
        # A task runner other than the default is a request for a flow.
        use_flow = task_runner != "threads" or prefect_server_configured()
        if not use_flow:
            console.print(
                "[dim]no Prefect server configured (PREFECT_API_URL): running the steps in this process; "
                "set it, or pass --flow, to run as a tracked Prefect flow[/]"
            )
    from pipeline import steps

    # The run loads its tokenizer in a process of its own; when the plan will want its fingerprints,
    # that starts here, so transformers is imported while this process imports Prefect.
    with steps.tokenizer_process(tokenizer, config):
        steps.warm_tokenizer(tokenizer, out, config)
        if use_flow:
            from flows.refresh import refresh_flow

            with console.status("[bold]running the sftkit-refresh flow[/] (Prefect)…"):
                flow = refresh_flow.with_options(task_runner=make_task_runner(task_runner))
                manifest = flow(inputs=list(inputs), tokenizer=tokenizer, out=str(out), config=config.model_dump(mode="json"))
        else:
            manifest = _prepare_with_progress(inputs, tokenizer, out, config)
    print_summary(manifest, out)
    return manifest


def prefect_server_configured() -> bool:
    """Whether Prefect would talk to a server (or Prefect Cloud) rather than start a temporary one:
    ``PREFECT_API_URL`` in the environment or in the active profile of ``$PREFECT_HOME/profiles.toml``.
    Read without importing Prefect (which costs a second or more)."""
    import os
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(profiles_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    settings = profiles.get("profiles", {}).get(active, {})
    return bool(isinstance(settings, dict) and settings.get("PREFECT_API_URL"))


def refuse_missing_tokenizer_folder(tokenizer: str) -> None:
    """A tokenizer written as a path (``/…``, ``./…``, ``~/…``, ``a/b/c``) that is not there is a typo
    or a moved folder, not a hub name: say so, instead of the hub client's complaint about repo ids."""
    text = str(tokenizer)
    looks_like_path = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path and not Path(text).expanduser().exists():
        raise ValueError(f"tokenizer folder {text!r} given with --tokenizer does not exist")


def _prepare_with_progress(inputs, tokenizer, out, config) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.steps import prepare

    with Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return prepare(inputs, tokenizer, out, config, progress=progress)


def print_summary(manifest: dict[str, Any], out: Path) -> None:
    counts = manifest["counts"]
    table = Table(title=f"sftkit prepare -> {out} (manifest version {manifest['version']})")
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_row("read", str(counts["read"]))
    table.add_row("kept", str(counts["kept"]), style="green")
    for stage, reasons in sorted(counts["rejected"].items()):
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            table.add_row(f"rejected: {stage} / {reason}", str(n), style="yellow")
    splits: dict[str, list[int]] = {}
    for shard in manifest["shards"]:
        rows_tokens = splits.setdefault(shard["split"], [0, 0, 0])
        rows_tokens[0] += shard["rows"]
        rows_tokens[1] += shard["tokens"]
        rows_tokens[2] += shard["trainable_tokens"]
    for split, (rows, tokens, trained) in sorted(splits.items()):
        table.add_row(f"{split}: rows / tokens / trained", f"{rows} / {tokens} / {trained}")
    if counts.get("turns_without_stop"):
        table.add_row("trained turns with no end-of-turn token", str(counts["turns_without_stop"]), style="yellow")
    console.print(table)
    if counts.get("turns_without_stop"):
        console.print(
            "[yellow]the chat template writes no end-of-turn token after those assistant turns, and sftkit knows "
            "no stop token for it: the model learns no stop from them[/]"
        )
    console.print(f"shards in {Path(out) / 'shards'}, rejected records in {Path(out) / 'rejected'}")

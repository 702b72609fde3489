"""Training launch flow: train on one prepared dataset version, or on a training mixture, and
record what went in and out.

The manifests of every dataset folder trained on, the training config and the final metrics
become run artifacts, so every model can be traced back to the exact shards (by sha256) it was
trained on.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._env import flow_runs_end_without_joining_heartbeats
from pipeline.manifest import read_manifest

flow_runs_end_without_joining_heartbeats()


@task(name="train")
def train_task(config: dict[str, Any]) -> dict[str, Any]:
    from trainer.loop import TrainConfig, run_training

    return run_training(TrainConfig(**config))


@flow(name="sftkit-train", description="Fine-tune on a prepared dataset version or a training mixture.")
def train_flow(
    data: str | None = None,
    out: str = "runs/sft",
    options: dict[str, Any] | None = None,
    expected_version: int | None = None,
    mixture: str | None = None,
) -> dict[str, Any]:
    """``options`` are `trainer.loop.TrainConfig` fields (model, lr, max_steps, ...); ``mixture``
    a mixture spec (YAML) to train on instead of the one folder ``data``."""
    from trainer.mixture import spec_folders

    if (data is None) == (mixture is None):
        raise ValueError("give the train flow `data` (a prepared folder) or `mixture` (a spec), exactly one")
    if expected_version is not None and data is None:
        raise ValueError("expected_version names the version of `data`; a mixture's folders each have their own")
    logger = get_run_logger()
    folders = [data] if data is not None else [str(folder) for folder in spec_folders(mixture)]
    shards = []
    for folder in folders:
        manifest = read_manifest(folder)
        if expected_version is not None and manifest["version"] != expected_version:
            raise ValueError(f"{folder} is at dataset version {manifest['version']}, not the requested {expected_version}")
        shards += [
            {
                "dataset": folder,
                "version": manifest["version"],
                "path": s["path"],
                "split": s["split"],
                "rows": s["rows"],
                "sha256": s["sha256"][:16],
            }
            for s in manifest["shards"]
        ]
    create_table_artifact(table=shards, key="sftkit-train-dataset", description=f"the shards of {', '.join(folders)}")
    config = {"data": data, "mixture": mixture, "out": out, **(options or {})}
    create_markdown_artifact(
        markdown="# Training config\n\n```json\n" + json.dumps(config, indent=2, default=str) + "\n```",
        key="sftkit-train-config",
    )
    logger.info("training on %s (%d shards)", mixture or data, len(shards))
    metrics = train_task(config)
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, str))],
        key="sftkit-train-metrics",
        description="Final metrics",
    )
    return metrics

"""Training launch flow: train on one prepared dataset version and record what went in and out.

The dataset manifest, the training config and the final metrics become run artifacts, so every
model can be traced back to the exact shards (by sha256) it was trained on.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.manifest import read_manifest


@task(name="train")
def train_task(config: dict[str, Any]) -> dict[str, Any]:
    from trainer.loop import TrainConfig, run_training

    return run_training(TrainConfig(**config))


@flow(name="sftkit-train", description="Fine-tune on a prepared dataset version.")
def train_flow(
    data: str, out: str, options: dict[str, Any] | None = None, expected_version: int | None = None
) -> dict[str, Any]:
    """``options`` are `trainer.loop.TrainConfig` fields (model, lr, max_steps, ...)."""
    logger = get_run_logger()
    manifest = read_manifest(data)
    if expected_version is not None and manifest["version"] != expected_version:
        raise ValueError(f"{data} is at dataset version {manifest['version']}, not the requested {expected_version}")
    shards = [{"path": s["path"], "split": s["split"], "rows": s["rows"], "sha256": s["sha256"][:16]} for s in manifest["shards"]]
    create_table_artifact(table=shards, key="sftkit-train-dataset", description=f"{data} version {manifest['version']}")
    config = {"data": data, "out": out, **(options or {})}
    create_markdown_artifact(
        markdown="# Training config\n\n```json\n" + json.dumps(config, indent=2, default=str) + "\n```",
        key="sftkit-train-config",
    )
    logger.info("training on %s (version %s, %d shards)", data, manifest["version"], len(shards))
    metrics = train_task(config)
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, str))],
        key="sftkit-train-metrics",
        description="Final metrics",
    )
    return metrics

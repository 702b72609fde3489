"""Scheduled refresh: the refresh flow as a deployment with a cron schedule.

``sftkit deploy`` serves it from this process (``flow.serve``), which needs a Prefect server
(``prefect server start``, then ``PREFECT_API_URL=http://127.0.0.1:4200/api``). For work pools,
see ``prefect.yaml`` at the repository root.
"""

from __future__ import annotations

from pathlib import Path

from flows.refresh import refresh_flow
from flows.runner import build_config


def refresh_parameters(inputs: list[str], tokenizer: str, out: Path, config_file: Path | None = None) -> dict:
    config = build_config(config_file)
    # Absolute paths: a scheduled run does not start in the directory the user deployed from.
    return {
        "inputs": [str(Path(i).absolute()) if not any(c in i for c in "*?[") else i for i in inputs],
        "tokenizer": str(Path(tokenizer).absolute()) if Path(tokenizer).exists() else tokenizer,
        "out": str(Path(out).absolute()),
        "config": config.model_dump(mode="json"),
    }


def build_deployment(
    inputs: list[str], cron: str, tokenizer: str, out: Path, config_file: Path | None = None, name: str = "sftkit-refresh"
):
    """A ``RunnerDeployment`` of the refresh flow on ``cron`` with these parameters (not yet served)."""
    return refresh_flow.to_deployment(
        name=name,
        cron=cron,
        parameters=refresh_parameters(inputs, tokenizer, out, config_file),
        description=f"Refresh {out} from {len(inputs)} input pattern(s) on '{cron}'",
        tags=["sftkit", "refresh"],
    )


def serve_refresh(
    inputs: list[str], cron: str, tokenizer: str, out: Path, config_file: Path | None = None, name: str = "sftkit-refresh"
) -> None:
    import os

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            "a schedule needs a running Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from prefect import serve

    serve(build_deployment(inputs, cron, tokenizer, out, config_file, name))

"""Prefect settings that work on a small machine with no server, applied before Prefect is imported
(and one change to how its engine ends a flow run, applied once it is:
:func:`flow_runs_end_without_joining_heartbeats`).

With no ``PREFECT_API_URL`` Prefect starts a temporary local server; on a slow 2-core machine
that takes 15-30 s, past Prefect's 20 s default, so the startup timeout is raised. State lives in
a project-local ``PREFECT_HOME`` (``./.prefect``) and analytics are off. Every value is only a
default: anything the user already set wins.

On Linux, Arrow allocates from jemalloc rather than pyarrow's default mimalloc: every stage's
peak resident memory was 110-180 MiB lower at the same speed (200k near-duplicate-heavy
conversations, one process: dedup 708 against 592 MiB, tokenize 779 against 635, the manifest
step 699 against 562), because mimalloc kept the pages of the batches a stage had freed. Arrow
reads the variable once, when pyarrow loads, so it is set here, before anything imports pyarrow;
worker processes get it from :mod:`pipeline.workers`. (pyarrow's macOS and Windows wheels have
no jemalloc.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "TOKENIZERS_PARALLELISM": "false",
    **({"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"} if sys.platform == "linux" else {}),
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def flow_runs_end_without_joining_heartbeats() -> None:
    """Let a flow run end without waiting for its heartbeat thread (Prefect 3.9's sync engine).

    The thread sends a heartbeat when the run starts and then sleeps in steps of one second,
    looking at its stop flag between them; the engine sets the flag when the run's body returns
    and joins the thread, so every run ended with up to a second of nothing (0.89 s in a profile
    of a refresh that found nothing new, a third of its wall time). Told not to join, as
    Prefect's own async engine is, the engine goes on at once, and the thread, a daemon, sees
    the flag at its next step and ends without sending anything more. Heartbeats while the
    run works are unchanged. A Prefect without this function or argument is left as it is.
    Called by the modules that define flows, once they import Prefect."""
    import functools
    import inspect

    from prefect import flow_engine

    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None or getattr(send, "sftkit_not_joined", False) or "join_on_exit" not in inspect.signature(send).parameters:
        return

    @functools.wraps(send)
    def not_joined(engine, join_on_exit: bool = True):
        return send(engine, join_on_exit=False)

    not_joined.sftkit_not_joined = True
    flow_engine._send_heartbeats = not_joined

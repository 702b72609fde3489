"""Prefect flows (refresh, train launch, deployments) and the sftkit command line.

Flows here are thin: every task calls one plain function from ``pipeline`` or ``trainer``.
"""

from flows._env import apply_defaults

apply_defaults()

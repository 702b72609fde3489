"""Fixtures for the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _trainer_on_one_thread(one_thread):
    """Every trainer test runs on one thread (tests/conftest.py ``one_thread``)."""

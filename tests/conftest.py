"""Shared fixtures: the bundled BPE tokenizer, the real Mistral SentencePiece tokenizer, real data.

Nothing here downloads: the BPE tokenizer ships in data_samples/, the SentencePiece model in the
mistral-common wheel, the real instruction data in ../shared/data/real (skipped when absent).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"
BPE_TOKENIZER = SAMPLES / "tokenizer"
REAL_DATA = Path(os.environ.get("SFTKIT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def bpe_tokenizer_path() -> Path:
    return BPE_TOKENIZER


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from pipeline.tokenizers import load_tokenizer

    return load_tokenizer(str(BPE_TOKENIZER))


@pytest.fixture(scope="session")
def mistral_tokenizer_path(tmp_path_factory) -> Path:
    """Mistral-7B's real SentencePiece model, from the mistral-common wheel, as an HF folder."""
    mistral_common = pytest.importorskip("mistral_common")
    pytest.importorskip("sentencepiece")
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.exists():
        pytest.skip("mistral-common wheel carries no tokenizer.model.v1")
    from pipeline.tokenizers import sentencepiece_folder

    return sentencepiece_folder(model, tmp_path_factory.mktemp("mistral-tokenizer"))


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_tokenizer_path):
    from pipeline.tokenizers import load_tokenizer

    return load_tokenizer(str(mistral_tokenizer_path))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir() or not any(REAL_DATA.glob("*.json")):
        pytest.skip(f"real instruction data not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="module")
def report_dataset(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    """A prepared dataset folder for the report/inspect tests (tests.support.report), built once per module."""
    from tests.support.report import build_dataset

    return build_dataset(tmp_path_factory.mktemp("report") / "prepared", bpe_tokenizer, bpe_tokenizer_path)


@pytest.fixture
def report_copy(report_dataset, tmp_path) -> Path:
    """A private copy of ``report_dataset``'s folder, for tests that damage it."""
    return shutil.copytree(report_dataset.path, tmp_path / "data")


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, especially on a busy machine.

    Autouse for every test under tests/trainer/ (tests/trainer/conftest.py); other modules request it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (real engine, real API) for the few tests that run flows."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (applies sftkit's Prefect defaults)

    with prefect_test_harness(server_startup_timeout=180):
        yield

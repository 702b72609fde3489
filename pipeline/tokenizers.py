"""Loading tokenizers safely, and fingerprinting them.

Never ``trust_remote_code``: a tokenizer folder is data, not code. A bare SentencePiece
``tokenizer.model`` (as the ``mistral-common`` wheel ships) is loaded as a Llama-style tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

SENTENCEPIECE_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def sentencepiece_folder(model_file: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Make a Hugging Face tokenizer folder around a bare SentencePiece ``.model`` file."""
    folder = Path(folder or tempfile.mkdtemp(prefix="sftkit-spm-"))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG), encoding="utf-8")
    return folder


# The class a tokenizer folder names in tokenizer_config.json when it is a plain tokenizer.json,
# under both of its names (transformers 5 calls PreTrainedTokenizerFast TokenizersBackend).
_BACKEND_CLASS_NAMES = ("TokenizersBackend", "PreTrainedTokenizerFast")


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """A fast tokenizer from a local folder (or a hub name when online); never runs remote code."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".model":
        path = sentencepiece_folder(path)
    try:
        if _plain_tokenizer_folder(path):
            # what AutoTokenizer picks for such a folder, without importing its model registry
            # (which imports torch: a second and more of a tokenizer process's start)
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            tokenizer = TokenizersBackend.from_pretrained(str(path))
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no fast (Rust) implementation; sftkit needs offset mappings to place loss masks exactly"
        )
    return tokenizer


def _plain_tokenizer_folder(path: Path) -> bool:
    """Whether AutoTokenizer would load ``path`` as the generic tokenizers-backed class without
    looking further: a local folder with a ``tokenizer.json``, whose ``tokenizer_config.json``
    names that class and maps no code of its own (``auto_map``), and with no model ``config.json``
    (whose model type can make AutoTokenizer pick a model's own class instead)."""
    if not path.is_dir() or not (path / "tokenizer.json").is_file() or (path / "config.json").exists():
        return False
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") in _BACKEND_CLASS_NAMES and "auto_map" not in config


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the vocabulary/merges and the special tokens."""
    backend = tokenizer.backend_tokenizer.to_str()
    specials = json.dumps(
        {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
        },
        sort_keys=True,
    )
    return hashlib.sha256((backend + specials).encode("utf-8")).hexdigest()[:16]

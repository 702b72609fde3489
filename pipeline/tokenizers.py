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


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """A fast tokenizer from a local folder (or a hub name when online); never runs remote code."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".model":
        path = sentencepiece_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no fast (Rust) implementation; sftkit needs offset mappings to place loss masks exactly"
        )
    return tokenizer


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

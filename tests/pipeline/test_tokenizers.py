"""Loading tokenizers (``pipeline.tokenizers.load_tokenizer``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline import tokenizers
from pipeline.tokenizers import load_tokenizer, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["hello world", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>", "数据 🙂 tokens\n\n  x"]


def _folder(tmp_path: Path, source: Path, *, name: str, model_config: bool = False, auto_map: bool = False) -> Path:
    folder = tmp_path / f"tok-{name}-{model_config}-{auto_map}"
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = name
    if auto_map:
        config["auto_map"] = {"AutoTokenizer": ["custom.Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if model_config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.mark.parametrize("name", ["TokenizersBackend", "PreTrainedTokenizerFast"])
def test_a_plain_tokenizer_folder_loads_as_autotokenizer_loads_it(tmp_path, bpe_tokenizer_path, name):
    # The shortcut (no model registry, so no torch) must give the very tokenizer AutoTokenizer gives.
    folder = _folder(tmp_path, bpe_tokenizer_path, name=name)
    assert tokenizers._plain_tokenizer_folder(folder)
    ours, theirs = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(theirs)
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(theirs)
    assert ours.chat_template == theirs.chat_template
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.init_kwargs == theirs.init_kwargs
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


def test_folders_autotokenizer_may_read_otherwise_take_its_road(tmp_path, bpe_tokenizer_path):
    # a model config (its model type can pick a model's own class), code of its own, another class
    assert not tokenizers._plain_tokenizer_folder(_folder(tmp_path, bpe_tokenizer_path, name="TokenizersBackend", model_config=True))
    assert not tokenizers._plain_tokenizer_folder(_folder(tmp_path, bpe_tokenizer_path, name="TokenizersBackend", auto_map=True))
    assert not tokenizers._plain_tokenizer_folder(_folder(tmp_path, bpe_tokenizer_path, name="Qwen2Tokenizer"))
    assert not tokenizers._plain_tokenizer_folder(tmp_path / "absent")


def test_loading_the_sample_tokenizer_imports_no_torch(bpe_tokenizer_path):
    # The tokenizer process of every run loads it: torch's import was a second of its start.
    code = (
        "import sys; from pipeline.tokenizers import load_tokenizer; "
        f"t = load_tokenizer({str(bpe_tokenizer_path)!r}); t('x'); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"

"""Start-up: a refresh that finds nothing new answers without loading the tokenizer, and the CLI
runs as a Prefect flow only where a Prefect server is configured (no temporary server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.runner import prefect_server_configured
from pipeline.config import SFTConfig
from pipeline.manifest import read_manifest
from pipeline.steps import prepare
from tests.support.inputs import make_inputs


def _prepare_in_fresh_process(tokenizer: Path, inputs: list[Path], out: Path, repo_root: Path) -> dict:
    code = (
        "import json, sys\n"
        "from pipeline.config import SFTConfig\n"
        "from pipeline.steps import prepare\n"
        f"manifest = prepare({[str(p) for p in inputs]!r}, {str(tokenizer)!r}, {str(out)!r}, SFTConfig())\n"
        "print(json.dumps({'version': manifest['version'], 'history': manifest['history'],\n"
        "                  'loaded': sorted(m for m in ('transformers', 'torch') if m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_refresh_with_nothing_new_does_not_load_the_tokenizer(tmp_path, bpe_tokenizer_path, repo_root):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = prepare([str(p) for p in inputs], str(bpe_tokenizer_path), out, SFTConfig())
    again = _prepare_in_fresh_process(bpe_tokenizer_path, inputs, out, repo_root)
    # Nothing new: the same version, and neither transformers nor torch was imported (seconds).
    assert again["version"] == first["version"] == 1
    assert again["loaded"] == []


def test_a_tokenizer_changed_in_place_is_noticed_and_a_stray_file_is_not_a_change(tmp_path, bpe_tokenizer_path, repo_root):
    from transformers import AutoTokenizer

    tokenizer = tmp_path / "tok"
    shutil.copytree(bpe_tokenizer_path, tokenizer)
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    prepare([str(p) for p in inputs], str(tokenizer), out, SFTConfig())
    fingerprint = read_manifest(out)["tokenizer"]["fingerprint"]

    (tokenizer / "NOTES.md").write_text("where this tokenizer came from\n")  # decides no token id
    stray = _prepare_in_fresh_process(tokenizer, inputs, out, repo_root)
    assert stray["version"] == 1 and "transformers" in stray["loaded"]  # checked the long way: same fingerprints

    loaded = AutoTokenizer.from_pretrained(str(tokenizer))
    loaded.add_tokens(["<tool_result_marker>"], special_tokens=True)
    loaded.save_pretrained(str(tokenizer))  # the same folder, new vocabulary
    changed = _prepare_in_fresh_process(tokenizer, inputs, out, repo_root)
    assert changed["version"] == 2 and changed["history"][-1]["rebuild"] is True
    assert read_manifest(out)["tokenizer"]["fingerprint"] != fingerprint


@pytest.mark.parametrize(
    "environment, profiles, expected",
    [
        ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, None, True),
        ({}, 'active = "local"\n[profiles.local]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n', True),
        ({"PREFECT_PROFILE": "other"}, 'active = "local"\n[profiles.local]\nPREFECT_API_URL = "http://x/api"\n[profiles.other]\n', False),
        ({}, 'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "true"\n', False),
        ({}, "not toml [", False),
        ({}, None, False),
    ],
)
def test_a_prefect_server_is_configured_by_the_environment_or_the_active_profile(tmp_path, monkeypatch, environment, profiles, expected):
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    if profiles is not None:
        (tmp_path / "profiles.toml").write_text(profiles)
    assert prefect_server_configured() is expected


def test_without_a_server_the_cli_runs_the_steps_in_process_and_says_so(tmp_path, bpe_tokenizer_path, repo_root):
    inputs = make_inputs(tmp_path / "in")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with a server
    command = [sys.executable, "-m", "flows.cli", "prepare", *map(str, inputs), "--tokenizer", str(bpe_tokenizer_path)]
    done = subprocess.run([*command, "--out", str(tmp_path / "data")], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no Prefect server configured" in done.stderr
    assert read_manifest(tmp_path / "data")["counts"]["kept"] > 0
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # no temporary server was started


def test_a_task_runner_asks_for_a_flow_and_cannot_go_with_no_flow(tmp_path, bpe_tokenizer_path, monkeypatch):
    import flows.refresh
    from flows.runner import run_prepare

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    with pytest.raises(ValueError, match="needs a flow"):
        run_prepare(inputs, str(bpe_tokenizer_path), tmp_path / "a", task_runner="processes", use_flow=False)
    flows_run = []

    class Recorded:
        def with_options(self, **options):
            flows_run.append(type(options["task_runner"]).__name__)
            return lambda **kwargs: prepare(
                kwargs["inputs"], kwargs["tokenizer"], kwargs["out"], SFTConfig.model_validate(kwargs["config"])
            )

    monkeypatch.setattr(flows.refresh, "refresh_flow", Recorded())
    run_prepare(inputs, str(bpe_tokenizer_path), tmp_path / "b", task_runner="processes")  # no server configured
    assert flows_run == ["ProcessPoolTaskRunner"]


def test_the_command_skips_the_interpreter_teardown_but_keeps_exit_codes_output_and_exit_handlers(tmp_path, bpe_tokenizer_path, repo_root):
    """``sftkit`` (flows.cli:main) ends with os._exit after the exit handlers: the exit code,
    everything written to stdout and stderr (a pipe, so block-buffered) and what an atexit
    handler does must all survive, as they would with a normal exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "sys.stdout.write('x' * 100_000)\n"
        "sys.stdout.write('end of output')\n"  # waits in the buffer (stdout is a pipe)
        "from flows.cli import main\n"
        "sys.argv = ['sftkit', *sys.argv[1:]]\n"
        "main()\n"
        "raise SystemExit('main returned')\n"
    )

    def sftkit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)

    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join(json.dumps({"foo": i}) for i in range(3)) + "\n", encoding="utf-8")
    kept_nothing = sftkit("prepare", str(odd), "--tokenizer", str(bpe_tokenizer_path), "--out", str(tmp_path / "a"), "--no-flow")
    assert kept_nothing.returncode == 1, kept_nothing.stderr[-2000:]
    assert "nothing was kept" in kept_nothing.stderr
    assert kept_nothing.stdout == "x" * 100_000 + "end of output"
    assert marker.read_text() == "yes"

    marker.unlink()
    usage = sftkit("prepare", str(tmp_path / "missing.jsonl"), "--tokenizer", str(bpe_tokenizer_path), "--out", str(tmp_path / "b"))
    assert usage.returncode == 2 and "missing.jsonl" in usage.stderr and marker.exists()

    done = sftkit(
        "prepare",
        *map(str, make_inputs(tmp_path / "in")),
        "--tokenizer",
        str(bpe_tokenizer_path),
        "--out",
        str(tmp_path / "c"),
        "--no-flow",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "manifest version 1" in done.stderr and "main returned" not in done.stderr
    assert read_manifest(tmp_path / "c")["counts"]["kept"] > 0

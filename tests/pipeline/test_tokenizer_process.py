"""The run's tokenizer process (``pipeline.steps.tokenizer_process``): the command line and the
refresh flow load the tokenizer, compute its fingerprints and tokenize in a process of their own,
so the run's own process never imports transformers and torch (1.5-2 s of start-up)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from flows.runner import run_prepare
from pipeline.config import SFTConfig
from pipeline.steps import prepare
from pipeline.workers import WorkerPool
from tests.support.inputs import alpaca_records, make_inputs, shard_bytes, write_json

REPO = Path(__file__).resolve().parents[2]
LOAD = "pipeline.steps:_load_in_worker"

# The command line's run, in a fresh interpreter: what it imported, and what it left running.
RUN = """
import json, sys
from pathlib import Path
import psutil
from flows.runner import run_prepare
run_prepare(sys.argv[3:], sys.argv[1], Path(sys.argv[2]), use_flow=False)
workers = [p for p in psutil.Process().children(recursive=True) if "pipeline.workers" in " ".join(p.cmdline())]
print(json.dumps({"transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules, "workers": len(workers)}))
"""


def _run(tokenizer: Path, out: Path, inputs: list[Path]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(tokenizer), str(out), *map(str, inputs)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_tokenizes_in_a_process_of_its_own_and_writes_what_one_process_writes(tmp_path, bpe_tokenizer_path):
    inputs = make_inputs(tmp_path / "in")
    here = tmp_path / "here"
    prepare([str(p) for p in inputs], str(bpe_tokenizer_path), here, SFTConfig())

    # A first build: the plan needs the fingerprints, the tokenize steps the tokenizer.
    seen = _run(bpe_tokenizer_path, tmp_path / "cli", inputs)
    assert seen == {"transformers": False, "torch": False, "workers": 0}
    assert shard_bytes(tmp_path / "cli") == shard_bytes(here)

    # A refresh with a new input: the fingerprints are recorded, the new input is tokenized.
    more = write_json(tmp_path / "in" / "more.json", alpaca_records(40, 10))
    prepare([str(p) for p in [*inputs, more]], str(bpe_tokenizer_path), here, SFTConfig())
    seen = _run(bpe_tokenizer_path, tmp_path / "cli", [*inputs, more])
    assert seen == {"transformers": False, "torch": False, "workers": 0}
    assert shard_bytes(tmp_path / "cli") == shard_bytes(here)
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (here, tmp_path / "cli")]
    assert manifests[0]["counts"] == manifests[1]["counts"]
    assert manifests[0]["tokenizer"] == manifests[1]["tokenizer"] and manifests[0]["template"] == manifests[1]["template"]


def _tokenizer_starts(monkeypatch) -> list[str]:
    started: list[str] = []
    real_init = WorkerPool.__init__
    monkeypatch.setattr(WorkerPool, "__init__", lambda self, *a: started.append(a[0]) or real_init(self, *a))
    return started


def _workers_left() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "pipeline.workers" in " ".join(p.cmdline())]


def test_a_refresh_with_nothing_new_starts_no_tokenizer_process(tmp_path, bpe_tokenizer_path, monkeypatch):
    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    started = _tokenizer_starts(monkeypatch)
    run_prepare(inputs, str(bpe_tokenizer_path), tmp_path / "data", use_flow=False)
    assert started.count(LOAD) == 1
    assert _workers_left() == []
    started.clear()
    run_prepare(inputs, str(bpe_tokenizer_path), tmp_path / "data", use_flow=False)
    assert LOAD not in started


def test_a_first_build_ingests_while_its_tokenizer_loads_and_one_that_does_not_load_stops_it_before_tokenizing(
    tmp_path, bpe_tokenizer_path, monkeypatch
):
    from pipeline import steps

    broken = tmp_path / "tokenizer"
    shutil.copytree(bpe_tokenizer_path, broken)
    good = (broken / "tokenizer.json").read_bytes()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    inputs = [str(p) for p in make_inputs(tmp_path / "in")]

    # A first build decides nothing by the fingerprints: its plan does not wait for the tokenizer.
    plan = steps.plan_refresh([Path(p) for p in inputs], str(broken), tmp_path / "plan-only", SFTConfig())
    assert (plan.tokenizer_fingerprint, plan.template_name, plan.template_fingerprint) == (None, None, None)

    with pytest.raises(ValueError) as here:
        prepare(inputs, str(broken), tmp_path / "here", SFTConfig())
    with pytest.raises(ValueError) as there:  # raised in the tokenizer process, again here
        run_prepare(inputs, str(broken), tmp_path / "there", use_flow=False)
    assert str(there.value) == str(here.value)
    assert "cannot load tokenizer" in str(there.value)
    assert _workers_left() == []
    work = tmp_path / "there" / ".work"
    done = {stage: sorted(work.glob(f"{stage}/*.stats.json")) for stage in ("ingest", "dedup", "quality", "tokenize")}
    assert done["ingest"] and done["dedup"] and done["quality"] and not done["tokenize"]
    assert not (tmp_path / "there" / "manifest.json").exists()

    # Mended, the run goes on from the steps it had done, and writes what a fresh run writes.
    (broken / "tokenizer.json").write_bytes(good)
    reused = []
    real_step_done = steps.step_done

    def step_done(plan, stage, key):
        if (found := real_step_done(plan, stage, key)) is not None:
            reused.append(stage)
        return found

    monkeypatch.setattr(steps, "step_done", step_done)
    run_prepare(inputs, str(broken), tmp_path / "there", use_flow=False)
    assert reused.count("ingest") == len(done["ingest"]) and reused.count("quality") == len(done["quality"])
    monkeypatch.undo()
    prepare(inputs, str(broken), tmp_path / "fresh", SFTConfig())
    assert shard_bytes(tmp_path / "there") == shard_bytes(tmp_path / "fresh")


def test_a_killed_tokenizer_process_stops_the_run_with_one_sentence_and_the_same_command_goes_on(tmp_path, bpe_tokenizer_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline import steps

    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    command = ["prepare", *inputs, "--tokenizer", str(bpe_tokenizer_path), "--out", str(tmp_path / "data"), "--no-flow"]
    real_call = steps._TokenizerProcess.call

    def killed_first(self, step, *args):
        if step == "run_tokenize":  # as the out-of-memory killer would, in the middle of a run
            os.kill(self._pool._workers[0].pid, signal.SIGKILL)
        return real_call(self, step, *args)

    monkeypatch.setattr(steps._TokenizerProcess, "call", killed_first)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "killed by SIGKILL" in said and "the same command goes on" in said and "Traceback" not in said
    assert not (tmp_path / "data" / "manifest.json").exists() and _workers_left() == []

    monkeypatch.undo()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    prepare(inputs, str(bpe_tokenizer_path), tmp_path / "fresh", SFTConfig())
    assert shard_bytes(tmp_path / "data") == shard_bytes(tmp_path / "fresh")

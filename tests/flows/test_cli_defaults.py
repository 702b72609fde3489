"""What an option left out means: `sftkit train` and `sftkit plan` take TrainConfig's defaults,
`sftkit prepare` leaves every setting to the config file (sftkit issue 15)."""

from __future__ import annotations

from enum import Enum

import pytest
import typer
from typer.testing import CliRunner

import trainer.loop
import trainer.mixture_plan
from flows import runner as flow_runner
from flows.cli import app
from pipeline.config import SFTConfig
from trainer.loop import TrainConfig

cli = CliRunner()
# Options of `sftkit train` that TrainConfig does not hold: how the command runs, not what it trains.
TRAIN_ONLY_OPTIONS = {"dry_run", "gpu_memory", "gpus"}
# `--out` is required on the command line although TrainConfig has a default.
REQUIRED_OPTIONS = {"out"}


def options(command: str) -> dict[str, object]:
    """The default of every option of ``sftkit <command>``, by parameter name, as click sees it."""
    group = typer.main.get_command(app)
    params = group.commands[command].params
    return {p.name: p.default.value if isinstance(p.default, Enum) else p.default for p in params if p.name != "help" and not p.required}


def test_every_train_option_defaults_to_train_config():
    defaults = options("train")
    field_options = set(defaults) - TRAIN_ONLY_OPTIONS
    assert field_options <= set(TrainConfig.model_fields), "a train option that TrainConfig does not know"
    assert REQUIRED_OPTIONS | field_options >= {"data", "mixture", "epochs", "lr", "batch_tokens", "lora_r", "device"}
    for name in sorted(field_options):
        assert defaults[name] == TrainConfig.model_fields[name].default, f"--{name.replace('_', '-')}"


def test_every_plan_option_that_is_a_train_setting_defaults_to_train_config():
    defaults = options("plan")
    shared = set(defaults) & set(TrainConfig.model_fields)
    assert shared == {"batch_tokens", "epochs", "max_steps", "grad_accum", "packing", "seed"}
    for name in sorted(shared):
        assert defaults[name] == TrainConfig.model_fields[name].default, f"--{name.replace('_', '-')}"


def test_train_without_options_runs_train_config_defaults(tmp_path, monkeypatch):
    seen: list[TrainConfig] = []

    def fake_run(config: TrainConfig) -> dict:
        seen.append(config)
        return {"steps": 0, "stop_reason": "max_steps", "best_step": None, "final_dir": None}

    monkeypatch.setattr(trainer.loop, "run_training", fake_run)
    result = cli.invoke(app, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    [config] = seen
    expected = TrainConfig(data=tmp_path / "data", out=tmp_path / "run")
    assert config.model_dump() == expected.model_dump()


def test_plan_without_options_plans_with_train_config_defaults(tmp_path, monkeypatch):
    seen: list[dict] = []

    class Report:
        def to_json(self) -> dict:
            return {}

    def fake_plan(mixture, **settings) -> Report:
        seen.append(settings)
        return Report()

    monkeypatch.setattr(trainer.mixture_plan, "plan_mixture", fake_plan)
    result = cli.invoke(app, ["plan", "--mixture", str(tmp_path / "mix.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    [settings] = seen
    defaults = TrainConfig()
    for name in ("batch_tokens", "epochs", "max_steps", "grad_accum", "packing", "seed"):
        assert settings[name] == getattr(defaults, name), name
    assert settings["world_size"] == 1


@pytest.fixture
def prepare_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(flow_runner, "run_prepare", lambda **kwargs: calls.append(kwargs) or {"counts": {"kept": 1}})
    return calls


def test_prepare_options_left_out_keep_the_config_files_settings(tmp_path, prepare_calls):
    # Every value of this file differs from SFTConfig's default: an option left out that carried a
    # default of its own (say --max-length 2048) would silently replace it.
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(
        "template:\n  name: chatml\n"
        "tokenize:\n  max_length: 512\n  reasoning: drop\n  strict_render: true\n"
        "shards:\n  val_fraction: 0.25\n"
        "dedup:\n  enabled: false\n"
    )
    from_file = SFTConfig.from_yaml(config_file)
    assert from_file.tokenize.max_length != SFTConfig().tokenize.max_length

    result = cli.invoke(app, ["prepare", "in.jsonl", "--tokenizer", "tok", "--out", str(tmp_path / "o"), "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    [call] = prepare_calls
    overrides = {k: v for k, v in call.items() if k not in ("inputs", "tokenizer", "out", "task_runner", "use_flow")}
    config = flow_runner.build_config(**overrides)
    assert config.model_dump() == from_file.model_dump()

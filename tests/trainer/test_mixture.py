"""Training mixtures on real prepared data: delivered shares, determinism, resume, DDP, spec errors.

Two folders are prepared with the real pipeline (``pipeline.steps.prepare``): the bundled
samples (``data_samples/inputs``, six sources) as ``data/nightly`` and the prepare fixtures'
inputs as ``data/team-a``. Runs that must survive kill -9 or span processes go through the real
``sftkit train`` in subprocesses, one thread each, as in tests/trainer/test_loop.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import SFTConfig
from pipeline.schema import IGNORE_INDEX
from pipeline.steps import prepare
from tests.support.inputs import alpaca_records, make_inputs, sharegpt_records, write_json, write_jsonl
from tests.support.training import (
    TORCHRUN,
    assert_same_curves,
    cpu_config,
    kill_mid_run,
    run_train,
    train_command,
    train_losses,
)
from trainer.batching import collate_packed
from trainer.data import ShardDataset
from trainer.loop import SFTTrainer, TrainConfig, run_training
from trainer.metrics import read_metrics
from trainer.mixture import MixtureError, load_mixture
from trainer.mixture_plan import plan_mixture
from trainer.models import tiny_model
from trainer.sampling import EpochPlanner

runner = CliRunner()

CHAT = {"name": "chat", "sources": ["*sharegpt*", "*openai*"]}
ZH = {"name": "zh", "sources": ["*zh*"]}
OTHER = {"name": "other", "sources": ["*alpaca_mixed*", "*prompt_completion*"]}
TEAM = {"name": "team", "sources": ["*team_inputs/*"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory, samples_dir, bpe_tokenizer_path):
    """ROOT/data/nightly (the bundled samples) and ROOT/data/team-a, prepared for real."""
    root = tmp_path_factory.mktemp("mixture")
    config = SFTConfig.from_yaml(samples_dir / "demo.yaml")
    samples = sorted(glob.glob(str(samples_dir / "inputs" / "*")))
    prepare(samples, str(bpe_tokenizer_path), root / "data" / "nightly", config)
    team = [str(p) for p in make_inputs(root / "team_inputs")]
    prepare(team, str(bpe_tokenizer_path), root / "data" / "team-a", config)
    return root


def write_spec(path: Path, groups: list[dict], datasets=("data/nightly",), **extra) -> Path:
    path.write_text(yaml.safe_dump({"datasets": list(datasets), **extra, "groups": groups}, sort_keys=False), encoding="utf-8")
    return path


def shares_of(mixture, order) -> np.ndarray:
    """Trained-token share of each group in a row order."""
    kept = mixture.train.kept
    delivered = np.bincount(mixture.train.group[kept][order], weights=mixture.train.trained[kept][order], minlength=len(mixture.groups))
    return delivered / delivered.sum()


# --- shares, determinism, the shards untouched ------------------------------------------------
@pytest.mark.parametrize(
    "kind, weights, extra",
    [
        ("down", (0.4, 0.2, 0.4), {"epoch_size": 1500}),  # every group below its natural size
        ("up", (0.4, 0.2, 0.4), {"epoch_size": 12000}),  # every group above it
        ("mixed", (0.2, 0.6, 0.2), {}),  # zh up, the others down
    ],
)
def test_delivered_trained_token_shares_match_the_spec_within_one_percent(root, kind, weights, extra):
    groups = [{**g, "weight": w} for g, w in zip((CHAT, ZH, OTHER), weights)]
    spec = write_spec(root / f"{kind}.yaml", groups, **extra)
    plan = plan_mixture(spec, batch_tokens=1024).to_json()  # counted from epoch 0's micro-batches
    target = np.array(weights) / sum(weights)
    assert [g["target_share"] for g in plan["groups"]] == pytest.approx(target)
    for group in plan["groups"]:
        assert abs(group["delivered_share"] - group["target_share"]) <= 0.01, group
    repeats = {g["name"]: g["repeats"] for g in plan["groups"]}
    if kind == "down":
        assert all(r < 1 for r in repeats.values()), repeats
    elif kind == "up":
        assert all(r > 1 for r in repeats.values()), repeats
    else:
        assert repeats["zh"] > 1 and repeats["chat"] < 1 and repeats["other"] < 1, repeats
    mixture = load_mixture(spec)
    sampler = mixture.sampler()
    for epoch in (1, 2, 3):  # later epochs draw other rows, and still hit the target
        assert np.abs(shares_of(mixture, sampler.epoch_order(epoch)) - target).max() <= 0.01


def test_the_order_is_a_function_of_seed_and_epoch_and_each_epoch_redraws(root):
    groups = [{**CHAT, "weight": 0.4}, {**ZH, "weight": 0.2}, {**OTHER, "weight": 0.4}]
    spec = write_spec(root / "seeded.yaml", groups, seed=3, epoch_size=1500)
    first, again = load_mixture(spec).sampler(), load_mixture(spec).sampler()
    for epoch in (0, 1):
        assert np.array_equal(first.epoch_order(epoch), again.epoch_order(epoch))
    assert not np.array_equal(np.sort(first.epoch_order(0)), np.sort(first.epoch_order(1))), "down-sampled rows re-drawn"
    other_seed = load_mixture(write_spec(root / "seeded4.yaml", groups, seed=4, epoch_size=1500)).sampler()
    assert not np.array_equal(first.epoch_order(0), other_seed.epoch_order(0))
    # the spec's seed decides the draws; train --seed is only its default
    assert np.array_equal(load_mixture(spec, default_seed=99).sampler().epoch_order(0), first.epoch_order(0))


def folder_files(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of the dataset's shards and manifest."""
    files = sorted((folder / "shards").glob("*.parquet")) + [folder / "manifest.json"]
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def test_a_changed_weight_gives_a_new_plan_and_leaves_every_shard_file_alone(root, bpe_tokenizer):
    folder = root / "data" / "nightly"
    before = folder_files(folder)
    plans = []
    for name, zh_weight in (("w1.yaml", 0.2), ("w2.yaml", 0.5)):
        spec = write_spec(root / name, [{**CHAT, "weight": 0.4}, {**ZH, "weight": zh_weight}, {**OTHER, "weight": 0.4}])
        result = runner.invoke(app, ["plan", "--mixture", str(spec), "--batch-tokens", "1024", "--json"])
        assert result.exit_code == 0, result.output
        plans.append(json.loads(result.output))
        load_mixture(spec).datasets(bpe_tokenizer)  # the trainer's view too (memory-map companions)
    old, new = ({g["name"]: g for g in p["groups"]} for p in plans)
    assert old["zh"]["target_share"] == pytest.approx(0.2) and new["zh"]["target_share"] == pytest.approx(0.5 / 1.3)
    assert new["zh"]["delivered_share"] > old["zh"]["delivered_share"] + 0.1
    assert plans[0]["spec_sha256"] != plans[1]["spec_sha256"]
    assert folder_files(folder) == before


def test_plan_json_has_the_promised_shape_and_warns_about_heavy_repeats(root):
    spec = write_spec(root / "repeat.yaml", [{**CHAT, "weight": 0.7}, {**ZH, "repeat": 5}, {**OTHER, "weight": 0.3}])
    result = runner.invoke(app, ["plan", "--mixture", str(spec), "--batch-tokens", "1024", "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert {"groups", "steps_per_epoch", "padding_share", "truncated_rows", "zero_trained_rows"} <= set(plan)
    assert [g["name"] for g in plan["groups"]] == ["chat", "zh", "other"]
    for group in plan["groups"]:
        assert {"name", "target_share", "delivered_share", "rows", "trained_tokens", "repeats"} <= set(group)
    zh = plan["groups"][1]
    assert zh["repeats"] == pytest.approx(5.0) and zh["delivered_rows"] == 5 * zh["rows"]
    assert plan["steps_per_epoch"] > 0 and plan["total_steps"] == 2 * plan["steps_per_epoch"]
    assert 0 <= plan["padding_share"] < 1 and plan["zero_trained_rows"] == 0 and plan["truncated_rows"] == 0
    assert any("'zh' is repeated 5.0 times" in w for w in plan["warnings"])
    assert sum(g["delivered_share"] for g in plan["groups"]) == pytest.approx(1.0)

    capped = write_spec(root / "capped.yaml", [{**CHAT, "weight": 0.5}, {**ZH, "weight": 0.3, "max_tokens": 150}, {**OTHER, "weight": 0.2}])
    plan = plan_mixture(capped, batch_tokens=1024).to_json()
    zh = plan["groups"][1]
    assert zh["capped"] and 0 < zh["delivered_trained_tokens"] <= 150 and zh["delivered_share"] < zh["target_share"]
    assert any("'zh' is capped by max_tokens 150" in w for w in plan["warnings"])

    terminal = runner.invoke(app, ["plan", "--mixture", str(spec), "--batch-tokens", "1024"])
    assert terminal.exit_code == 0 and "warning" in terminal.output and "delivered" in terminal.output


ISSUE_SPEC = """\
seed: 0
datasets: [data/nightly, data/team-a]
by: trained_tokens            # or rows
groups:
  - {name: chat, sources: ["*sharegpt*"], weight: 0.6}
  - {name: zh,   sources: ["*zh*"],       weight: 0.3}
  - {name: tools, sources: ["*tool*"],    weight: 0.1, max_tokens: 2000000}
"""


def test_the_spec_of_the_issue_works_as_written(tmp_path, samples_dir, bpe_tokenizer_path):
    inputs = tmp_path / "incoming"
    inputs.mkdir()
    config = SFTConfig.from_yaml(samples_dir / "demo.yaml")
    nightly = [
        write_jsonl(inputs / "sharegpt_en.jsonl", sharegpt_records(0, 8)),
        write_json(inputs / "alpaca_zh.json", alpaca_records(5, 10)),
    ]
    prepare([str(p) for p in nightly], str(bpe_tokenizer_path), tmp_path / "data" / "nightly", config)
    team = [write_jsonl(inputs / "tool_calls.jsonl", sharegpt_records(20, 6))]
    prepare([str(p) for p in team], str(bpe_tokenizer_path), tmp_path / "data" / "team-a", config)
    (tmp_path / "mix.yaml").write_text(ISSUE_SPEC, encoding="utf-8")
    result = runner.invoke(app, ["plan", "--mixture", str(tmp_path / "mix.yaml"), "--batch-tokens", "1024", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [(g["name"], g["target_share"]) for g in plan["groups"]] == [("chat", 0.6), ("zh", 0.3), ("tools", 0.1)]
    assert all(abs(g["delivered_share"] - g["target_share"]) <= 0.01 for g in plan["groups"]), plan["groups"]


# --- the spec's mistakes ---------------------------------------------------------------------
def test_spec_mistakes_are_one_clear_sentence_each(root):
    def error(name, groups, **extra) -> str:
        with pytest.raises(MixtureError) as caught:
            load_mixture(write_spec(root / name, groups, **extra))
        return str(caught.value)

    unknown = error("unknown.yaml", [{**CHAT, "wieght": 0.5}, {**ZH, "weight": 0.5}], rest="drop")
    assert "unknown key 'wieght' in groups[0] (chat)" in unknown, unknown
    assert "unknown key 'weights'" in error("top.yaml", [{**CHAT, "weight": 1}], weights=[1], rest="drop")
    assert "groups[0] (chat): give a group either weight" in error("both.yaml", [{**CHAT, "weight": 1, "repeat": 2}], rest="drop")
    missing = error("missing.yaml", [{**CHAT, "weight": 1}], datasets=["data/nowhere"])
    assert "datasets[0] 'data/nowhere' is no folder" in missing and str(root / "data" / "nowhere") in missing
    stray = error("stray.yaml", [{**CHAT, "weight": 1}])
    assert "source(s) are in no group" in stray and "chat_zh.jsonl.zst" in stray and "rest: drop" in stray
    empty = error("empty.yaml", [{**CHAT, "weight": 1}, {"name": "typo", "sources": ["*sharegtp*"], "weight": 1}], rest="drop")
    assert "group 'typo' ('*sharegtp*') matches no training row" in empty

    # folders prepared with another template: named both
    other = root / "data" / "team-b"
    shutil.copytree(root / "data" / "team-a", other, ignore=shutil.ignore_patterns(".cache"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["template"]["fingerprint"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    mismatch = error("mismatch.yaml", [{**TEAM, "weight": 1}], datasets=["data/team-a", "data/team-b"])
    assert f"{root / 'data' / 'team-a'} and {other} were prepared with different templates" in mismatch, mismatch

    result = runner.invoke(app, ["plan", "--mixture", str(root / "missing.yaml")])
    assert result.exit_code == 2 and "is no folder" in result.output and "Traceback" not in result.output


def test_one_folder_under_two_spellings_and_infinite_numbers_are_refused(root):
    """`data/nightly` and `data/nightly/` (or its absolute path) are one folder: listed both ways,
    its rows were read twice and every row trained twice an epoch. `.inf` passes gt=0 and made
    every budget NaN (a bare "cannot convert float NaN to integer")."""
    everything = {"name": "all", "sources": ["*"], "weight": 1}
    for second in ("data/nightly/", "./data/nightly", str(root / "data" / "nightly")):
        with pytest.raises(MixtureError, match=r"datasets\[0\] 'data/nightly' and datasets\[1\] .* are the same folder"):
            load_mixture(write_spec(root / "twice.yaml", [everything], datasets=["data/nightly", second]))
    for key in ("weight", "repeat", "loss_weight"):
        group = {"name": "all", "sources": ["*"], "weight": 1, key: float("inf")}
        if key == "repeat":
            del group["weight"]
        with pytest.raises(MixtureError, match=rf"groups\[0\] \(all\)\.{key}: Input should be a finite number"):
            load_mixture(write_spec(root / "inf.yaml", [group]))
    result = runner.invoke(app, ["plan", "--mixture", str(root / "inf.yaml")])
    assert result.exit_code == 2 and "finite number" in result.output and "Traceback" not in result.output


def test_an_epoch_too_large_to_plan_is_one_sentence_not_an_exhausted_machine(root):
    # a typo'd repeat: 1e9 copies of every chat row
    spec = write_spec(root / "huge.yaml", [{**CHAT, "repeat": 1e9}, {**ZH, "weight": 1}], rest="drop")
    with pytest.raises(MixtureError, match=r"an epoch would hold about [\d,]+ rows, more than the 50,000,000 .*group 'chat' alone"):
        load_mixture(spec)


def test_epoch_size_without_a_weighted_group_is_refused_not_ignored(root):
    spec = write_spec(root / "repeats-only.yaml", [{**CHAT, "repeat": 2}, {**ZH, "repeat": 1}], rest="drop", epoch_size=100)
    with pytest.raises(MixtureError, match=r"epoch_size 100 has no effect without a group with a weight"):
        load_mixture(spec)


@pytest.mark.parametrize("command", ["plan", "train"])
def test_infinite_epochs_are_a_usage_error_not_a_traceback(root, tmp_path, command):
    """`--epochs inf` passed the > 0 check and overflowed in math.ceil (plan and train alike)."""
    spec = write_spec(root / "finite.yaml", [{"name": "all", "sources": ["*"], "weight": 1}])
    extra = ["--out", str(tmp_path / "run"), "--device", "cpu"] if command == "train" else []
    for value in ("inf", "nan"):
        result = runner.invoke(app, [command, "--mixture", str(spec), *extra, "--epochs", value])
        assert result.exit_code == 2, result.output
        assert "must be a finite number" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_the_plan_warns_about_a_group_that_gets_no_row_and_an_epoch_without_a_step(root):
    tiny_share = write_spec(root / "tiny-share.yaml", [{**ZH, "weight": 1e-5}, {**CHAT, "weight": 1}, {**OTHER, "weight": 1}], rest="drop")
    plan = plan_mixture(tiny_share, batch_tokens=1024).to_json()
    zh = plan["groups"][0]
    assert zh["rows"] > 0 and zh["delivered_rows"] == 0
    assert any("'zh' delivers no row this epoch" in w for w in plan["warnings"]), plan["warnings"]

    no_step = write_spec(root / "no-step.yaml", [{**CHAT, "weight": 1}], rest="drop", epoch_size=1)
    plan = plan_mixture(no_step, batch_tokens=1024).to_json()
    assert plan["steps_per_epoch"] == 0
    assert any("an epoch holds no optimizer step" in w for w in plan["warnings"]), plan["warnings"]


def test_a_source_two_groups_match_goes_to_the_first_and_the_plan_says_so(root):
    # a catch-all last group: every source matches it, sharegpt_tools.jsonl matches the first group too
    spec = write_spec(
        root / "overlap.yaml",
        [{"name": "chat", "sources": ["*sharegpt*"], "weight": 0.6}, {"name": "other", "sources": ["*"], "weight": 0.4}],
    )
    mixture = load_mixture(spec)
    both = [i for i, (_, name) in enumerate(mixture.sources) if "sharegpt_tools" in name]
    assert both and set(mixture.source_group[both].tolist()) == {0}  # the first group in the spec wins
    assert set(mixture.source_group.tolist()) == {0, 1}
    result = runner.invoke(app, ["plan", "--mixture", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    assert any(
        re.search(r"source '.*sharegpt_tools.jsonl' .* matches groups 'chat', 'other': its rows go to 'chat'", w)
        for w in json.loads(result.output)["warnings"]
    )


# --- several folders, train_on: last, loss weights --------------------------------------------
def test_two_folders_train_as_one_mixture_with_rows_from_both(root, bpe_tokenizer):
    spec = write_spec(
        root / "two.yaml", [{**CHAT, "weight": 0.5}, {**TEAM, "weight": 0.5}], datasets=["data/nightly", "data/team-a"], rest="drop"
    )
    mixture = load_mixture(spec)
    train, val = mixture.datasets(bpe_tokenizer)
    team_rows = [j for j in range(len(train)) if mixture.groups[train.group[j]].name == "team"]
    assert team_rows and len(train) < len(mixture.train.group)  # rest: drop left the other sources out
    # a team-a row read through the mixture is the row of team-a's own shards
    expected = [
        r
        for p in sorted((root / "data" / "team-a" / "shards").glob("train-*.parquet"))
        for r in pq.read_table(p, columns=["input_ids"]).column("input_ids").to_pylist()
    ]
    assert train[team_rows[0]]["input_ids"].tolist() == expected[0]
    assert len(val) == len(mixture.val.kept) > 0
    plan = plan_mixture(spec, batch_tokens=1024).to_json()
    assert plan["dropped_rows"] > 0 and len(plan["datasets"]) == 2


def runs_of(labels: np.ndarray) -> list[tuple[int, int]]:
    trained = np.r_[0, (labels != IGNORE_INDEX).astype(int), 0]
    edges = np.flatnonzero(np.diff(trained))
    return list(zip(edges[::2], edges[1::2]))


def test_train_on_last_masks_everything_but_the_last_assistant_turn(root, bpe_tokenizer):
    spec = write_spec(root / "last.yaml", [{**ZH, "weight": 0.5, "train_on": "last"}, {**OTHER, "weight": 0.5}], rest="drop")
    mixture = load_mixture(spec)
    train, _ = mixture.datasets(bpe_tokenizer)
    base = ShardDataset(root / "data" / "nightly", "train")
    messages = [
        m
        for p in sorted((root / "data" / "nightly" / "shards").glob("train-*.parquet"))
        for m in pq.read_table(p, columns=["messages"]).column("messages").to_pylist()
    ]
    kept = mixture.train.kept
    multi_turn = 0
    for j in range(len(train)):
        original = base[int(kept[j])]["labels"]
        batch = collate_packed([[train[j]]], 0)  # the mask is applied where the batch is built
        labels, input_ids = batch["labels"][0].numpy(), batch["input_ids"][0].numpy()
        if mixture.groups[train.group[j]].name != "zh":
            assert np.array_equal(labels, original)
            continue
        original_runs, masked_runs = runs_of(original), runs_of(labels)
        assert masked_runs == original_runs[-1:]
        assert mixture.train.trained[kept[j]] == masked_runs[0][1] - masked_runs[0][0]  # the plan counts what trains
        assert np.array_equal(labels[masked_runs[0][0] :], original[masked_runs[0][0] :])
        assistants = [m["content"] for m in messages[kept[j]] if m["role"] == "assistant"]
        text = bpe_tokenizer.decode(input_ids[labels != IGNORE_INDEX].tolist())
        assert assistants[-1].strip() in text
        if len(original_runs) > 1:
            multi_turn += 1
            assert assistants[0].strip() not in text
    assert multi_turn > 0, "the samples should hold a multi-turn zh conversation"


def test_a_group_loss_weight_scales_its_tokens_loss(root, bpe_tokenizer):
    groups = [{**ZH, "weight": 0.5}, {**OTHER, "weight": 0.5}]
    plain = load_mixture(write_spec(root / "plain.yaml", groups, rest="drop")).datasets(bpe_tokenizer)[0]
    weighted = load_mixture(write_spec(root / "weighted.yaml", [{**groups[0], "loss_weight": 3.0}, groups[1]], rest="drop")).datasets(
        bpe_tokenizer
    )[0]
    config = TrainConfig(device="cpu", batch_tokens=2048, progress=False)
    trainer = SFTTrainer(tiny_model(bpe_tokenizer, seed=0), weighted, None, config, tokenizer=bpe_tokenizer)
    zh = [j for j in range(len(plain)) if plain.group[j] == 0][:2]
    other = [j for j in range(len(plain)) if plain.group[j] == 1][:2]

    def summed(dataset, rows) -> float:
        batch = collate_packed([[dataset[j] for j in rows]], trainer.pad_token_id)  # one packed row
        with torch.no_grad():
            return float(trainer.compute_loss(batch, num_targets=1))

    assert "loss_weights" not in collate_packed([[plain[j] for j in zh]], 0)  # batches without weights: unchanged
    assert summed(weighted, zh) == pytest.approx(3 * summed(plain, zh), rel=1e-5)
    assert summed(weighted, other) == pytest.approx(summed(plain, other), rel=1e-6)
    mixed = zh[:1] + other[:1]
    assert summed(weighted, mixed) == pytest.approx(summed(plain, mixed) + 2 * summed(plain, zh[:1]), rel=1e-4)


# --- training: validation + early stopping, resume, DDP --------------------------------------
def test_validation_uses_the_groups_val_rows_once_and_early_stopping_works(root, tmp_path):
    spec = write_spec(root / "val.yaml", [{**CHAT, "weight": 0.5}, {**ZH, "weight": 0.5}], rest="drop")
    summary = run_training(cpu_config(mixture=spec, out=tmp_path / "run", max_steps=50, lr=0.0, eval_every=2, patience=2, save_every=1000))
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 6
    mixture = load_mixture(spec)
    val_sources = {mixture.sources[s][1] for s in mixture.val.source[mixture.val.kept]}
    assert val_sources and all(re.search("sharegpt|openai|zh", s) for s in val_sources)
    evals = [r for r in read_metrics(tmp_path / "run") if r["type"] == "eval"]
    # each validation row of the groups once, none of the dropped sources'
    assert evals[0]["eval_tokens"] == int(mixture.val.trained[mixture.val.kept].sum())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["spec_sha256"] == mixture.sha256 and plan["val_rows"] == len(mixture.val.kept)


def mixed_spec(root: Path, name: str, zh_weight: float = 0.5) -> Path:
    return write_spec(
        root / name,
        [{**CHAT, "weight": 0.3, "loss_weight": 2.0}, {**ZH, "weight": zh_weight, "train_on": "last"}, {**OTHER, "weight": 0.2}],
    )


def test_kill_9_mid_epoch_then_resume_reproduces_the_loss_curve(root, tmp_path):
    spec = mixed_spec(root, "resume.yaml")
    steps = ["--max-steps", "24", "--save-every", "4"]
    full = run_train(train_command(spec, tmp_path / "full", *steps, data_option="--mixture"))
    assert "delivered" in full.stdout  # the plan is shown at the start
    uninterrupted = train_losses(tmp_path / "full")
    assert len(uninterrupted) == 24
    assert max(r["epoch"] for r in read_metrics(tmp_path / "full") if r["type"] == "train") >= 1, "should span epochs"

    crashed = tmp_path / "crashed"
    assert 7 <= kill_mid_run(train_command(spec, crashed, *steps, data_option="--mixture"), crashed, after_steps=7) < 24, "killed mid-way"

    resumed = run_train(train_command(spec, crashed, *steps, "--resume", data_option="--mixture"))
    assert "resuming" in resumed.stdout and "from step 0" not in resumed.stdout
    assert train_losses(crashed) == uninterrupted  # bit-for-bit


def test_resume_with_changed_weights_is_refused_with_a_reason(root, tmp_path):
    spec = mixed_spec(root, "changing.yaml")
    config = dict(
        mixture=spec, out=tmp_path / "run", max_steps=2, batch_tokens=1024, eval_every=100, save_every=1, device="cpu", progress=False
    )
    run_training(TrainConfig(**config))
    plan_before = (tmp_path / "run" / "plan.json").read_text()
    mixed_spec(root, "changing.yaml", zh_weight=0.9)  # same file, new weights
    with pytest.raises(ValueError, match=r"the mixture .*changing.yaml changed since this checkpoint .*another --out"):
        run_training(TrainConfig(**{**config, "resume": True, "max_steps": 3}))
    assert (tmp_path / "run" / "plan.json").read_text() == plan_before
    # without --resume the run is refused too, and its plan.json (once overwritten first) stays
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_training(TrainConfig(**{**config, "max_steps": 3}))
    assert (tmp_path / "run" / "plan.json").read_text() == plan_before
    mixed_spec(root, "changing.yaml")  # back to the weights it started with: resumes
    assert run_training(TrainConfig(**{**config, "resume": True, "max_steps": 3}))["steps"] == 3


# Runs the real `sftkit train` path (run_training) in each torchrun process, recording the plan
# every rank's loop asked for, so the test sees what each rank really trained on.
PROBE = """
import json, sys
from trainer import sampling
from trainer.loop import TrainConfig, run_training
from flows.cli import exit_without_teardown

seen = {}
plan_of_rank = sampling.EpochPlanner.rank_plan


def recording(self, epoch):
    plan = plan_of_rank(self, epoch)
    seen[epoch] = (self.rank, [[[int(r) for r in packed] for packed in batch] for batch in plan])
    return plan


sampling.EpochPlanner.rank_plan = recording
spec, out = sys.argv[1], sys.argv[2]
run_training(TrainConfig(mixture=spec, out=out, max_steps=6, lr=3e-3, batch_tokens=512, eval_every=3, save_every=100,
                         device="cpu", seed=1, progress=False))
rank = seen[0][0]
with open(f"{out}/rank{rank}.json", "w") as handle:
    json.dump({epoch: plan for epoch, (_, plan) in seen.items()}, handle)
exit_without_teardown()  # as `sftkit train` ends: the interpreter's teardown can abort under gloo
"""


def test_two_process_ddp_ranks_see_disjoint_rows_and_match_one_process(root, tmp_path):
    # down-sampled (no row twice in an epoch), with a loss weight and a train_on: last group
    spec = write_spec(
        root / "ddp.yaml",
        [{**CHAT, "weight": 0.4, "loss_weight": 2.0}, {**ZH, "weight": 0.2, "train_on": "last"}, {**OTHER, "weight": 0.4}],
        epoch_size=2000,
        seed=5,
    )
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run_train([*TORCHRUN, str(probe), str(spec), str(tmp_path / "ddp")])
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    mixture = load_mixture(spec)
    planner = EpochPlanner(mixture.train.length[mixture.train.kept], 1, 512, order=mixture.sampler().epoch_order)
    assert set(ranks[0]) == set(ranks[1]) == {"0", "1"}, "6 steps should reach the second epoch"
    for epoch in ("0", "1"):
        seen = [[r for batch in rank[epoch] for packed in batch for r in packed] for rank in ranks]
        assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
        whole = planner.global_plan(int(epoch))
        trained = [r for batch in whole[: 2 * (len(whole) // 2)] for packed in batch for r in packed]
        assert sorted(seen[0] + seen[1]) == sorted(trained) and len(set(trained)) == len(trained)

    # the same global batches as one process accumulating two micro-batches per step
    run_training(cpu_config(mixture=spec, out=tmp_path / "single", max_steps=6, grad_accum=2, eval_every=3, save_every=100, seed=1))
    assert_same_curves(tmp_path / "ddp", tmp_path / "single")


# --- the report on a page ----------------------------------------------------------------------
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_inspect_html_shows_the_mixture_plan(root, tmp_path):
    spec = mixed_spec(root, "page.yaml")
    alone, with_data = tmp_path / "plan.html", tmp_path / "data.html"
    result = runner.invoke(app, ["inspect", "--mixture", str(spec), "--html", str(alone)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(root / "data" / "nightly"), "--mixture", str(spec), "--html", str(with_data)])
    assert result.exit_code == 0, result.output
    for page in (alone, with_data):
        text = page.read_text()
        assert '<section id="mixture">' in text
        assert all(f'<td class="l">{name}</td>' in text for name in ("chat", "zh", "other"))
        assert "steps per epoch" in text and "delivered" in text
    assert '<section id="sources">' in with_data.read_text() and 'href="#mixture"' in with_data.read_text()
    printed = runner.invoke(app, ["inspect", "--mixture", str(spec)])
    assert printed.exit_code == 0 and "steps per epoch" in printed.output
    if CHROMIUM is None:
        pytest.skip("no chromium to render the page")
    for page in (alone, with_data):
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert 'data-images-loaded="all"' in dom, dom[:500]


def test_the_plan_warns_when_a_group_or_the_whole_mixture_has_no_validation_row(root, samples_dir, bpe_tokenizer_path):
    """Early stopping compares validation losses: a group without val rows is judged by the others."""
    config = SFTConfig.from_yaml(samples_dir / "demo.yaml")
    config.shards.val_fraction = 0.0
    inputs = root / "train_only_inputs"
    inputs.mkdir(exist_ok=True)
    shutil.copy(samples_dir / "inputs" / "sharegpt_tools.jsonl", inputs / "train_only_tools.jsonl")
    prepare([str(inputs / "train_only_tools.jsonl")], str(bpe_tokenizer_path), root / "data" / "noval", config)

    alone = write_spec(root / "noval.yaml", [{"name": "tools", "sources": ["*train_only*"], "weight": 1}], datasets=["data/noval"])
    warnings = plan_mixture(alone, batch_tokens=1024).to_json()["warnings"]
    assert any("the mixture has no validation row" in w for w in warnings), warnings

    mixed = write_spec(
        root / "part-noval.yaml",
        [{**CHAT, "weight": 1}, {"name": "tools", "sources": ["*train_only*"], "weight": 1}],
        datasets=["data/nightly", "data/noval"],
        rest="drop",
    )
    plan = plan_mixture(mixed, batch_tokens=1024).to_json()
    assert plan["groups"][0]["val_rows"] > 0 and plan["groups"][1]["val_rows"] == 0
    assert any("group 'tools' has no validation row" in w for w in plan["warnings"]), plan["warnings"]
    assert not any("group 'chat' has no validation row" in w for w in plan["warnings"])


def test_the_plan_shows_the_users_names_as_written_not_as_terminal_markup(root):
    # "[/chat]" would be a closing markup tag to rich: printed raw it raised MarkupError
    spec = write_spec(root / "markup.yaml", [{**CHAT, "name": "[/chat] [bold]x", "weight": 1}], rest="drop")
    result = runner.invoke(app, ["plan", "--mixture", str(spec)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[/chat] [bold]x" in result.output

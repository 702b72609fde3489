"""Template policies a user relies on: a pinned date, template variables, system prompts a
template refuses, roles it cannot render, the render-vs-inference check and reasoning policies.

Every test runs the official chat template of a real model (tests/chat_templates/) through
:class:`Masker` directly; three tests run a whole prepare (two in-process, one through the CLI
with ``--no-flow``) because what they check is what lands in the dataset folder.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import schema
from pipeline.config import SFTConfig, TemplateConfig
from pipeline.formats import to_conversation
from pipeline.manifest import read_manifest
from pipeline.masking import Encoded, Masker
from pipeline.masking.policies import prompt_in_generation_blocks
from pipeline.stage import Drop
from pipeline.templates import BUILTIN_TEMPLATES, Template, render, resolve_template
from tests.chat_templates.models import TEMPLATES, conversation, template_text, tokenizer_for

PINNED = "26 Jul 2024"  # TemplateConfig.today's default, formatted as Llama-3.1 prints it


# --- helpers -----------------------------------------------------------------------------------
def row(name: str):
    """One fixture conversation in sftkit's canonical form: (messages, tools JSON)."""
    messages, tools = conversation(name)
    return to_conversation({"messages": messages, "tools": tools})


def masker_for(
    model: str,
    base_tokenizer,
    *,
    twin: bool = False,
    system: str = "keep",
    reasoning: str = "template",
    strict_render: bool = False,
    span_method: str = "auto",
    **template_config,
):
    """(tokenizer dressed as ``model``, Masker on its own template resolved from ``template_config``)."""
    tokenizer = tokenizer_for(model, base_tokenizer, twin=twin)
    template = resolve_template(tokenizer, TemplateConfig(system=system, **template_config))
    masker = Masker(
        tokenizer, template, max_length=8192, system=system, reasoning=reasoning, strict_render=strict_render, span_method=span_method
    )
    return tokenizer, masker


def trained_text(tokenizer, encoded: Encoded) -> str:
    return tokenizer.decode(encoded.input_ids[encoded.labels != schema.IGNORE_INDEX].tolist())


def full_text(tokenizer, encoded: Encoded) -> str:
    return tokenizer.decode(encoded.input_ids.tolist())


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def fast_config(**sections) -> SFTConfig:
    """No dedup, no quality filters, everything in train: every input row reaches the tokenizer."""
    data = {"dedup": {"enabled": False}, "quality": {"enabled": False}, "shards": {"val_fraction": 0.0}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return SFTConfig.model_validate(data)


def shard_texts(out: Path, tokenizer) -> list[str]:
    texts = []
    for entry in read_manifest(out)["shards"]:
        for ids in pq.read_table(out / entry["path"], columns=[schema.INPUT_IDS]).column(0).to_pylist():
            texts.append(tokenizer.decode(ids))
    return texts


class _Clock:
    """Fakes the clock transformers' ``strftime_now`` reads (``datetime.now()`` in chat_template_utils)."""

    def __init__(self, monkeypatch):
        from transformers.utils import chat_template_utils

        self.monkeypatch, self.module = monkeypatch, chat_template_utils

    def set(self, day: dt.date) -> None:
        class FakeDatetime(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(day.year, day.month, day.day, 12, 0, 0)

        self.monkeypatch.setattr(self.module, "datetime", FakeDatetime)


# --- 1. a pinned date --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama31_folder(tmp_path_factory):
    """A tokenizer folder carrying Llama-3.1's official template, and a small input file."""
    from pipeline.tokenizers import load_tokenizer
    from tests.conftest import BPE_TOKENIZER

    root = tmp_path_factory.mktemp("llama31")
    tokenizer_for("llama31", load_tokenizer(str(BPE_TOKENIZER))).save_pretrained(root / "tokenizer")
    records = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(1, 5)
    ]
    records.append({"messages": conversation("system_multi_turn")[0]})
    return root / "tokenizer", write_records(root / "chat.jsonl", records)


def test_llama31_shards_are_byte_identical_on_different_days(tmp_path, monkeypatch, llama31_folder):
    from pipeline.steps import plan_refresh, prepare
    from pipeline.tokenizers import load_tokenizer

    tokenizer_dir, source = llama31_folder
    tokenizer = load_tokenizer(str(tokenizer_dir))
    clock = _Clock(monkeypatch)
    days = [dt.date(2031, 3, 4), dt.date(2032, 11, 15)]
    manifests = []
    for i, day in enumerate(days):
        clock.set(day)
        # the fake clock is the one transformers renders with: unpinned, the date would leak in
        unpinned = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        assert f"Today Date: {day.strftime('%d %b %Y')}" in unpinned
        manifests.append(prepare([str(source)], str(tokenizer_dir), tmp_path / f"day{i}", fast_config()))

    first, second = manifests
    assert first["counts"]["kept"] == 5 and second["counts"]["kept"] == 5
    assert [(s["path"], s["sha256"]) for s in first["shards"]] == [(s["path"], s["sha256"]) for s in second["shards"]]
    for a, b in zip(first["shards"], second["shards"]):
        assert (tmp_path / "day0" / a["path"]).read_bytes() == (tmp_path / "day1" / b["path"]).read_bytes()
    texts = shard_texts(tmp_path / "day0", tokenizer)
    assert texts and all(f"Today Date: {PINNED}" in text for text in texts)
    assert not any(day.strftime("%d %b %Y") in text for text in texts for day in days)

    # The manifest records the template's fingerprint; a different day changes it, so a refresh
    # into the same folder rebuilds instead of appending rows rendered with another date.
    default = resolve_template(tokenizer, TemplateConfig())
    assert first["template"]["fingerprint"] == default.fingerprint
    for changed in ({"today": "2030-01-02"}, {"variables": {"date_string": "02 Jan 2030"}}):
        plan = plan_refresh([source], str(tokenizer_dir), tmp_path / "day0", fast_config(template=changed))
        assert plan.template_fingerprint != first["template"]["fingerprint"], changed
        assert plan.rebuild, changed


@pytest.mark.parametrize(
    "setting, shown",
    [({"today": dt.date(2030, 1, 2)}, "02 Jan 2030"), ({"variables": {"date_string": "09 Sep 2029"}}, "09 Sep 2029")],
)
def test_a_chosen_date_changes_the_text_and_the_fingerprint(bpe_tokenizer, setting, shown):
    tokenizer, pinned = masker_for("llama31", bpe_tokenizer)
    _, chosen = masker_for("llama31", bpe_tokenizer, **setting)
    before, after = pinned.encode(*row("single_turn")), chosen.encode(*row("single_turn"))
    assert isinstance(before, Encoded) and isinstance(after, Encoded)
    assert f"Today Date: {PINNED}" in full_text(tokenizer, before)
    assert f"Today Date: {shown}" in full_text(tokenizer, after)
    assert PINNED not in full_text(tokenizer, after)
    assert chosen.template.fingerprint != pinned.template.fingerprint


def test_the_pinned_date_does_not_depend_on_the_clock(bpe_tokenizer, monkeypatch):
    tokenizer, masker = masker_for("llama31", bpe_tokenizer)
    clock = _Clock(monkeypatch)
    texts, fingerprints = [], []
    for day in (dt.date(2031, 3, 4), dt.date(2035, 6, 7)):
        clock.set(day)
        _, masker = masker_for("llama31", bpe_tokenizer)
        encoded = masker.encode(*row("multi_turn"))
        texts.append(full_text(tokenizer, encoded))
        fingerprints.append(masker.template.fingerprint)
    assert texts[0] == texts[1] and f"Today Date: {PINNED}" in texts[0]
    assert fingerprints[0] == fingerprints[1]


# --- 2. template.variables ---------------------------------------------------------------------
def test_enable_thinking_false_reaches_qwen3s_generation_prompt(bpe_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    tokenizer, off = masker_for("qwen3", bpe_tokenizer, variables={"enable_thinking": False})
    _, default = masker_for("qwen3", bpe_tokenizer)
    text_off, _ = render(off.template, off.variables, prompt, add_generation_prompt=True)
    text_default, _ = render(default.template, default.variables, prompt, add_generation_prompt=True)
    assert text_off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text_default.endswith("<|im_start|>assistant\n")
    assert off.template.fingerprint != default.template.fingerprint
    # and a row rendered with it is kept, its reply trained
    encoded = off.encode(*row("single_turn"))
    assert isinstance(encoded, Encoded), encoded
    assert trained_text(tokenizer, encoded).endswith("The capital of France is Paris.<|im_end|>")


@pytest.mark.parametrize("name", ["add_generation_prompt", "messages", "tools", "strftime_now", "raise_exception"])
def test_reserved_template_variables_are_refused(bpe_tokenizer, name):
    tokenizer = tokenizer_for("qwen3", bpe_tokenizer)
    with pytest.raises(ValueError, match=f"template.variables cannot set {name}"):
        resolve_template(tokenizer, TemplateConfig(variables={name: True, "enable_thinking": False}))


# --- 3. template.system with a template that refuses system prompts (Gemma) ----------------------
def test_gemma_keep_rejects_a_system_prompt_naming_the_role_and_template(bpe_tokenizer):
    _, masker = masker_for("gemma", bpe_tokenizer, system="keep")
    with_system, without = masker.encode_batch([row("system_multi_turn"), row("multi_turn")])
    assert isinstance(with_system, Drop)
    assert (with_system.stage, with_system.reason) == ("template", "template_unsupported_role")
    assert "'system'" in with_system.detail and repr(masker.template.name) in with_system.detail
    assert "merge" in with_system.detail  # says how to get the row in
    assert isinstance(without, Encoded)


def test_gemma_merge_folds_the_system_prompt_into_the_first_user_turn(bpe_tokenizer):
    tokenizer, official = masker_for("gemma", bpe_tokenizer, system="merge")
    _, twin = masker_for("gemma", bpe_tokenizer, twin=True, system="merge", span_method="generation")
    assert not official.template.has_generation_tags and twin.template.has_generation_tags
    rows = [row("system_multi_turn"), row("multi_turn"), row("single_turn")]
    got, want = official.encode_batch(rows), twin.encode_batch(rows)
    for conversation_row, a, b in zip(rows, got, want):
        assert isinstance(a, Encoded) and isinstance(b, Encoded), (a, b)
        assert a.input_ids.tolist() == b.input_ids.tolist(), conversation_row
        assert a.labels.tolist() == b.labels.tolist(), conversation_row
    text = full_text(tokenizer, got[0])
    assert "<start_of_turn>user\nYou are a terse assistant.\n\nHi!<end_of_turn>" in text
    assert text.count("You are a terse assistant.") == 1
    assert "You are a terse assistant." not in trained_text(tokenizer, got[0])
    assert trained_text(tokenizer, got[0]) == "Hello.<end_of_turn>Thirteen.<end_of_turn>"


def test_gemma_reject_refuses_only_rows_with_a_system_prompt(bpe_tokenizer):
    _, masker = masker_for("gemma", bpe_tokenizer, system="reject")
    with_system, without, single = masker.encode_batch([row("system_multi_turn"), row("multi_turn"), row("single_turn")])
    assert isinstance(with_system, Drop)
    assert with_system.reason == "template_unsupported_role" and "system" in with_system.detail
    assert "reject" in with_system.detail  # refused by the policy, not by the template
    assert isinstance(without, Encoded) and isinstance(single, Encoded)


def test_reject_refuses_system_prompts_even_where_the_template_renders_them(bpe_tokenizer):
    _, keep = masker_for("qwen3", bpe_tokenizer, system="keep")
    _, reject = masker_for("qwen3", bpe_tokenizer, system="reject")
    assert isinstance(keep.encode(*row("system_multi_turn")), Encoded)
    refused, plain = reject.encode_batch([row("system_multi_turn"), row("multi_turn")])
    assert isinstance(refused, Drop) and refused.reason == "template_unsupported_role"
    assert isinstance(plain, Encoded)


def test_system_policy_is_validated(bpe_tokenizer):
    tokenizer = tokenizer_for("gemma", bpe_tokenizer)
    template = resolve_template(tokenizer, TemplateConfig())
    with pytest.raises(ValueError, match="template.system"):
        Masker(tokenizer, template, max_length=512, system="fold")
    with pytest.raises(ValueError):
        TemplateConfig(system="fold")


# --- 4. a role the template cannot render ------------------------------------------------------
def test_mistral_tool_conversation_is_an_unsupported_role_not_a_template_error(mistral_tokenizer):
    _, masker = masker_for("mistral", mistral_tokenizer)
    tool, plain = masker.encode_batch([row("tool_call"), row("multi_turn")])
    assert isinstance(tool, Drop)
    assert (tool.stage, tool.reason) == ("template", "template_unsupported_role")
    assert "'tool'" in tool.detail and repr(masker.template.name) in tool.detail
    assert isinstance(plain, Encoded)


@pytest.mark.parametrize("model", ["mistral", "gemma"])
def test_tool_calls_a_template_never_renders_are_refused_not_trained_without_them(model, bpe_tokenizer):
    """Mistral v0.2's and Gemma's templates raise on a tool result but render an assistant turn's
    tool calls as nothing: a turn that only calls (its result not in the row) would be trained as
    its words alone, the calls lost. Its reasoning naming the tool once made that pass the span check."""
    _, masker = masker_for(model, bpe_tokenizer)
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in ("Paris", "Rome")]
    messages = [
        schema.make_message("user", "Weather in Paris and Rome?"),
        schema.make_message("assistant", "", tool_calls=calls, reasoning="I will call get_weather for each city."),
    ]
    refused = masker.encode(messages)
    assert isinstance(refused, Drop), trained_text(masker.tokenizer, refused)
    assert refused.reason == "template_unsupported_role" and "renders no tool calls" in refused.detail


# A ChatML template that writes tool results as user turns and a calling turn's words only (as
# Granite 3.x's renders a result under its own role while a call's text depends on the version).
_RESULTS_NOT_CALLS = (
    "{% for m in messages %}<|im_start|>{{ 'user' if m.role == 'tool' else m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "source, said, not_said",
    [
        (_RESULTS_NOT_CALLS, "renders no tool calls (", "tool results"),
        (template_text("phi3"), "renders no tool calls and no tool results", None),
    ],
)
def test_a_dropped_tool_role_is_refused_naming_what_the_template_drops(source, said, not_said, bpe_tokenizer):
    """The refusal says what is lost: the calls, the results or both (it said "no tool messages or
    calls" for a template that renders the results)."""
    masker = Masker(bpe_tokenizer, Template("custom", source), max_length=1024)
    refused = masker.encode(*row("tool_call"))
    assert isinstance(refused, Drop) and refused.reason == "template_unsupported_role"
    assert said in refused.detail, refused.detail
    assert not_said is None or not_said not in refused.detail


def with_call_ids(name: str, call_id: str):
    """Fixture conversation ``name`` with every call's id (and every result's) set to ``call_id``."""
    messages, tools = conversation(name)
    for message in messages:
        for call in message.get("tool_calls") or ():
            call["id"] = call_id
        if message.get("tool_call_id"):
            message["tool_call_id"] = call_id
    return to_conversation({"messages": messages, "tools": tools})


def test_kimi_k2_trains_calls_whose_ids_name_them_and_refuses_the_others(bpe_tokenizer):
    """Kimi K2's template writes a call's id where its name would be (its model writes ids like
    functions.NAME:0) and each result under the id of the call it answers. A row whose ids name
    their calls is masked as the tagged twin masks it; one whose ids do not (OpenAI's call_…)
    would lose every call's name, and is refused saying so."""
    tokenizer, official = masker_for("kimi_k2", bpe_tokenizer)
    _, twin = masker_for("kimi_k2", bpe_tokenizer, twin=True)
    assert official.roles.calls_named_by_id and not official.roles.needs_call_ids
    named = with_call_ids("tool_call", "functions.get_weather:0")
    got, want = official.encode(*named), twin.encode(*named)
    assert isinstance(got, Encoded) and isinstance(want, Encoded), (got, want)
    assert (got.input_ids.tolist(), got.labels.tolist()) == (want.input_ids.tolist(), want.labels.tolist())
    assert "## Return of functions.get_weather:0" in full_text(tokenizer, got)
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in trained_text(tokenizer, got)
    for call_id in ("call_0001", "call_get_weather_7", "functions.get_weather"):
        refused = official.encode(*with_call_ids("tool_call", call_id))
        assert isinstance(refused, Drop) and refused.reason == "template_drops_tool_calls", call_id
        assert f"'get_weather' under the id '{call_id}'" in refused.detail and "functions.NAME:INDEX" in refused.detail


@pytest.mark.parametrize("model, call_id", [("kimi_k2", "functions.get_weather:0"), ("mistral_v03", "call_0001")])
def test_a_result_that_answers_no_call_with_an_id_is_refused_where_the_template_writes_ids(model, call_id, bpe_tokenizer):
    """A template that writes each result under its call's id would render such a result under no
    id at all (Kimi K2: '## Return of ' and nothing): refused, not trained that way."""
    _, masker = masker_for(model, bpe_tokenizer)
    messages, tools = conversation("tool_call")
    messages[1]["tool_calls"][0]["id"] = call_id
    messages.insert(3, {"role": "tool", "name": "get_weather", "content": '{"temperature": 19}'})  # a second result
    refused = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(refused, Drop) and refused.reason == "tool_result_unpaired", refused
    assert "tool result 3" in refused.detail


def test_mistral_v03_trains_tool_rows_with_the_ids_its_template_demands(bpe_tokenizer):
    """Mistral v0.3's template refuses a call or a result without a nine-character id. Results get
    back the id of the call they answer, so tool rows are trained (before, every one was refused as
    a role the template cannot render); a call without an id is refused, in the template's words
    where it has no result."""
    tokenizer, masker = masker_for("mistral_v03", bpe_tokenizer)
    assert masker.roles.needs_call_ids and not masker.roles.calls_named_by_id
    encoded = masker.encode(*row("tool_call"))
    assert isinstance(encoded, Encoded), encoded
    assert '"call_id": "call_0001"}[/TOOL_RESULTS]' in full_text(tokenizer, encoded)
    # name before arguments, as the model writes a call (the stored JSON has its keys sorted)
    assert trained_text(tokenizer, encoded).startswith('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"')
    messages, tools = conversation("tool_call")
    del messages[1]["tool_calls"][0]["id"]
    unpaired = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(unpaired, Drop) and unpaired.reason == "tool_result_unpaired"  # its result has no id to go under
    refused = masker.encode(*to_conversation({"messages": messages[:2], "tools": tools}))  # the call alone
    assert isinstance(refused, Drop) and refused.reason == "template_error"
    assert "Tool call IDs should be alphanumeric strings with length 9!" in refused.detail


@pytest.mark.parametrize("model", ["qwen3", "llama31", "gpt_oss", "deepseek_r1"])
def test_templates_that_name_calls_need_no_ids(model, bpe_tokenizer):
    _, masker = masker_for(model, bpe_tokenizer)
    assert not masker.roles.needs_call_ids and not masker.roles.calls_named_by_id


# --- 5. render-vs-inference check --------------------------------------------------------------
DEEPSEEK_MISMATCHING = ["single_turn", "multi_turn", "system_multi_turn", "reasoning"]
# the last assistant turn follows a tool result: the generation prompt opens no <think> there
DEEPSEEK_MATCHING = ["tool_call_json_args"]


def test_deepseek_r1_rows_are_kept_and_flagged_as_render_mismatch(bpe_tokenizer):
    _, masker = masker_for("deepseek_r1", bpe_tokenizer)
    results = masker.encode_batch([row(n) for n in DEEPSEEK_MISMATCHING + DEEPSEEK_MATCHING])
    assert all(isinstance(r, Encoded) for r in results), results
    assert [r.render_mismatch for r in results] == [True] * len(DEEPSEEK_MISMATCHING) + [False] * len(DEEPSEEK_MATCHING)


def test_deepseek_r1_strict_render_rejects_the_mismatching_rows(bpe_tokenizer):
    _, masker = masker_for("deepseek_r1", bpe_tokenizer, strict_render=True)
    results = masker.encode_batch([row(n) for n in DEEPSEEK_MISMATCHING + DEEPSEEK_MATCHING])
    for name, result in zip(DEEPSEEK_MISMATCHING, results):
        assert isinstance(result, Drop), name
        assert (result.stage, result.reason) == ("tokenize", "render_mismatch"), name
        assert "<think>" in result.detail  # says what inference shows that training does not
    assert isinstance(results[-1], Encoded) and not results[-1].render_mismatch


@pytest.mark.parametrize("model", ["qwen3", "llama31", "chatml"])
def test_templates_that_render_like_inference_have_no_render_mismatch(bpe_tokenizer, model):
    if model == "chatml":
        masker = Masker(bpe_tokenizer, resolve_template(bpe_tokenizer, TemplateConfig(name="chatml")), max_length=8192, strict_render=True)
        names = list(TEMPLATES["qwen3"]["conversations"])
    else:
        _, masker = masker_for(
            model,
            bpe_tokenizer,
            strict_render=True,
            **({"variables": TEMPLATES[model]["variables"]} if TEMPLATES[model]["variables"] else {}),
        )
        names = TEMPLATES[model]["conversations"]
    results = masker.encode_batch([row(n) for n in names])
    for name, result in zip(names, results):
        assert isinstance(result, Encoded), (name, result)
        assert not result.render_mismatch, name


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    from pipeline.tokenizers import load_tokenizer
    from tests.conftest import BPE_TOKENIZER

    root = tmp_path_factory.mktemp("deepseek")
    tokenizer_for("deepseek_r1", load_tokenizer(str(BPE_TOKENIZER))).save_pretrained(root / "tokenizer")
    records = []
    for name in DEEPSEEK_MISMATCHING + DEEPSEEK_MATCHING:
        messages, tools = conversation(name)
        records.append({"messages": messages, "tools": tools} if tools else {"messages": messages})
    return root / "tokenizer", write_records(root / "chat.jsonl", records)


def test_prepare_counts_render_mismatches_in_the_manifest(tmp_path, deepseek_folder):
    from pipeline.steps import prepare

    tokenizer_dir, source = deepseek_folder
    manifest = prepare([str(source)], str(tokenizer_dir), tmp_path / "data", fast_config())
    counts = manifest["counts"]
    assert counts["read"] == counts["kept"] == len(DEEPSEEK_MISMATCHING) + len(DEEPSEEK_MATCHING), counts
    assert counts["render_mismatch"] == len(DEEPSEEK_MISMATCHING)
    assert read_manifest(tmp_path / "data")["counts"]["render_mismatch"] == len(DEEPSEEK_MISMATCHING)


def test_cli_strict_render_rejects_the_mismatching_rows(tmp_path, deepseek_folder):
    from flows.cli import app

    tokenizer_dir, source = deepseek_folder
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"dedup": {"enabled": False}, "quality": {"enabled": False}}))
    out = tmp_path / "data"
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            str(source),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--config",
            str(config),
            "--no-flow",
            "--strict-render",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["config"]["tokenize"]["strict_render"] is True
    counts = manifest["counts"]
    assert counts["kept"] == len(DEEPSEEK_MATCHING)
    assert counts["rejected"] == {"tokenize": {"render_mismatch": len(DEEPSEEK_MISMATCHING)}}
    assert counts["render_mismatch"] == 0


def test_cli_refuses_an_unknown_reasoning_policy(tmp_path, bpe_tokenizer_path):
    from flows.cli import app
    from flows.runner import build_config

    assert build_config(reasoning="drop", strict_render=True).tokenize.reasoning == "drop"
    assert build_config(reasoning="drop", strict_render=True).tokenize.strict_render is True
    source = write_records(tmp_path / "in.jsonl", [{"messages": conversation("single_turn")[0]}])
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            str(source),
            "--tokenizer",
            str(bpe_tokenizer_path),
            "--out",
            str(tmp_path / "o"),
            "--no-flow",
            "--reasoning",
            "sometimes",
        ],
    )
    assert result.exit_code == 2
    assert "reasoning" in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


# --- 6. reasoning policies ---------------------------------------------------------------------
def test_qwen3_reasoning_drop_trains_no_reasoning(bpe_tokenizer):
    variables = {"variables": TEMPLATES["qwen3"]["variables"]}
    tokenizer, kept = masker_for("qwen3", bpe_tokenizer, reasoning="template", **variables)
    _, dropped = masker_for("qwen3", bpe_tokenizer, reasoning="drop", **variables)
    with_reasoning, without = kept.encode(*row("reasoning")), dropped.encode(*row("reasoning"))
    assert isinstance(with_reasoning, Encoded) and isinstance(without, Encoded), (with_reasoning, without)
    # template: Qwen3 renders the reasoning of the last turn only, and it is trained
    assert "<think>\n13 * 13 = 169.\n</think>" in trained_text(tokenizer, with_reasoning)
    assert "12 * 12 = 144." not in full_text(tokenizer, with_reasoning)
    # drop: no reasoning anywhere, the answers are still trained
    for text in (trained_text(tokenizer, without), full_text(tokenizer, without)):
        assert "13 * 13 = 169." not in text and "12 * 12 = 144." not in text
    assert "<think>\n13" not in trained_text(tokenizer, without)
    assert trained_text(tokenizer, without).endswith("169<|im_end|>")
    assert "144<|im_end|>" in trained_text(tokenizer, without)
    assert without.num_trainable < with_reasoning.num_trainable


def test_reasoning_drop_with_a_template_that_reads_only_content(bpe_tokenizer):
    # Llama-3.1 does not read reasoning_content: under template it is put back inline
    tokenizer, kept = masker_for("llama31", bpe_tokenizer, reasoning="template")
    _, dropped = masker_for("llama31", bpe_tokenizer, reasoning="drop")
    with_reasoning, without = kept.encode(*row("reasoning")), dropped.encode(*row("reasoning"))
    assert isinstance(with_reasoning, Encoded) and isinstance(without, Encoded), (with_reasoning, without)
    trained = trained_text(tokenizer, with_reasoning)
    assert "<think>\n12 * 12 = 144.\n</think>\n\n144" in trained and "<think>\n13 * 13 = 169.\n</think>\n\n169" in trained
    assert "<think>" not in full_text(tokenizer, without)
    assert trained_text(tokenizer, without) == "144<|eot_id|>169<|eot_id|>"


def test_reasoning_policy_is_validated(bpe_tokenizer):
    tokenizer = tokenizer_for("qwen3", bpe_tokenizer)
    template = resolve_template(tokenizer, TemplateConfig())
    with pytest.raises(ValueError, match="tokenize.reasoning"):
        Masker(tokenizer, template, max_length=512, reasoning="hide")


def test_a_template_that_reads_the_clock_itself_sees_the_pinned_day(bpe_tokenizer, monkeypatch):
    """strftime_now() called by the template (not through date_string) is pinned too."""
    import transformers.utils.chat_template_utils as ctu

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2031, 5, 6, 7, 8, 9)

    monkeypatch.setattr(ctu, "datetime", FakeDatetime)
    source = (
        "{{- 'Today: ' + strftime_now('%Y-%m-%d') + '\\n' }}{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n' }}{%- endfor %}"
    )
    today = Template("clock", source, today=dt.date(2024, 7, 26))
    text, _ = render(today, {}, [{"role": "user", "content": "hi"}])
    assert text.startswith("Today: 2024-07-26\n")
    other = Template("clock", source, today=dt.date(2025, 1, 2))
    assert render(other, {}, [{"role": "user", "content": "hi"}])[0].startswith("Today: 2025-01-02\n")
    assert today.fingerprint != other.fingerprint


# --- 7. what a template's own generation blocks and its comments say ----------------------------
NO_THINK = to_conversation(
    {
        "messages": [
            {"role": "system", "content": "You are terse. /no_think"},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
)


@pytest.mark.parametrize(
    "variables, prompt",
    [({}, "<|im_start|>assistant\n"), ({"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n")],
)
def test_smollm3s_generation_blocks_hold_its_prompt_and_are_seen_through(bpe_tokenizer, variables, prompt):
    """SmolLM3's official template opens its {% generation %} blocks before the assistant header,
    its generation prompt (without thinking, the empty think block too): taken as they are, every
    row would train text the model is given and be refused by the span check. ``auto`` locates
    each turn instead and trains what the model writes, exactly as the correctly tagged twin does;
    ``generation`` is refused up front, naming the prompt."""
    config = {"variables": variables} if variables else {}
    tokenizer, official = masker_for("smollm3", bpe_tokenizer, **config)
    assert official.template.has_generation_tags and not official.use_generation
    assert prompt_in_generation_blocks(official.template, official.variables) == prompt
    _, twin = masker_for("smollm3", bpe_tokenizer, twin=True, **config)
    assert twin.use_generation
    rows = [row(name) for name in TEMPLATES["smollm3"]["conversations"]] + [NO_THINK]
    for conversation_row, got, want in zip(rows, official.encode_batch(rows), twin.encode_batch(rows)):
        assert isinstance(got, Encoded) and isinstance(want, Encoded), (got, want)
        assert got.input_ids.tolist() == want.input_ids.tolist(), conversation_row
        assert got.labels.tolist() == want.labels.tolist(), conversation_row
        assert "<|im_start|>" not in trained_text(tokenizer, got)
    no_think = official.encode(*NO_THINK)
    assert "<|im_start|>assistant\n<think>\n\n</think>\nHello.<|im_end|>" in full_text(tokenizer, no_think)
    assert trained_text(tokenizer, no_think) == "Hello.<|im_end|>"
    with pytest.raises(ValueError, match="puts its generation prompt .* inside its"):
        masker_for("smollm3", bpe_tokenizer, span_method="generation", **config)


def test_generation_blocks_that_take_in_a_header_before_a_prompts_think_block_are_seen_through(bpe_tokenizer):
    """DeepSeek-R1's twin with its answer block opened before '<｜Assistant｜>': its prompt goes on
    with '<think>\n', which the answer never renders, so the prompt is no prefix of the answer's
    rendering; the header the block takes in is still found (where the two renderings part)."""
    tokenizer = tokenizer_for("deepseek_r1", bpe_tokenizer, twin=True)
    source = template_text("deepseek_r1", twin=True)
    right = "{{'<｜Assistant｜>'}}{%- generation %}{{content + '<｜end▁of▁sentence｜>'}}"
    assert source.count(right) == 1
    wrong = Template(
        "r1-header-in-block", source.replace(right, "{%- generation %}{{'<｜Assistant｜>'}}{{content + '<｜end▁of▁sentence｜>'}}")
    )
    masker = Masker(tokenizer, wrong, max_length=512)
    assert not masker.use_generation and prompt_in_generation_blocks(wrong, masker.variables) == "<｜Assistant｜>"
    encoded = masker.encode(*row("single_turn"))
    assert isinstance(encoded, Encoded), encoded
    assert "<｜Assistant｜>" not in trained_text(tokenizer, encoded)


@pytest.mark.parametrize("name", [*(n for n in TEMPLATES if n != "smollm3"), *BUILTIN_TEMPLATES])
def test_generation_blocks_that_start_where_the_prompt_ends_are_used(name, bpe_tokenizer):
    """The twins' blocks and the built-in templates' start right after the generation prompt."""
    if name in TEMPLATES:
        variables = TEMPLATES[name]["variables"]
        _, masker = masker_for(name, bpe_tokenizer, twin=True, span_method="generation", **({"variables": variables} if variables else {}))
    else:
        masker = Masker(bpe_tokenizer, resolve_template(bpe_tokenizer, TemplateConfig(name=name)), max_length=512, span_method="generation")
    assert masker.use_generation
    assert prompt_in_generation_blocks(masker.template, masker.variables) is None


def test_what_a_template_only_mentions_in_a_comment_does_not_change_how_it_is_read(bpe_tokenizer):
    """A comment naming reasoning_content once made sftkit pass reasoning in a field the template
    never reads: the reasoning vanished from the row without a word. Tags, fields and roles are
    read off the template's code, never off its comments."""
    body = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    comment = "{#- reads no reasoning_content or message.thinking, has no {% generation %} blocks, no system role -#}\n"
    plain, commented = Template("plain", body), Template("commented", comment + body)
    assert (commented.has_generation_tags, commented.supports_system) == (False, False)
    reasoning = row("reasoning")
    results = [Masker(bpe_tokenizer, t, max_length=512).encode(*reasoning) for t in (plain, commented)]
    assert all(isinstance(r, Encoded) for r in results), results
    assert results[0].input_ids.tolist() == results[1].input_ids.tolist()
    assert results[0].labels.tolist() == results[1].labels.tolist()
    assert "12 * 12 = 144." in trained_text(bpe_tokenizer, results[1])

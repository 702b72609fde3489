"""Templates with no end-of-turn token: the model stops with the token that opens the next message.

GLM-4.5 and GLM-4.6 close an assistant turn with nothing of its own: the next message's role
token follows its text (``<|user|>`` after an answer, ``<|observation|>`` after a tool call), and
those are the model's stop tokens. A conversation's last turn is followed by nothing at all. Trained
as rendered, no GLM row would teach the model to stop; sftkit trains the following role token as
the turn's end and appends it after the last turn.
"""

from __future__ import annotations

import json

import pytest

from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.masking.policies import next_message_stops
from pipeline.templates import Template, template_variables
from tests.chat_templates.models import TEMPLATES, conversation, template_text, tokenizer_for
from tests.support.masks import trained_runs


def _glm(tokenizer, **options) -> tuple[Masker, object]:
    dressed = tokenizer_for("glm45", tokenizer)
    return Masker(dressed, Template("glm45", template_text("glm45")), max_length=4096, span_method="locate", **options), dressed


def _encode(masker: Masker, name: str) -> Encoded:
    messages, tools = conversation(name)
    result = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(result, Encoded), result
    return result


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_only_a_template_without_end_tokens_gets_stops(name, bpe_tokenizer):
    dressed = tokenizer_for(name, bpe_tokenizer)
    masker = Masker(dressed, Template(name, template_text(name)), max_length=4096, span_method="locate")
    expected = {"answer": "<|user|>", "call": "<|observation|>"} if name == "glm45" else {}
    assert masker.stops == expected


def test_a_single_answer_ends_with_the_stop_token_trained(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer)
    result = _encode(masker, "single_turn")
    stop = tokenizer.convert_tokens_to_ids("<|user|>")
    assert result.input_ids[-1] == stop and result.labels[-1] == stop
    assert trained_runs(tokenizer, result.input_ids, result.labels) == ["\n<think></think>\nThe capital of France is Paris.<|user|>"]
    # everything before it is exactly what the official template renders
    messages, _ = conversation("single_turn")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(result.input_ids.tolist()) == rendered + "<|user|>"
    assert not result.render_mismatch


def test_each_turn_trains_the_role_token_that_follows_it(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer)
    result = _encode(masker, "multi_turn")
    runs = trained_runs(tokenizer, result.input_ids, result.labels)
    assert runs == ["\n<think></think>\nSeven.<|user|>", "\n<think></think>\nFourteen.<|user|>"]


def test_a_calling_turn_stops_with_the_observation_token(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer)
    result = _encode(masker, "tool_call")
    runs = trained_runs(tokenizer, result.input_ids, result.labels)
    assert len(runs) == 2
    assert runs[0].startswith("\n<think></think>\n<tool_call>get_weather\n") and runs[0].endswith("</tool_call><|observation|>")
    assert runs[1] == "\n<think></think>\nIt is 18 °C and cloudy in Paris.<|user|>"


def test_a_conversation_that_ends_in_a_call_gets_its_observation_token(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer)
    messages, tools = conversation("tool_call")
    messages = messages[:2]  # the question and the calling turn, no result yet
    result = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(result, Encoded), result
    runs = trained_runs(tokenizer, result.input_ids, result.labels)
    assert len(runs) == 1
    assert runs[0].startswith("\n<think></think>\n<tool_call>get_weather") and runs[0].endswith("</tool_call><|observation|>")


def test_per_turn_rows_end_with_their_stop(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer, reasoning="per_turn")
    messages, tools = conversation("tool_call")
    stops = []
    for end in (1, 3):  # one row per assistant turn, holding the conversation up to it
        result = masker.encode(*to_conversation({"messages": messages[: end + 1], "tools": tools}))
        assert isinstance(result, Encoded), result
        stops.append(tokenizer.decode(result.input_ids[-1:].tolist()))
        assert result.labels[-1] == result.input_ids[-1]
    assert stops == ["<|observation|>", "<|user|>"]


def test_reasoning_of_the_last_turn_is_trained_with_its_stop(bpe_tokenizer):
    masker, tokenizer = _glm(bpe_tokenizer)
    result = _encode(masker, "reasoning")
    runs = trained_runs(tokenizer, result.input_ids, result.labels)
    # GLM drops the reasoning of turns before the last question, as Qwen3 does
    assert runs == ["\n<think></think>\n144<|user|>", "\n<think>13 * 13 = 169.</think>\n169<|user|>"]


def _role_template(after_answer: str, header: str = "<|{role}|>\n") -> str:
    """Every message as HEADER + content, an assistant's followed by ``after_answer``."""
    open_ = header.replace("{role}", "' + m.role + '")
    return (
        "{%- for m in messages %}{{- '" + open_ + "' + m.content }}"
        "{%- if m.role == 'assistant' %}{{- '" + after_answer + "' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '" + header.replace("{role}", "assistant") + "' }}{%- endif %}"
    )


@pytest.mark.parametrize(
    "source, controls",
    [
        # a marker of its own after each answer, a control token sftkit does not list as an end token
        (_role_template("<|eot|>\\n"), ["<|user|>", "<|assistant|>", "<|eot|>"]),
        # the same marker as plain text
        (_role_template("[END]\\n"), ["<|user|>", "<|assistant|>"]),
        # Baichuan-2: nothing after the answer, but the model stops on an EOS the template never
        # writes, not on the next message's token
        (
            "{%- for m in messages %}{{- ('<reserved_106>' if m.role == 'user' else '<reserved_107>') + m.content }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<reserved_107>' }}{%- endif %}",
            ["<reserved_106>", "<reserved_107>"],
        ),
        # plain-text headers
        (_role_template("", header="### {role}:\\n"), ["<|user|>"]),
    ],
    ids=["own-control-marker", "own-text-marker", "baichuan2", "plain-headers"],
)
def test_no_stop_is_guessed_for_other_templates(source, controls, bpe_tokenizer):
    """Only a GLM-style template gets stops: the next message's token right after the answer, and
    one its family stops on. Others keep their masks as before (nothing appended, nothing added)."""
    variables = template_variables(bpe_tokenizer)
    assert next_message_stops(Template("custom", source), variables, controls, ["<|im_end|>"], False) == {}


def test_a_template_with_its_own_marker_keeps_its_masks(bpe_tokenizer):
    """A turn closed by a control marker sftkit does not list is trained as before: up to its text."""
    tokenizer = tokenizer_for("glm45", bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    source = _role_template("<|eot|>\\n")
    masker = Masker(tokenizer, Template("custom", source), max_length=4096, span_method="locate")
    assert masker.stops == {}
    messages, _ = conversation("multi_turn")
    result = masker.encode(*to_conversation({"messages": messages}))
    assert isinstance(result, Encoded), result
    assert [run.strip() for run in trained_runs(tokenizer, result.input_ids, result.labels)] == ["Seven.", "Fourteen."]


_BAICHUAN2 = (
    "{%- for m in messages %}{{- ('<reserved_106>' if m.role == 'user' else '<reserved_107>') + m.content }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<reserved_107>' }}{%- endif %}"
)


def test_turns_that_end_without_a_stop_are_counted(bpe_tokenizer):
    """A template with no end-of-turn token and no known stop (Baichuan-2's): each trained turn is
    counted, so the run can say its model learns no stop; GLM's and Qwen3's turns all have one."""
    tokenizer = tokenizer_for("glm45", bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<reserved_106>", "<reserved_107>"]})
    row = to_conversation({"messages": conversation("multi_turn")[0]})
    baichuan = Masker(tokenizer, Template("baichuan2", _BAICHUAN2), max_length=4096, span_method="locate")
    assert baichuan.encode(*row).turns_without_stop == 2
    assert baichuan.encode(*row).num_trainable > 0  # kept, as before: only counted
    glm, _ = _glm(bpe_tokenizer)
    assert glm.encode(*row).turns_without_stop == 0
    qwen3 = Masker(tokenizer_for("qwen3", bpe_tokenizer), Template("qwen3", template_text("qwen3")), max_length=4096, span_method="locate")
    assert qwen3.encode(*row).turns_without_stop == 0


def test_prepare_says_when_the_model_learns_no_stop(tmp_path, bpe_tokenizer):
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.manifest import read_manifest

    tokenizer = tokenizer_for("glm45", bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<reserved_106>", "<reserved_107>"]})
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "baichuan2.jinja").write_text(_BAICHUAN2)
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": conversation("multi_turn")[0]}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "dedup": {"enabled": False},
                "quality": {"enabled": False},
                "shards": {"val_fraction": 0.0},
                "template": {"jinja_file": str(tmp_path / "baichuan2.jinja")},
            }
        )
    )
    out = tmp_path / "data"
    args = ["prepare", str(source), "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out), "--config", str(config), "--no-flow"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["counts"]["turns_without_stop"] == 2
    assert "no end-of-turn token" in result.output
    inspected = CliRunner().invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    assert "2 trained assistant turns end with no end-of-turn token" in " ".join(inspected.output.split())

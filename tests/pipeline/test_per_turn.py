"""tokenize.reasoning: per_turn — one row per assistant turn, rendered and trained as at inference.

A conversation with N trained assistant turns becomes N rows; row k holds the conversation up to
turn k, trains only that turn (its reasoning included) and shows before it exactly the generation
prompt the model sees at inference. Records are still counted once (conservation by record), a
turn refused while others of its record are kept is filed with its ``turn``, and a record all of
whose turns are refused is rejected once.
"""

from __future__ import annotations

import copy
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline import schema
from pipeline.config import SFTConfig, TemplateConfig
from pipeline.formats import to_conversation
from pipeline.manifest import read_manifest
from pipeline.masking import Encoded, Masker
from pipeline.masking.locate import realise
from pipeline.steps import prepare
from pipeline.templates import Template, resolve_template
from pipeline.tokenize import encode_table
from tests.chat_templates.models import CONVERSATIONS, template_text, tokenizer_for

REASONING = CONVERSATIONS["reasoning"]["messages"]  # two turns, each with reasoning_content


def canonical_table(conversations) -> pa.Table:
    rows = []
    for index, messages in enumerate(conversations):
        canonical, tools = to_conversation({"messages": messages})
        rows.append(
            {
                "id": schema.conversation_id(canonical, tools),
                "source": "in.jsonl",
                "source_index": index,
                "messages": canonical,
                "tools": tools,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA)


def masker(model: str, base_tokenizer, *, twin: bool = False, variables: dict | None = None, **kwargs):
    tokenizer = tokenizer_for(model, base_tokenizer, twin=twin)
    template = resolve_template(tokenizer, TemplateConfig(variables=variables or {}))
    return tokenizer, Masker(
        tokenizer,
        template,
        max_length=kwargs.pop("max_length", 4096),
        reasoning="per_turn",
        span_method="generation" if twin else "locate",
        **kwargs,
    )


def history(per_turn: Masker, tokenizer, canonical, **variables) -> list[dict]:
    """The messages before a row's turn as the template gets them: reasoning inline where the
    template reads only content, except where it cuts it out (DeepSeek's answers to a user)."""
    messages = schema.messages_for_template(canonical)
    shaped = per_turn.reasoning.shape(messages)

    def render(plain):
        return tokenizer.apply_chat_template(plain, tokenize=False, date_string="26 Jul 2024", **variables)

    return realise(per_turn.reasoning.shape(messages, per_turn.reasoning.placement(shaped, render(realise(shaped, None)), render)), None)


def weather_call(call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def trained(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != schema.IGNORE_INDEX])


@pytest.mark.parametrize("model", ["qwen3", "deepseek_r1", "phi3", "llama31", "smollm3", "kimi_k2_thinking", "nemotron_nano_v2"])
def test_each_turn_is_a_row_trained_as_at_inference(model, bpe_tokenizer, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    class PinnedDay(dt.datetime):  # transformers' strftime_now, for SmolLM3's dated system block
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2024, 7, 26, 12, 0, 0)

    monkeypatch.setattr(ctu, "datetime", PinnedDay)
    tokenizer, per_turn = masker(model, bpe_tokenizer)
    kept, rejected, figures = encode_table(per_turn, canonical_table([REASONING]))
    assert rejected.num_rows == 0 and kept.num_rows == 2
    assert figures["records_in"] == figures["records_out"] == 1
    assert kept.column(schema.TURN).to_pylist() == [1, 3]
    assert [len(m) for m in kept.column(schema.MESSAGES).to_pylist()] == [2, 4]
    rows = kept.to_pylist()
    for row, (reasoning, answer) in zip(rows, [("12 * 12 = 144.", "144"), ("13 * 13 = 169.", "169")]):
        text = trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS])
        assert reasoning in text and answer in text, text  # the turn's reasoning is trained, whatever the template
        if answer == "169":
            assert "12 * 12" not in text and "144" not in text  # nothing of an earlier turn is trained
        # The text before the trained turn is exactly the inference prompt, token for token.
        first = next(i for i, label in enumerate(row[schema.LABELS]) if label != schema.IGNORE_INDEX)
        messages = history(per_turn, tokenizer, row[schema.MESSAGES][:-1])
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, date_string="26 Jul 2024")
        assert row[schema.INPUT_IDS][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_deepseek_reasoning_is_written_into_the_think_block_the_prompt_opens(bpe_tokenizer):
    """DeepSeek-R1's template strips reasoning even from the last turn; per_turn puts it back after
    the prompt's "<think>\\n", as the model writes it at inference. Same as the tagged twin."""
    tokenizer, per_turn = masker("deepseek_r1", bpe_tokenizer)
    _, twin = masker("deepseek_r1", bpe_tokenizer, twin=True)
    table = canonical_table([REASONING])
    kept, _, _ = encode_table(per_turn, table)
    reference, _, _ = encode_table(twin, table)
    last = kept.to_pylist()[-1]
    assert tokenizer.decode(last[schema.INPUT_IDS]).endswith("<｜Assistant｜><think>\n13 * 13 = 169.\n</think>\n\n169<｜end▁of▁sentence｜>")
    assert trained(tokenizer, last[schema.INPUT_IDS], last[schema.LABELS]) == ("13 * 13 = 169.\n</think>\n\n169<｜end▁of▁sentence｜>")
    assert kept.column(schema.LABELS).to_pylist() == reference.column(schema.LABELS).to_pylist()
    assert kept.column(schema.INPUT_IDS).to_pylist() == reference.column(schema.INPUT_IDS).to_pylist()


def test_deepseek_v31_thinking_reasoning_is_written_before_the_close(bpe_tokenizer):
    """DeepSeek-V3.1 with thinking prompts "<｜Assistant｜><think>" but renders every turn as
    "</think>" + content, its reasoning cut out; per_turn writes the reasoning before that close, as
    the model does at inference. A turn without reasoning closes the block empty."""
    tokenizer, per_turn = masker("deepseek_v31", bpe_tokenizer, variables={"thinking": True})
    no_reasoning = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    kept, rejected, _ = encode_table(per_turn, canonical_table([REASONING, no_reasoning]))
    assert rejected.num_rows == 0 and kept.num_rows == 3
    rows = kept.to_pylist()
    texts = [trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) for row in rows]
    eos = "<｜end▁of▁sentence｜>"
    assert texts[1] == f"13 * 13 = 169.</think>169{eos}"  # the content as it is: no separator of sftkit's
    assert texts[0].startswith("12 * 12 = 144.</think>") and "13 * 13" not in texts[0]
    assert texts[2] == f"</think>Hello.{eos}"
    for row in rows:  # before the trained turn: exactly the inference prompt, which opens the block
        first = next(i for i, label in enumerate(row[schema.LABELS]) if label != schema.IGNORE_INDEX)
        messages = history(per_turn, tokenizer, row[schema.MESSAGES][:-1], thinking=True)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking=True)
        assert prompt.endswith("<｜Assistant｜><think>")
        assert row[schema.INPUT_IDS][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_kimi_k2_thinking_reasoning_is_written_into_the_empty_block_of_its_answer(bpe_tokenizer):
    """Kimi K2 Thinking renders every answer, the last one too, as "<think></think>" + content and
    keeps reasoning only in the calling turns after the last answer: the rendering of a turn never
    holds its reasoning, which the model writes at inference after "<|im_assistant|>assistant<|im_middle|>".
    per_turn writes it into the empty block, with no whitespace, as the template writes the reasoning it
    keeps (it trained "<think></think>169", teaching the model not to think). Same as the tagged twin."""
    tokenizer, per_turn = masker("kimi_k2_thinking", bpe_tokenizer)
    _, twin = masker("kimi_k2_thinking", bpe_tokenizer, twin=True)
    assert per_turn.think_frame == ("", "")
    call = weather_call("functions.get_weather:0")
    with_tools = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C.", "reasoning_content": "The tool said 18."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You're welcome."},  # no reasoning: its block stays empty
    ]
    table = canonical_table([REASONING, with_tools])
    kept, rejected, _ = encode_table(per_turn, table)
    reference, _, _ = encode_table(twin, table)
    assert rejected.num_rows == 0 and kept.num_rows == 5
    texts = [trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) for row in kept.to_pylist()]
    assert texts == [
        "<think>12 * 12 = 144.</think>144<|im_end|>",
        "<think>13 * 13 = 169.</think>169<|im_end|>",
        "<think>I should call the tool.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
        "<think>The tool said 18.</think>It is 18 C.<|im_end|>",
        "<think></think>You're welcome.<|im_end|>",
    ]
    for row in kept.to_pylist():  # before the trained turn: exactly the inference prompt
        first = next(i for i, label in enumerate(row[schema.LABELS]) if label != schema.IGNORE_INDEX)
        messages = history(per_turn, tokenizer, row[schema.MESSAGES][:-1])
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert row[schema.INPUT_IDS][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # The answer after the call is prompted with the call's reasoning, as the template renders it then.
    assert "<think>I should call the tool.</think>" in tokenizer.decode(kept.to_pylist()[3][schema.INPUT_IDS])
    assert kept.column(schema.LABELS).to_pylist() == reference.column(schema.LABELS).to_pylist()
    assert kept.column(schema.INPUT_IDS).to_pylist() == reference.column(schema.INPUT_IDS).to_pylist()


def test_nemotron_nano_v2_reasoning_goes_into_the_think_block_its_template_opens(bpe_tokenizer):
    """Nemotron Nano v2 reads no reasoning field and renders the last answer as its generation prompt
    does, "<SPECIAL_11>Assistant\n<think>\n\n", then the content: reasoning put inline with a tag of
    its own trained a second "<think>" (the span check refused every such row). It now goes in as
    "REASONING\n</think>\n\n" before the content, what the model writes after that prompt; a calling
    turn the template splits from its words is refused, named so. Same as the tagged twin."""
    tokenizer, per_turn = masker("nemotron_nano_v2", bpe_tokenizer)
    _, twin = masker("nemotron_nano_v2", bpe_tokenizer, twin=True)
    calling = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [weather_call("call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C.", "reasoning_content": "The tool said 18."},
    ]
    table = canonical_table([REASONING, calling])
    kept, rejected, _ = encode_table(per_turn, table)
    reference, _, _ = encode_table(twin, table)
    texts = [trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) for row in kept.to_pylist()]
    assert texts == [
        "12 * 12 = 144.\n</think>\n\n144\n<SPECIAL_12>",
        "13 * 13 = 169.\n</think>\n\n169\n<SPECIAL_12>",
        "The tool said 18.\n</think>\n\nIt is 18 C.\n<SPECIAL_12>",
    ]
    assert "<think>\n\n13 * 13" in tokenizer.decode(kept.to_pylist()[1][schema.INPUT_IDS])  # the template's own tag
    # The calling turn, rendered last: its reasoning as one assistant turn, its call as another.
    assert rejected.column("reason").to_pylist() == ["template_splits_turn"]
    assert "two turns" in rejected.column("detail").to_pylist()[0]
    assert kept.column(schema.LABELS).to_pylist() == reference.column(schema.LABELS).to_pylist()


# Gemma 4 (google/gemma-4-*-it), written for this test: what its official template does with a model
# turn's text (read from llama.cpp's copy, models/templates/gemma4.jinja): it reads no reasoning field
# and cuts everything from "<|channel>" through "<channel|>" out of every model turn, then trims; its
# generation prompt, thinking being off, ends with an empty thought channel.
_GEMMA4 = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\\n' }}"
    "{%- if m.role == 'assistant' -%}{%- set kept = namespace(text='') -%}"
    "{%- for part in m.content.split('<channel|>') -%}{%- set kept.text = kept.text ~ part.split('<|channel>')[0] -%}{%- endfor -%}"
    "{{ kept.text | trim }}{%- else -%}{{ m.content | trim }}{%- endif -%}{{ '<turn|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- if not enable_thinking | default(false) -%}"
    "{{ '<|channel>thought\\n<channel|>' }}{%- endif -%}{%- endif -%}"
)


def test_gemma4_reasoning_goes_inline_in_its_own_thought_channel_never_as_think_tags(bpe_tokenizer):
    """Gemma 4 reads no reasoning field, writes its reasoning in a thought channel of its own, and its
    template cuts that channel out of every model turn. Reasoning put inline as "<think>…</think>"
    was kept by it and trained as text the model never writes; it now goes inline in Gemma's own
    channel, which the template cuts as DeepSeek-R1's cuts "<think>": the answers are trained without
    it, and per_turn, which promises the reasoning, refuses those turns and names the way out."""
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]})
    tokenizer.add_special_tokens({"eos_token": "<turn|>"})
    template = Template("gemma4", _GEMMA4)
    table = canonical_table([REASONING])
    rows = {}
    for policy in ("template", "per_turn", "drop"):
        masker_ = Masker(tokenizer, template, max_length=4096, reasoning=policy)
        assert masker_.reasoning.open == ("<think>\n" if policy == "drop" else "<|channel>thought\n")
        rows[policy] = encode_table(masker_, table)
    kept, rejected, _ = rows["template"]
    assert rejected.num_rows == 0
    text = tokenizer.decode(kept.column(schema.INPUT_IDS).to_pylist()[0])
    assert "<think>" not in text and "12 * 12 = 144." not in text
    answers = trained(tokenizer, kept.column(schema.INPUT_IDS)[0].as_py(), kept.column(schema.LABELS)[0].as_py())
    assert answers == "144<turn|>169<turn|>"
    kept, rejected, _ = rows["per_turn"]
    assert kept.num_rows == 0 and set(rejected.column("reason").to_pylist()) == {"template_drops_reasoning"}
    assert "tokenize.reasoning: drop" in rejected.column("detail")[0].as_py()
    kept, rejected, _ = rows["drop"]
    assert rejected.num_rows == 0 and "<think>" not in tokenizer.decode(kept.column(schema.INPUT_IDS)[0].as_py())


_KIMI_PROMPT = "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
# Kimi K2.5 and K2.6 render answers as K2 Thinking does, and their generation prompt opens the block
# (closes it at once with thinking false).
_KIMI_K25_PROMPT = (
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- if thinking is defined and thinking is false -%}<think></think>{%- else -%}<think>{%- endif -%}{%- endif -%}"
)


@pytest.mark.parametrize("thinking, answers", [(True, ["12 * 12 = 144.</think>144", "13 * 13 = 169.</think>169"]), (False, ["144", "169"])])
def test_kimi_k25_reasoning_is_written_before_the_close_its_answer_renders(thinking, answers, bpe_tokenizer):
    """Kimi K2.5's prompt opens "<think>" and its rendering of the answer closes the block at once,
    "</think>A": per_turn writes the reasoning before that close (it trained "</think>169", the
    reasoning lost, since the rendering starts with the prompt). With thinking false the prompt
    closes the block and no reasoning is trained. (No tagged twin: the prompt's "<think>" lies inside
    K2 Thinking's blocks.)"""
    tokenizer = tokenizer_for("kimi_k2_thinking", bpe_tokenizer)
    source = template_text("kimi_k2_thinking")
    assert _KIMI_PROMPT in source
    source = source.replace(_KIMI_PROMPT, _KIMI_K25_PROMPT)
    per_turn = Masker(tokenizer, Template("kimi_k25", source, variables=(("thinking", thinking),)), max_length=4096, reasoning="per_turn")
    kept, rejected, _ = encode_table(per_turn, canonical_table([REASONING]))
    assert rejected.num_rows == 0
    rows = kept.to_pylist()
    assert [trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) for row in rows] == [f"{a}<|im_end|>" for a in answers]
    for row in rows:  # before the trained turn: exactly the inference prompt
        first = next(i for i, label in enumerate(row[schema.LABELS]) if label != schema.IGNORE_INDEX)
        messages = history(per_turn, tokenizer, row[schema.MESSAGES][:-1])
        prompt = tokenizer.apply_chat_template(
            messages, chat_template=source, add_generation_prompt=True, tokenize=False, thinking=thinking
        )
        assert prompt.endswith("<think>" if thinking else "<think></think>")
        assert row[schema.INPUT_IDS][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_reasoning_a_template_reads_but_renders_nowhere_in_the_turn_is_refused_not_lost(bpe_tokenizer):
    """A template that reads the reasoning field, cuts it from its answers and writes no <think>
    block to put it back into (here K2 Thinking's rule with tags of its own) would have per_turn train
    the answer without its reasoning: such a turn is refused, named, and a calling turn whose
    reasoning it renders is kept."""
    tokenizer = tokenizer_for("kimi_k2_thinking", bpe_tokenizer)
    source = template_text("kimi_k2_thinking").replace("'<think>' ~ reasoning ~ '</think>'", "'<reason>' ~ reasoning ~ '</reason>'")
    assert "<reason>" in source
    per_turn = Masker(tokenizer, Template("own-tags", source), max_length=4096, reasoning="per_turn")
    assert per_turn.think_frame is None
    call = weather_call("functions.get_weather:0")
    calling = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [call]},
    ]
    kept, rejected, _ = encode_table(per_turn, canonical_table([REASONING, calling]))
    assert rejected.column(schema.REASON).to_pylist() == ["template_drops_reasoning"]  # the record, both its answers refused
    assert "renders none of it" in rejected.column(schema.DETAIL).to_pylist()[0]
    assert [trained(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]) for row in kept.to_pylist()] == [
        "<reason>Call it.</reason><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    ]


def test_reasoning_of_a_calling_turn_llama31_writes_without_its_content_is_refused_not_lost(bpe_tokenizer):
    """Llama-3.1's template writes a calling turn's call and not its content, where the reasoning of a
    template that reads only content goes inline: per_turn would train the call without the
    reasoning. It is refused, named; without reasoning the same turn is kept."""
    tokenizer, per_turn = masker("llama31", bpe_tokenizer)
    call = weather_call("call_0001")
    question = {"role": "user", "content": "Weather in Paris?"}
    with_reasoning = [question, {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [call]}]
    without = [question, {"role": "assistant", "content": "", "tool_calls": [call]}]
    kept, rejected, _ = encode_table(per_turn, canonical_table([with_reasoning, without]))
    assert rejected.column(schema.REASON).to_pylist() == ["template_drops_reasoning"]
    assert rejected.column(schema.SOURCE_INDEX).to_pylist() == [0]
    assert kept.column(schema.SOURCE_INDEX).to_pylist() == [1]
    assert "get_weather" in trained(tokenizer, kept.to_pylist()[0][schema.INPUT_IDS], kept.to_pylist()[0][schema.LABELS])


@pytest.mark.parametrize("model, frame", [("qwen3", ("\n", "\n")), ("glm45", ("", "")), ("deepseek_r1", None), ("llama31", None)])
def test_the_frame_of_kept_reasoning_is_read_from_the_template(model, frame, bpe_tokenizer):
    """How a template writes the reasoning it keeps, probed once: Qwen3 "<think>\nR\n</think>", GLM
    "<think>R</think>"; DeepSeek-R1 keeps none in a think block of its own, Llama-3.1 reads no reasoning."""
    _, per_turn = masker(model, bpe_tokenizer)
    assert per_turn.think_frame == frame


@pytest.mark.parametrize("model, answer", [("qwen3", "169<|im_end|>"), ("glm45", "\n169<|user|>")])
def test_with_thinking_off_no_reasoning_is_trained_after_the_prompt_closed_the_block(model, answer, bpe_tokenizer):
    """enable_thinking false: the prompt ends with an empty think block, after which the model
    writes its answer, never a second block. The turn's reasoning is not trained (it was, as
    "<think>…</think>" after the prompt's empty one)."""
    tokenizer, per_turn = masker(model, bpe_tokenizer, variables={"enable_thinking": False})
    kept, rejected, _ = encode_table(per_turn, canonical_table([REASONING]))
    assert rejected.num_rows == 0
    last = kept.to_pylist()[-1]
    assert trained(tokenizer, last[schema.INPUT_IDS], last[schema.LABELS]) == answer
    first = next(i for i, label in enumerate(last[schema.LABELS]) if label != schema.IGNORE_INDEX)
    assert tokenizer.decode(last[schema.INPUT_IDS][:first]).rstrip().endswith("</think>")


def test_a_question_ending_in_a_close_tag_does_not_turn_thinking_off(bpe_tokenizer):
    """Only a close the generation prompt adds means thinking is off; a template without one,
    whose rendering ends with the question "...: </think>", keeps the turn's reasoning."""
    source = "{%- for m in messages %}{{- m.content + '\\n' }}{%- endfor %}"
    per_turn = Masker(bpe_tokenizer, Template("bare", source), max_length=512, span_method="locate", reasoning="per_turn")
    messages = [
        {"role": "user", "content": "What does this tag do: </think>"},
        {"role": "assistant", "reasoning_content": "The user asks about a tag.", "content": "It closes a think block."},
    ]
    result = per_turn.encode(*to_conversation({"messages": messages}))
    assert "The user asks about a tag." in trained(bpe_tokenizer, result.input_ids, result.labels)


def test_deepseek_v31_without_thinking_trains_no_reasoning_in_a_calling_turn(bpe_tokenizer):
    """DeepSeek-V3.1 renders a calling turn's content whole, so reasoning put inline there would be
    trained as "<think>…</think>" right after the prompt's "</think>"."""
    tokenizer, per_turn = masker("deepseek_v31", bpe_tokenizer)
    messages, _ = to_conversation(CONVERSATIONS["tool_call_json_args"])
    messages = [dict(m) for m in messages[:2]]
    messages[1]["reasoning"] = "I need the weather tool."
    result = per_turn.encode(messages, json.dumps(CONVERSATIONS["tool_call_json_args"]["tools"]))
    text = trained(tokenizer, result.input_ids, result.labels)
    assert text.startswith("<｜tool▁calls▁begin｜>") and "weather tool" not in text and "<think>" not in text


@pytest.mark.parametrize("thinking", [False, True])
def test_deepseek_v31_calling_turn_trains_its_reasoning_only_where_the_model_writes_it(thinking, bpe_tokenizer):
    """DeepSeek-V3.1 renders a calling turn as "<｜Assistant｜></think>" + its content whole: the
    reasoning put inline there stood after that close. With thinking on (the prompt opens the
    block) every such row was refused as mask_unverifiable under both policies; under `template`
    with thinking off it trained "<think>…</think>" after the close. The turn is now rendered
    without it, as the template shows a past turn: `template` trains what follows the prompt,
    `per_turn` writes the reasoning before the close where the prompt opens the block."""
    calling = [dict(m) for m in CONVERSATIONS["tool_call_json_args"]["messages"][:2]]
    calling[1]["reasoning_content"] = "I need the weather tool."
    tools = CONVERSATIONS["tool_call_json_args"]["tools"]
    calls = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "unit": "celsius"}'
    calls += "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    tokenizer = tokenizer_for("deepseek_v31", bpe_tokenizer)
    template = resolve_template(tokenizer, TemplateConfig(variables={"thinking": thinking}))
    for policy, want in (
        ("template", "</think>" + calls if thinking else calls),
        ("per_turn", "I need the weather tool.</think>" + calls if thinking else calls),
    ):
        masker_ = Masker(tokenizer, template, max_length=4096, span_method="locate", reasoning=policy)
        result = masker_.encode(*to_conversation({"messages": calling, "tools": tools}))
        assert isinstance(result, Encoded), result
        assert trained(tokenizer, result.input_ids, result.labels) == want, policy


def test_a_refused_turn_of_a_kept_record_is_filed_with_its_turn(bpe_tokenizer):
    long_answer = "word " * 300
    conversation = [
        {"role": "user", "content": "Short?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Long?"},
        {"role": "assistant", "content": long_answer},
    ]
    tokenizer, per_turn = masker("qwen3", bpe_tokenizer, max_length=64)
    kept, rejected, figures = encode_table(per_turn, canonical_table([conversation, conversation[2:]]))
    assert kept.column(schema.TURN).to_pylist() == [1]  # record 0's first turn
    assert rejected.column(schema.TURN).to_pylist() == [3, None]  # record 0's second turn; record 1 whole
    assert rejected.column(schema.REASON).to_pylist() == ["too_long", "too_long"]
    assert figures["records_in"] == 2 and figures["records_out"] == 1
    assert figures["rejected"] == {"too_long": 1} and figures["turns_rejected"] == 1


def test_per_turn_cannot_train_everything():
    with pytest.raises(ValueError, match="per_turn"):
        SFTConfig.model_validate({"tokenize": {"reasoning": "per_turn", "train_on": "all"}})


def test_prepare_counts_records_once(tmp_path, bpe_tokenizer):
    tokenizer = tokenizer_for("qwen3", bpe_tokenizer)
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    long_answer = "word " * 300
    records = [
        {"messages": REASONING},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "user", "content": "Short?"},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Long?"},
                {"role": "assistant", "content": long_answer},
            ]
        },
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = SFTConfig.model_validate(
        {
            "dedup": {"enabled": False},
            "quality": {"enabled": False},
            "shards": {"val_fraction": 0.0, "target_rows": 2},
            "tokenize": {"reasoning": "per_turn", "max_length": 96},
        }
    )
    manifest = prepare([str(source)], str(tokenizer_dir), tmp_path / "data", config)
    counts = manifest["counts"]
    assert counts["read"] == 3 and counts["kept"] == 3 and counts["rows"] == 4
    assert counts["turns_rejected"] == {"too_long": 1}
    assert sum(e["records"] for e in manifest["shards"]) == 3
    # A file is cut only between records: the two rows of the reasoning record share one file.
    for entry in manifest["shards"]:
        table = pq.read_table(tmp_path / "data" / entry["path"], columns=[schema.SOURCE_INDEX, schema.TURN])
        assert entry["records"] == len(set(table.column(schema.SOURCE_INDEX).to_pylist()))
    rejected = pq.read_table(next((tmp_path / "data" / "rejected").glob("*.parquet")))
    assert rejected.column(schema.TURN).to_pylist() == [3]
    assert read_manifest(tmp_path / "data")["counts"] == counts
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "data")], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    assert "records read 3 = kept 3 + rejected 0" in shown.output
    assert "3 records are 4 rows, one per assistant turn" in shown.output and "too_long 1" in shown.output

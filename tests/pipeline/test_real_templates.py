"""Masks for the official chat templates of real models, located without generation tags.

The test of the product: each official template (tests/chat_templates/, each naming the
model it comes from) is run without ``{% generation %}`` blocks, so sftkit must locate every
assistant turn itself, and its masks must equal those of a generation-tagged twin of the same
template, token for token, on the sample data, the public real data and the fixtures'
conversations (tools, reasoning in its own field and inline), with the bundled byte-level BPE
and the real Mistral SentencePiece tokenizer. No row may be rejected as ``mask_unverifiable``.
"""

from __future__ import annotations

import json
import re

import pytest

from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.stage import Drop
from pipeline.templates import Template
from tests.chat_templates.models import CONVERSATIONS, TEMPLATES, conversation, template_text, tokenizer_for
from tests.support.conversations import conversations as rows_of

NAMES = list(TEMPLATES)


def fixture_rows(name: str) -> list[tuple[list[dict], str | None]]:
    entry = TEMPLATES[name]
    rows = []
    for conv in entry["conversations"] + entry["raises"]:
        messages, tools = conversation(conv)
        rows.append(to_conversation({"messages": messages, "tools": tools}))
    return rows


def maskers(name: str, base_tokenizer, variables: dict | None = None, **policy) -> tuple[Masker, Masker]:
    """(sftkit locating turns in the official template, the same template with generation tags);
    ``variables`` on top of the entry's (a thinking switch)."""
    entry = TEMPLATES[name]
    tokenizer = tokenizer_for(name, base_tokenizer)
    variables = tuple(sorted({**entry["variables"], **(variables or {})}.items()))
    official = Template(name, template_text(name), variables=variables)
    twin = Template(f"{name}-twin", template_text(name, twin=True), variables=variables)
    assert official.has_generation_tags == entry.get("tagged", False) and twin.has_generation_tags
    # Gemma refuses system prompts: fold them into the first user turn, as its model card says.
    system = "merge" if name == "gemma" else "keep"
    locate = Masker(tokenizer, official, max_length=8192, span_method="locate", system=system, **policy)
    tagged = Masker(tokenizer, twin, max_length=8192, span_method="generation", system=system, **policy)
    return locate, tagged


def compare(locate: Masker, tagged: Masker, rows) -> dict[str, int]:
    """Encode ``rows`` both ways; every difference fails. Returns counts of the outcomes."""
    counts: dict[str, int] = {}
    located, reference = locate.encode_batch(rows), tagged.encode_batch(rows)
    for row, got, want in zip(rows, located, reference):
        if isinstance(got, Drop):
            assert got.reason != "mask_unverifiable", (got.detail, row)
        if isinstance(want, Encoded):
            assert isinstance(got, Encoded), (got, row)
            assert got.input_ids.tolist() == want.input_ids.tolist(), row
            assert got.labels.tolist() == want.labels.tolist(), row
            assert got.render_mismatch == want.render_mismatch, row
            key = "kept"
        else:
            assert isinstance(got, Drop) and got.reason == want.reason, (got, want, row)
            key = want.reason
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_fixture_conversations_bpe(name, bpe_tokenizer):
    counts = compare(*maskers(name, bpe_tokenizer), fixture_rows(name))
    assert counts.get("kept", 0) >= len(TEMPLATES[name]["conversations"])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_conversations_sentencepiece(name, mistral_tokenizer):
    counts = compare(*maskers(name, mistral_tokenizer), fixture_rows(name))
    assert counts.get("kept", 0) >= len(TEMPLATES[name]["conversations"])


@pytest.mark.parametrize("name", NAMES)
def test_sample_data(name, bpe_tokenizer, samples_dir):
    rows = rows_of(sorted((samples_dir / "inputs").glob("*.*")))
    assert len(rows) > 40
    counts = compare(*maskers(name, bpe_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


@pytest.mark.parametrize("name", NAMES)
def test_real_data_bpe(name, bpe_tokenizer, real_data_dir):
    rows = rows_of(sorted(real_data_dir.glob("*.json*")))
    counts = compare(*maskers(name, bpe_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


@pytest.mark.parametrize("name", ["qwen3", "qwen35", "deepseek_r1", "mistral"])
def test_real_data_sentencepiece(name, mistral_tokenizer, real_data_dir):
    rows = rows_of(sorted(real_data_dir.glob("*.json*")))[::3]  # every third: SentencePiece is slower
    counts = compare(*maskers(name, mistral_tokenizer), rows)
    assert counts["kept"] > len(rows) // 2


@pytest.mark.parametrize("policy", ["template", "per_turn"])
def test_real_data_deepseek_v31_with_thinking(policy, bpe_tokenizer, real_data_dir):
    """DeepSeek-V3.1 with `thinking` (the prompt opens the block every past turn shows closed): its
    calling turns with reasoning were all refused as mask_unverifiable. (The twin's blocks, written
    for its default, take the past turns' "</think>" as prompt: no reference here; what such a turn
    trains is in test_per_turn.py.)"""
    rows = rows_of(sorted(real_data_dir.glob("*.json*")))
    if policy == "per_turn":
        rows = [(m[: i + 1], t) for m, t in rows for i, x in enumerate(m) if x["role"] == "assistant"]
    locate, _ = maskers("deepseek_v31", bpe_tokenizer, variables={"thinking": True}, reasoning=policy)
    results = locate.encode_batch(rows)
    refused = [(r.reason, r.detail) for r in results if isinstance(r, Drop) and r.reason != "no_trainable_tokens"]
    assert refused == []
    assert sum(isinstance(r, Encoded) for r in results) >= len(rows) - 1  # one turn of the data trains nothing


def test_reasoning_is_trained_where_the_template_renders_it(bpe_tokenizer):
    """Qwen3 keeps the last turn's reasoning and drops earlier turns' (before the last query)."""
    locate, _ = maskers("qwen3", bpe_tokenizer)
    messages, tools = to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]})
    result = locate.encode(messages, tools)
    tokenizer = locate.tokenizer
    trained = tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100])
    assert "13 * 13 = 169." in trained and "12 * 12 = 144." not in trained
    assert trained.count("<|im_end|>") == 2


@pytest.mark.parametrize("name", ["deepseek_r1", "deepseek_v31"])
def test_reasoning_a_template_cuts_out_leaves_no_separator_behind(name, bpe_tokenizer):
    """DeepSeek's templates cut everything up to '</think>' out of a turn's content: reasoning put
    back inline there would leave its "\n\n" before the answer, trained, though the model never
    writes it after its prompt. Such a template gets no reasoning (per_turn writes it, see
    test_per_turn.py)."""
    locate, _ = maskers(name, bpe_tokenizer)
    result = locate.encode(*to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]}))
    trained = [i for i, label in zip(result.input_ids, result.labels) if label != -100]
    assert locate.tokenizer.decode(trained) == "144<｜end▁of▁sentence｜>169<｜end▁of▁sentence｜>"


def test_reasoning_that_also_stands_elsewhere_is_still_found_cut(bpe_tokenizer):
    """Whether the template cut a turn's reasoning out is told by a sentinel, not by searching for
    its text: here the reasoning also stands in the question and in the answer."""
    locate, _ = maskers("deepseek_r1", bpe_tokenizer)
    messages = [
        {"role": "user", "content": "Say Paris. Paris."},
        {"role": "assistant", "reasoning_content": "Paris.", "content": "The capital is Paris."},
    ]
    result = locate.encode(*to_conversation({"messages": messages}))
    trained = [i for i, label in zip(result.input_ids, result.labels) if label != -100]
    assert locate.tokenizer.decode(trained) == "The capital is Paris.<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("rewrite", ["replace('\\n\\n', '\\n')", "e"])
def test_reasoning_a_template_rewrites_is_not_taken_for_cut(rewrite, bpe_tokenizer):
    """A template that rewrites an answer (collapses blank lines, escapes it) still renders the
    reasoning put inline: the row is refused as before, never trained without its reasoning."""
    source = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{{- m.content | " + rewrite + " }}{%- else %}{{- m.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    masker = Masker(bpe_tokenizer, Template("rewrites", source), max_length=512, span_method="locate")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "reasoning_content": "one\n\ntwo < three", "content": "Hello."}]
    result = masker.encode(*to_conversation({"messages": messages}))
    assert isinstance(result, Drop) and result.reason == "mask_unverifiable", result


@pytest.mark.parametrize("policy", ["template", "per_turn"])
def test_deepseek_r1_keeps_inline_reasoning_where_it_renders_it(policy, bpe_tokenizer):
    """DeepSeek-R1 cuts reasoning out of an answer to a user only: a calling turn and an answer
    after tool outputs render their content whole, so their reasoning stays inline and is trained."""
    locate, _ = maskers("deepseek_r1", bpe_tokenizer, reasoning=policy)
    messages, tools = conversation("tool_call_json_args")
    messages[1]["reasoning_content"] = "I need the weather tool."
    messages[3]["reasoning_content"] = "The tool says 18 degrees."
    texts = []
    for end in (2, 4) if policy == "per_turn" else (4,):
        result = locate.encode(*to_conversation({"messages": messages[:end], "tools": tools}))
        assert isinstance(result, Encoded), result
        texts.append(locate.tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100]))
    trained = "".join(texts)
    assert "I need the weather tool." in trained and "<｜tool▁sep｜>get_weather" in trained
    assert "<think>\nThe tool says 18 degrees.\n</think>\n\nIt is 18 °C and cloudy in Paris." in trained


def test_reasoning_stays_inline_where_the_template_renders_it(bpe_tokenizer):
    """Phi-3 reads only content and renders it whole: the reasoning goes there, and is trained."""
    locate, _ = maskers("phi3", bpe_tokenizer)
    result = locate.encode(*to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]}))
    trained = locate.tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100])
    assert "<think>\n13 * 13 = 169.\n</think>\n\n169<|end|>" in trained


def test_a_template_that_changes_the_text_is_refused_not_mislabelled(bpe_tokenizer):
    """A template that rewrites content (here: upper-cases it) cannot be located: rejected, never guessed."""
    source = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{{- m.content | upper }}{%- else %}{{- m.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    masker = Masker(bpe_tokenizer, Template("upper", source), max_length=512, span_method="locate")
    result = masker.encode(
        *to_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]})
    )
    assert isinstance(result, Drop) and result.reason == "mask_unverifiable"


def test_qwen3_without_thinking_trains_the_think_block_a_turn_brings(bpe_tokenizer):
    """enable_thinking false: the prompt holds an empty think block; a turn with reasoning renders a
    full one there. It is trained from "<think>" on and flagged as rendered unlike inference."""
    tokenizer = tokenizer_for("qwen3", bpe_tokenizer)
    template = Template("qwen3", template_text("qwen3"), variables=(("enable_thinking", False),))
    masker = Masker(tokenizer, template, max_length=4096, span_method="locate")
    result = masker.encode(*to_conversation({"messages": CONVERSATIONS["reasoning"]["messages"]}))
    assert isinstance(result, Encoded), result
    trained = tokenizer.decode([i for i, label in zip(result.input_ids, result.labels) if label != -100])
    assert trained.endswith("<think>\n13 * 13 = 169.\n</think>\n\n169<|im_end|>")
    assert result.render_mismatch
    plain = masker.encode(*to_conversation({"messages": CONVERSATIONS["multi_turn"]["messages"]}))
    assert isinstance(plain, Encoded) and not plain.render_mismatch  # the empty block is the prompt's


@pytest.mark.parametrize("policy", ["template", "per_turn", "drop"])
def test_nemotron_nano_v2_without_thinking_trains_each_answer_after_its_empty_think_block(policy, bpe_tokenizer):
    """Nemotron Nano v2 with "/no_think" (cut out of what it renders, so turns are located with the
    system message as real text) prompts its next answer with "<think></think>", which no past turn
    of the conversation shows: every multi-turn conversation was refused as mask_unverifiable. Data
    reasoning under `template` was written inline after that empty block, training a second think
    block when the model is told not to think. Now each answer trains alone, as in the tagged twin
    and as the model writes it after its prompt."""
    from pipeline.tokenize import encode_table
    from tests.pipeline.test_per_turn import canonical_table, trained

    locate, tagged = maskers("nemotron_nano_v2", bpe_tokenizer, reasoning=policy)
    messages = CONVERSATIONS["no_think_multi_turn"]["messages"]
    without_reasoning = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    table = canonical_table([messages, without_reasoning])
    kept, rejected, _ = encode_table(locate, table)
    reference, _, _ = encode_table(tagged, table)
    assert rejected.num_rows == 0, rejected.column("detail").to_pylist()
    texts = [trained(locate.tokenizer, row["input_ids"], row["labels"]) for row in kept.to_pylist()]
    per_row = ["144\n<SPECIAL_12>", "169\n<SPECIAL_12>"] if policy == "per_turn" else ["144\n<SPECIAL_12>169\n<SPECIAL_12>"]
    assert texts == per_row * 2
    assert kept.column("labels").to_pylist() == reference.column("labels").to_pylist()
    for row in kept.to_pylist():
        assert "<think></think><think>" not in locate.tokenizer.decode(row["input_ids"])


def _inference_prompt_ids(tokenizer, source: str, variables: dict, messages: list[dict], tools) -> list[int]:
    """What inference tokenizes before the last assistant turn: the generation prompt rendered by
    transformers' own apply_chat_template, encoded whole by the tokenizer (the ground truth)."""
    from pipeline import schema
    from pipeline.templates import DEFAULT_TODAY

    # the day sftkit pins (template.today), for a template that asks the clock (gpt-oss)
    source = re.sub(r'strftime_now\("([^"]*)"\)', lambda call: json.dumps(DEFAULT_TODAY.strftime(call.group(1))), source)
    plain = schema.messages_for_template(messages)
    last = max(i for i, m in enumerate(plain) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(
        plain[:last],
        tools=schema.tools_for_template(tools),
        chat_template=source,
        add_generation_prompt=True,
        tokenize=False,
        date_string="26 Jul 2024",  # the date sftkit pins (template.today)
        **variables,
    )
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _check_render_mismatch(
    masker: Masker, source: str, variables: dict, rows, controls: list[str], skip_system: bool = False
) -> tuple[int, int]:
    """Assert each kept row's ``render_mismatch`` against the ground truth; returns (checked, flagged)."""
    checked = flagged = 0
    for (messages, tools), result in zip(rows, masker.encode_batch(rows)):
        if not isinstance(result, Encoded) or (skip_system and messages[0]["role"] == "system"):
            continue
        if any(c in json.dumps([messages, tools], ensure_ascii=False) for c in controls):
            continue  # control-token text in the data: sftkit keeps it plain, the tokenizer would not
        if any(m.get("reasoning") for m in messages):
            continue  # sftkit's reasoning policy shapes these rows; the template alone renders them otherwise
        try:
            want = _inference_prompt_ids(masker.tokenizer, source, variables, messages, tools)
        except Exception:  # DeepSeek-R1 concatenates dict arguments; sftkit renders them as JSON text
            continue
        assert result.render_mismatch == (result.input_ids[: len(want)].tolist() != want), (messages, tools)
        checked, flagged = checked + 1, flagged + result.render_mismatch
    return checked, flagged


@pytest.mark.parametrize("tokenizer_fixture", ["bpe_tokenizer", "mistral_tokenizer"])
@pytest.mark.parametrize("name", NAMES)
def test_render_mismatch_is_what_tokenizing_the_generation_prompt_shows(name, tokenizer_fixture, request, samples_dir):
    """A kept row is flagged ``render_mismatch`` exactly when its tokens before the last trained
    turn differ from the tokenizer's encoding of that turn's generation prompt. A SentencePiece
    tokenizer encodes a text after a control token without the "▁" it puts before a string's
    start (a check that encoded the prompt's tail on its own flagged every such row), and a
    tokenizer that spells the space before a response as a token of its own puts that token in
    neither the prompt nor the response."""
    locate, _ = maskers(name, request.getfixturevalue(tokenizer_fixture))
    rows = fixture_rows(name) + rows_of(sorted((samples_dir / "inputs").glob("*.*")))
    entry = TEMPLATES[name]
    controls = [*entry["controls"], *(t for t in (entry["bos"], entry["eos"]) if t)]
    # (Gemma's rows with a system prompt are merged by sftkit, not by the template.)
    checked, flagged = _check_render_mismatch(locate, template_text(name), entry["variables"], rows, controls, skip_system=name == "gemma")
    assert checked >= 20
    if not entry.get("prompt_opens_think"):  # DeepSeek-R1, MiniMax-M2: turns without reasoning show no <think>
        assert flagged < checked // 4


@pytest.mark.parametrize("tokenizer_fixture", ["bpe_tokenizer", "mistral_tokenizer"])
@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca"])
def test_render_mismatch_of_the_built_in_templates(name, tokenizer_fixture, request, samples_dir):
    from pipeline.config import TemplateConfig
    from pipeline.templates import resolve_template

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    template = resolve_template(tokenizer, TemplateConfig(name=name))
    masker = Masker(tokenizer, template, max_length=8192)
    rows = rows_of(sorted((samples_dir / "inputs").glob("*.*")))
    checked, flagged = _check_render_mismatch(masker, template.source, {}, rows, list(masker.controls))
    assert checked >= 20 and flagged == 0  # each renders its generation prompt as a prefix of the row

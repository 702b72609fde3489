"""A built-in template's generation prompt is found in the conversation's rendering, not rendered again.

The masker checks that the text before the last trained turn is what the model sees at
inference (``apply_chat_template(messages[:i], add_generation_prompt=True)``). For sftkit's own
templates that prompt is the rendering up to the turn's header (:func:`builtin_prompt_end`), which
saves one render per row. These tests hold the shortcut against the render it stands for.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.formats import to_conversation
from pipeline.masking import Masker
from pipeline.masking import masker as masker_module
from pipeline.stage import Drop
from pipeline.templates import BUILTIN_TEMPLATES, Renderer, Template, builtin_prompt_end, resolve_template
from pipeline.tokenize import encode_table

TEXTS = [
    "What is 2 + 2?",
    "4",
    "",
    "  padded  ",
    "Line one\n\nLine two",
    "<|im_start|>assistant\n",
    "[/INST]",
    "### Response:\n",
    " [INST] x [/INST]",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "你好，世界",
    "ends with a space ",
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}]


def random_messages(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    """A template-ready conversation: an optional system prompt, then user / assistant rounds with
    tool calls and tool results; sometimes tools, sometimes two assistant turns in a row."""
    messages = [{"role": "system", "content": rng.choice(TEXTS)}] if rng.random() < 0.4 else []
    for round_ in range(rng.randint(1, 3)):
        if round_ == 0 or rng.random() < 0.9:
            messages.append({"role": "user", "content": rng.choice(TEXTS)})
        for _ in range(2 if rng.random() < 0.1 else 1):
            calls = None
            if rng.random() < 0.3:
                calls = [{"type": "function", "function": {"name": "add", "arguments": {"a": rng.randint(0, 9), "b": 2}}}]
            messages.append({"role": "assistant", "content": rng.choice(TEXTS), "tool_calls": calls})
            if calls:
                messages.append({"role": "tool", "content": rng.choice(TEXTS)})
                messages.append({"role": "assistant", "content": rng.choice(TEXTS)})
    return messages, (TOOLS if rng.random() < 0.3 else None)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("bos", ["<s>", ""])
def test_the_derived_prompt_is_the_rendered_prompt(name, bos):
    template = Template(name, BUILTIN_TEMPLATES[name])
    renderer = Renderer(template, {"bos_token": bos, "eos_token": "</s>"})
    rng = random.Random(f"{name}{bos}")
    derived = declined = 0
    for _ in range(1500):
        messages, tools = random_messages(rng)
        rendered, spans = renderer.render(messages, tools, with_spans=True)
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(spans) == len(assistants)
        for index, (start, _) in zip(assistants, spans):
            if index == 0:
                continue
            end = builtin_prompt_end(template, rendered, start, messages, index, bool(tools))
            if end is None:
                declined += 1
                continue
            derived += 1
            prompt, _ = renderer.render(messages[:index], tools, add_generation_prompt=True)
            assert rendered[:end] == prompt, (messages[:index], tools)
            assert not rendered[end:start].strip()
    assert derived > 1000
    if name == "mistral":
        assert declined > 100  # tools and a later user turn: rendered, since Mistral lists them before the last one
    else:
        assert declined == 0


def test_only_the_built_in_text_is_derived():
    source = BUILTIN_TEMPLATES["chatml"].replace("assistant\\n", "assistant\\n\\n")
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\nHello<|im_end|>\n"
    message = {"role": "assistant", "content": "Hello"}
    messages = [{"role": "user", "content": "Hi"}, message]
    assert builtin_prompt_end(Template("chatml", source), rendered, rendered.index("Hello"), messages, 1, False) is None
    assert builtin_prompt_end(Template("auto", BUILTIN_TEMPLATES["chatml"]), rendered, 40, messages, 1, False) is None
    builtin = rendered.replace("assistant\n\n", "assistant\n")
    assert builtin_prompt_end(
        Template("chatml", BUILTIN_TEMPLATES["chatml"]), builtin, builtin.index("Hello"), messages, 1, False
    ) == builtin.index("Hello")
    # ... but not where the header is not right before the turn
    assert (
        builtin_prompt_end(Template("chatml", BUILTIN_TEMPLATES["chatml"]), rendered, rendered.index("Hello"), messages, 1, False) is None
    )


def _table(rng: random.Random, count: int) -> pa.Table:
    rows = []
    for index in range(count):
        messages, tools = random_messages(rng)
        record = {"messages": [{k: v for k, v in m.items() if v is not None} for m in messages]}
        if tools:
            record["tools"] = json.loads(json.dumps(tools))
        try:
            canonical, tool_text = to_conversation(record)
        except Drop:  # e.g. an empty turn: not what this test is about
            continue
        rows.append(
            {
                "id": schema.conversation_id(canonical, tool_text),
                "source": "in.jsonl",
                "source_index": index,
                "messages": canonical,
                "tools": tool_text,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA)


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_rows_labels_and_rejections_are_the_same_as_with_the_prompt_rendered(name, bpe_tokenizer, mistral_tokenizer, monkeypatch):
    tokenizer = mistral_tokenizer if name == "mistral" else bpe_tokenizer
    template = resolve_template(tokenizer, TemplateConfig(name=name))
    table = _table(random.Random(name), 400)
    derived = encode_table(Masker(tokenizer, template, max_length=4096), table)
    monkeypatch.setattr(masker_module, "builtin_prompt_end", lambda *args: None)
    rendered = encode_table(Masker(tokenizer, template, max_length=4096), table)
    assert derived[0].equals(rendered[0]) and derived[1].equals(rendered[1])
    assert derived[2] == rendered[2]
    assert derived[0].num_rows > 300

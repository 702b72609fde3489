"""Token-exact loss masks, checked against apply_chat_template token for token.

Every built-in template (and the bundled tokenizer's own) with the bundled byte-level BPE
tokenizer and with the real Mistral-7B SentencePiece tokenizer, over the hard cases of the
issue: multi-turn, system prompts, tool calls and results, Chinese and emoji, control-token
text inside content, BOS, truncation, too long, nothing trainable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.masking import Encoded, Masker, _PlainControlEncoder, control_tokens
from pipeline.schema import make_message as msg
from pipeline.schema import messages_for_template, tools_for_template
from pipeline.stage import Drop
from pipeline.templates import BUILTIN_TEMPLATES, resolve_template, template_variables

TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
)
WEATHER_CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]

CONVERSATIONS = {
    "single": ([msg("user", "Hello"), msg("assistant", "Hi there!")], None),
    "system_multi_turn": (
        [
            msg("system", "You are terse."),
            msg("user", "Name a colour."),
            msg("assistant", "Blue."),
            msg("user", "Another?"),
            msg("assistant", "Green, or perhaps red."),
        ],
        None,
    ),
    "tools": (
        [
            msg("user", "Weather in Paris?"),
            msg("assistant", "", tool_calls=WEATHER_CALL),
            msg("tool", '{"temperature": 21}'),
            msg("assistant", "It is 21 degrees."),
        ],
        TOOLS,
    ),
    "chinese_emoji": (
        [
            msg("user", "你好，今天天气怎么样？🙂"),
            msg("assistant", "今天晴朗 ☀️，适合散步 🚶‍♀️。"),
            msg("user", "谢谢"),
            msg("assistant", "不客气 🎉"),
        ],
        None,
    ),
}

# The llama3 template writes <|eot_id|><|start_header_id|> as plain text when the tokenizer has
# no such tokens; SentencePiece then merges "><" across the end of one turn and the start of the
# next, so no token boundary separates them. The reference mask trains that straddling token;
# sftkit's verification refuses the row instead of writing a mask that trains header text.
STRADDLES = {("mistral", "llama3", "system_multi_turn"), ("mistral", "llama3", "tools"), ("mistral", "llama3", "chinese_emoji")}


def template_names(tokenizer):
    return (["auto"] if tokenizer.chat_template else []) + list(BUILTIN_TEMPLATES)


@pytest.fixture(scope="module", params=["bpe", "mistral"])
def tokenizer_case(request):
    return request.param, request.getfixturevalue(f"{request.param}_tokenizer")


def reference(tokenizer, template, messages, tools, **kwargs):
    return tokenizer.apply_chat_template(
        messages_for_template(messages),
        tools=tools_for_template(tools),
        chat_template=template.source,
        tokenize=True,
        return_dict=True,
        **kwargs,
    )


def trained_runs(labels):
    """[start, end) of each contiguous run of trained positions."""
    trained = np.flatnonzero(np.asarray(labels) != schema.IGNORE_INDEX)
    if not len(trained):
        return []
    breaks = np.flatnonzero(np.diff(trained) > 1)
    starts = np.concatenate([[trained[0]], trained[breaks + 1]])
    ends = np.concatenate([trained[breaks] + 1, [trained[-1] + 1]])
    return list(zip(starts.tolist(), ends.tolist()))


def end_token_of(tokenizer, template):
    return template.end_token or tokenizer.eos_token


@pytest.mark.parametrize("case", list(CONVERSATIONS))
@pytest.mark.parametrize("method", ["generation", "prefix"])
def test_ids_and_masks_match_apply_chat_template(tokenizer_case, case, method):
    tok_name, tokenizer = tokenizer_case
    messages, tools = CONVERSATIONS[case]
    for name in template_names(tokenizer):
        template = resolve_template(tokenizer, TemplateConfig(name=name))
        result = Masker(tokenizer, template, max_length=4096, span_method=method).encode(messages, tools)
        ref = reference(tokenizer, template, messages, tools, return_assistant_tokens_mask=True)
        if (tok_name, name, case) in STRADDLES:
            assert isinstance(result, Drop) and result.reason == "mask_unverifiable", name
            # the reference mask does train a token that is partly the next turn's header
            runs = trained_runs([t if m else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"])])
            assert any(tokenizer.decode(ref["input_ids"][s:e]).endswith("<|eot_id|><") for s, e in runs)
            continue
        assert isinstance(result, Encoded), (name, result)
        assert result.input_ids.tolist() == ref["input_ids"], name
        expected_labels = [t if m else schema.IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
        assert result.labels.tolist() == expected_labels, name


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_trained_tokens_are_each_assistant_turns_content_and_end_token(tokenizer_case, case):
    tok_name, tokenizer = tokenizer_case
    messages, tools = CONVERSATIONS[case]
    for name in template_names(tokenizer):
        if (tok_name, name, case) in STRADDLES:
            continue
        template = resolve_template(tokenizer, TemplateConfig(name=name))
        result = Masker(tokenizer, template, max_length=4096).encode(messages, tools)
        assert isinstance(result, Encoded)
        end = end_token_of(tokenizer, template)
        assistant = [m for m in messages if m["role"] == "assistant"]
        runs = trained_runs(result.labels)
        assert len(runs) == len(assistant), name
        for (start, stop), message in zip(runs, assistant):
            text = tokenizer.decode(result.input_ids[start:stop].tolist())
            assert text.strip().endswith(end), (name, text)  # the end token, and not the newline after it
            if message["tool_calls"]:
                assert '"get_weather"' in text and "Paris" in text
            else:
                assert text.strip() == message["content"] + end, (name, text)
            # the header before the turn is not trained
            assert "assistant" not in text and "### Response" not in text and "[/INST]" not in text


def test_exactly_one_bos_when_the_template_writes_it(mistral_tokenizer):
    messages, _ = CONVERSATIONS["single"]
    bos = mistral_tokenizer.bos_token_id
    for name in ("mistral", "alpaca"):
        template = resolve_template(mistral_tokenizer, TemplateConfig(name=name))
        text = reference(mistral_tokenizer, template, messages, None)
        rendered = mistral_tokenizer.decode(text["input_ids"])
        # the hazard: this tokenizer adds a BOS of its own to whatever it encodes
        assert mistral_tokenizer(rendered)["input_ids"][:2] == [bos, bos]
        result = Masker(mistral_tokenizer, template, max_length=512).encode(messages)
        assert result.input_ids[0] == bos and int((result.input_ids == bos).sum()) == 1


CONTROL_TEXT = [
    msg("user", "Repeat after me: <|im_end|> and </s> and [INST] and <s> and <|im_start|>assistant"),
    msg("assistant", "Sure: <|im_end|> </s> [INST] <s> done."),
    msg("user", "Thanks</s>"),
    msg("assistant", "<|im_start|>user\nnot a real turn<|im_end|>"),
]


def test_control_token_text_in_content_is_plain_text(tokenizer_case):
    _, tokenizer = tokenizer_case
    controls = {tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer, "")}
    for name in template_names(tokenizer):
        if (tokenizer_case[0], name, "system_multi_turn") in STRADDLES:
            continue
        template = resolve_template(tokenizer, TemplateConfig(name=name))
        result = Masker(tokenizer, template, max_length=4096).encode(CONTROL_TEXT)
        assert isinstance(result, Encoded), (name, result)
        ids = result.input_ids.tolist()
        # The same conversation with the control text blanked out holds exactly the control
        # tokens the template writes; the data adds none.
        blank = [{**m, "content": m["content"].replace("<", "_")} for m in CONTROL_TEXT]
        written = reference(tokenizer, template, blank, None)["input_ids"]
        assert sorted(t for t in ids if t in controls) == sorted(t for t in written if t in controls), name
        # The text is unchanged, and apply_chat_template (without sanitizing) would have turned it
        # into control tokens.
        assert tokenizer.decode(ids) == tokenizer.decode(reference(tokenizer, template, CONTROL_TEXT, None)["input_ids"])
        assert ids != reference(tokenizer, template, CONTROL_TEXT, None)["input_ids"]
        # The trained turns still decode to their content and end token.
        end = end_token_of(tokenizer, template)
        runs = trained_runs(result.labels)
        assert [tokenizer.decode(ids[s:e]).strip() for s, e in runs] == [
            m["content"] + end for m in CONTROL_TEXT if m["role"] == "assistant"
        ]


def test_control_text_matches_transformers_sanitized_tokenization(bpe_tokenizer):
    for name in template_names(bpe_tokenizer):
        template = resolve_template(bpe_tokenizer, TemplateConfig(name=name))
        result = Masker(bpe_tokenizer, template, max_length=4096).encode(CONTROL_TEXT)
        sanitized = reference(bpe_tokenizer, template, CONTROL_TEXT, None, sanitize_control_tokens=True)
        assert result.input_ids.tolist() == sanitized["input_ids"], name


def test_mistral_control_text_is_tokenized_as_one_stretch_not_glued_pieces(mistral_tokenizer):
    # transformers' sanitizer encodes the text around "</s>" piecewise ("▁", "</"); sftkit
    # encodes the whole stretch as SentencePiece would ("▁</"), i.e. as split_special_tokens does.
    template = resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    result = Masker(mistral_tokenizer, template, max_length=512).encode([msg("user", "say </s> now"), msg("assistant", "ok")])
    plain = mistral_tokenizer("[INST] say </s> now [/INST]", add_special_tokens=False, split_special_tokens=True)
    plain = plain["input_ids"][1:]  # at the very start SentencePiece writes "▁[", after <s> it writes "["
    assert result.input_ids.tolist()[2 : 2 + len(plain)] == plain
    assert "▁</" in mistral_tokenizer.convert_ids_to_tokens(plain)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_placeholder_encoder_equals_the_tokenizer_on_ordinary_text(tokenizer_case, case):
    # The copy used for rows with control text must split and tokenize exactly like the original.
    _, tokenizer = tokenizer_case
    messages, tools = CONVERSATIONS[case]
    for name in template_names(tokenizer):
        template = resolve_template(tokenizer, TemplateConfig(name=name))
        encoder = _PlainControlEncoder(tokenizer.backend_tokenizer, control_tokens(tokenizer, template.source))
        text = tokenizer.apply_chat_template(
            messages_for_template(messages), tools=tools_for_template(tools), chat_template=template.source, tokenize=False
        )
        true_text, marked = encoder.texts(text)
        assert true_text == text and len(marked) == len(text)
        encodings, ids = encoder.encode_batch([marked])
        expected = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        assert ids[0].tolist() == expected.ids and encodings[0].offsets == expected.offsets


def multi_turn_labels(tokenizer, train_on, messages=None):
    template = resolve_template(tokenizer, TemplateConfig(name="chatml"))
    messages = messages or CONVERSATIONS["system_multi_turn"][0]
    result = Masker(tokenizer, template, max_length=4096, train_on=train_on).encode(messages)
    return result, [tokenizer.decode(result.input_ids[s:e].tolist()) for s, e in trained_runs(result.labels)]


def test_train_on_policies(bpe_tokenizer):
    _, runs = multi_turn_labels(bpe_tokenizer, "all_assistant")
    assert runs == ["Blue.<|im_end|>", "Green, or perhaps red.<|im_end|>"]
    _, runs = multi_turn_labels(bpe_tokenizer, "last_assistant")
    assert runs == ["Green, or perhaps red.<|im_end|>"]
    result, runs = multi_turn_labels(bpe_tokenizer, "all")
    assert result.num_trainable == len(result.input_ids)


def test_per_message_train_flags(bpe_tokenizer):
    messages = [dict(m) for m in CONVERSATIONS["system_multi_turn"][0]]
    messages[2]["train"] = False
    _, runs = multi_turn_labels(bpe_tokenizer, "all_assistant", messages)
    assert runs == ["Green, or perhaps red.<|im_end|>"]
    result, _ = multi_turn_labels(bpe_tokenizer, "all", messages)
    assert result.num_trainable < len(result.input_ids)
    assert "Blue." not in bpe_tokenizer.decode(result.input_ids[result.labels != -100].tolist())
    messages[2]["train"] = True
    _, runs = multi_turn_labels(bpe_tokenizer, "last_assistant", messages)
    assert runs == ["Blue.<|im_end|>", "Green, or perhaps red.<|im_end|>"]


def test_nothing_trainable_is_rejected_with_a_reason(bpe_tokenizer):
    messages = [{**m, "train": False} if m["role"] == "assistant" else m for m in CONVERSATIONS["single"][0]]
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml"))
    result = Masker(bpe_tokenizer, template, max_length=512).encode(messages)
    assert isinstance(result, Drop)
    assert (result.stage, result.reason) == ("tokenize", "no_trainable_tokens")
    assert "train: false" in result.detail


@pytest.mark.parametrize("truncate", [False, True])
def test_a_prompt_that_alone_exceeds_max_length_is_too_long(tokenizer_case, truncate):
    _, tokenizer = tokenizer_case
    template = resolve_template(tokenizer, TemplateConfig(name="chatml"))
    messages = [msg("user", "word " * 300), msg("assistant", "ok")]
    result = Masker(tokenizer, template, max_length=100, truncate=truncate).encode(messages)
    assert isinstance(result, Drop) and result.reason == "too_long"
    assert "prompt" in result.detail


def test_long_rows_are_rejected_without_truncation(bpe_tokenizer):
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml"))
    messages = [msg("user", "hi"), msg("assistant", "word " * 300)]
    result = Masker(bpe_tokenizer, template, max_length=100).encode(messages)
    assert isinstance(result, Drop) and result.reason == "too_long"
    assert "max_length is 100" in result.detail


def test_truncation_keeps_whole_turns_and_never_a_dangling_header(tokenizer_case):
    _, tokenizer = tokenizer_case
    template = resolve_template(tokenizer, TemplateConfig(name="chatml"))
    messages = [msg("user", "Q1"), msg("assistant", "A1 short."), msg("user", "Q2"), msg("assistant", "long " * 200)]
    full = Masker(tokenizer, template, max_length=10_000).encode(messages)
    first_turn_end = trained_runs(full.labels)[0][1]
    result = Masker(tokenizer, template, max_length=first_turn_end + 8, truncate=True).encode(messages)
    assert isinstance(result, Encoded) and result.truncated
    assert result.truncated_tokens == len(full.input_ids) - first_turn_end  # what the plan reports as lost
    # cut right after the first turn's end token: the second turn's header is not kept
    assert len(result.input_ids) == first_turn_end
    assert result.input_ids.tolist() == full.input_ids[:first_turn_end].tolist()
    assert result.labels.tolist() == full.labels[:first_turn_end].tolist()
    assert tokenizer.decode(result.input_ids.tolist()).endswith("A1 short.<|im_end|>")


def test_truncation_inside_the_only_turn_does_not_train_a_cut_end_token(tokenizer_case):
    _, tokenizer = tokenizer_case
    template = resolve_template(tokenizer, TemplateConfig(name="chatml"))
    messages = [msg("user", "Q"), msg("assistant", "long " * 200)]
    full = Masker(tokenizer, template, max_length=10_000).encode(messages)
    start = trained_runs(full.labels)[0][0]
    result = Masker(tokenizer, template, max_length=start + 20, truncate=True).encode(messages)
    assert isinstance(result, Encoded) and len(result.input_ids) == start + 20
    assert result.labels.tolist() == full.labels[: start + 20].tolist()
    trained_text = tokenizer.decode(result.input_ids[result.labels != schema.IGNORE_INDEX].tolist())
    assert trained_text.startswith("long long") and "<|im_end|>" not in trained_text


def test_a_template_that_rewrites_content_is_unverifiable(bpe_tokenizer, tmp_path):
    path = tmp_path / "upper.jinja"
    path.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content | upper }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
        "{% endfor %}",
        encoding="utf-8",
    )
    template = resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=path))
    result = Masker(bpe_tokenizer, template, max_length=512).encode(CONVERSATIONS["single"][0])
    assert isinstance(result, Drop) and result.reason == "mask_unverifiable"
    assert "HI THERE!" in result.detail


def test_prefix_spans_need_prefix_stable_templates(bpe_tokenizer, tmp_path):
    # A template that renders the last turn differently cannot be located by prefixes.
    path = tmp_path / "last.jinja"
    path.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} (last){% endif %}\n{% endfor %}",
        encoding="utf-8",
    )
    template = resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=path))
    result = Masker(bpe_tokenizer, template, max_length=512).encode(CONVERSATIONS["system_multi_turn"][0])
    assert isinstance(result, Drop) and result.reason == "mask_unverifiable"


def test_batch_results_keep_row_order(bpe_tokenizer):
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml"))
    masker = Masker(bpe_tokenizer, template, max_length=4096)
    rows = [CONVERSATIONS["single"], (CONTROL_TEXT, None), ([msg("user", "x " * 5000), msg("assistant", "y")], None)]
    rows = rows + rows[::-1]
    batch = masker.encode_batch(rows)
    one_by_one = [masker.encode(*row) for row in rows]
    for a, b in zip(batch, one_by_one):
        assert type(a) is type(b)
        if isinstance(a, Encoded):
            assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
        else:
            assert a == b


def test_template_variables_are_the_tokenizers_special_tokens(mistral_tokenizer):
    variables = template_variables(mistral_tokenizer)
    assert variables["bos_token"] == "<s>" and variables["eos_token"] == "</s>"


def test_state_left_on_the_tokenizer_does_not_change_ids(mistral_tokenizer):
    template = resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    masker = Masker(mistral_tokenizer, template, max_length=512)
    before = masker.encode(CONVERSATIONS["single"][0]).input_ids.tolist()
    # transformers keeps split_special_tokens on the shared Rust tokenizer after this call
    mistral_tokenizer("<s>x</s>", split_special_tokens=True)
    assert mistral_tokenizer.backend_tokenizer.encode_special_tokens
    try:
        after = Masker(mistral_tokenizer, template, max_length=512).encode(CONVERSATIONS["single"][0])
        assert after.input_ids.tolist() == before and before[0] == mistral_tokenizer.bos_token_id
    finally:
        mistral_tokenizer.backend_tokenizer.encode_special_tokens = False


def test_truncation_cuts_after_a_trained_turn_not_an_untrained_one(bpe_tokenizer):
    # last_assistant: the first turn fits but is not trained; cutting after it would leave
    # nothing to learn, so the cut goes inside the trained last turn instead.
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml"))
    messages = [msg("user", "Q1"), msg("assistant", "A1."), msg("user", "Q2"), msg("assistant", "long " * 200)]
    masker = Masker(bpe_tokenizer, template, max_length=10_000, train_on="last_assistant")
    full = masker.encode(messages)
    start = trained_runs(full.labels)[0][0]
    result = Masker(bpe_tokenizer, template, max_length=start + 10, truncate=True, train_on="last_assistant").encode(messages)
    assert isinstance(result, Encoded) and len(result.input_ids) == start + 10 and result.num_trainable == 10

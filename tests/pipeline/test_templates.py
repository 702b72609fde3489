"""Choosing and rendering chat templates: the tokenizer's own, built-ins, custom files, default system."""

from __future__ import annotations

import json

import pytest

from pipeline.config import TemplateConfig
from pipeline.masking import Encoded, Masker
from pipeline.schema import make_message, messages_for_template, tools_for_template
from pipeline.stage import Drop
from pipeline.templates import BUILTIN_TEMPLATES, render, resolve_template, template_variables

CHAT = [make_message("user", "What is 2+2?"), make_message("assistant", "4.")]
TOOLS = json.dumps([{"type": "function", "function": {"name": "lookup_price", "description": "price", "parameters": {"type": "object"}}}])


def rendered(tokenizer, template, messages=CHAT, tools=None):
    text, _ = render(template, template_variables(tokenizer), messages_for_template(messages), tools_for_template(tools))
    return text


def test_auto_uses_the_tokenizers_own_template(bpe_tokenizer):
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="auto"))
    assert template.name == "auto"
    assert template.source == bpe_tokenizer.chat_template
    assert template.has_generation_tags


def test_auto_without_a_template_names_the_builtins(mistral_tokenizer):
    with pytest.raises(ValueError, match="no chat template") as info:
        resolve_template(mistral_tokenizer, TemplateConfig(name="auto"))
    for name in BUILTIN_TEMPLATES:
        assert name in str(info.value)


def test_unknown_name_is_a_clear_error(bpe_tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template(bpe_tokenizer, TemplateConfig(name="vicuna"))


def test_custom_jinja_file_wins_over_the_name(bpe_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}", encoding="utf-8")
    template = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml", jinja_file=path))
    assert template.name == "file:mine.jinja"
    assert rendered(bpe_tokenizer, template) == "<<user>>What is 2+2?<<assistant>>4."


def test_missing_jinja_file_names_the_file(bpe_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="nothere.jinja"):
        resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=tmp_path / "nothere.jinja"))


def test_fingerprint_follows_the_template_text_and_default_system(bpe_tokenizer):
    chatml = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml"))
    assert chatml.fingerprint == resolve_template(bpe_tokenizer, TemplateConfig(name="chatml")).fingerprint
    assert chatml.fingerprint != resolve_template(bpe_tokenizer, TemplateConfig(name="llama3")).fingerprint
    with_system = resolve_template(bpe_tokenizer, TemplateConfig(name="chatml", default_system="Be brief."))
    assert with_system.fingerprint != chatml.fingerprint


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_default_system_is_added_and_the_datas_own_system_wins(bpe_tokenizer, name):
    template = resolve_template(bpe_tokenizer, TemplateConfig(name=name, default_system="DEFAULT-SYS"))
    masker = Masker(bpe_tokenizer, template, max_length=4096)
    plain = masker.encode(CHAT)
    assert isinstance(plain, Encoded)
    assert "DEFAULT-SYS" in bpe_tokenizer.decode(plain.input_ids)
    own = masker.encode([make_message("system", "OWN-SYS"), *CHAT])
    assert isinstance(own, Encoded)
    text = bpe_tokenizer.decode(own.input_ids)
    assert "OWN-SYS" in text and "DEFAULT-SYS" not in text


def test_default_system_needs_a_template_with_a_system_role(bpe_tokenizer, tmp_path):
    path = tmp_path / "nosys.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    with pytest.raises(ValueError, match="no system role"):
        resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=path, default_system="x"))


def test_builtin_layouts(bpe_tokenizer, mistral_tokenizer):
    def text(tokenizer, name, messages=CHAT):
        return rendered(tokenizer, resolve_template(tokenizer, TemplateConfig(name=name)), messages)

    assert text(bpe_tokenizer, "chatml") == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n")
    assert text(bpe_tokenizer, "llama3") == (
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    )
    # Mistral: BOS written by the template, [INST] … [/INST], the tokenizer's EOS closes the turn.
    assert text(mistral_tokenizer, "mistral") == "<s>[INST] What is 2+2? [/INST] 4.</s>"
    with_system = text(mistral_tokenizer, "mistral", [make_message("system", "Be brief."), *CHAT])
    assert with_system == "<s>[INST] Be brief.\n\nWhat is 2+2? [/INST] 4.</s>"
    # the system prompt goes into the first user turn only, the tools before the last one; a
    # system message after the first is an [INST] turn of its own
    call = {"type": "function", "function": {"name": "price", "arguments": {"item": "kiwi"}}}
    tools = [{"type": "function", "function": {"name": "price", "parameters": {}}}]
    mistral = resolve_template(mistral_tokenizer, TemplateConfig(name="mistral"))
    turns = [
        make_message("system", "Be brief."),
        make_message("user", "Price?"),
        make_message("assistant", "", tool_calls=[call]),
        make_message("tool", '{"price": 3}'),
        make_message("assistant", "Three."),
        make_message("user", "And a pear?"),
        make_message("assistant", "Four."),
    ]
    assert render(mistral, template_variables(mistral_tokenizer), messages_for_template(turns), tools)[0] == (
        '<s>[INST] Be brief.\n\nPrice? [/INST] [TOOL_CALLS] [{"name": "price", "arguments": {"item": "kiwi"}}]</s>'
        '[TOOL_RESULTS] {"price": 3} [/TOOL_RESULTS] Three.</s>'
        '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "price", "parameters": {}}}] [/AVAILABLE_TOOLS]'
        "[INST] And a pear? [/INST] Four.</s>"
    )
    late = text(mistral_tokenizer, "mistral", [CHAT[0], make_message("system", "late"), CHAT[1]])
    assert late == "<s>[INST] What is 2+2? [/INST][INST] late [/INST] 4.</s>"
    assert text(mistral_tokenizer, "alpaca") == "<s>### Instruction:\nWhat is 2+2?\n\n### Response:\n4.</s>\n\n"


# The built-in Mistral template as it was written before, keeping its state in a namespace() as
# Mistral's own templates do; the built-in finds the same two turns from the list of roles.
MISTRAL_WITH_NAMESPACE = (
    BUILTIN_TEMPLATES["mistral"]
    .split("{%- for message in messages %}", 1)[1]
    .replace("{%- if tools and loop.index0 == last_user %}", "{%- if tools and loop.index0 == ns.last_user %}")
    .replace(
        "{%- if loop.index0 == first_user %}{{- '[INST] ' + messages[0]['content'] + '\\n\\n' + message['content'] + ' [/INST]' }}",
        "{%- if ns.system %}{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{%- set ns.system = '' %}",
    )
)
MISTRAL_WITH_NAMESPACE = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- set ns = namespace(system='', last_user=-1) %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] + '\\n\\n' %}{%- endif %}"
    "{%- if tools %}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- for message in messages %}" + MISTRAL_WITH_NAMESPACE
)


def test_builtin_mistral_renders_what_its_namespace_form_renders():
    import random

    from pipeline.templates import Renderer, Template

    assert "ns.system" in MISTRAL_WITH_NAMESPACE and "ns.last_user" in MISTRAL_WITH_NAMESPACE
    rng = random.Random(3)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    rendered = 0
    for bos in ("<s>", ""):
        variables = {"bos_token": bos, "eos_token": "</s>"}
        ours, theirs = (
            Renderer(Template("mistral", source), variables) for source in (BUILTIN_TEMPLATES["mistral"], MISTRAL_WITH_NAMESPACE)
        )
        for _ in range(4000):
            messages = []  # any order of roles, also the ones sftkit rejects before rendering
            for _ in range(rng.randint(0, 6)):
                role = rng.choice(["system", "user", "assistant", "tool", "user", "assistant"])
                call = [{"function": {"name": "f", "arguments": {"a": 1}}}] if role == "assistant" and rng.random() < 0.3 else None
                messages.append({"role": role, "content": rng.choice(["", "hi", " x ", "[/INST]", "a\n\nb"]), "tool_calls": call})
            offered = tools if rng.random() < 0.4 else None
            for prompt in (False, True):
                outcomes = []
                for renderer in (ours, theirs):
                    try:
                        outcomes.append(renderer.render(messages, offered, with_spans=True, add_generation_prompt=prompt))
                    except Exception as exc:  # an empty conversation: both raise
                        outcomes.append(type(exc).__name__)
                assert outcomes[0] == outcomes[1], (messages, offered)
                rendered += isinstance(outcomes[0], tuple)
    assert rendered > 12000


@pytest.mark.parametrize("name", ["auto", *BUILTIN_TEMPLATES])
def test_tools_and_tool_calls_are_passed_through(bpe_tokenizer, name):
    template = resolve_template(bpe_tokenizer, TemplateConfig(name=name))
    messages = [
        make_message("user", "How much is a kiwi?"),
        make_message(
            "assistant",
            "",
            tool_calls=[{"type": "function", "function": {"name": "lookup_price", "arguments": {"item": "kiwi"}}}],
        ),
        make_message("tool", '{"price": 3}'),
        make_message("assistant", "Three."),
    ]
    text = rendered(bpe_tokenizer, template, messages, TOOLS)
    assert text.count("lookup_price") == 2  # the schema and the call
    assert '"item": "kiwi"' in text and '{"price": 3}' in text


def test_templates_render_in_a_sandbox(bpe_tokenizer, tmp_path):
    path = tmp_path / "evil.jinja"
    path.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}{% generation %}x{% endgeneration %}", encoding="utf-8")
    template = resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=path))
    result = Masker(bpe_tokenizer, template, max_length=512).encode(CHAT)
    assert isinstance(result, Drop)
    assert (result.stage, result.reason) == ("template", "template_error")


def test_a_template_that_raises_rejects_the_row_with_its_message(mistral_tokenizer, tmp_path):
    path = tmp_path / "strict.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system prompts here') }}"
        "{% endif %}{{ m.content }}{% endfor %}",
        encoding="utf-8",
    )
    template = resolve_template(mistral_tokenizer, TemplateConfig(jinja_file=path))
    result = Masker(mistral_tokenizer, template, max_length=512).encode([make_message("system", "s"), *CHAT])
    assert isinstance(result, Drop)
    assert result.stage == "template" and "no system prompts here" in result.detail


def test_rich_objects_in_the_data_reach_the_template_as_plain_values(bpe_tokenizer, tmp_path):
    # numpy.str_ has a tofile method; a template must never be handed it (the sandbox relies on
    # transformers rebuilding every input as plain data before rendering).
    np = pytest.importorskip("numpy")
    target = tmp_path / "written-by-template.bin"
    path = tmp_path / "sneaky.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.content.tofile is defined %}{% set _ = m.content.tofile('"
        + str(target)
        + "') %}{% endif %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}",
        encoding="utf-8",
    )
    template = resolve_template(bpe_tokenizer, TemplateConfig(jinja_file=path))
    messages = [make_message("user", np.str_("hello")), make_message("assistant", np.str_("hi"))]
    Masker(bpe_tokenizer, template, max_length=512).encode(messages)
    assert not target.exists()


def test_builtin_mistral_in_python_renders_what_its_jinja_renders():
    """The built-in mistral template is rendered in Python for the conversations sftkit passes:
    the same text and generation spans as its Jinja, or the Jinja itself for anything else."""
    import random

    from pipeline.templates import Renderer, RenderTooLarge, Template

    rng = random.Random(5)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"q": "é"}}}]
    contents = ["", "hi", " x ", "[/INST]", "a\n\nb", "你好", None, 7]
    arguments = ['{"a": 1}', {"a": 1, "b": [1.5, None, "ü"]}, {"a": (1, 2)}, None, 3]
    natives = 0
    for bos in ("<s>", ""):
        variables = {"bos_token": bos, "eos_token": "</s>"}
        python = Renderer(Template("mistral", BUILTIN_TEMPLATES["mistral"]), variables)
        jinja = Renderer(Template("mistral", BUILTIN_TEMPLATES["mistral"]), variables)
        jinja._native_tokens = None
        assert python._native_tokens is not None
        for _ in range(6000):
            messages = []
            for _ in range(rng.randint(0, 6)):
                role = rng.choice(["system", "user", "assistant", "tool", "user", "assistant", "developer"])
                message = {"role": role, "content": rng.choice(contents) if rng.random() < 0.1 else rng.choice(contents[:6])}
                if role == "assistant" and rng.random() < 0.4:
                    calls = []
                    for _ in range(rng.randint(0, 2)):
                        function = {"name": rng.choice(["f", "g"]) if rng.random() < 0.95 else None, "arguments": rng.choice(arguments)}
                        calls.append({"type": "function", "function": function} if rng.random() < 0.7 else function)
                    message["tool_calls"] = calls
                messages.append(message)
            offered = rng.choice([None, [], tools])
            for prompt in (False, True):
                outcomes = []
                for renderer in (python, jinja):
                    try:
                        outcomes.append(renderer.render(messages, offered, with_spans=True, add_generation_prompt=prompt))
                    except Exception as exc:
                        outcomes.append(type(exc).__name__)
                assert outcomes[0] == outcomes[1], (messages, offered)
            natives += isinstance(outcomes[0], tuple) and len(outcomes[0][1]) > 0
    assert natives > 4000
    small = Renderer(Template("mistral", BUILTIN_TEMPLATES["mistral"]), {"bos_token": "<s>", "eos_token": "</s>"}, max_chars=20)
    with pytest.raises(RenderTooLarge, match="passed 20 characters"):
        small.render([{"role": "user", "content": "a long question, longer than twenty characters"}])

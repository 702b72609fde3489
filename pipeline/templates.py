"""Chat templates: which Jinja template renders a conversation, and rendering it.

This module owns the choice of template (the tokenizer's own, a built-in, or a custom Jinja
file), the built-in templates themselves, the template fingerprint, and the one place where
conversations are rendered. Rendering always goes through transformers' sandboxed Jinja
environment (the same renderer ``apply_chat_template`` uses), never through a Jinja of our own.

Built-in templates mark every assistant turn with ``{% generation %}`` … ``{% endgeneration %}``
around exactly the text that is trained: the turn's content, its rendered tool calls and its
end-of-turn token, not the header before it and not the newline after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.config import TemplateConfig

log = logging.getLogger("sftkit.templates")

# --- built-in templates ----------------------------------------------------------------------
# Tool calls render as one JSON object per call; `call.function` is the OpenAI shape.
_TOOL_CALLS_JSON = (
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- ('' if loop.first else ', ') + '{\"name\": \"' + fn['name'] + '\", \"arguments\": ' "
    "+ (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson) + '}' }}"
    "{%- endfor %}"
)

CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] }}"
    "{%- if message['tool_calls'] %}{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' "
    "+ (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON "
    '{"name": function name, "arguments": dictionary of argument name and its value}.\\n\\n\' }}'
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0]['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message['content'] }}"
    "{%- if message['tool_calls'] %}{{- '\\n' if message['content'] else '' }}" + _TOOL_CALLS_JSON + "{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endgeneration %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral's [INST] format (v0.1 spacing): the system prompt goes into the first user turn, as
# Mistral's own templates do; tools are listed before the last user turn. Those two turns are
# found from the list of roles, made only when there is a system prompt or tools: rendering is
# most of a run's Python, and a namespace() object (what Mistral's own templates keep such state
# in) cost a fifth of this template's rendering.
MISTRAL = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- set first_user = -1 %}"
    "{%- if tools or messages[0]['role'] == 'system' %}{%- set roles = messages | map(attribute='role') | list %}"
    "{%- set first_user = roles.index('user') if messages[0]['role'] == 'system' and 'user' in roles else -1 %}"
    "{%- set last_user = (roles | length) - 1 - (roles | reverse | list).index('user') if tools and 'user' in roles else -1 %}"
    "{%- endif %}"
    "{%- for message in messages %}{%- set role = message['role'] %}"
    "{%- if role == 'user' %}"
    "{%- if tools and loop.index0 == last_user %}"
    "{{- '[AVAILABLE_TOOLS] ' + tools | tojson + ' [/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if loop.index0 == first_user %}{{- '[INST] ' + messages[0]['content'] + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif role == 'assistant' %}{{- ' ' if message['content'] or message['tool_calls'] else '' }}"
    "{%- generation %}{{- message['content'] }}"
    "{%- if message['tool_calls'] %}{{- ' ' if message['content'] else '' }}{{- '[TOOL_CALLS] [' }}"
    + _TOOL_CALLS_JSON
    + "{{- ']' }}{%- endif %}"
    "{{- eos_token }}{%- endgeneration %}"
    "{%- elif role == 'system' and loop.first %}"
    "{%- elif role == 'tool' %}"
    "{{- '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ALPACA = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{%- if tools %}{{- '### Tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}{{- '\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' }}"
    "{%- generation %}{{- message['content'] }}"
    "{%- if message['tool_calls'] %}{{- '\\n' if message['content'] else '' }}{{- 'Tool calls: ' }}" + _TOOL_CALLS_JSON + "{%- endif %}"
    "{{- eos_token }}{%- endgeneration %}{{- '\\n\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{- '### Tool result:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else %}{{- '### ' + message['role'] + ':\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "alpaca": ALPACA,
}

# What add_generation_prompt appends in each built-in: the header its assistant turns open with
# (Mistral's appends nothing; an assistant turn with text opens with a space there).
BUILTIN_GENERATION_PROMPTS = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",
    "alpaca": "### Response:\n",
}


def builtin_prompt_end(
    template: Template, rendered: str, turn_start: int, messages: list[dict[str, Any]], index: int, has_tools: bool
) -> int | None:
    """Where the generation prompt before assistant turn ``messages[index]`` ends in ``rendered``
    (the rendering of ``messages``), for a built-in template, without rendering ``messages[:index]``
    with ``add_generation_prompt``; None where this is not derived (any other template; a first
    message; Mistral with tools and a user turn after this one: it lists the tools before the last
    user turn of what it renders).

    ``turn_start`` is where the turn's ``{% generation %}`` block starts. A built-in renders each
    message by itself, the system prompt and tools from the first message and the tools alone,
    so the prompt is the rendering up to that turn's header. Tests check ``rendered[:end]``
    against the rendered prompt on many random conversations for every built-in.
    """
    header = BUILTIN_GENERATION_PROMPTS.get(template.name)
    if header is None or template.source != BUILTIN_TEMPLATES[template.name] or index < 1:
        return None
    if header:
        return turn_start if rendered.startswith(header, turn_start - len(header)) and turn_start >= len(header) else None
    if has_tools and any(message["role"] == "user" for message in messages[index + 1 :]):
        return None
    message = messages[index]
    if message.get("content") or message.get("tool_calls"):
        return turn_start - 1 if turn_start >= 1 and rendered[turn_start - 1] == " " else None
    return turn_start


# The end-of-turn marker each built-in closes an assistant turn with; "{eos}" is the tokenizer's EOS.
BUILTIN_END_TOKENS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "{eos}", "alpaca": "{eos}"}

# Turn markers a built-in writes that only work well as the tokenizer's own tokens.
BUILTIN_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

# End-of-turn markers of common model families, recognised after a turn's content when a
# template's own generation span (or prefix rendering) does not include one.
KNOWN_END_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|return|>",  # gpt-oss (harmony): the last turn's end; earlier turns end with <|end|>
    "<|call|>",  # gpt-oss: a turn that calls a tool ends with it
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)

# Tokens that open the next message and also end the assistant turn before it, for templates that
# write no end-of-turn marker: the GLM family's (ChatGLM3, GLM-4, GLM-4.5/4.6 stop generating on
# <|user|> and <|observation|>). Another template without an end marker trains no stop token: its
# model's stop (Baichuan-2 stops on an EOS its template never writes) cannot be read off the text.
KNOWN_NEXT_MESSAGE_STOPS = ("<|user|>", "<|observation|>")

_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")


DEFAULT_TODAY = date(2024, 7, 26)  # Llama-3.1's own fallback date: any fixed day would do


@dataclass(frozen=True)
class Template:
    """A resolved chat template: its name, its Jinja text and everything that decides its output.

    ``variables`` are the user's extra template variables (``enable_thinking`` …) and ``today``
    the date every render sees: ``strftime_now`` is replaced by one that formats it and
    ``date_string`` defaults to it, so a template that prints the date (Llama-3.1) renders the
    same text on every day. Both are part of the fingerprint.
    """

    name: str
    source: str
    default_system: str | None = None
    end_token: str | None = None  # the marker that closes an assistant turn, when known
    variables: tuple[tuple[str, Any], ...] = ()
    today: date = DEFAULT_TODAY

    @property
    def fingerprint(self) -> str:
        payload = self.source + "\x00" + (self.default_system or "")
        if self.variables or "strftime_now" in self.source or "date_string" in self.source:
            # only templates that can see them change with them: old fingerprints stay valid
            payload += "\x00" + json.dumps(self.pinned_variables(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @property
    def date_string(self) -> str:
        return self.today.strftime("%d %b %Y")

    def strftime_now(self, format: str) -> str:
        """The template's clock: ``today`` at midnight, whatever the day the run happens on."""
        return datetime.combine(self.today, datetime.min.time()).strftime(format)

    def pinned_variables(self) -> dict[str, Any]:
        """The variables every render passes besides the conversation (the clock aside)."""
        return {"date_string": self.date_string, **dict(self.variables)}

    @property
    def code(self) -> str:
        """The Jinja text without its comments: what sftkit reads off a template (its generation
        tags, the fields and roles it reads) is what it renders, never what a comment mentions.
        (Its control tokens follow transformers' rule, which reads the whole source.)"""
        return _without_comments(self.source)

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.code))

    @property
    def supports_system(self) -> bool:
        return "system" in self.code


@lru_cache(maxsize=64)
def _without_comments(source: str) -> str:
    """``source`` without its ``{# … #}`` comments, as Jinja's own lexer finds them (a ``{#`` in a
    string is not one); the text itself where it does not lex (rendering will say why)."""
    from jinja2 import Environment, TemplateSyntaxError

    try:
        return "".join(value for _, kind, value in Environment().lex(source) if not kind.startswith(("comment", "linecomment")))
    except TemplateSyntaxError:
        return source


def resolve_template(tokenizer, config: TemplateConfig) -> Template:
    """The template a run renders with: custom Jinja file > built-in name > the tokenizer's own."""
    default_system = config.default_system
    if config.jinja_file is not None:
        path = Path(config.jinja_file)
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read chat template file {path}: {exc}") from exc
        if not source.strip():
            raise ValueError(f"chat template file {path} is empty")
        template = Template(f"file:{path.name}", source, default_system, None)
    elif config.name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # tokenizers with several named templates
            source = source.get("default")
        if not source:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template of its own; "
                f"choose a built-in one with --template ({', '.join(BUILTIN_TEMPLATES)}) or pass a Jinja file"
            )
        template = Template("auto", source, default_system, None)
    elif config.name in BUILTIN_TEMPLATES:
        end = BUILTIN_END_TOKENS[config.name]
        if end == "{eos}":
            end = tokenizer.eos_token
            if not end:
                raise ValueError(
                    f"template {config.name!r} ends assistant turns with the EOS token, but tokenizer "
                    f"{getattr(tokenizer, 'name_or_path', '?')!r} has none"
                )
        template = Template(config.name, BUILTIN_TEMPLATES[config.name], default_system, end)
        missing = [m for m in BUILTIN_MARKERS.get(config.name, ()) if m not in tokenizer.get_vocab()]
        if missing:
            log.warning(
                "template %r writes %s, which tokenizer %r does not have as tokens; they are encoded as "
                "plain text, and turns whose end merges into the next header are rejected as mask_unverifiable",
                config.name,
                ", ".join(missing),
                getattr(tokenizer, "name_or_path", "?"),
            )
    else:
        raise ValueError(f"unknown chat template {config.name!r}; expected auto, a Jinja file, or one of {', '.join(BUILTIN_TEMPLATES)}")
    if default_system and not template.supports_system:
        raise ValueError(f"chat template {template.name!r} has no system role, so default_system cannot be used")
    reserved = {"messages", "tools", "add_generation_prompt", "strftime_now", "raise_exception"} & set(config.variables)
    if reserved:
        raise ValueError(f"template.variables cannot set {', '.join(sorted(reserved))}: sftkit passes those itself")
    return replace(template, variables=tuple(sorted(config.variables.items())), today=config.today)


def with_default_system(messages: list[dict[str, Any]], template: Template) -> list[dict[str, Any]]:
    """Prepend the template's default system prompt when the conversation brings none of its own."""
    if template.default_system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": template.default_system}, *messages]
    return messages


def template_variables(tokenizer) -> dict[str, Any]:
    """The special-token variables (bos_token, eos_token …) a template sees, as apply_chat_template passes them."""
    return {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}


def render(
    template: Template,
    variables: dict[str, Any],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    with_spans: bool = False,
    add_generation_prompt: bool = False,
    max_chars: int | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; with ``with_spans`` also the character spans of its generation blocks.

    A rendering that grows past ``max_chars`` raises :class:`RenderTooLarge` as soon as it does.
    (:class:`Renderer` does the same with the template's variables prepared once.)

    The template is transformers' own compiled one (``apply_chat_template``'s sandboxed Jinja
    environment, its ``{% generation %}`` tracker, its filters), rendered the way
    ``render_jinja_template`` renders it, with two differences: the inputs are rebuilt as plain
    JSON data here (:func:`_plain`, the same rule as transformers' ``_plain_template_data``, for
    the shapes sftkit passes, at a third of its cost: rendering is most of a run's Python), and
    ``strftime_now`` is the template's pinned clock (a function can only be passed this way;
    transformers' rebuild would turn it into a string). Where transformers lacks the pieces, its
    public ``render_jinja_template`` is used (without the pinned clock; ``date_string`` still is).
    """
    return Renderer(template, variables, max_chars).render(
        messages, tools, with_spans=with_spans, add_generation_prompt=add_generation_prompt
    )


class Renderer:
    """:func:`render` for one template and one set of variables, prepared once (a Masker's)."""

    def __init__(self, template: Template, variables: dict[str, Any], max_chars: int | None = None):
        self.template = template
        self.max_chars = max_chars
        self.context = {**_plain(variables), **_plain(template.pinned_variables())}
        self.compiled = _compile(template.source) if _compile is not None else None
        # the environment's globals under the variables, as Template.new_context puts them, merged
        # once here: new_context reads them from a ChainMap on every render
        self._base = {**self.compiled.globals, **self.context} if self.compiled is not None else {}
        # the built-in mistral template in Python: the same text and spans (a test holds it to the
        # Jinja on random conversations), a fifth of the cost; other conversations go to Jinja
        bos, eos = self.context.get("bos_token"), self.context.get("eos_token")
        native = template.name == "mistral" and template.source == MISTRAL and type(bos) is str and type(eos) is str
        self._native_tokens = (bos, eos) if native else None

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        with_spans: bool = False,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[tuple[int, int]]]:
        tool_schemas = _plain(tools)
        if self._native_tokens is not None and (native := _render_mistral(messages, tool_schemas, *self._native_tokens)) is not None:
            text, spans = native
            if self.max_chars is not None and len(text) > self.max_chars:
                raise RenderTooLarge(f"the rendering passed {self.max_chars:,} characters")
            return text, spans if with_spans else []
        chat = _plain_messages(messages)
        if self.compiled is None:  # pragma: no cover - a transformers without the private helpers
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, spans = render_jinja_template(
                conversations=[chat],
                tools=tool_schemas,
                chat_template=self.template.source,
                return_assistant_tokens_mask=with_spans,
                add_generation_prompt=add_generation_prompt,
                **self.context,
            )
            return rendered[0], [tuple(span) for span in spans[0]] if with_spans else []
        compiled = self.compiled
        context = compiled.new_context(
            {
                **self._base,
                "strftime_now": self.template.strftime_now,
                "messages": chat,
                "tools": tool_schemas,
                "documents": None,
                "add_generation_prompt": add_generation_prompt,
            },
            shared=True,  # the globals are in already
        )
        blocks: list[str] = []
        if not with_spans:
            _collect(compiled.root_render_func(context), blocks, self.max_chars)
            return "".join(blocks), []
        spans: list[tuple[int, int]] = []
        # what transformers' _render_with_assistant_indices does, with the size check inside: the
        # tracker reads the blocks rendered so far, so they are appended as they come
        with compiled.environment.activate_tracker(blocks, spans):
            _collect(compiled.root_render_func(context), blocks, self.max_chars)
            text = "".join(blocks)
        return text, [tuple(span) for span in spans]


def _render_mistral(messages: list[dict[str, Any]], tools: Any, bos: str, eos: str) -> tuple[str, list[tuple[int, int]]] | None:
    """:data:`MISTRAL` rendered in Python: (text, generation spans), or None for a conversation
    outside what this covers (a message that is not a dict of a string role and content, tool
    calls of another shape, no messages), which the Jinja renders instead. Mistral's template has
    no generation prompt, so ``add_generation_prompt`` changes nothing."""
    if not messages or type(messages) is not list:
        return None
    for message in messages:
        if type(message) is not dict or type(message.get("role")) is not str or type(message.get("content")) is not str:
            return None
        calls = message.get("tool_calls")
        if calls is not None and (type(calls) is not list or not all(_plain_call(call) for call in calls)):
            return None
    parts: list[str] = [bos] if bos else []
    size = len(bos) if bos else 0
    spans: list[tuple[int, int]] = []
    first_user = last_user = -1
    if tools or messages[0]["role"] == "system":
        roles = [message["role"] for message in messages]
        if messages[0]["role"] == "system" and "user" in roles:
            first_user = roles.index("user")
        if tools and "user" in roles:
            last_user = len(roles) - 1 - roles[::-1].index("user")
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "assistant":
            calls = message.get("tool_calls")
            if content or calls:
                parts.append(" ")
                size += 1
            turn = [content]
            if calls:
                turn.append(" [TOOL_CALLS] [" if content else "[TOOL_CALLS] [")
                for number, call in enumerate(calls):
                    function = call["function"] if "function" in call else call
                    arguments = function["arguments"]
                    arguments = arguments if type(arguments) is str else json.dumps(arguments, ensure_ascii=False)
                    turn.append(("" if number == 0 else ", ") + '{"name": "' + function["name"] + '", "arguments": ' + arguments + "}")
                turn.append("]")
            turn.append(eos)
            text = "".join(turn)
            spans.append((size, size + len(text)))
        elif role == "user":
            text = f"[AVAILABLE_TOOLS] {json.dumps(tools, ensure_ascii=False)} [/AVAILABLE_TOOLS]" if tools and index == last_user else ""
            if index == first_user:
                text += "[INST] " + messages[0]["content"] + "\n\n" + content + " [/INST]"
            else:
                text += "[INST] " + content + " [/INST]"
        elif role == "system" and index == 0:
            continue
        elif role == "tool":
            text = "[TOOL_RESULTS] " + content + " [/TOOL_RESULTS]"
        else:
            text = "[INST] " + content + " [/INST]"
        parts.append(text)
        size += len(text)
    return "".join(parts), spans


def _plain_call(call: Any) -> bool:
    """A tool call :func:`_render_mistral` renders as the Jinja would: a dict whose ``function``
    (or itself) holds a string name and arguments that are a string or plain JSON data."""
    if type(call) is not dict:
        return False
    function = call["function"] if "function" in call else call
    if type(function) is not dict or type(function.get("name")) is not str or "arguments" not in function:
        return False
    arguments = function["arguments"]
    return type(arguments) is str or _is_plain_json(arguments)


def _is_plain_json(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    if kind is list:
        return all(map(_is_plain_json, value))
    return False


class RenderTooLarge(BaseException):
    """A rendering grew past its size limit (a template looping on its output); a BaseException,
    so that the ``except Exception`` around a template's own errors does not take it for one."""


def _collect(stream, blocks: list[str], max_chars: int | None) -> None:
    """Append the rendering's blocks to ``blocks`` as they come, a few hundred at a time (the
    append loop runs in C), stopping once they pass ``max_chars``."""
    size = 0
    while True:
        before = len(blocks)
        blocks.extend(islice(stream, 256))
        if len(blocks) == before:
            return
        size += sum(map(len, blocks[before:]))
        if max_chars is not None and size > max_chars:
            stream.close()
            raise RenderTooLarge(f"the rendering passed {max_chars:,} characters")


try:  # transformers' compiled-template cache and generation tracker (apply_chat_template's own)
    from transformers.utils.chat_template_utils import _compile_jinja_template as _compile
    from transformers.utils.chat_template_utils import _render_with_assistant_indices  # noqa: F401 (the tracker API)
except ImportError:  # pragma: no cover
    _compile = None

_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types only: a str subclass (numpy.str_, an enum) becomes a
    str, so a template can reach no method the sandbox does not know; anything else that is not
    JSON data becomes a placeholder naming its type, as transformers does."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_plain(item) for item in value]
    from transformers.utils.chat_template_utils import _plain_template_data

    return _plain_template_data(value)  # the rare rich object: transformers' own full rule


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain data, with the reasoning also under ``thinking`` (gpt-oss templates)."""
    chat = []
    for message in messages:
        if type(message) is not dict:
            raise TypeError(f"chat messages must be dicts, got {type(message).__name__}")
        plain = {k if type(k) is str else _plain(k): v if type(v) is str else _plain(v) for k, v in message.items()}
        reasoning = plain.get("reasoning_content")
        if reasoning is not None and "thinking" not in plain:
            plain["thinking"] = reasoning
        chat.append(plain)
    return chat

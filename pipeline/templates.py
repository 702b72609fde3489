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
from datetime import date
from pathlib import Path
from typing import Any

from pipeline.config import TemplateConfig

log = logging.getLogger("sftkit.templates")

# --- built-in templates ----------------------------------------------------------------------
# Tool calls render as one JSON object per call; `call.function` is the OpenAI shape.
_TOOL_CALLS_JSON = (
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- ('' if loop.first else ', ') + '{\"name\": \"' + fn.name + '\", \"arguments\": ' "
    "+ (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}' }}"
    "{%- endfor %}"
)

CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message.content }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' "
    "+ (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON "
    "{\"name\": function name, \"arguments\": dictionary of argument name and its value}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0].content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message.content }}"
    "{%- if message.tool_calls %}{{- '\\n' if message.content else '' }}" + _TOOL_CALLS_JSON + "{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endgeneration %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral's [INST] format (v0.1 spacing): the system prompt goes into the first user turn, as
# Mistral's own templates do; tools are listed before the last user turn.
MISTRAL = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- set ns = namespace(system='', last_user=-1) %}"
    "{%- if messages[0].role == 'system' %}{%- set ns.system = messages[0].content + '\\n\\n' %}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}"
    "{{- '[AVAILABLE_TOOLS] ' + tools | tojson + ' [/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST] ' + ns.system + message.content + ' [/INST]' }}{%- set ns.system = '' %}"
    "{%- elif message.role == 'assistant' %}{{- ' ' if message.content or message.tool_calls else '' }}"
    "{%- generation %}{{- message.content }}"
    "{%- if message.tool_calls %}{{- ' ' if message.content else '' }}{{- '[TOOL_CALLS] [' }}"
    + _TOOL_CALLS_JSON
    + "{{- ']' }}{%- endif %}"
    "{{- eos_token }}{%- endgeneration %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '[TOOL_RESULTS] ' + message.content + ' [/TOOL_RESULTS]' }}"
    "{%- else %}{{- '[INST] ' + message.content + ' [/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ALPACA = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{%- if tools %}{{- '### Tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}{{- '\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' %}{{- '### Instruction:\\n' + message.content + '\\n\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '### Response:\\n' }}"
    "{%- generation %}{{- message.content }}"
    "{%- if message.tool_calls %}{{- '\\n' if message.content else '' }}{{- 'Tool calls: ' }}"
    + _TOOL_CALLS_JSON
    + "{%- endif %}"
    "{{- eos_token }}{%- endgeneration %}{{- '\\n\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '### Tool result:\\n' + message.content + '\\n\\n' }}"
    "{%- else %}{{- '### ' + message.role + ':\\n' + message.content + '\\n\\n' }}"
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
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
        pinned = self.pinned_variables()
        if self.variables or "strftime_now" in self.source or "date_string" in self.source:
            # only templates that can see them change with them: old fingerprints stay valid
            payload += "\x00" + json.dumps(
                {k: v for k, v in pinned.items() if k != "strftime_now"}, sort_keys=True, default=str
            )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def pinned_variables(self) -> dict[str, Any]:
        """What every render of this template passes besides the conversation."""
        today = self.today

        def strftime_now(format: str) -> str:
            return today.strftime(format)

        variables = {"date_string": today.strftime("%d %b %Y"), "strftime_now": strftime_now}
        variables.update(dict(self.variables))
        return variables

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))

    @property
    def supports_system(self) -> bool:
        return "system" in self.source


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
        raise ValueError(
            f"unknown chat template {config.name!r}; expected auto, a Jinja file, or one of "
            f"{', '.join(BUILTIN_TEMPLATES)}"
        )
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
) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; with ``with_spans`` also the character spans of its generation blocks.

    Uses transformers' own sandboxed renderer (what ``apply_chat_template`` calls), so a template
    can do nothing outside Jinja's sandbox.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, spans = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template.source,
        return_assistant_tokens_mask=with_spans,
        add_generation_prompt=add_generation_prompt,
        **{**variables, **template.pinned_variables()},
    )
    return rendered[0], [tuple(span) for span in spans[0]] if with_spans else []

"""Official chat templates of seventeen real models, and their generation-tagged twins, as test fixtures.

Each ``<name>.jinja`` file is the model's published chat template (see the comment at its top for
where the text came from and what, if anything, was changed; ``gpt_oss.jinja`` is written to
reproduce every behaviour of gpt-oss's that decides where a turn lies, with a shorter tool schema); ``<name>_gen.jinja`` is the same
template with ``{% generation %}`` … ``{% endgeneration %}`` around exactly what the model writes in
each assistant turn (from right after the assistant header through the end-of-turn marker). A twin
renders byte-identical text to its original for every input; its generation spans are the ground
truth a mask locator working on the *untagged* original has to reproduce.

``TEMPLATES[name]`` holds, per model:

- ``file`` / ``twin``: the two file names in this folder;
- ``controls``: the control tokens the template writes, added as *special* tokens by
  :func:`tokenizer_for`;
- ``added``: tokens the real tokenizer has as ordinary (non-special) added tokens, e.g. ``<think>``;
- ``bos`` / ``eos`` / ``end_of_turn``: the model's strings (``bos`` is None for Qwen3);
- ``variables``: extra keyword arguments to pass when rendering (``enable_thinking`` for Qwen3);
- ``conversations``: the names in :data:`CONVERSATIONS` the template renders faithfully;
- ``tagged``: present (True) where the official template has ``{% generation %}`` blocks of its own;
- ``prompt_opens_think``: present (True) where the generation prompt opens a think block that a turn
  rendered without reasoning does not show, so such rows are flagged ``render_mismatch``;
- ``raises``: the names in :data:`CONVERSATIONS` the template refuses with ``raise_exception``
  (a ``jinja2.TemplateError``). Names in neither list render but lose or mangle information
  (Phi-3 drops tool messages; Llama-3.1 JSON-quotes string arguments again) or fail with an
  ordinary error (DeepSeek-R1 concatenates dict arguments).
"""

from __future__ import annotations

import copy
from pathlib import Path

from data_samples.make_inputs import WEATHER_TOOL as SAMPLE_WEATHER_TOOL
from tests.support.inputs import openai_record

HERE = Path(__file__).resolve().parent

# The bundled samples' get_weather schema, wrapped the way chat templates expect tools.
WEATHER_TOOL = {"type": "function", "function": SAMPLE_WEATHER_TOOL}


def _tool_conversation(arguments) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "What's the weather in Paris right now?"},
            {
                "role": "assistant",
                # "" rather than None: transformers' apply_chat_template drops keys whose value is
                # None, and DeepSeek-R1's `message['content'] is none` test then fails on the
                # missing key. Both render the same text.
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_0001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_0001",
                "name": "get_weather",
                "content": '{"temperature": 18, "unit": "celsius", "sky": "cloudy"}',
            },
            {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."},
        ],
        "tools": [WEATHER_TOOL],
    }


#: name -> {"messages": [OpenAI-style messages], "tools": [tool schemas] or None}
CONVERSATIONS: dict[str, dict] = {
    "single_turn": openai_record(("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."), tools=None),
    "multi_turn": openai_record(
        ("user", "Give me a number between 1 and 10."),
        ("assistant", "Seven."),
        ("user", "  Now double it.  "),
        ("assistant", "  Fourteen.\n"),
        tools=None,
    ),
    "system_multi_turn": openai_record(
        ("system", "You are a terse assistant."),
        ("user", "Hi!"),
        ("assistant", "Hello."),
        ("user", "Name a prime number."),
        ("assistant", "Thirteen."),
        tools=None,
    ),
    # OpenAI shape: arguments as an object (what transformers documents for tool calling).
    "tool_call": _tool_conversation({"city": "Paris", "unit": "celsius"}),
    # The same call with arguments as a JSON string (what DeepSeek-R1's template concatenates).
    "tool_call_json_args": _tool_conversation('{"city": "Paris", "unit": "celsius"}'),
    # Assistant turns carrying reasoning in a separate field (Qwen3 reads it; the others ignore it).
    "reasoning": {
        "messages": [
            {"role": "user", "content": "What is 12 * 12?"},
            {"role": "assistant", "reasoning_content": "12 * 12 = 144.", "content": "144"},
            {"role": "user", "content": "And 13 * 13?"},
            {"role": "assistant", "reasoning_content": "13 * 13 = 169.", "content": "169"},
        ],
        "tools": None,
    },
    # Reasoning inline in the content (Qwen3 splits it out, DeepSeek-R1 drops it, the others keep it).
    "think_in_content": openai_record(
        ("user", "Is 91 prime?"), ("assistant", "<think>\n91 = 7 * 13.\n</think>\n\nNo, 91 = 7 × 13."), tools=None
    ),
    # Thinking switched off by the system prompt, as SmolLM3 and Nemotron Nano v2 read it (both cut
    # the flag out of what they render; other templates render it as text), with reasoning in the
    # data: those two render the last answer after an empty think block of their own.
    "no_think_multi_turn": {
        "messages": [
            {"role": "system", "content": "/no_think"},
            {"role": "user", "content": "What is 12 * 12?"},
            {"role": "assistant", "reasoning_content": "12 * 12 = 144.", "content": "144"},
            {"role": "user", "content": "And 13 * 13?"},
            {"role": "assistant", "reasoning_content": "13 * 13 = 169.", "content": "169"},
        ],
        "tools": None,
    },
}

_ALL = list(CONVERSATIONS)
_NO_TOOLS = [c for c in _ALL if not c.startswith("tool_call")]

# Qwen3's tokens; Qwen3.5 shares them
_QWEN = {
    "controls": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "added": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    "bos": None,
    "eos": "<|im_end|>",
    "end_of_turn": "<|im_end|>",
}

# DeepSeek-R1's tokens; DeepSeek-V3.1 shares them (its template writes all but the outputs pair)
_DEEPSEEK = {
    "controls": [
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜User｜>",
        "<｜Assistant｜>",
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "<｜tool▁outputs▁begin｜>",
        "<｜tool▁outputs▁end｜>",
        "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>",
    ],
    "added": ["<think>", "</think>"],
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "end_of_turn": "<｜end▁of▁sentence｜>",
}

# Kimi K2's chat tokens (its tiktoken tokenizer adds no BOS; the chat stops on <|im_end|>); K2 Thinking's too
_KIMI_CONTROLS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
]

TEMPLATES: dict[str, dict] = {
    "qwen3": {
        "file": "qwen3.jinja",
        "twin": "qwen3_gen.jinja",
        **_QWEN,
        "variables": {"enable_thinking": True},
        "conversations": _ALL,
        "raises": [],
    },
    "qwen35": {
        "file": "qwen35.jinja",
        "twin": "qwen35_gen.jinja",
        **_QWEN,
        "variables": {},
        # Tool calls with arguments as an object only: it iterates over them (|items), and a JSON
        # string fails there.
        "conversations": [c for c in _ALL if c != "tool_call_json_args"],
        "raises": [],
    },
    "deepseek_r1": {
        "file": "deepseek_r1.jinja",
        "twin": "deepseek_r1_gen.jinja",
        **_DEEPSEEK,
        "variables": {},
        # Tool calls only with arguments as a JSON string: the template concatenates them (a dict
        # raises a TypeError, not a raise_exception, so "tool_call" is simply left out).
        "conversations": [c for c in _ALL if c != "tool_call"],
        "raises": [],
        "prompt_opens_think": True,
    },
    "deepseek_v31": {
        "file": "deepseek_v31.jinja",
        "twin": "deepseek_v31_gen.jinja",
        **_DEEPSEEK,
        # no <｜tool▁outputs▁begin｜>/<｜tool▁outputs▁end｜> around the outputs, as R1 writes
        "controls": [c for c in _DEEPSEEK["controls"] if "outputs" not in c],
        # thinking false (its default): the prompt closes the think block, '<｜Assistant｜></think>'.
        # With thinking true it opens one, which no rendered turn shows (see test_per_turn.py).
        "variables": {},
        # Tool calls only with arguments as a JSON string: the template concatenates them.
        "conversations": [c for c in _ALL if c != "tool_call"],
        "raises": [],
    },
    "phi3": {
        "file": "phi3.jinja",
        "twin": "phi3_gen.jinja",
        "controls": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        "added": [],
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "end_of_turn": "<|end|>",
        "variables": {},
        # No tool support: the tool conversations render, but tool messages are silently dropped
        # and tool_calls ignored, so they are not listed.
        "conversations": _NO_TOOLS,
        "raises": [],
    },
    "gemma": {
        "file": "gemma.jinja",
        "twin": "gemma_gen.jinja",
        "controls": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "added": [],
        "bos": "<bos>",
        "eos": "<eos>",
        "end_of_turn": "<end_of_turn>",
        "variables": {},
        # No system role, no tools (a tool message breaks the user/model alternation check).
        "conversations": [c for c in _NO_TOOLS if c not in ("system_multi_turn", "no_think_multi_turn")],
        "raises": ["system_multi_turn", "no_think_multi_turn", "tool_call", "tool_call_json_args"],
    },
    "llama31": {
        "file": "llama31.jinja",
        "twin": "llama31_gen.jinja",
        "controls": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "added": [],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "end_of_turn": "<|eot_id|>",
        # date_string defaults to strftime_now("%d %b %Y"): pass date_string="26 Jul 2024" to pin it.
        "variables": {},
        # One tool call per turn, arguments as an object (a string would be JSON-quoted again).
        "conversations": [c for c in _ALL if c != "tool_call_json_args"],
        "raises": [],
    },
    "gpt_oss": {
        "file": "gpt_oss.jinja",
        "twin": "gpt_oss_gen.jinja",
        # the harmony format's tokens (o200k_harmony): all special
        "controls": ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>", "<|endoftext|>"],
        "added": [],
        "bos": "<|startoftext|>",
        "eos": "<|return|>",
        "end_of_turn": "<|end|>",
        "variables": {},
        # One call per turn (the template renders tool_calls[0] only); arguments of either shape go
        # through tojson (a JSON string is quoted again, as the official template does).
        "conversations": _ALL,
        "raises": [],
    },
    "glm45": {
        "file": "glm45.jinja",
        "twin": "glm45_gen.jinja",
        "controls": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"],
        "added": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
        "bos": None,
        "eos": "<|endoftext|>",
        # No end-of-turn token: a turn ends where the next message's role token begins, and the
        # model stops with that token (<|user|> after an answer, <|observation|> after a call).
        "end_of_turn": None,
        "variables": {},
        # Tool calls with arguments as an object only: it iterates over them (.items()).
        "conversations": [c for c in _ALL if c != "tool_call_json_args"],
        "raises": [],
    },
    "smollm3": {
        "file": "smollm3.jinja",
        "twin": "smollm3_gen.jinja",
        # SmolLM3-3B's chat tokens (a Llama-3 vocabulary with ChatML turns)
        "controls": ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>"],
        "added": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<code>", "</code>"],
        "bos": None,
        "eos": "<|im_end|>",
        "end_of_turn": "<|im_end|>",
        "variables": {},
        # Its own generation blocks hold the assistant header (see smollm3.jinja): the official text
        # has them, so "auto" has to see through them.
        "tagged": True,
        # No tools: the tool conversations render, but tool calls are dropped and tool messages
        # written as user turns, so they are not listed.
        "conversations": _NO_TOOLS,
        "raises": [],
    },
    "kimi_k2": {
        "file": "kimi_k2.jinja",
        "twin": "kimi_k2_gen.jinja",
        "controls": _KIMI_CONTROLS,
        "added": [],
        "bos": None,
        "eos": "<|im_end|>",
        "end_of_turn": "<|im_end|>",
        "variables": {},
        # No tool conversations: it writes a call's id where its name would be and each result under
        # its tool_call_id, which sftkit's messages do not keep; such rows are refused, named so.
        "conversations": _NO_TOOLS,
        "raises": [],
    },
    "mistral_v03": {
        "file": "mistral_v03.jinja",
        "twin": "mistral_v03_gen.jinja",
        # Mistral-7B-Instruct-v0.3 (SentencePiece v3): the instruction and tool markers are control tokens
        "controls": [
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        "added": [],
        "bos": "<s>",
        "eos": "</s>",
        "end_of_turn": "</s>",
        "variables": {},
        # Not the system conversation (a conversation ending with an answer renders no system
        # prompt: refused, with merge as the way in), nor arguments as a JSON string (quoted again).
        "conversations": [c for c in _ALL if c not in ("system_multi_turn", "no_think_multi_turn", "tool_call_json_args")],
        "raises": [],
    },
    "mistral": {
        "file": "mistral.jinja",
        "twin": "mistral_gen.jinja",
        # Mistral-7B v0.1/v0.2 (SentencePiece v1): [INST] and [/INST] are plain text, not tokens.
        "controls": ["<s>", "</s>"],
        "added": [],
        "bos": "<s>",
        "eos": "</s>",
        "end_of_turn": "</s>",
        "variables": {},
        "conversations": _NO_TOOLS,
        "raises": ["tool_call", "tool_call_json_args"],
    },
}


# Kimi K2 Thinking: Kimi K2's tokens and roles (<think> and </think> are added tokens of its tokenizer);
# as for K2, the tool conversations' ids are not functions.NAME:INDEX, so they are refused.
TEMPLATES["kimi_k2_thinking"] = {
    **TEMPLATES["kimi_k2"],
    "file": "kimi_k2_thinking.jinja",
    "twin": "kimi_k2_thinking_gen.jinja",
    "added": ["<think>", "</think>"],
}


# MiniMax-M2: its chat markers are special tokens, and <think> and </think> are taken as special too
# (MiniMax's own verifier says its M3 tokenizer has them so); the masks are the same with them as
# ordinary added tokens. Every conversation opens with a system turn; the generation prompt opens a
# think block.
TEMPLATES["minimax_m2"] = {
    "file": "minimax_m2.jinja",
    "twin": "minimax_m2_gen.jinja",
    "controls": ["]~!b[", "]~b]", "[e~[", "<think>", "</think>"],
    "added": ["<minimax:tool_call>", "</minimax:tool_call>"],
    "bos": "]~!b[",
    "eos": "[e~[",
    "end_of_turn": "[e~[",
    "variables": {},
    "conversations": _ALL,
    "raises": [],
    "prompt_opens_think": True,
}


# Seed-OSS: '<seed:bos>' opens every turn and '<seed:eos>' closes it; its think and tool-call tags are
# added tokens. Reasoning is written as '<seed:think>R</seed:think>' and kept in every turn.
TEMPLATES["seed_oss"] = {
    "file": "seed_oss.jinja",
    "twin": "seed_oss_gen.jinja",
    "controls": ["<seed:bos>", "<seed:eos>", "<seed:pad>"],
    "added": ["<seed:think>", "</seed:think>", "<seed:tool_call>", "</seed:tool_call>"],
    "bos": "<seed:bos>",
    "eos": "<seed:eos>",
    "end_of_turn": "<seed:eos>",
    "variables": {},
    "conversations": _ALL,
    "raises": [],
}


# NVIDIA Nemotron Nano v2: <SPECIAL_10>/<SPECIAL_11> open a system or user/assistant turn and
# <SPECIAL_12> ends an assistant turn (the model's stop token); it writes no BOS. It reads no
# reasoning field, and renders the last answer after a '<think>\n\n' of its own.
TEMPLATES["nemotron_nano_v2"] = {
    "file": "nemotron_nano_v2.jinja",
    "twin": "nemotron_nano_v2_gen.jinja",
    "controls": ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"],
    "added": ["<think>", "</think>"],
    "bos": None,
    "eos": "<SPECIAL_12>",
    "end_of_turn": "<SPECIAL_12>",
    "variables": {},
    "conversations": _ALL,
    "raises": [],
}


def template_text(name: str, twin: bool = False) -> str:
    """The text of a template file (the official one, or its generation-tagged twin)."""
    entry = TEMPLATES[name]
    return (HERE / entry["twin" if twin else "file"]).read_text(encoding="utf-8")


def conversation(name: str) -> tuple[list[dict], list[dict] | None]:
    """A deep copy of one example conversation: (messages, tools)."""
    conv = CONVERSATIONS[name]
    return copy.deepcopy(conv["messages"]), copy.deepcopy(conv["tools"])


def tokenizer_for(name: str, base_tokenizer, twin: bool = False):
    """A copy of ``base_tokenizer`` dressed as model ``name``.

    The model's control tokens become special tokens, its other added tokens (``<think>`` …)
    ordinary added tokens, bos/eos are set to the model's strings (bos is removed for Qwen3, which
    has none) and ``chat_template`` is the official template (or its twin). ``base_tokenizer`` is
    never modified (``load_tokenizer`` caches and shares its tokenizers).
    """
    entry = TEMPLATES[name]
    tokenizer = copy.deepcopy(base_tokenizer)
    specials = list(entry["controls"])
    for token in (entry["bos"], entry["eos"]):
        if token is not None and token not in specials:
            specials.append(token)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if entry["added"]:
        tokenizer.add_tokens(list(entry["added"]), special_tokens=False)
    tokenizer.add_special_tokens({"eos_token": entry["eos"]})
    if entry["bos"] is None:
        tokenizer.bos_token = None
    else:
        tokenizer.add_special_tokens({"bos_token": entry["bos"]})
    tokenizer.chat_template = template_text(name, twin=twin)
    return tokenizer

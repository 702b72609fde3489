"""One input record, in whatever layout people have, -> the canonical conversation.

This module owns format detection and conversion (:func:`to_conversation`) and the validation
every conversation must pass before it leaves ingest. It knows nothing about files: readers
hand it parsed records, and it answers canonical messages plus a tools JSON string, or raises
:class:`~pipeline.stage.Drop` with a reason code and a sentence for humans.

Layouts recognised, tried in this order:

1. a custom :class:`~pipeline.config.FieldMapping` from the config, when the record has the
   mapping's columns (records without them fall through to auto-detection);
2. a message list under ``messages``, ``conversations`` or ``conversation``, whose items are
   either OpenAI style (``role``/``content``, content as text or a list of ``{"type": "text"}``
   parts, ``tool_calls``, legacy ``function_call``, ``tool`` role, optional ``train``/``weight``,
   ``reasoning_content``/``reasoning``), LLaMA-Factory style (``role``/``content`` with content a
   list of ``{"type": "text"|"reasoning"|"tool_call", "value": ...}`` parts, per-message
   ``loss_weight``), or ShareGPT style (``from``/``value`` with human, gpt, system,
   function_call, observation), plus optional record-level ``system`` and ``tools`` (a JSON
   string or a list);
3. Alpaca: ``instruction`` + ``output`` (``input``, ``system``, ``history`` optional);
4. prompt/completion: ``prompt`` + ``completion`` as strings or message lists (also the pairs
   prompt/response, query/response, question/answer).

Normalisation decisions (documented here because users see their effect):

* Tool calls become OpenAI style ``[{"type": "function", "function": {"name", "arguments"}}]``
  with ``arguments`` parsed to an object when it is JSON text; a call ``id`` is kept. A
  LLaMA-Factory ``tool_call`` content part (JSON text ``{"name", "arguments"}``) is one call;
  a message may have several. Calls both in ``tool_calls`` and in parts are ``wrong_type``.
* Content parts: several text parts are joined by a newline; a part's payload is read from
  ``value`` (LLaMA-Factory) or ``text`` (OpenAI). Part types other than text, reasoning and
  tool_call (images, audio) are ``wrong_type``, and so are reasoning/tool_call parts on a
  non-assistant message.
* Reasoning (an assistant's "thinking") goes to the message's ``reasoning`` field, from
  ``reasoning_content`` (OpenAI-compatible APIs, Qwen3, DeepSeek-R1; preferred), a string
  ``reasoning`` field, ``reasoning`` content parts (joined by a newline), or a
  ``<think>…</think>`` block at the very start of an assistant's content in any layout (newlines
  around the reasoning and leading newlines of the rest are dropped; ``<think>`` without a
  ``</think>`` stays content as written; an empty block is removed and gives no reasoning).
  Two sources on one message must agree, else ``wrong_type``; null or empty reasoning is none.
  Reasoning on a system, user or tool message is ``wrong_type``.
* An assistant turn must answer: one with reasoning but no content and no tool call is an
  ``empty_response`` (training on thinking that leads nowhere teaches the model to stop there).
* Per-message ``train`` (bool) wins over ``weight`` (axolotl, 0 or 1), which wins over
  ``loss_weight`` (LLaMA-Factory, 0/0.0 -> not trained, 1/1.0 -> trained; any other value is
  ``wrong_type``: fractional loss weights are not supported).
* Tool schemas given bare (``{"name", "description", "parameters"}``) are wrapped as
  ``{"type": "function", "function": {...}}``, the shape chat templates expect.
* Empty system messages are dropped; several leading system messages are joined.
* Consecutive messages of the same role (user after user, assistant after assistant) are
  merged into one, joined by a blank line, because most chat templates demand alternation;
  pass ``merge_consecutive=False`` (config ``ingest.merge_consecutive_turns``) to reject them
  as ``bad_turn_order`` instead. Messages with different ``train`` flags, an earlier
  assistant message that already calls tools, or a later assistant message that has reasoning
  (its reasoning would be rendered before text it came after) are never merged; the merged turn
  keeps the earlier turn's reasoning.
* Rejected as ``bad_turn_order``: a conversation whose first non-system turn is not the user's,
  a system message after the start, a tool result not following an assistant tool call, a
  user turn right after a tool result, and a conversation that ends on a user turn or a tool
  result (nothing to learn from the unanswered turn; usually a truncated record).
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

from pipeline import schema
from pipeline.config import FieldMapping
from pipeline.stage import Drop

# --- reason codes (the rejected rows' ``reason`` column) -------------------------------------
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
WRONG_TYPE = "wrong_type"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
BAD_TURN_ORDER = "bad_turn_order"
EMPTY_RESPONSE = "empty_response"
INVALID_UTF8 = "invalid_utf8"
RECORD_TOO_LARGE = "record_too_large"
TOO_DEEPLY_NESTED = "too_deeply_nested"

REASONS = (
    INVALID_JSON,
    NOT_AN_OBJECT,
    UNKNOWN_FORMAT,
    WRONG_TYPE,
    UNKNOWN_ROLE,
    NO_ASSISTANT_TURN,
    BAD_TURN_ORDER,
    EMPTY_RESPONSE,
    INVALID_UTF8,
    RECORD_TOO_LARGE,
    TOO_DEEPLY_NESTED,
)

# Real instruction data nests a few levels (a tool call's arguments inside a message inside a
# list inside the record: 11 at most in the bundled real sets, embedded JSON text included);
# 64 leaves room for any honest schema and stays far below Python's recursion limit, which a
# deeper value would otherwise hit in the JSON parser, in json.dumps or in a chat template.
DEFAULT_MAX_NESTING = 64


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects in ``value`` nest more than ``limit`` levels (the value itself is 1).

    Walks level by level without recursion, and stops as soon as the answer is known.
    """
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list, tuple))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list, tuple))
        ]
        if not level:
            return False
    return bool(level) and any(isinstance(item, (dict, list, tuple)) for item in level)


def too_deep(limit: int, what: str = "the record") -> Drop:
    return Drop(
        TOO_DEEPLY_NESTED,
        f"{what} nests arrays/objects more than {limit} levels deep (ingest.max_nesting); "
        "real conversations nest a few levels, so this is not instruction data",
    )


def loads_bounded(text: str, limit: int, what: str = "the record") -> Any:
    """``json.loads(text)``, refusing values nested deeper than ``limit`` with ``too_deeply_nested``.

    A text with no more than ``limit`` brackets cannot nest deeper, so the common case costs two
    ``str.count`` calls; a deeper one never reaches Python's recursion limit unhandled.
    """
    if text.count("[") + text.count("{") <= limit:
        return json.loads(text)
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(limit, what) from None
    if nesting_exceeds(value, limit):
        raise too_deep(limit, what)
    return value


_MAX_NESTING: contextvars.ContextVar[int] = contextvars.ContextVar("max_nesting", default=DEFAULT_MAX_NESTING)

MESSAGE_LIST_KEYS = ("messages", "conversations", "conversation")
PROMPT_COMPLETION_KEYS = (("prompt", "completion"), ("prompt", "response"), ("query", "response"), ("question", "answer"))

# Speaker names met in the wild -> canonical role. "function_call" is an assistant turn whose
# value is the call; "observation"/"function"/"ipython" carry a tool's result.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's name for the system prompt since o1 (and gpt-oss's harmony format)
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
    "function_call": "function_call",
}


def to_conversation(
    record: Any,
    mapping: FieldMapping | None = None,
    *,
    merge_consecutive: bool = True,
    max_nesting: int = DEFAULT_MAX_NESTING,
) -> tuple[list[dict[str, Any]], str | None]:
    """Canonical messages (see :func:`schema.make_message`) and the tools JSON text of ``record``.

    Raises :class:`Drop` when the record has no usable conversation. JSON given as text
    inside the record (tool schemas, tool-call arguments) is parsed with the same nesting limit
    ``max_nesting`` as the record itself (``too_deeply_nested``).
    """
    token = _MAX_NESTING.set(max_nesting)
    try:
        return _to_conversation(record, mapping, merge_consecutive)
    except RecursionError:
        # A safety net: every JSON text is parsed with the limit, but a value built deep
        # elsewhere (a Parquet column) must still cost one record, not the run.
        raise too_deep(max_nesting) from None
    finally:
        _MAX_NESTING.reset(token)


def _loads(text: str, what: str) -> Any:
    return loads_bounded(text, _MAX_NESTING.get(), what)


def _to_conversation(record: Any, mapping: FieldMapping | None, merge_consecutive: bool) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(record, dict):
        raise Drop(NOT_AN_OBJECT, f"the record is a JSON {_json_type(record)}, not an object")
    if mapping is not None and _mapping_applies(record, mapping):
        messages, tools = _from_mapping(record, mapping)
    elif (key := _message_list_key(record)) is not None:
        messages, tools = _from_message_list(record, key)
    elif record.get("instruction") is not None:
        messages, tools = _from_alpaca(record)
    elif (pair := _prompt_completion_keys(record)) is not None:
        messages, tools = _from_prompt_completion(record, *pair)
    else:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise Drop(
            UNKNOWN_FORMAT,
            f"no known layout matches the record's fields ({keys}); expected messages, conversations, "
            "instruction/output, prompt/completion, or a custom mapping in the config",
        )
    return validate(_inline_reasoning(messages), merge_consecutive=merge_consecutive), tools


# --- layouts ---------------------------------------------------------------------------------
# A null field counts as absent: Parquet and datasets files written from mixed inputs carry
# every layout's columns on every row, null where a row does not use them.
def _message_list_key(record: dict) -> str | None:
    for key in MESSAGE_LIST_KEYS:
        if record.get(key) is not None:
            return key
    return None


def _prompt_completion_keys(record: dict) -> tuple[str, str] | None:
    for prompt_key, completion_key in PROMPT_COMPLETION_KEYS:
        if record.get(prompt_key) is not None and completion_key in record:
            return prompt_key, completion_key
    for prompt_key, completion_key in PROMPT_COMPLETION_KEYS:
        if record.get(prompt_key) is not None:
            return prompt_key, completion_key
    return None


def _from_message_list(record: dict, key: str) -> tuple[list[dict], str | None]:
    items = record[key]
    if not isinstance(items, list):
        raise Drop(WRONG_TYPE, f"field {key!r} must be a list of messages, got {_json_type(items)}")
    messages = _convert_items(items, key)
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise Drop(WRONG_TYPE, f"field 'system' must be text, got {_json_type(system)}")
        messages.insert(0, schema.make_message("system", system))
    return messages, normalise_tools(record.get("tools"), "tools")


def _from_alpaca(record: dict) -> tuple[list[dict], str | None]:
    instruction = _text_field(record, "instruction")
    extra = ""
    for input_key in ("input", "context"):
        if record.get(input_key) is not None:
            extra = _text_field(record, input_key)
            break
    output_key = "output" if "output" in record else "response" if "response" in record else None
    if output_key is None or record[output_key] is None:
        raise Drop(NO_ASSISTANT_TURN, "the Alpaca record has no 'output' to learn from")
    output = _text_field(record, output_key)

    messages = []
    system = record.get("system")
    if system is not None:
        messages.append(schema.make_message("system", _text_field(record, "system")))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise Drop(WRONG_TYPE, f"field 'history' must be a list of [prompt, response] pairs, got {_json_type(history)}")
    for turn_index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise Drop(WRONG_TYPE, f"history turn {turn_index} must be a [prompt, response] pair of texts")
        messages.append(schema.make_message("user", pair[0]))
        messages.append(schema.make_message("assistant", pair[1]))
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages.append(schema.make_message("user", prompt))
    messages.append(schema.make_message("assistant", output))
    return messages, None


def _from_prompt_completion(record: dict, prompt_key: str, completion_key: str) -> tuple[list[dict], str | None]:
    if record.get(completion_key) is None:
        raise Drop(NO_ASSISTANT_TURN, f"the record has {prompt_key!r} but no {completion_key!r} to learn from")
    messages = []
    for key, role in ((prompt_key, "user"), (completion_key, "assistant")):
        value = record[key]
        if isinstance(value, str):
            messages.append(schema.make_message(role, value))
        elif isinstance(value, list):
            messages.extend(_convert_items(value, key))
        else:
            raise Drop(WRONG_TYPE, f"field {key!r} must be text or a list of messages, got {_json_type(value)}")
    system = record.get("system")
    if system is not None:
        messages.insert(0, schema.make_message("system", _text_field(record, "system")))
    return messages, normalise_tools(record.get("tools"), "tools")


def _mapping_applies(record: dict, mapping: FieldMapping) -> bool:
    if mapping.messages:
        return _lookup(record, mapping.messages) not in (_MISSING, None)
    if mapping.prompt and mapping.response:
        return _lookup(record, mapping.prompt) not in (_MISSING, None)
    return False


def _from_mapping(record: dict, mapping: FieldMapping) -> tuple[list[dict], str | None]:
    messages: list[dict] = []
    if mapping.system:
        system = _lookup(record, mapping.system)
        if system is not _MISSING and system is not None:
            if not isinstance(system, str):
                raise Drop(WRONG_TYPE, f"mapped system field {mapping.system!r} must be text, got {_json_type(system)}")
            messages.append(schema.make_message("system", system))
    if mapping.messages:
        items = _lookup(record, mapping.messages)
        if not isinstance(items, list):
            raise Drop(WRONG_TYPE, f"mapped field {mapping.messages!r} must be a list of messages, got {_json_type(items)}")
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise Drop(WRONG_TYPE, f"message {position} of {mapping.messages!r} is a {_json_type(item)}, not an object")
            speaker = item.get(mapping.role_key)
            if not isinstance(speaker, str):
                raise Drop(WRONG_TYPE, f"message {position} has no text field {mapping.role_key!r} naming its role")
            role = mapping.roles.get(speaker, speaker if speaker in schema.ROLES else None)
            if role is None:
                known = ", ".join(sorted(mapping.roles)) or "none"
                raise Drop(UNKNOWN_ROLE, f"message {position} has role {speaker!r}, which the mapping does not name (mapped: {known})")
            content, reasoning, calls = _read_content(item.get(mapping.content_key), position, role, allow_null=False)
            messages.append(schema.make_message(role, content, tool_calls=calls, train=_train_flag(item, position), reasoning=reasoning))
    else:
        for column, role in ((mapping.prompt, "user"), (mapping.response, "assistant")):
            value = _lookup(record, column)
            if value is _MISSING or value is None:
                raise Drop(NO_ASSISTANT_TURN if role == "assistant" else WRONG_TYPE, f"mapped field {column!r} is missing")
            if not isinstance(value, str):
                raise Drop(WRONG_TYPE, f"mapped field {column!r} must be text, got {_json_type(value)}")
            messages.append(schema.make_message(role, value))
    tools = _lookup(record, mapping.tools) if mapping.tools else None
    return messages, normalise_tools(None if tools is _MISSING else tools, mapping.tools or "tools")


_MISSING = object()


def _lookup(record: dict, column: str) -> Any:
    """``record[column]``, where a dotted column ``a.b`` also reaches into nested objects."""
    if column in record:
        return record[column]
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


# --- message items ---------------------------------------------------------------------------
def _convert_items(items: list, field_name: str) -> list[dict]:
    """OpenAI-style or ShareGPT-style message items -> canonical messages."""
    messages: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call id -> function name, to name tool results
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise Drop(WRONG_TYPE, f"message {position} of {field_name!r} is a {_json_type(item)}, not an object")
        if item.get("role") is not None:
            speaker, content = item["role"], item.get("content")
        elif item.get("from") is not None:
            speaker, content = item["from"], item.get("value")
        else:
            raise Drop(WRONG_TYPE, f"message {position} of {field_name!r} has neither 'role' nor 'from'")
        if not isinstance(speaker, str):
            raise Drop(WRONG_TYPE, f"message {position} has a role of type {_json_type(speaker)}, not text")
        role = ROLE_ALIASES.get(speaker.strip().lower())
        if role is None:
            raise Drop(UNKNOWN_ROLE, f"message {position} has role {speaker!r}; known roles are {', '.join(sorted(ROLE_ALIASES))}")
        train = _train_flag(item, position)
        reasoning = _field_reasoning(item, position)
        if reasoning is not None and role not in ("assistant", "function_call"):
            raise Drop(WRONG_TYPE, f"message {position} is a {role} message but carries reasoning; only assistant messages can")

        if role == "function_call":
            # ShareGPT: the whole value is the call, e.g. {"name": ..., "arguments": {...}}.
            calls = _parse_function_call_value(content, position)
            messages.append(schema.make_message("assistant", "", tool_calls=calls, train=train, reasoning=reasoning))
            continue

        tool_calls = None
        raw_calls = item.get("tool_calls")
        if raw_calls is None and item.get("function_call") is not None:
            raw_calls = [{"type": "function", "function": item["function_call"]}]
        if raw_calls is not None:
            if role != "assistant":
                raise Drop(WRONG_TYPE, f"message {position} is a {role} message but carries tool calls")
            tool_calls = _normalise_calls(raw_calls, position)
            for call in tool_calls:
                if "id" in call:
                    call_names[str(call["id"])] = call["function"]["name"]
        if role == "tool" and isinstance(content, (dict, list)) and not _is_content_parts(content):
            content = json.dumps(content, ensure_ascii=False)  # a tool's structured result, as text
        allow_null = tool_calls is not None or reasoning is not None or role == "tool"
        text, part_reasoning, part_calls = _read_content(content, position, role, allow_null=allow_null)
        if part_calls is not None:
            if tool_calls is not None:
                raise Drop(WRONG_TYPE, f"message {position} carries tool calls both in 'tool_calls' and in tool_call content parts")
            tool_calls = part_calls
        if part_reasoning is not None:
            if reasoning is not None and reasoning != part_reasoning:
                raise Drop(
                    WRONG_TYPE, f"message {position} carries reasoning both in a field and in reasoning content parts, and they differ"
                )
            reasoning = part_reasoning

        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise Drop(WRONG_TYPE, f"message {position} has a 'name' of type {_json_type(name)}, not text")
        if role == "tool" and name is None:
            name = call_names.get(str(item.get("tool_call_id")))
            if name is None:
                name = _single_call_name(messages)
        messages.append(schema.make_message(role, text, name=name, tool_calls=tool_calls, train=train, reasoning=reasoning))
    return messages


# Content part types a message list may carry, OpenAI style ({"type": "text", "text": ...}) or
# LLaMA-Factory style ({"type": ..., "value": ...}); reasoning and tool_call only on assistants.
PART_TYPES = ("text", "reasoning", "tool_call")


def _read_content(content: Any, position: int, role: str, *, allow_null: bool) -> tuple[str, str | None, list[dict] | None]:
    """A message's content -> (text, reasoning from reasoning parts, tool calls from tool_call parts).

    Content is text, null (where ``allow_null``), or a list of parts: plain strings and
    ``{"type": "text"|"reasoning"|"tool_call"}`` objects whose payload is under ``text`` or
    ``value``. Several text parts are joined by a newline, several reasoning parts too; a
    tool_call part's payload is JSON text (or an object) ``{"name": ..., "arguments": ...}``.
    """
    if isinstance(content, str):
        return content, None, None
    if content is None:
        if allow_null:
            return "", None, None
        raise Drop(WRONG_TYPE, f"message {position} has no content")
    if not isinstance(content, list):
        raise Drop(WRONG_TYPE, f"message {position} has content of type {_json_type(content)}, not text")
    texts: list[str] = []
    reasonings: list[str] = []
    calls: list[dict] = []
    for part_index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise Drop(WRONG_TYPE, f"message {position} has a content part that is a {_json_type(part)}, not text or an object")
        kind = part.get("type", "text")
        if kind not in PART_TYPES:
            raise Drop(
                WRONG_TYPE,
                f"message {position} has a content part of type {kind!r}, which sftkit does not take; "
                "accepted part types are 'text', and on assistant messages 'reasoning' and 'tool_call'",
            )
        if kind != "text" and role not in ("assistant", "function_call"):
            raise Drop(WRONG_TYPE, f"message {position} is a {role} message but has a {kind!r} content part; only assistant messages can")
        key = "value" if "value" in part else "text"
        payload = part.get(key)
        if kind == "tool_call":
            calls.extend(_part_calls(payload, position, part_index))
        elif not isinstance(payload, str):
            raise Drop(
                WRONG_TYPE,
                f"message {position} has a {kind!r} content part whose 'text'/'value' is {_json_type(payload)}, not text",
            )
        elif kind == "reasoning":
            reasonings.append(payload)
        else:
            texts.append(payload)
    return "\n".join(texts), "\n".join(reasonings) or None, calls or None


def _part_calls(payload: Any, position: int, part_index: int) -> list[dict]:
    """A tool_call content part's payload -> normalised calls."""
    if isinstance(payload, str):
        try:
            payload = _loads(payload, f"the tool_call part of message {position}")
        except json.JSONDecodeError:
            payload = None
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list) or not payload or not all(isinstance(c, dict) for c in payload):
        raise Drop(
            WRONG_TYPE,
            f"message {position} has a tool_call content part (part {part_index}) that is not JSON of the form "
            '{"name": ..., "arguments": ...}',
        )
    return _normalise_calls([c if "function" in c else {"type": "function", "function": c} for c in payload], position)


def _field_reasoning(item: dict, position: int) -> str | None:
    """Reasoning given as a message field: ``reasoning_content`` (OpenAI-compatible APIs, Qwen3,
    DeepSeek-R1), else ``reasoning``. Null or empty text means none."""
    for key in ("reasoning_content", "reasoning"):
        value = item.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise Drop(WRONG_TYPE, f"message {position} has {key!r} of type {_json_type(value)}, not text")
        if value:
            return value
    return None


THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_inline_reasoning(text: str) -> tuple[str | None, str]:
    """``"<think>R</think>C"`` at the very start of ``text`` -> ``(R, C)``; otherwise ``(None, text)``.

    Newlines around R are dropped, and leading newlines of C; an empty R gives ``None``. Text
    that opens ``<think>`` and never closes it is left as it is (content, not reasoning).
    """
    if not text.startswith(THINK_OPEN):
        return None, text
    end = text.find(THINK_CLOSE, len(THINK_OPEN))
    if end < 0:
        return None, text
    reasoning = text[len(THINK_OPEN) : end].strip("\r\n")
    return reasoning or None, text[end + len(THINK_CLOSE) :].lstrip("\r\n")


def _inline_reasoning(messages: list[dict]) -> list[dict]:
    """Move a leading ``<think>…</think>`` block of every assistant message into ``reasoning``."""
    out = []
    for position, message in enumerate(messages):
        if message["role"] == "assistant" and message["content"].startswith(THINK_OPEN):
            reasoning, content = split_inline_reasoning(message["content"])
            if content != message["content"]:
                given = message.get("reasoning")
                if given is not None and reasoning is not None and given != reasoning:
                    raise Drop(
                        WRONG_TYPE,
                        f"assistant message {position} has reasoning in a field or part and a different "
                        "<think> block at the start of its content",
                    )
                message = {**message, "content": content, "reasoning": given or reasoning}
        out.append(message)
    return out


def _is_content_parts(content: Any) -> bool:
    """A list of typed content parts (as opposed to a tool's structured JSON result)."""
    return isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in PART_TYPES for p in content)


def _train_flag(item: dict, position: int) -> bool | None:
    if "train" in item and item["train"] is not None:
        if not isinstance(item["train"], bool):
            raise Drop(WRONG_TYPE, f"message {position} has 'train' of type {_json_type(item['train'])}, not true/false")
        return item["train"]
    if "weight" in item and item["weight"] is not None:
        # axolotl-style per-turn weight: 0 means "do not train on this turn".
        if item["weight"] not in (0, 1) or isinstance(item["weight"], bool):
            raise Drop(WRONG_TYPE, f"message {position} has 'weight' {item['weight']!r}; only 0 or 1 is supported")
        return bool(item["weight"])
    if "loss_weight" in item and item["loss_weight"] is not None:
        # LLaMA-Factory's per-message loss_weight: 0.0 -> not trained, 1.0 -> trained.
        weight = item["loss_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise Drop(
                WRONG_TYPE,
                f"message {position} has 'loss_weight' {weight!r}; only 0 (not trained) or 1 (trained) is supported",
            )
        return weight == 1
    return None


def _parse_function_call_value(value: Any, position: int) -> list[dict]:
    if isinstance(value, str):
        try:
            value = _loads(value, f"function_call message {position}")
        except json.JSONDecodeError:
            raise Drop(WRONG_TYPE, f'function_call message {position} is not JSON of the form {{"name": ..., "arguments": ...}}') from None
    calls = value if isinstance(value, list) else [value]
    return _normalise_calls(
        [{"type": "function", "function": c} if isinstance(c, dict) and "function" not in c else c for c in calls], position
    )


def _normalise_calls(raw_calls: Any, position: int) -> list[dict]:
    if not isinstance(raw_calls, list) or not raw_calls:
        raise Drop(WRONG_TYPE, f"message {position} has 'tool_calls' that is not a non-empty list")
    calls = []
    for call in raw_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise Drop(WRONG_TYPE, f"message {position} has a tool call without a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = _loads(arguments, f"the tool call arguments of message {position}") if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # not JSON: keep the text as written rather than guess
        normalised: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normalised["id"] = call["id"]
        calls.append(normalised)
    return calls


def _single_call_name(messages: list[dict]) -> str | None:
    """Name of the function a tool result answers, when the last assistant made exactly one call."""
    for message in reversed(messages):
        if message["role"] == "assistant":
            if message["tool_calls"]:
                calls = json.loads(message["tool_calls"])
                if len(calls) == 1:
                    return calls[0]["function"]["name"]
            return None
    return None


def normalise_tools(tools: Any, field_name: str = "tools") -> str | None:
    """Tool schemas (JSON text or a list) -> canonical JSON text, or None when there are none."""
    if tools is None:
        return None
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = _loads(tools, f"field {field_name!r}")
        except json.JSONDecodeError:
            raise Drop(WRONG_TYPE, f"field {field_name!r} is text but not JSON") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Drop(WRONG_TYPE, f"field {field_name!r} must be a list of tool schemas")
    if not tools:
        return None
    wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return json.dumps(wrapped, ensure_ascii=False, sort_keys=True)


def _text_field(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise Drop(WRONG_TYPE, f"field {key!r} must be text, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- validation ------------------------------------------------------------------------------
def validate(messages: list[dict], *, merge_consecutive: bool = True) -> list[dict]:
    """Check turn order and responses; returns the messages after the normalisations above."""
    messages = _leading_system(messages)
    merged: list[dict] = []
    for position, message in enumerate(messages):
        role = message["role"]
        previous = merged[-1] if merged else None
        if role == "system":
            if position != 0:
                raise Drop(BAD_TURN_ORDER, f"message {position} is a system message after the conversation started")
        elif previous is None or previous["role"] == "system":
            if role != "user":
                raise Drop(
                    BAD_TURN_ORDER,
                    f"the conversation starts with {'an' if role == 'assistant' else 'a'} {role} turn; the first turn must be the user's",
                )
        elif role == "tool":
            if not (previous["role"] == "tool" or (previous["role"] == "assistant" and previous["tool_calls"])):
                raise Drop(BAD_TURN_ORDER, f"message {position} is a tool result that does not follow an assistant tool call")
        elif role == "user" and previous["role"] == "tool":
            raise Drop(BAD_TURN_ORDER, f"message {position} is a user turn right after a tool result the assistant never answered")
        elif role == previous["role"]:
            if not merge_consecutive or not _can_merge(previous, message):
                raise Drop(BAD_TURN_ORDER, f"messages {position - 1} and {position} are both {role} turns")
            merged[-1] = _merge(previous, message)
            continue
        merged.append(message)

    if not any(m["role"] == "assistant" for m in merged):
        raise Drop(NO_ASSISTANT_TURN, "the conversation has no assistant turn to learn from")
    for position, message in enumerate(merged):
        if message["role"] == "assistant" and not message["tool_calls"] and not message["content"].strip():
            what = "empty" if not message["content"] else "whitespace only"
            if message.get("reasoning"):
                what = f"{what} apart from its reasoning (a turn must answer with content or a tool call)"
            raise Drop(EMPTY_RESPONSE, f"assistant message {position} is {what}")
    last = merged[-1]["role"]
    if last in ("user", "tool"):
        what = "a user turn" if last == "user" else "a tool result"
        raise Drop(BAD_TURN_ORDER, f"the conversation ends with {what} that the assistant never answers")
    return merged


def _leading_system(messages: list[dict]) -> list[dict]:
    """Drop empty system messages and join the leading ones into one."""
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    leading = 0
    while leading < len(messages) and messages[leading]["role"] == "system":
        leading += 1
    if leading > 1:
        text = "\n\n".join(m["content"] for m in messages[:leading])
        messages = [schema.make_message("system", text)] + messages[leading:]
    return messages


def _can_merge(earlier: dict, later: dict) -> bool:
    # A later turn's reasoning was thought after the earlier turn's text; merged, it would be
    # rendered before that text. So a turn with reasoning never merges into the one before it.
    return (
        earlier["train"] == later["train"]
        and not earlier["tool_calls"]
        and earlier["role"] in ("user", "assistant")
        and not later.get("reasoning")
    )


def _merge(earlier: dict, later: dict) -> dict:
    parts = [text for text in (earlier["content"], later["content"]) if text]
    return schema.make_message(
        earlier["role"],
        "\n\n".join(parts),
        name=earlier["name"] or later["name"],
        tool_calls=later["tool_calls"],
        train=earlier["train"],
        reasoning=earlier.get("reasoning"),
    )

"""The on-disk formats of sftkit, in one place.

This module owns every table layout the project reads or writes:

* the **canonical conversation record** that every stage after ingest speaks,
* the **rejected row** written to ``DIR/rejected/`` by every stage,
* the **shard row** written to ``DIR/shards/*.parquet`` (the contract users script against),
* the Parquet file-metadata keys that carry tokenizer and template fingerprints.

Nobody else spells these column names: import the constants from here.

Canonical record
----------------
``id``            stable content hash of the conversation (see :func:`conversation_id`)
``source``        input file name as given on the command line
``source_index``  0-based record index inside that file (JSONL: counting every non-empty line)
``messages``      list of {role, content, name, tool_calls, train, reasoning}
                  role in system | user | assistant | tool; content is text;
                  ``tool_calls`` is a JSON string (a list of OpenAI-style calls) or null;
                  ``train`` is null (follow the policy) or an explicit per-message bool;
                  ``reasoning`` is the assistant's reasoning ("thinking") text that precedes
                  its content, or null (always null on other roles). It is kept apart from
                  ``content`` so that a chat template can render it its own way; it reaches
                  templates as ``reasoning_content`` (the Qwen3 / DeepSeek-R1 convention, see
                  :func:`messages_for_template`). Added as the last struct field: shards written
                  before it read back with ``reasoning`` null.
                  A tool message keeps no ``tool_call_id`` (its ``name`` is its call's tool):
                  :func:`messages_for_template` gives it the id of the first call of the turn
                  before it that calls that tool and is not yet answered (a template that writes
                  the id, Mistral v0.3's or Kimi K2's, gets it back).
``tools``         JSON string of the tool schemas offered to the model, or null

Shard row
---------
The canonical columns plus ``turn`` int32 (null for a row holding the whole conversation; with
``tokenize.reasoning: per_turn`` the index in ``messages`` of the assistant turn the row ends at,
``messages`` then holding the conversation up to that turn), ``input_ids`` list<int32>,
``labels`` list<int32> (= input_ids where trained, -100 elsewhere, same length, not shifted),
``length`` int32, ``num_trainable`` int32. Rows of one record share its ``id``, ``source`` and
``source_index``: a record is counted once, whatever number of rows it became.

Rejected row
------------
``source``, ``source_index``, ``stage``, ``reason``, ``detail``, ``id``, ``duplicate_of``,
``similarity``, ``raw``, and ``turn``: null when the whole record was rejected; the turn's index
when one turn-row of a record was refused while others of the same record were kept (such rows
are not counted as rejected records).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import orjson
import pyarrow as pa

IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant", "tool")

# --- column names ----------------------------------------------------------------------------
ID = "id"
SOURCE = "source"
SOURCE_INDEX = "source_index"
MESSAGES = "messages"
TOOLS = "tools"
INPUT_IDS = "input_ids"
LABELS = "labels"
LENGTH = "length"
NUM_TRAINABLE = "num_trainable"
TURN = "turn"

STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
DUPLICATE_OF = "duplicate_of"
SIMILARITY = "similarity"
RAW = "raw"

STAGES = ("ingest", "dedup", "quality", "template", "tokenize")

# The raw record text kept in rejected/ is cut to this many characters so that one giant bad
# record cannot blow up the quarantine; the cut is marked with RAW_CUT_MARK.
RAW_MAX_CHARS = 65_536
RAW_CUT_MARK = "…[cut]"

# --- Arrow types -----------------------------------------------------------------------------
MESSAGE_TYPE = pa.struct(
    [
        pa.field("role", pa.string(), nullable=False),
        pa.field("content", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("tool_calls", pa.string()),
        pa.field("train", pa.bool_()),
        pa.field("reasoning", pa.string()),
    ]
)

CONVERSATION_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_INDEX, pa.int64(), nullable=False),
        pa.field(MESSAGES, pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field(TOOLS, pa.string()),
    ]
)

SHARD_SCHEMA = pa.schema(
    list(CONVERSATION_SCHEMA)
    + [
        pa.field(TURN, pa.int32()),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(LABELS, pa.list_(pa.int32()), nullable=False),
        pa.field(LENGTH, pa.int32(), nullable=False),
        pa.field(NUM_TRAINABLE, pa.int32(), nullable=False),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_INDEX, pa.int64(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
        pa.field(ID, pa.string()),
        pa.field(DUPLICATE_OF, pa.string()),
        pa.field(SIMILARITY, pa.float32()),
        pa.field(RAW, pa.string(), nullable=False),
        pa.field(TURN, pa.int32()),
    ]
)

# --- Parquet file metadata keys (bytes, as pyarrow wants them) -------------------------------
META_TOKENIZER_NAME = b"sftkit.tokenizer.name"
META_TOKENIZER_FINGERPRINT = b"sftkit.tokenizer.fingerprint"
META_TEMPLATE_NAME = b"sftkit.template.name"
META_TEMPLATE_FINGERPRINT = b"sftkit.template.fingerprint"
META_SPLIT = b"sftkit.split"
META_FORMAT_VERSION = b"sftkit.format_version"
FORMAT_VERSION = "2"  # 2: messages[].reasoning and the turn column

SPLITS = ("train", "val")


def shard_file_name(split: str, index: int) -> str:
    """``train-00000.parquet``: the contract's shard naming."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"{split}-{index:05d}.parquet"


# --- canonical messages ----------------------------------------------------------------------
def make_message(
    role: str,
    content: str,
    *,
    name: str | None = None,
    tool_calls: list[dict[str, Any]] | str | None = None,
    train: bool | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    """One canonical message as a plain dict matching :data:`MESSAGE_TYPE`.

    An empty ``reasoning`` is stored as null: "no reasoning" has one spelling.
    """
    if tool_calls is not None and not isinstance(tool_calls, str):
        tool_calls = json.dumps(tool_calls, ensure_ascii=False, sort_keys=True)
    return {
        "role": role,
        "content": content,
        "name": name,
        "tool_calls": tool_calls,
        "train": train,
        "reasoning": reasoning or None,
    }


def conversation_id(messages: Iterable[dict[str, Any]], tools: str | None = None) -> str:
    """Stable content hash of a conversation: same messages (and tools) -> same id.

    Independent of source file and position, so the same conversation met twice has one id and
    the train/validation split by id is stable across refreshes. A message's reasoning joins the
    hashed payload only when the message has some, so the ids of conversations without reasoning
    are the same as before reasoning existed.
    """
    canonical = []
    for m in messages:
        item = [m["role"], m["content"], m.get("name"), m.get("tool_calls"), m.get("train")]
        if m.get("reasoning"):
            item.append(m["reasoning"])
        canonical.append(item)
    return hashlib.blake2b(_compact_json([canonical, tools]), digest_size=16).hexdigest()


def _compact_json(value: Any) -> bytes:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` in UTF-8, for strings,
    booleans, nulls and lists of them (what an id hashes), from orjson, which writes those very
    bytes six times faster (a test holds the two to the same bytes on every code point). A value
    orjson refuses (a lone surrogate) goes through json, which gives its text or its error."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def messages_for_template(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages -> the list-of-dicts shape ``apply_chat_template`` expects.

    Reasoning goes out as ``reasoning_content`` (what Qwen3's and DeepSeek-R1's templates read),
    and only for a message with non-empty reasoning text. A tool message gets the
    ``tool_call_id`` of the call it answers (:func:`_answered_call`: Mistral v0.3's template writes
    it and refuses a result without one; Kimi K2's writes each result under it). Calls go out with
    their keys in OpenAI's order, ``name`` before ``arguments``.
    """
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("name"):
            msg["name"] = m["name"]
        if m.get("tool_calls"):
            msg["tool_calls"] = [_in_openai_order(call) for call in json.loads(m["tool_calls"])]
        reasoning = m.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return give_results_call_ids(out)


def give_results_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Template messages (``messages``, changed in place) whose tool results carry the
    ``tool_call_id`` of the call each answers (:func:`_answered_call`), where it has one."""
    answering: list[dict[str, Any]] = []  # the calls of the last calling turn not yet answered, in order
    for msg in messages:
        if msg["role"] == "tool":
            if (call := _answered_call(answering, msg.get("name"))) is not None:
                msg["tool_call_id"] = call["id"]
        else:
            answering = [c for c in msg.get("tool_calls") or () if isinstance(c, dict)]
    return messages


def _answered_call(answering: list[dict[str, Any]], tool_name: str | None) -> dict[str, Any] | None:
    """The call a tool message answers, taken off ``answering``: the first one not yet answered
    that calls the tool the message names (any, where it names none). Only a call with an id is
    returned. Two calls of one tool answered out of order cannot be told apart here: ingest keeps
    each result's tool name, not its tool_call_id."""
    for position, call in enumerate(answering):
        function = call.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not tool_name or name == tool_name:
            del answering[position]
            call_id = call.get("id")
            return call if isinstance(call_id, str) and call_id else None
    return None


# The key order OpenAI writes a call in: the stored JSON has its keys sorted (a stable id), and a
# template that writes a call or its function with tojson (Mistral v0.3) shows the order.
_CALL_KEYS, _FUNCTION_KEYS = ("id", "type", "function"), ("name", "arguments")


def _in_openai_order(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict):
        call = {**call, "function": _ordered(function, _FUNCTION_KEYS)}
    return _ordered(call, _CALL_KEYS)


def _ordered(mapping: dict[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    return {**{key: mapping[key] for key in first if key in mapping}, **mapping}


def tools_for_template(tools: str | None) -> list[dict[str, Any]] | None:
    """The ``tools`` column (JSON text) -> the list ``apply_chat_template(tools=...)`` expects."""
    return json.loads(tools) if tools else None


def rejected_row(
    source: str,
    source_index: int,
    stage: str,
    reason: str,
    detail: str,
    raw: str,
    *,
    id: str | None = None,
    duplicate_of: str | None = None,
    similarity: float | None = None,
    turn: int | None = None,
) -> dict[str, Any]:
    """One row of :data:`REJECTED_SCHEMA` as a plain dict (``raw`` cut with :func:`cut_raw`)."""
    return {
        SOURCE: source,
        SOURCE_INDEX: source_index,
        STAGE: stage,
        REASON: reason,
        DETAIL: detail,
        ID: id,
        DUPLICATE_OF: duplicate_of,
        SIMILARITY: similarity,
        RAW: cut_raw(raw),
        TURN: turn,
    }


def cut_raw(raw: str) -> str:
    """Keep at most :data:`RAW_MAX_CHARS` of a rejected record's original text."""
    if len(raw) <= RAW_MAX_CHARS:
        return raw
    return raw[: RAW_MAX_CHARS - len(RAW_CUT_MARK)] + RAW_CUT_MARK

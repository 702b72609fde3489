"""Which turns are trained, how reasoning reaches the template, roles and calls a template refuses,
and the header text it writes inside a turn (these found by probing the template once)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pipeline.deadline import RenderTimeout, release, time_limit
from pipeline.masking.locate import Piece, parting_point, realise
from pipeline.masking.verify import bare, clip
from pipeline.schema import give_results_call_ids
from pipeline.stage import Drop
from pipeline.templates import KNOWN_NEXT_MESSAGE_STOPS, RenderTooLarge, Template, render

TRAIN_ON = ("all_assistant", "last_assistant", "all")
REASONING_POLICIES = ("template", "per_turn", "drop")
SYSTEM_POLICIES = ("keep", "merge", "reject")


def trained_turns(assistant_indices: Sequence[int], train_flags: Sequence[bool | None], train_on: str) -> list[int]:
    """Which assistant turns (message indices) a conversation trains under ``train_on``.

    A turn marked ``train: false`` never is; ``last_assistant`` trains the last turn and any
    marked ``train: true``; ``all_assistant`` (and ``all``) every turn not marked false.
    """
    if train_on != "last_assistant" and not any(train_flags) and False not in train_flags:
        return list(assistant_indices)  # no flags at all (the common case): every turn
    wanted = [i for i in assistant_indices if train_flags[i] is not False]
    if train_on == "last_assistant":
        last = assistant_indices[-1] if assistant_indices else None
        wanted = [i for i in wanted if i == last or train_flags[i] is True]
    return wanted


# A template that reads the reasoning under ``thinking`` (gpt-oss's harmony template: message.thinking,
# "thinking" in message); the renderer passes ``reasoning_content`` there too.
# (A namespace's own .thinking flag is not a message field.)
_READS_THINKING = re.compile(
    r"""\b(?:message|msg|m|turn|item|entry)\.thinking\b|\[\s*['"]thinking['"]\s*\]|['"]thinking['"]\s+(?:not\s+)?in\s+\w"""
)


class ReasoningShape:
    """How an assistant turn's reasoning reaches the template (``tokenize.reasoning``).

    A template that reads ``reasoning_content`` (Qwen3, DeepSeek-R1 distills, gpt-oss ports) gets
    it there; for one that reads only ``content`` the reasoning is put back inline, as
    ``<think>\nREASONING\n</think>\n\n`` before the content, the form such models were trained on
    (or in the model's own tags, where its template strips those: :func:`inline_tags`).
    ``drop`` renders no reasoning at all. ``per_turn`` rows (the tokenize stage cuts a conversation
    into one row per assistant turn) train only their last turn, rendered as at inference: the
    row is the generation prompt of the messages before the turn followed by the turn as the
    template renders it last, and where the template leaves the reasoning out although the prompt
    opens a think block (DeepSeek-R1 renders no block; DeepSeek-V3.1 with thinking closes it at
    once) the reasoning is written into that block.

    Where the template itself opens the think block right before a turn's content (Nemotron Nano
    v2 renders the conversation's last answer as its generation prompt, ``<think>\n\n``, followed
    by the content), the inline reasoning goes in without an opening tag of its own, as
    ``REASONING\n</think>\n\n`` before the content: the model writes exactly that after its prompt,
    and a second ``<think>`` would be trained although it never writes one (:meth:`placement`).
    """

    def __init__(self, template: Template, policy: str, variables: dict[str, Any] | None = None, limits=(None, None)):
        if policy not in REASONING_POLICIES:
            raise ValueError(f"tokenize.reasoning must be one of {REASONING_POLICIES}, got {policy!r}")
        self.policy = policy
        self.reads_field = "reasoning_content" in template.code or _READS_THINKING.search(template.code) is not None
        # how reasoning is written inline for a template that reads no field: "<think>\n" … "\n</think>\n\n",
        # or the model's own tags where its template strips those (Gemma 4's thought channel)
        self.open, self.close = (
            inline_tags(template, variables, limits) if variables is not None and not self.reads_field and policy != "drop" else INLINE_TAGS
        )

    def shape(self, messages: list[dict[str, Any]], placed: Placement | None = None) -> list[dict[str, Any]]:
        """Template messages with reasoning where the template will find it (piece lists, see
        locate); none for the messages ``placed`` says the template cuts it out of, and without
        an opening tag for those it says the template opens the block of (see :meth:`placement`)."""
        cut, opened = placed if placed is not None else ((), ())
        shaped = []
        for index, message in enumerate(messages):
            reasoning = message.get("reasoning_content")
            if reasoning is None:
                shaped.append(message)
                continue
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
            if self.policy != "drop":
                if self.reads_field:
                    message["reasoning_content"] = reasoning
                elif index in opened:
                    message["content"] = [Piece(reasoning), self.close, Piece(message["content"])]
                elif index not in cut:
                    message["content"] = [self.open, Piece(reasoning), self.close, Piece(message["content"])]
            shaped.append(message)
        return shaped

    def placement(self, shaped: list[dict[str, Any]], rendered: str, render: Callable[[list[dict[str, Any]]], str]) -> Placement | None:
        """Where the template puts the reasoning :meth:`shape` wrote inline; None where nothing changes.

        ``cut``: the messages whose inline reasoning the template cuts out of its rendering.
        DeepSeek-R1 and -V3.1 keep only what follows ``</think>`` in an answer to a user (not in a
        calling turn nor after tool outputs): the inline block's separator, ``\n\n``, would stay
        before the answer, trained although the model never writes it there. Such a message is
        rendered again without reasoning (``per_turn`` still writes it into a think block its
        prompt opens).

        ``opened``: the messages whose content the template writes right after a ``<think>`` of its
        own (Nemotron Nano v2's last answer): their reasoning goes in without the inline block's
        opening tag. One whose content it writes right after closing a think block itself, empty
        (Nemotron's last answer with ``/no_think``: ``<think></think>``) or opened by the generation
        prompt alone (DeepSeek-V3.1's calling turns: ``<｜Assistant｜></think>``), is in ``cut``: the
        template shows that turn without reasoning, and an inline block after its close would train
        a second block (``per_turn`` writes the reasoning before that close where its prompt opens
        the block, and none where its prompt closes it: thinking is off).

        Told exactly by rendering ``shaped`` once more, each inline reasoning replaced by a sentinel
        (``render``): a template that rewrites the reasoning (trims it, escapes it) still shows its
        sentinel, and is then refused by the locator as before, never silently trained without it.
        No inline reasoning, or a rendering that fails: None."""
        pieces = {}
        for index, message in enumerate(shaped):
            content = message.get("content")
            if isinstance(content, list) and len(content) == 4 and isinstance(content[1], Piece):
                pieces[(index, "content.1")] = index
        if not pieces:
            return None
        marker = "@@skr"
        while marker in rendered:
            marker += "r"
        names = {key: f"{marker}{n}@@" for n, key in enumerate(pieces)}
        realised = realise(shaped, lambda index, field: names.get((index, field)))
        try:
            skeleton = render(realised)
        except Exception:
            return None
        cut, opened = [], []
        close = self.close.strip()
        closed_before = re.compile(rf"{re.escape(close)}\s*$")
        for key, name in names.items():
            at = skeleton.find(self.open + name)
            if name not in skeleton or (
                at >= 0 and closed_before.search(skeleton, 0, at) and not _data_close(realised, pieces[key], skeleton[:at], close)
            ):
                cut.append(pieces[key])
            elif at >= 0 and skeleton[:at].rstrip().endswith(self.open.strip()):
                opened.append(pieces[key])
        return Placement(cut, opened) if cut or opened else None


def _data_close(messages: list[dict[str, Any]], index: int, before: str, close: str) -> bool:
    """Whether the close tag right before message ``index``'s inline reasoning is the previous
    message's own text (a question ending "…: </think>" under a template that writes nothing
    between two messages), not a close the template writes."""
    previous = messages[index - 1].get("content") if index > 0 else None
    return isinstance(previous, str) and previous.rstrip().endswith(close) and before.rstrip().endswith(previous.rstrip())


# Reasoning put inline, for a template that reads only content: open + reasoning + close + content.
INLINE_TAGS = ("<think>\n", "\n</think>\n\n")
# The inline tags of models that write their reasoning otherwise, each taken only where the template strips
# reasoning written in them (and not reasoning in <think>): Gemma 4's thought channel.
OWN_INLINE_TAGS = (("<|channel>thought\n", "<channel|>"),)


def inline_tags(template: Template, variables: dict[str, Any], limits=(None, None)) -> tuple[str, str]:
    """The tags reasoning is written inline in, for a template that reads no reasoning field.

    ``<think>\n`` … ``\n</think>\n\n`` (what DeepSeek-R1 distills and most open models write),
    unless the template strips reasoning written in a model's own tags from an answer and keeps
    ``<think>`` text: Gemma 4's template cuts ``<|channel>thought\n…<channel|>`` out of every model
    turn, so reasoning in ``<think>`` tags would be trained there as foreign text the model never
    writes, while in its own tags it is cut, as DeepSeek-R1's is (under ``per_turn`` such a turn is
    then refused as ``template_drops_reasoning``, ``tokenize.reasoning: drop`` trains it without).
    Found by rendering one answer with probe reasoning in each set of tags (within ``limits``)."""

    def stripped(tags: tuple[str, str]) -> bool:
        answer = {"role": "assistant", "content": tags[0] + _REASONING + tags[1] + _ANSWER}
        text = _rendered_or_error(template, variables, [{"role": "user", "content": _QUESTION}, answer], limits)
        return isinstance(text, str) and _ANSWER in text and _REASONING not in text

    if stripped(INLINE_TAGS):
        return INLINE_TAGS
    return next((tags for tags in OWN_INLINE_TAGS if stripped(tags)), INLINE_TAGS)


class Placement(NamedTuple):
    """What :meth:`ReasoningShape.placement` found: message indices whose inline reasoning the template
    cuts out (``cut``), and those whose content it writes right after a think block it opens (``opened``)."""

    cut: list[int]
    opened: list[int]


# What each probe text stands for, to say which one a template dropped.
_PROBED_AS = {"sftkit probe system": "system messages", "sftkit_probe_call": "tool calls", "sftkit probe result": "tool results"}


class RolePolicy:
    """System prompts and roles a template cannot render (``template.system``).

    ``keep`` renders the system message as it is; ``merge`` folds it into the first user turn
    (``SYSTEM\n\nUSER``, what Gemma's model card suggests); ``reject`` refuses rows that have one.
    Which roles the template refuses is probed once on tiny conversations, so a row it cannot
    render is rejected as ``template_unsupported_role`` naming the role, not as a generic error.
    """

    def __init__(self, template: Template, variables: dict[str, Any], policy: str, limits=(None, None)):
        if policy not in SYSTEM_POLICIES:
            raise ValueError(f"template.system must be one of {SYSTEM_POLICIES}, got {policy!r}")
        self.template = template
        self.policy = policy
        self.unsupported: dict[str, str] = {}  # role -> what the template said when asked to render it
        user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
        call = {"type": "function", "function": {"name": "sftkit_probe_call", "arguments": {}}}
        probes = {  # role -> (conversation, texts its rendering must hold)
            "system": ([{"role": "system", "content": "sftkit probe system"}, user, answer], ("sftkit probe system",)),
            "tool": (
                [
                    user,
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "sftkit probe result"},
                    answer,
                ],
                ("sftkit_probe_call", "sftkit probe result"),
            ),
        }
        # Some templates concatenate a call's arguments as text (DeepSeek-R1): they get JSON text.
        self.arguments_as_text = False
        self.dropped: dict[str, str] = {}  # role -> why: the template renders it as nothing
        self.one_call_per_turn = False  # it renders only a turn's first tool call (gpt-oss: one call per message)
        # it writes a calling turn's words only while no later turn answers (gpt-oss: as the turn's analysis)
        self.drops_answered_call_text = False
        self.drops_call_text = False  # it never writes a calling turn's words (Llama-3.1)
        # it refuses a call or a result without an id (Mistral v0.3: "Tool call IDs should be …")
        self.needs_call_ids = False
        # it writes a call's id where its name would be (Kimi K2, whose ids read functions.NAME:0)
        self.calls_named_by_id = False
        plain = _rendered_or_error(template, variables, [user, answer], limits)
        if isinstance(plain, _Overrun):
            raise ValueError(
                f"chat template {template.name!r} cannot be used: {plain} (template.render_timeout_s, template.max_render_chars)"
            )
        if isinstance(plain, Exception):
            return  # nothing renders: every row gets the template's own error
        for role, (conversation, must_hold) in probes.items():
            text = _rendered_or_error(template, variables, conversation, limits)
            if isinstance(text, Exception) and role == "tool":
                as_text = _rendered_or_error(template, variables, _arguments_as_text(conversation), limits)
                if isinstance(as_text, str):
                    self.arguments_as_text, text = True, as_text
            if role == "tool" and (isinstance(text, Exception) or not all(piece in text for piece in must_hold)):
                text = self._tool_turns_with_ids(template, variables, conversation, must_hold, limits) or text
            if isinstance(text, Exception):
                self.unsupported[role] = str(text) or type(text).__name__
            elif missing := [_PROBED_AS[piece] for piece in must_hold if piece not in text]:
                self.dropped[role] = f"the template renders no {' and no '.join(missing)} (it drops them silently)"
        if "tool" in self.unsupported:  # it refuses tool results: does it render a call at all?
            calling = [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
            text = _rendered_or_error(template, variables, calling, limits)
            if isinstance(text, str) and "sftkit_probe_call" not in text:  # Mistral v0.2, Gemma: calls vanish
                self.dropped["tool"] = "the template renders no tool calls (it drops them silently)"
        if "tool" not in self.unsupported and "tool" not in self.dropped:
            second = {"type": "function", "function": {"name": "sftkit_probe_second_call", "arguments": {}}}
            calls = [user, {"role": "assistant", "content": "", "tool_calls": [call, second]}]
            text = _rendered_or_error(template, variables, self._as_probed(calls), limits)
            self.one_call_per_turn = isinstance(text, str) and "sftkit_probe_call" in text and "sftkit_probe_second_call" not in text
            calling = {"role": "assistant", "content": "sftkit probe preamble", "tool_calls": [call]}
            latest, answered = (
                _rendered_or_error(template, variables, self._as_probed(c), limits)
                for c in ([user, calling], [user, calling, {"role": "tool", "content": "sftkit probe result"}, answer])
            )
            if isinstance(latest, str) and isinstance(answered, str):
                self.drops_answered_call_text = "sftkit probe preamble" in latest and "sftkit probe preamble" not in answered
                self.drops_call_text = "sftkit probe preamble" not in latest and "sftkit probe preamble" not in answered

    def _tool_turns_with_ids(self, template, variables, conversation, must_hold, limits) -> str | None:
        """The tool probe's rendering once its calls carry ids (and its result the call's id), for
        a template that refuses calls without them (Mistral v0.3) or writes the id in place of the
        call's name (Kimi K2: an id like ``functions.NAME:0`` shows the name); None if neither."""
        for as_text in (self.arguments_as_text, not self.arguments_as_text):
            base = _arguments_as_text(conversation) if as_text else conversation
            text = _rendered_or_error(template, variables, _with_call_ids(base, _PROBE_ID), limits)
            if isinstance(text, str) and all(piece in text for piece in must_hold):
                self.needs_call_ids, self.arguments_as_text = True, as_text
                return text
            if isinstance(text, str) and _PROBE_ID in text and "sftkit_probe_call" not in text:
                text = _rendered_or_error(template, variables, _with_call_ids(base, None), limits)
                if isinstance(text, str) and all(piece in text for piece in must_hold):
                    self.calls_named_by_id, self.arguments_as_text = True, as_text
                    return text
        return None

    def _as_probed(self, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A probe conversation in the shape the template was found to need."""
        if self.arguments_as_text:
            conversation = _arguments_as_text(conversation)
        if self.needs_call_ids or self.calls_named_by_id:
            conversation = _with_call_ids(conversation, _PROBE_ID if self.needs_call_ids else None)
        return conversation

    def prepare(self, messages, true_messages, train_flags):
        """(messages, true messages, train flags) with the default system prompt and the policy applied."""
        if self.arguments_as_text:
            messages, true_messages = _arguments_as_text(messages), _arguments_as_text(true_messages)
        if self.template.default_system and (not messages or messages[0]["role"] != "system"):
            system = {"role": "system", "content": self.template.default_system}
            messages, true_messages, train_flags = [system, *messages], [system, *true_messages], [None, *train_flags]
        if messages and messages[0]["role"] == "system" and self.policy != "keep":
            if self.policy == "reject":
                return Drop(
                    "template_unsupported_role",
                    f"the conversation has a system prompt and template.system is reject (template {self.template.name!r})",
                    stage="template",
                )
            messages, true_messages, train_flags = _merge_system(messages), _merge_system(true_messages), train_flags[1:]
        if (
            self.one_call_per_turn
            and (many := next((i for i, m in enumerate(messages) if len(m.get("tool_calls") or ()) > 1), None)) is not None
        ):
            return Drop(
                "template_drops_tool_calls",
                f"assistant turn {many} makes {len(messages[many]['tool_calls'])} tool calls and chat template "
                f"{self.template.name!r} renders only the first call of a turn (the others would be lost)",
                stage="template",
            )
        if self.calls_named_by_id and (unnamed := _call_not_named_by_its_id(messages)) is not None:
            index, name, call_id = unnamed
            return Drop(
                "template_drops_tool_calls",
                f"assistant turn {index} calls {name!r} under the id {call_id!r}, and chat template "
                f"{self.template.name!r} writes a call's id where its name would be (Kimi K2's ids read "
                "functions.NAME:INDEX): the call's name would be lost",
                stage="template",
            )
        if (self.needs_call_ids or self.calls_named_by_id) and (
            unpaired := next((i for i, m in enumerate(messages) if m["role"] == "tool" and not m.get("tool_call_id")), None)
        ) is not None:
            return Drop(
                "tool_result_unpaired",
                f"tool result {unpaired} answers no call of the turn before it that has an id and calls "
                f"the tool it names, and chat template {self.template.name!r} writes each result under "
                "the id of its call",
                stage="template",
            )
        if self.drops_call_text and (
            (worded := next((i for i, m in enumerate(messages) if m.get("tool_calls") and (m.get("content") or "").strip()), None))
            is not None
        ):
            return Drop(
                "template_drops_content",
                f"assistant turn {worded} has words beside its tool calls and chat template {self.template.name!r} "
                "renders no calling turn's words (they would be lost)",
                stage="template",
            )
        for role, said in self.dropped.items():
            if any(m["role"] == role or (role == "tool" and m.get("tool_calls")) for m in messages):
                hint = " (template.system: merge folds it into the first user turn)" if role == "system" else ""
                return Drop(
                    "template_unsupported_role",
                    f"chat template {self.template.name!r} cannot render a {role!r} message: {said}{hint}",
                    stage="template",
                )
        return messages, true_messages, train_flags

    def render_failure(self, messages: list[dict[str, Any]], exc: Exception) -> Drop:
        roles = {m["role"] for m in messages}
        for role, said in self.unsupported.items():
            if role in roles:
                hint = " (template.system: merge folds it into the first user turn)" if role == "system" else ""
                return Drop(
                    "template_unsupported_role",
                    f"chat template {self.template.name!r} cannot render a {role!r} message: {clip(said)}{hint}",
                    stage="template",
                )
        return Drop("template_error", f"chat template {self.template.name!r} failed: {exc}", stage="template")


# Probe texts for turn_markup: what no template writes of its own.
_QUESTION, _ANSWER, _REASONING = "sftkit probe question", "sftkit probe answer", "sftkit probe reasoning"


def turn_markup(
    template: Template, variables: dict[str, Any], controls: Sequence[str], reasoning_field: bool, limits=(None, None)
) -> frozenset[str]:
    """The header text a template writes inside an assistant turn before its content, where that
    text holds control tokens: gpt-oss's ``<|channel|>final<|message|>`` after the generation
    prompt's ``<|start|>assistant``, and with reasoning
    ``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>``.

    The model writes it, so it is trained; :func:`~pipeline.masking.verify.span_matches` allows exactly these texts
    (whitespace aside, reasoning taken out) before a turn's content, and nothing else made of
    control tokens: a span that starts a token early (taking in ``<|start|>``) still fails.
    Found by rendering short conversations within ``limits`` (a probe the template refuses, or
    that overruns, adds nothing): for each assistant turn, the text between the
    generation prompt of the messages before it and the turn's content. A template whose
    generation prompt adds nothing has none: there the text before a turn's content is its role
    header, which the prompt leaves out, not text the model writes after it.
    """
    if not controls:
        return frozenset()

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        text = _rendered_or_error(template, variables, messages, limits, add_generation_prompt=add_generation_prompt)
        if isinstance(text, Exception):
            raise text
        return text

    user = {"role": "user", "content": _QUESTION}
    try:
        if render([user], True) == render([user], False):
            # No generation prompt: a turn's header is not the prompt's, and would pass for markup
            return frozenset()
    except Exception:
        return frozenset()

    def answer(number: int, reasoning: bool, calls: bool = False) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": f"{_ANSWER} {number}"}
        if reasoning:
            message["reasoning_content"] = f"{_REASONING} {number}"
        if calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": "sftkit_probe_call", "arguments": {}}}]
        return message

    probes = [[user, answer(1, False), user, answer(2, False)], [user, answer(1, False, calls=True)]]
    if reasoning_field:
        probes.append([user, answer(1, True), user, answer(2, True)])
    found = set()
    for messages in probes:
        try:
            full = render(messages, False)
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = render(messages[:index], True)
                at = full.find(message["content"], len(prompt))
                if not full.startswith(prompt) or at < 0:
                    continue
                header = full[len(prompt) : at]
                if reasoning := message.get("reasoning_content"):
                    header = header.replace(reasoning, "", 1)
                if any(control in header for control in controls):
                    found.add(bare(header))
        except Exception:  # a probe the template refuses (tool calls, a role): it shows nothing
            continue
    return frozenset(found)


_CALL, _ARGUMENT, _VALUE, _RESULT = "sftkit_probe_call", "sftkit_probe_argument", "sftkit probe value", "sftkit probe result"
# A probe turn's tool call, its keys in canonical (sorted) order, as rows store them
_PROBE_CALL = {"function": {"arguments": {_ARGUMENT: _VALUE}, "name": _CALL}, "type": "function"}


def call_leads(
    template: Template,
    variables: dict[str, Any],
    controls: Sequence[str],
    reasoning_field: bool,
    arguments_as_text: bool,
    limits=(None, None),
) -> dict[tuple[bool, bool], frozenset[str]] | None:
    """What a template writes in a calling turn with no words before its first call's name:
    Mistral's ``[TOOL_CALLS] [{"name": "``, Qwen3's ``<tool_call>\n{"name": "`` (after
    ``<think>\n\n</think>\n\n`` on the last turn), gpt-oss's ``<|channel|>commentary to=functions.``.

    :func:`~pipeline.masking.verify.span_matches` allows exactly these texts (whitespace aside,
    reasoning taken out) before the first call's name in such a turn's trained span, so a span
    that starts early (taking in the prompt) or late (missing ``<tool_call>``) fails.

    Found by rendering calling turns last, twice in a row and answered, in a second exchange and
    before a later question, with and without reasoning, within ``limits``: each lead is the text
    between where the rendering parts from the generation prompt of the messages before the turn
    (:func:`~pipeline.masking.locate.parting_point`; DeepSeek-R1 prompts with ``<think>\n`` and
    renders a calling turn without it) and the call's name. Keyed by where the turn stands
    (:func:`lead_key`): DeepSeek-R1 writes ``<｜tool▁calls▁begin｜>`` before a conversation's first
    call only, Qwen3.5 closes a think block before a call no later question follows. ``None`` where
    no lead can be known (the template refuses calls, or writes a call's arguments before its
    name): such a turn is then checked for its names and end token only.
    """

    def calling(reasoning: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
        if reasoning:
            message["reasoning_content"] = _REASONING
        return message

    user, result, answer = (
        {"role": "user", "content": _QUESTION},
        {"role": "tool", "content": _RESULT},
        {"role": "assistant", "content": _ANSWER},
    )
    probes = []
    for c in [calling(False), calling(True)] if reasoning_field else [calling(False)]:
        # last, twice in a row and answered, in a second exchange (DeepSeek-R1 opens its call block once
        # a conversation), before a later question (Qwen3.5 opens a think block after the last one only)
        probes += [
            [user, c],
            [user, c, result, c, result, answer],
            [user, c, result, answer, user, c],
            [user, c, result, c, result, answer, user, answer],
        ]
    found: dict[tuple[bool, bool], set[str]] = {}
    prompts: dict[str, str | Exception] = {}  # the probes share their beginnings: each prompt rendered once
    for messages in probes:
        if arguments_as_text:
            messages = _arguments_as_text(messages)
        full = _rendered_or_error(template, variables, messages, limits)
        if isinstance(full, Exception):
            continue
        for index, message in enumerate(messages):
            if not message.get("tool_calls"):
                continue
            before = json.dumps(messages[:index], sort_keys=True)
            if before not in prompts:
                prompts[before] = _rendered_or_error(template, variables, messages[:index], limits, add_generation_prompt=True)
            prompt = prompts[before]
            if isinstance(prompt, Exception):
                continue
            start = parting_point(prompt, full, controls)
            at = full.find(_CALL, start)
            lead = full[start:at]
            if at < 0 or any(text in lead for text in (_QUESTION, _RESULT, _ANSWER)):
                continue  # this turn's call is not rendered here
            if _ARGUMENT in lead or _VALUE in lead:
                return None  # the arguments come first: what stands before the name depends on the row
            found.setdefault(lead_key(messages, index), set()).add(bare(lead.replace(_REASONING, "", 1)))
    if not found:
        return None
    every = frozenset().union(*found.values())  # a position never rendered: it may write any of them
    return {key: frozenset(found.get(key, every)) for key in _LEAD_KEYS}


_LEAD_KEYS = [(first, asked) for first in (True, False) for asked in (True, False)]


_KEPT_THINK = re.compile(r"<think>(\s*)" + re.escape(_REASONING) + r"(\s*)</think>")
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>")


def kept_reasoning_frame(template: Template, variables: dict[str, Any], limits=(None, None)) -> tuple[str, str] | None:
    """How a template writes a turn's reasoning where it keeps it: the whitespace it puts after
    ``<think>`` and before ``</think>`` (Qwen3 ``"\n"``, ``"\n"``; Kimi K2 Thinking none), or None
    where it writes reasoning in no think block (or refuses every probe).

    Kimi K2 Thinking renders every answer with an empty ``<think></think>``, the last one too,
    and keeps reasoning only in the calling turns after the last answer: the reasoning of an
    answer is written at inference, never in a rendering that holds the answer. ``per_turn``
    writes it into that empty block in this frame (:func:`reasoning_into_empty_block`). Found by
    rendering an answer and a calling turn with reasoning, last, within ``limits``."""
    user = {"role": "user", "content": _QUESTION}
    turns = [
        {"role": "assistant", "content": _ANSWER, "reasoning_content": _REASONING},
        {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL], "reasoning_content": _REASONING},
    ]
    for turn in turns:
        rendered = _rendered_or_error(template, variables, [user, turn], limits)
        if isinstance(rendered, str) and (kept := _KEPT_THINK.search(rendered)):
            return kept.group(1), kept.group(2)
    return None


def reasoning_into_empty_block(generated: str, reasoning: str, frame: tuple[str, str] | None) -> str | None:
    """``generated`` (an assistant turn as rendered) with ``reasoning`` written into the empty think
    block it opens with, in the template's ``frame``; None where it opens with no empty block."""
    empty = _EMPTY_THINK.match(generated)
    if empty is None or frame is None or not reasoning:
        return None
    lead = generated[: generated.index("<think>")]  # the whitespace before the block, kept
    return f"{lead}<think>{frame[0]}{reasoning}{frame[1]}</think>{generated[empty.end() :]}"


def next_message_stops(
    template: Template,
    variables: dict[str, Any],
    controls: Sequence[str],
    end_tokens: Sequence[str],
    arguments_as_text: bool,
    limits=(None, None),
) -> dict[str, str]:
    """The tokens a model stops with, for a template that writes no end-of-turn marker of its own:
    GLM-4.5 closes an assistant turn with the next message's role token, ``<|user|>`` after an
    answer and ``<|observation|>`` after a tool call (its generation config stops on both), and
    writes nothing after a conversation's last turn.

    Returns ``{"answer": token, "call": token}`` (the call's may be missing), or ``{}``. Found by
    rendering a question, an answer and a second question (and a calling turn with its result)
    within ``limits``: the template must write nothing after the answer when it is last, and only
    whitespace before the next message's first token, which must be a control token and one of
    :data:`~pipeline.templates.KNOWN_NEXT_MESSAGE_STOPS`. Anything else there (an end token,
    a marker of the template's own, a header token some other model does not stop on) gives
    ``{}``. The masker trains the stop as the turn's end token, and appends it to a conversation
    whose last turn the template leaves open, as the model writes it there.
    """
    stops_known = [c for c in controls if c in KNOWN_NEXT_MESSAGE_STOPS]
    if not stops_known:
        return {}
    user, second = {"role": "user", "content": _QUESTION}, {"role": "user", "content": f"{_QUESTION} 2"}
    call = {"type": "function", "function": {"name": _CALL, "arguments": {_ARGUMENT: _VALUE}}}
    probes = {
        "answer": ([user, {"role": "assistant", "content": _ANSWER}], second),
        "call": ([user, {"role": "assistant", "content": "", "tool_calls": [call]}], {"role": "tool", "content": _RESULT}),
    }
    stops = {}
    for kind, (turn, following) in probes.items():
        if arguments_as_text:
            turn = _arguments_as_text(turn)
        alone = _rendered_or_error(template, variables, turn, limits)
        full = _rendered_or_error(template, variables, [*turn, following], limits)
        usable = not isinstance(alone, Exception) and not isinstance(full, Exception) and full.startswith(alone)
        own = alone.rfind(_ANSWER if kind == "answer" else _CALL) if usable else -1
        next_text = full.find(following["content"], len(alone)) if usable else -1
        if own < 0 or next_text < 0:
            if kind == "answer":
                return {}  # no answer rendered as written: nothing is known
            continue  # the template does not render calls, or their results
        if any(token in alone[own:] or token in full[len(alone) : next_text] for token in end_tokens):
            return {}  # the template closes its turns itself
        if kind == "answer" and alone[own + len(_ANSWER) :].strip():
            return {}  # it writes something of its own after the answer (a marker it does not list)
        header = full[len(alone) : next_text].lstrip()
        stop = next((token for token in stops_known if header.startswith(token)), None)
        if stop is None:
            if kind == "answer":
                return {}  # the next message opens with something the model is not known to stop on
            continue
        stops[kind] = stop
    return stops


def prompt_in_generation_blocks(template: Template, variables: dict[str, Any], limits=(None, None)) -> str | None:
    """The text of the generation prompt that a template's ``{% generation %}`` blocks take in, or
    None when they start where the prompt ends (or nothing can be told).

    A block is meant to hold what the model writes. SmolLM3's official template opens it before
    the assistant header, ``<|im_start|>assistant\n`` (and, in its no-think mode, the empty think
    block after it), which is its generation prompt: the model is given that text, never writes
    it, and a mask taken from the blocks would train it. Found by rendering a question and an
    answer with their spans, and the question with its generation prompt, within ``limits``: a
    block that opens before the two renderings part holds text of the prompt.
    """
    if not template.has_generation_tags:
        return None
    question = [{"role": "user", "content": _QUESTION}]
    spanned = _rendered_or_error(template, variables, [*question, {"role": "assistant", "content": _ANSWER}], limits, with_spans=True)
    prompt = _rendered_or_error(template, variables, question, limits, add_generation_prompt=True)
    if isinstance(spanned, Exception) or isinstance(prompt, Exception):
        return None
    rendered, spans = spanned
    parting = len(os.path.commonprefix([rendered, prompt]))  # the prompt may open a think block the answer lacks
    if not spans or spans[0][0] >= parting:
        return None
    return prompt[spans[0][0] : parting]


def lead_key(messages: Sequence[dict[str, Any]], index: int) -> tuple[bool, bool]:
    """Where a calling turn stands, as far as what a template writes before its call depends on it:
    (the conversation's first calling turn, a user question follows). Coarse on purpose: a finer
    key (the last message, say) would refuse turns whose template follows a rule the probes did
    not meet (gpt-oss keeps a calling turn's analysis until a final answer follows)."""
    first = not any(m.get("tool_calls") for m in messages[:index])
    return first, any(m.get("role") == "user" for m in messages[index + 1 :])


def _rendered_or_error(
    template: Template,
    variables: dict[str, Any],
    messages: list[dict[str, Any]],
    limits=(None, None),
    *,
    add_generation_prompt: bool = False,
    with_spans: bool = False,
):
    """The rendering of ``messages`` (with its generation spans: ``(text, spans)``), or the
    exception the template raised (or its overrun)."""
    seconds, max_chars = limits
    try:
        with time_limit(seconds):
            rendered = render(
                template, variables, messages, add_generation_prompt=add_generation_prompt, with_spans=with_spans, max_chars=max_chars
            )
            return rendered if with_spans else rendered[0]
    except Exception as exc:
        return exc
    except RenderTimeout:
        release()  # if it landed as the limit was being left
        return _Overrun(f"it took longer than {seconds:g} s to render a short conversation")
    except RenderTooLarge as exc:
        return _Overrun(f"its rendering of a short conversation: {exc}")


_PROBE_ID = "sftkprobe"  # nine letters: Mistral v0.3 refuses ids of any other length


def _with_call_ids(conversation: list[dict[str, Any]], call_id: str | None) -> list[dict[str, Any]]:
    """A probe conversation whose calls carry ``call_id`` (None: ``functions.NAME:INDEX``, Kimi
    K2's form) and whose tool results carry the id of the call they answer, as rows get them."""
    out = []
    for message in conversation:
        calls = message.get("tool_calls") or ()
        ids = [call_id or f"functions.{call['function']['name']}:{index}" for index, call in enumerate(calls)]
        out.append({**message, "tool_calls": [{**c, "id": i} for c, i in zip(calls, ids)]} if calls else dict(message))
    return give_results_call_ids(out)


def _call_not_named_by_its_id(messages: list[dict[str, Any]]) -> tuple[int, str | None, Any] | None:
    """(turn, name, id) of the first call whose id is not ``functions.NAME:INDEX`` for its function."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            call_id = call.get("id") if isinstance(call, dict) else None
            if not (isinstance(name, str) and isinstance(call_id, str) and re.fullmatch(rf"functions\.{re.escape(name)}:\d+", call_id)):
                return index, name, call_id
    return None


class _Overrun(Exception):
    """A probe rendering ran out of time or size: the template cannot serve any row."""


def _arguments_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose tool calls carry their arguments as JSON text instead of an object."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            as_text = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and not isinstance(fn.get("arguments"), str):
                    call = {**call, "function": {**fn, "arguments": json.dumps(fn.get("arguments"), ensure_ascii=False)}}
                as_text.append(call)
            message = {**message, "tool_calls": as_text}
        out.append(message)
    return out


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system, rest = messages[0], list(messages[1:])
    for i, message in enumerate(rest):
        if message["role"] == "user":
            rest[i] = {**message, "content": f"{system['content']}\n\n{message['content']}"}
            return rest
    return rest

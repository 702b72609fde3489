"""gpt-oss's harmony template (tests/chat_templates/gpt_oss.jinja): what is trained, turn by turn.

The template is the field's least prefix-stable: reasoning goes to an analysis message and only
for the last turn, the last turn ends with <|return|> and earlier ones with <|end|>, a tool call is
a message of its own ending with <|call|>, tool results are JSON-quoted, only a turn's first call is
rendered and today's date is printed. These tests hold sftkit to what the model writes after its
generation prompt ``<|start|>assistant``, with the template's own text and no generation tags.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from pipeline.formats import to_conversation
from pipeline.masking import Encoded
from pipeline.masking.verify import span_matches
from pipeline.stage import Drop
from tests.chat_templates.models import conversation
from tests.pipeline.test_template_policies import fast_config, masker_for, write_records

ANSWER = "<|channel|>final<|message|>"
ANALYSIS = "<|channel|>analysis<|message|>"


def texts(tokenizer, encoded: Encoded) -> tuple[str, str]:
    """(the row's text, its trained text), control tokens spelled out."""
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    trained = [i for i, label in zip(ids, labels) if label != -100]
    return tokenizer.decode(ids, skip_special_tokens=False), tokenizer.decode(trained, skip_special_tokens=False)


def encoded(masker, messages, tools=None) -> Encoded:
    result = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(result, Encoded), result
    return result


def test_reasoning_goes_to_the_analysis_channel_of_the_last_turn(bpe_tokenizer):
    tokenizer, masker = masker_for("gpt_oss", bpe_tokenizer)
    text, trained = texts(tokenizer, encoded(masker, *conversation("reasoning")))
    assert "<think>" not in text  # never inlined as a think block: the template reads `thinking`
    assert "12 * 12 = 144." not in text  # earlier turns' reasoning is dropped, as the template does
    assert trained == (
        f"{ANSWER}144<|end|>"  # an earlier turn: its answer and <|end|>
        f"{ANALYSIS}13 * 13 = 169.<|end|><|start|>assistant{ANSWER}169<|return|>"  # the last: analysis, answer, <|return|>
    )
    assert "Current date: 2024-07-26" in text  # the template asks the clock: sftkit pins the day


def test_the_generation_prompt_is_never_trained(bpe_tokenizer):
    tokenizer, masker = masker_for("gpt_oss", bpe_tokenizer)
    result = encoded(masker, *conversation("multi_turn"))
    ids, labels = result.input_ids.tolist(), result.labels.tolist()
    starts = [i for i in range(1, len(ids)) if labels[i] != -100 and labels[i - 1] == -100]
    assert len(starts) == 2
    for start in starts:  # each turn is trained from <|channel|> on: "<|start|>assistant" is the prompt's
        assert tokenizer.decode(ids[:start], skip_special_tokens=False).endswith("<|start|>assistant")
        assert tokenizer.convert_ids_to_tokens(ids[start]) == "<|channel|>"
    assert not result.render_mismatch


def test_per_turn_trains_each_turn_with_its_reasoning_as_at_inference(bpe_tokenizer):
    tokenizer, masker = masker_for("gpt_oss", bpe_tokenizer, reasoning="per_turn")
    messages, _ = conversation("reasoning")
    first = encoded(masker, messages[:2])
    _, trained = texts(tokenizer, first)
    assert trained == f"{ANALYSIS}12 * 12 = 144.<|end|><|start|>assistant{ANSWER}144<|return|>"
    assert not first.render_mismatch


def test_a_tool_call_is_trained_to_its_call_token(bpe_tokenizer):
    tokenizer, masker = masker_for("gpt_oss", bpe_tokenizer)
    messages, tools = conversation("tool_call")
    text, trained = texts(tokenizer, encoded(masker, messages, tools))
    call = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'
    assert trained == call + f"{ANSWER}It is 18 °C and cloudy in Paris.<|return|>"
    # the tool result is JSON-quoted by the template and not trained
    assert '<|message|>"{\\"temperature\\": 18, \\"unit\\": \\"celsius\\", \\"sky\\": \\"cloudy\\"}"<|end|>' in text


def test_a_calling_turns_words_are_trained_where_the_template_writes_them(bpe_tokenizer):
    """The template writes a calling turn's content as its analysis, and drops it once a later
    turn answers: the content is trained in the first case, absent in the second (as the
    template's own training text has it), and the call is trained in both."""
    tokenizer, masker = masker_for("gpt_oss", bpe_tokenizer)
    messages, tools = conversation("tool_call")
    messages[1]["content"] = "Let me check the weather."
    call = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'

    text, trained = texts(tokenizer, encoded(masker, messages[:2], tools))  # the call ends the conversation
    assert trained == f"{ANALYSIS}Let me check the weather.<|end|><|start|>assistant" + call

    text, trained = texts(tokenizer, encoded(masker, messages, tools))  # answered later
    assert "Let me check the weather." not in text
    assert trained.startswith(call)


def test_a_turn_with_two_calls_is_rejected_not_cut_to_one(bpe_tokenizer):
    _, masker = masker_for("gpt_oss", bpe_tokenizer)
    messages, tools = conversation("tool_call")
    second = json.loads(json.dumps(messages[1]["tool_calls"][0]))
    second["id"], second["function"]["arguments"] = "call_0002", {"city": "London", "unit": "celsius"}
    messages[1]["tool_calls"].append(second)
    messages.insert(3, {"role": "tool", "tool_call_id": "call_0002", "name": "get_weather", "content": '{"temperature": 9}'})
    result = masker.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(result, Drop)
    assert (result.stage, result.reason) == ("template", "template_drops_tool_calls")
    assert "assistant turn 1 makes 2 tool calls" in result.detail and "renders only the first call" in result.detail
    # a template that renders every call (Qwen3) keeps the row
    _, qwen3 = masker_for("qwen3", bpe_tokenizer)
    assert isinstance(qwen3.encode(*to_conversation({"messages": messages, "tools": tools})), Encoded)


@pytest.mark.parametrize(
    "decoded",
    [
        f"{ANSWER}Seven.<|end|>",  # the turn as the model writes it
        f"  {ANSWER} Seven. <|end|>",  # spaces aside
    ],
)
def test_the_span_check_allows_the_templates_own_header(bpe_tokenizer, decoded):
    _, masker = masker_for("gpt_oss", bpe_tokenizer)
    assert ANSWER in masker.turn_markup
    assert span_matches(decoded, {"role": "assistant", "content": "Seven."}, "<|end|>", markup=masker.turn_markup)


@pytest.mark.parametrize(
    "decoded",
    [
        f"<|start|>assistant{ANSWER}Seven.<|end|>",  # one token early: the prompt's header trained
        f"assistant{ANSWER}Seven.<|end|>",
        f"<|end|>{ANSWER}Seven.<|end|>",
        f"{ANALYSIS}Seven.<|end|><|start|>user<|message|>Hi<|end|>{ANSWER}Seven.<|end|>",
        "<|channel|>commentary<|message|>Seven.<|end|>",  # markup the template never writes before an answer
    ],
)
def test_the_span_check_refuses_anything_else_around_the_content(bpe_tokenizer, decoded):
    _, masker = masker_for("gpt_oss", bpe_tokenizer)
    assert not span_matches(decoded, {"role": "assistant", "content": "Seven."}, "<|end|>", markup=masker.turn_markup)


def test_templates_without_header_markup_keep_the_strict_check(bpe_tokenizer):
    for model in ("llama31", "deepseek_r1", "mistral", "phi3"):
        _, masker = masker_for(model, bpe_tokenizer)
        assert masker.turn_markup == frozenset(), model


def test_prepare_writes_harmony_shards(tmp_path, bpe_tokenizer):
    """End to end through ``prepare``: a gpt-oss tokenizer folder, reasoning and tool data in, shards
    whose trained tokens are the harmony turns, the two-call record in rejected/ with its reason."""
    from pipeline.steps import prepare
    from tests.chat_templates.models import tokenizer_for

    tokenizer = tokenizer_for("gpt_oss", bpe_tokenizer)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    two_calls, tools = conversation("tool_call")
    two_calls[1]["tool_calls"].append({**two_calls[1]["tool_calls"][0], "id": "call_0002"})
    two_calls.insert(3, {"role": "tool", "tool_call_id": "call_0002", "name": "get_weather", "content": "{}"})
    records = [
        {"messages": conversation(name)[0], **({"tools": t} if (t := conversation(name)[1]) else {})}
        for name in ("reasoning", "tool_call", "multi_turn")
    ]
    records.append({"messages": two_calls, "tools": tools})
    source = write_records(tmp_path / "chat.jsonl", records)
    manifest = prepare([str(source)], str(tmp_path / "tokenizer"), tmp_path / "data", fast_config())
    counts = manifest["counts"]
    assert counts["kept"] == 3 and counts["rejected"] == {"template": {"template_drops_tool_calls": 1}}, counts
    assert counts["render_mismatch"] == 0
    shards = pl.read_parquet(tmp_path / "data" / manifest["shards"][0]["path"])
    trained = sorted(
        tokenizer.decode([i for i, label in zip(ids, labels) if label != -100], skip_special_tokens=False)
        for ids, labels in zip(shards["input_ids"].to_list(), shards["labels"].to_list())
    )
    assert f"{ANSWER}144<|end|>{ANALYSIS}13 * 13 = 169.<|end|><|start|>assistant{ANSWER}169<|return|>" in trained
    assert all(text.endswith(("<|return|>", "<|call|>")) for text in trained), trained


# --- found by probing the change: each once gave a wrong mask, lost text or refused a good row ----
def _tool_row(content: str, name: str = "get_weather", answer: str | None = "It is 18.") -> tuple:
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": {"city": "Paris"}}}
    turn = {"role": "assistant", "content": content, "tool_calls": [call]}
    messages = [{"role": "user", "content": "Weather in Paris?"}, turn]
    if answer is not None:  # None: the conversation ends with the call
        messages += [{"role": "tool", "tool_call_id": "c1", "content": '{"t": 18}'}, {"role": "assistant", "content": answer}]
    tool = {"type": "function", "function": {"name": name, "description": "d", "parameters": {"type": "object", "properties": {}}}}
    return to_conversation({"messages": messages, "tools": [tool]})


def _same_as_tagged(base_tokenizer, row, **policy) -> tuple[str, str]:
    """(text, trained text) of ``row``, after checking that locating equals the tagged twin."""
    from tests.pipeline.test_real_templates import maskers

    locate, tagged = maskers("gpt_oss", base_tokenizer, **policy)
    got, want = locate.encode(*row), tagged.encode(*row)
    assert isinstance(got, Encoded) and isinstance(want, Encoded), (got, want)
    assert got.input_ids.tolist() == want.input_ids.tolist() and got.labels.tolist() == want.labels.tolist()
    return texts(locate.tokenizer, got)


@pytest.mark.parametrize("name", ["analysis", "message", "channel", "a"])
def test_a_call_to_a_tool_named_like_the_templates_own_words_is_trained_to_its_call_token(name, bpe_tokenizer):
    # no words before the call: its end is found after the call's name AND arguments, not at the
    # first "analysis" of the template's own header
    _, trained = _same_as_tagged(bpe_tokenizer, _tool_row("\n", name=name, answer=None))
    assert trained.endswith(f'to=functions.{name}<|channel|>commentary json<|message|>{{"city": "Paris"}}<|call|>'), trained


def test_a_calling_turns_words_repeated_later_are_still_not_looked_for_where_the_template_dropped_them(bpe_tokenizer):
    _, trained = _same_as_tagged(bpe_tokenizer, _tool_row("Sure.", answer="Sure. It is 18."))
    assert trained.startswith(" to=functions.get_weather")


def test_reasoning_that_reads_like_the_header_is_trained(bpe_tokenizer):
    messages, _ = conversation("reasoning")
    messages[-1]["reasoning_content"] = "analysis"
    _, trained = _same_as_tagged(bpe_tokenizer, to_conversation({"messages": messages}))
    assert trained.endswith(f"{ANALYSIS}analysis<|end|><|start|>assistant{ANSWER}169<|return|>")


def _call_turn(content: str) -> dict:
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def test_templates_that_drop_a_calling_turns_words_otherwise_do_not_lose_them_silently(bpe_tokenizer):
    """Llama-3.1 writes no calling turn's content at all, and DeepSeek-R1 loses a second calling
    turn's content with its header (its ns.is_first flag); neither is gpt-oss's rule (words kept
    until a later turn answers), so such rows are still refused, not trained without their words."""
    _, llama = masker_for("llama31", bpe_tokenizer)
    messages, tools = conversation("tool_call")
    messages[1]["content"] = "Let me check the weather."
    assert not llama.roles.drops_answered_call_text
    refused = llama.encode(*to_conversation({"messages": messages, "tools": tools}))
    assert isinstance(refused, Drop) and (refused.stage, refused.reason) == ("template", "template_drops_content")
    assert "assistant turn 1 has words beside its tool calls" in refused.detail
    messages[1]["content"] = ""  # a call alone is rendered whole, and kept
    assert isinstance(llama.encode(*to_conversation({"messages": messages, "tools": tools})), Encoded)

    _, deepseek = masker_for("deepseek_r1", bpe_tokenizer)
    user, tool = {"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c", "content": "{}"}
    messages = [user, _call_turn("A."), tool, {"role": "assistant", "content": "B."}, {"role": "user", "content": "more"}]
    messages += [_call_turn("Checking London."), tool, {"role": "assistant", "content": "D."}]
    assert not deepseek.roles.drops_answered_call_text
    assert isinstance(deepseek.encode(*to_conversation({"messages": messages, "tools": tools})), Drop)


def test_a_template_without_a_generation_prompt_gets_no_header_allowance(bpe_tokenizer):
    from pipeline.masking import Masker
    from pipeline.templates import Template
    from tests.chat_templates.models import tokenizer_for

    source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    masker = Masker(tokenizer_for("qwen3", bpe_tokenizer), Template("no-prompt", source), max_length=4096, span_method="locate")
    assert masker.turn_markup == frozenset()  # "<|im_start|>assistant" is the turn's header, never trained


def test_a_namespace_flag_named_thinking_is_not_a_reasoning_field():
    from pipeline.masking.policies import ReasoningShape
    from pipeline.templates import Template

    flag = "{% set ns = namespace(thinking=false) %}{% set ns.thinking = true %}{{ messages[0].content }}"
    assert not ReasoningShape(Template("flag", flag), "template").reads_field
    for reads in ("{{ message.thinking }}", "{{ m['thinking'] }}", '{% if "thinking" in message %}{% endif %}'):
        assert ReasoningShape(Template("reads", reads), "template").reads_field, reads


@pytest.mark.parametrize("words", ["analysis", "message", "a"])
def test_a_calling_turns_words_that_also_stand_in_the_header_are_found_where_they_are(words, bpe_tokenizer):
    # the call ends the conversation, so its words are written (as the turn's analysis)
    _, trained = _same_as_tagged(bpe_tokenizer, _tool_row(words, answer=None))
    assert trained.startswith(f"{ANALYSIS}{words}<|end|><|start|>assistant to=functions.get_weather"), trained


def test_per_turn_trains_a_calling_turns_words_that_read_like_the_header(bpe_tokenizer):
    # per_turn cuts the conversation at each trained turn: the calling turn's row ends with it
    _, trained = _same_as_tagged(bpe_tokenizer, _tool_row("message", answer=None), reasoning="per_turn")
    assert trained.startswith(f"{ANALYSIS}message<|end|>"), trained

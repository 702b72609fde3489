"""Quality filters: each filter keeps what it should and drops what it should, in English and
Chinese; the stage end to end on real Parquet; switching filters and thresholds from the config."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import QualityConfig, SFTConfig
from pipeline.quality import FILTERS, build_filters, passes, quality_stage
from pipeline.quality.base import FilterChain


def conv(*turns, tools=None):
    """A canonical record from (role, content) pairs or ready-made message dicts."""
    messages = [t if isinstance(t, dict) else schema.make_message(*t) for t in turns]
    return {"messages": messages, "tools": tools}


def qa(prompt, response):
    return conv(("user", prompt), ("assistant", response))


def only(name, **params):
    """The one filter ``name`` built from a config, with ``params``."""
    config = QualityConfig(filters={n: (params or True) if n == name else False for n in FILTERS})
    (flt,) = build_filters(config)
    return flt


def reason(flt, record):
    drop = flt.check(record)
    return drop.reason if drop else None


LONG_EN = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into "
    "chemical energy. In the chloroplasts, chlorophyll absorbs sunlight, which drives the splitting "
    "of water into oxygen, protons and electrons. The energy captured this way is stored in ATP and "
    "NADPH, and the Calvin cycle then uses it to fix carbon dioxide from the air into sugars that the "
    "plant uses for growth. Oxygen is released as a by-product, which is why forests matter so much."
)
LONG_ZH = (
    "光合作用是绿色植物、藻类和某些细菌利用光能把二氧化碳和水转化为有机物并释放氧气的过程。"
    "叶绿体中的叶绿素吸收阳光，推动水的分解，产生氧气、质子和电子。捕获的能量储存在三磷酸腺苷"
    "和还原型辅酶中，随后卡尔文循环利用这些能量把空气中的二氧化碳固定成糖类，供植物生长使用。"
    "这个过程维持了地球大气中的氧气含量，也是几乎所有食物链的能量来源，因此森林和海洋浮游植物非常重要。"
)


# --- missing instruction ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "record",
    [
        conv(("system", "You are helpful."), ("assistant", "Hello! How can I help?")),
        conv(("user", "   "), ("assistant", "The capital of Australia is Canberra.")),
        conv(("system", "你是一个助手。"), ("assistant", "你好！有什么可以帮你？")),
        conv(("assistant", "北京是中国的首都。"), ("user", "谢谢")),
    ],
)
def test_missing_instruction_drops_a_reply_to_nothing(record):
    assert reason(only("missing_instruction"), record) == "missing_instruction"


@pytest.mark.parametrize(
    "record",
    [
        conv(("system", "Be brief."), ("user", "Capital of Australia?"), ("assistant", "Canberra.")),
        qa("中国的首都是哪里？", "北京。"),
    ],
)
def test_missing_instruction_keeps_answered_prompts(record):
    assert only("missing_instruction").check(record) is None


# --- empty / placeholder responses -----------------------------------------------------------
@pytest.mark.parametrize(
    "record, expected",
    [
        (qa("Summarise the text.", ""), "empty_response"),
        (qa("Summarise the text.", " \n\t "), "empty_response"),
        (qa("What is the output?", "N/A"), "placeholder_response"),
        (qa("List the side effects.", "None."), "placeholder_response"),
        (qa("Continue the story.", "..."), "placeholder_response"),
        (qa("请总结这段话。", "无"), "placeholder_response"),
        (qa("这篇文章的作者是谁？", "暂无"), "placeholder_response"),
        (conv(("user", "你好")), "no_response"),
        (conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "And?"), ("assistant", "")), "empty_response"),
    ],
)
def test_empty_response_drops_empty_and_placeholder_answers(record, expected):
    assert reason(only("empty_response"), record) == expected


@pytest.mark.parametrize(
    "record",
    [
        qa("What is the capital of Australia?", "Canberra."),
        qa("2 + 2 = ?", "4"),
        qa("一加一等于几？", "二。"),
        qa("有没有更便宜的选项？", "没有。"),
        # a tool-calling turn carries no text and is not an empty response
        conv(
            ("user", "What's the weather in Paris?"),
            schema.make_message(
                "assistant", "", tool_calls=[{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
            ),
            ("tool", '{"temp": 21}'),
            ("assistant", "It is 21 °C in Paris."),
            tools='[{"name": "weather"}]',
        ),
        # an untrained (context-only) empty assistant turn is not judged
        conv(("user", "Hi"), schema.make_message("assistant", "", train=False), ("user", "Hello?"), ("assistant", "Hi there!")),
    ],
)
def test_empty_response_keeps_short_answers_and_tool_calls(record):
    assert only("empty_response").check(record) is None


def test_placeholder_list_is_configurable():
    record = qa("Any remarks?", "None")
    assert reason(only("empty_response", placeholders=["n/a"]), record) is None
    assert reason(only("empty_response", extra_placeholders=["see above"]), qa("Q?", "See above")) == "placeholder_response"


# --- length ----------------------------------------------------------------------------------
def test_length_drops_overlong_turns_and_keeps_short_answers():
    flt = only("length")
    assert reason(flt, qa("Write an essay.", "word " * 12_000)) == "response_too_long"
    assert reason(flt, qa("汉" * 60_000, "好的。")) == "prompt_too_long"
    assert reason(flt, qa("", "An answer to nothing.")) == "prompt_too_short"
    assert flt.check(qa("Capital of Australia?", "Canberra.")) is None
    assert flt.check(qa("法国的首都是哪里？", "巴黎。")) is None


def test_length_bounds_are_configurable():
    flt = only("length", min_response_chars=20, max_prompt_chars=30)
    assert reason(flt, qa("Capital of Australia?", "Canberra.")) == "response_too_short"
    assert (
        reason(flt, qa("请详细解释一下相对论的基本原理以及它在现代物理学中的地位和意义。", "相对论包括狭义相对论和广义相对论两部分。"))
        == "prompt_too_long"
    )


def test_response_prompt_ratio_flags_lost_instructions_but_not_short_exchanges():
    flt = only("length")
    assert reason(flt, qa("ok", "Some long essay text. " * 200)) == "response_prompt_ratio"
    assert reason(flt, qa("好", "这是一段很长的回答。" * 300)) == "response_prompt_ratio"
    assert reason(flt, qa("Review: " + "The plot was thin and the acting wooden. " * 600, "x")) == "response_prompt_ratio"
    # classification of a long text with a one-word label stays within the ratio bounds
    assert flt.check(qa("Classify the sentiment: " + "I loved every minute of it. " * 100, "Positive")) is None
    assert flt.check(qa("Write a poem about the sea.", "The sea, the sea, it calls to me. " * 40)) is None
    assert reason(only("length", max_ratio=None, min_ratio=None), qa("ok", "Some long essay text. " * 200)) is None


def test_token_bounds_use_the_given_tokenizer(bpe_tokenizer):
    config = QualityConfig(filters={n: ({"max_response_tokens": 5} if n == "length" else False) for n in FILTERS})
    (flt,) = build_filters(config, tokenizer=bpe_tokenizer)
    drop = flt.check(qa("Count to ten.", "one two three four five six seven eight nine ten"))
    assert drop.reason == "response_too_long" and "tokens" in drop.detail
    assert flt.check(qa("Count to two.", "one two")) is None


def test_token_bounds_without_a_tokenizer_are_an_error():
    with pytest.raises(ValueError, match="token bounds but no tokenizer"):
        only("length", max_response_tokens=10)


# --- refusals and AI disclaimers -------------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        ("As an AI language model, I do not have personal opinions on politics.", "ai_disclaimer"),
        ("I'm sorry, but as an AI, I cannot browse the internet for current prices.", "ai_disclaimer"),
        ("Sure! Here is the plan. As an AI language model I must add that I cannot verify it.", "ai_disclaimer"),
        ("As an AI, I don’t have feelings, but here are some thoughts on the question.", "ai_disclaimer"),
        ("I'm sorry, but I can't help with that request.", "refusal"),
        ("I cannot assist with creating malware.", "refusal"),
        ("作为一个人工智能语言模型，我无法提供个人观点。", "ai_disclaimer"),
        ("作为AI，我没有个人情感，但我可以给你一些建议。", "ai_disclaimer"),
        ("抱歉，我无法回答这个问题。", "refusal"),
        ("很抱歉，我不能帮你完成这个任务。", "refusal"),
        ("对不起，我没办法评价这个人。", "refusal"),
        ("我无法提供这类信息。", "refusal"),
    ],
)
def test_refusal_drops_disclaimers_and_refusals(response, expected):
    assert reason(only("refusal"), qa("Question?", response)) == expected


@pytest.mark.parametrize(
    "response",
    [
        "I am Vicuna, a language model trained by researchers from LMSYS.",
        "The function returns None when the user cannot be found, so check for it first.",
        "I will not succeed unless I practise daily — a line from the poem's second stanza.",
        "AI language models such as GPT are trained on large text corpora.",
        "作为一名老师，我认为阅读习惯最重要。",
        "人工智能语言模型是一种基于大量文本训练的程序。",
        "如果服务器无法连接，请先检查网络设置。",
        "我不会游泳，但我的哥哥游得很好。",
    ],
)
def test_refusal_keeps_ordinary_answers(response):
    assert only("refusal").check(qa("Question?", response)) is None


def test_refusal_phrase_list_is_extendable_from_the_config():
    config = QualityConfig(filters={n: n == "refusal" for n in FILTERS}, refusal_phrases=["My knowledge cutoff", "我的知识截止"])
    (flt,) = build_filters(config)
    assert reason(flt, qa("Latest news?", "My knowledge cutoff is 2021, so here is what I know.")) == "ai_disclaimer"
    assert reason(flt, qa("最新消息？", "我的知识截止到2021年。")) == "ai_disclaimer"


def test_tool_conversations_may_decline_what_their_tools_cannot_do():
    record = conv(
        ("user", "Can you order me a pizza?"),
        ("assistant", "I'm sorry, but as an AI, I don't have the capability to order a pizza. I can search recipes."),
        tools='[{"name": "search_recipes"}]',
    )
    assert only("refusal").check(record) is None
    assert reason(only("refusal", exempt_tool_conversations=False), record) == "ai_disclaimer"
    record["messages"][1]["content"] = "As an AI language model, I cannot order food."
    assert reason(only("refusal"), record) == "ai_disclaimer"  # the phrase list always applies


# --- garbage ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record, expected",
    [
        (qa("Describe the file.", "The header\x00\x01\x02 is broken here."), "control_characters"),
        (qa("描述文件。", "文件头\x1b\x07损坏了。"), "control_characters"),
        (qa("Translate.", "Caf\ufffd and cr\ufffdpe"), "control_characters"),
        (qa("Describe Paris.", "CafÃ© au lait is a popular drink in ParisÃ¢â‚¬â„¢s cafÃ©s."), "mojibake"),
        (qa("翻译一下。", "ä¸­æ–‡æ˜¯ä¸€ç§è¯­è¨€"), "mojibake"),
        (qa("Say something.", "@#$%^&*()!~`<>?/\\|{}[];:'\",.-_=+ " * 4), "symbol_soup"),
        (qa("说点什么。", "【】《》！？。，、；：“”‘’（）…—～·" * 5), "symbol_soup"),
        (qa("Numbers?", "1234567890 0987654321 " * 8 + "!!"), "low_letter_share"),
        (qa("###### ^^^^^ %%%%% ?????? &&&&&& ****** ((((((( )))))))) ======= ~~~~~~~~", "ok then"), "symbol_soup"),
    ],
)
def test_garbage_drops_broken_text(record, expected):
    assert reason(only("garbage"), record) == expected


@pytest.mark.parametrize(
    "response",
    [
        "0, 1, 1, 2, 3, 5, 8, 13, 21, 34",
        "Perimeter = 4 + 6 + 8\n          = 18",
        "```python\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n```",
        '{"name": "Alice", "age": 30, "languages": ["en", "fr"], "active": true}',
        "| Name | Age |\n|------|-----|\n| Ann  | 31  |\n| Bob  | 27  |",
        r"$x = \frac{-b \pm \sqrt{b^2 - 4ac}}{2a}$, so for $a=1, b=-3, c=2$ the roots are $1$ and $2$.",
        "Il a commandé un café crème à Besançon; naïve façade, déjà vu, Ærø, Øresund.",
        LONG_ZH,
        "设 $f(x) = x^2 + 2x + 1$，则 $f(x) = (x+1)^2 \\geq 0$。",
    ],
)
def test_garbage_keeps_code_math_tables_and_accents(response):
    assert only("garbage").check(qa("Question?", response)) is None


@pytest.mark.parametrize("response", ["...", "!!!???", "—", "？！", "$", "%%%", "** **", ":)", "…！", "。。。", "\u200b"])
def test_garbage_drops_a_response_without_a_letter_or_digit_at_any_length(response):
    drop = only("garbage").check(qa("What is the answer?", response))
    assert drop is not None and drop.reason == "no_letters"
    assert drop.detail == f"assistant turn 1 has no letter or digit: {response.strip()!r}"


@pytest.mark.parametrize(
    "response",
    ["42", "$5.00", "是", "OK", "٤٢", "ок", "はい", "네", "π", "x", "½", "Ⅻ", "🙂", "🙂🙂", "👍🎉!"],
)
def test_garbage_keeps_short_answers_with_a_letter_digit_or_emoji(response):
    assert only("garbage").check(qa("Answer briefly.", response)) is None


def test_garbage_judges_letterless_text_in_responses_only():
    assert only("garbage").check(conv(("user", "Here is the report."), ("user", "???"), ("assistant", "Could you say more?"))) is None
    untrained = schema.make_message("assistant", "...", train=False)
    assert only("garbage").check(conv(("user", "Hi"), untrained, ("user", "And?"), ("assistant", "Yes."))) is None
    # a placeholder is still reported as one: empty_response runs before garbage
    assert FilterChain(build_filters(QualityConfig())).apply(qa("Answer?", "...")).reason == "placeholder_response"


def test_garbage_thresholds_are_configurable():
    record = qa("Question?", "Perimeter = 4 + 6 + 8 = 18; area = 6 * 8 / 2 = 24 (units) => total = 42 ...")
    assert only("garbage").check(record) is None
    assert reason(only("garbage", min_chars=10, min_letter_share=0.5), record) == "low_letter_share"


# --- repetition ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        ("I love you so much.\n" * 20, "repeated_lines"),
        ("The answer is below.\n\n" + "Please try again later, the service is busy.\n\n" * 6, "repeated_paragraphs"),
        ("and then the cat sat and then the cat sat " * 15, "top_ngram"),
        ("我爱你，我爱你，我爱你，" * 20, "top_ngram"),
        (LONG_EN + " " + " ".join([LONG_EN.split(".")[1]] * 6), "repeated_ngrams"),
        (LONG_ZH + "光合作用把光能转化为化学能并释放出氧气" * 8, "repeated_ngrams"),
        ("人工智能正在改变世界。\n" * 12, "repeated_lines"),
    ],
)
def test_repetition_drops_degenerate_loops(response, expected):
    assert reason(only("repetition"), qa("Tell me something.", response)) == expected


@pytest.mark.parametrize(
    "response",
    [
        LONG_EN,
        LONG_ZH,
        "Yes yes yes.",  # too short to judge
        # a song with a repeated chorus
        "(Verse 1)\nIn the forest and the sea\nThere are creatures great and small\nBut now they're in jeopardy\n\n"
        "(Chorus)\nEndangered species, hear their cries\nTheir homes are vanishing before our eyes\n\n"
        "(Verse 2)\nFrom the mighty elephant\nTo the tiny bee\nThey all have a role to play\nIn our ecology\n\n"
        "(Chorus)\nEndangered species, hear their cries\nTheir homes are vanishing before our eyes",
        # templated list items
        "There are several comparison operators in most programming languages, including:\n\n"
        + "\n".join(
            f"* `{op}` ({name}) - checks if the value of the left operand is {name} the value of the right operand."
            for op, name in [("<", "less than"), (">", "greater than"), ("==", "equal to"), ("!=", "not equal to")]
        )
        + "\n\nThe result of a comparison is a Boolean value, and the exact syntax varies between languages.",
        # code with repeated braces and fences
        "```js\nfunction a() {\n  return 1;\n}\nfunction b() {\n  return 2;\n}\nfunction c() {\n  return 3;\n}\n```\n"
        "Each function returns its own constant, so calling a, b and c in turn prints one, two and three.",
        "1. 准备面粉、鸡蛋和牛奶。\n2. 把面粉和鸡蛋混合均匀。\n3. 慢慢加入牛奶并搅拌。\n4. 平底锅加热后倒入面糊。\n"
        "5. 煎到两面金黄即可。\n6. 根据口味加入果酱或蜂蜜，趁热食用味道最好。",
    ],
)
def test_repetition_keeps_songs_lists_code_and_prose(response):
    assert only("repetition").check(qa("Tell me something.", response)) is None


def test_repetition_thresholds_are_configurable():
    record = qa("Q?", LONG_EN + " " + LONG_EN.split(".")[1])
    assert only("repetition").check(record) is None
    assert reason(only("repetition", duplicate_ngram_shares={5: 0.15}), record) == "repeated_ngrams"
    assert only("repetition", min_tokens=10_000).check(qa("Q?", "I love you so much.\n" * 20)) is None


# --- PII -------------------------------------------------------------------------------------
PII_RECORD_TURNS = [
    ("user", "Mail john.doe@gmail.com or call (415) 555-0132, server at 203.0.113.7 or 8.8.4.4."),
    ("assistant", "Noted: john.doe@gmail.com, +44 20 7946 0958, and 2001:4860:4860::8888."),
    ("user", "我的手机号是13812345678，座机010-62345678，邮箱zhang.san@qq.com或 zhangsan@163.com，服务器地址是8.8.8.8。"),
    ("assistant", "好的，已记录 138-1234-5678。"),
]


def test_pii_redacts_in_place_and_counts():
    flt = only("pii")
    record = conv(*PII_RECORD_TURNS)
    assert flt.check(record) is None
    texts = [m["content"] for m in record["messages"]]
    assert texts[0] == "Mail <EMAIL> or call <PHONE>, server at 203.0.113.7 or <IP_ADDRESS>."
    assert texts[1] == "Noted: <EMAIL>, <PHONE>, and <IP_ADDRESS>."
    assert "13812345678" not in texts[2] and "62345678" not in texts[2] and "zhangsan@163.com" not in texts[2]
    assert texts[2].endswith("邮箱<EMAIL>或 <EMAIL>，服务器地址是<IP_ADDRESS>。")
    assert texts[3] == "好的，已记录 <PHONE>。"
    assert flt.summary()["redactions"] == {"email": 4, "ip": 3, "phone": 5}


def test_pii_drop_mode_rejects_the_record_unchanged():
    config = QualityConfig(filters={n: n == "pii" for n in FILTERS}, pii="drop")
    (flt,) = build_filters(config)
    record = conv(*PII_RECORD_TURNS)
    drop = flt.check(record)
    assert drop.reason == "pii" and "email" in drop.detail
    assert record["messages"][0]["content"] == PII_RECORD_TURNS[0][1]


def test_pii_redacts_tool_call_arguments():
    record = conv(
        ("user", "Email my boss at boss@acme.io"),
        schema.make_message(
            "assistant", "", tool_calls=[{"type": "function", "function": {"name": "send", "arguments": {"to": "boss@acme.io"}}}]
        ),
    )
    only("pii").check(record)
    assert json.loads(record["messages"][1]["tool_calls"])[0]["function"]["arguments"]["to"] == "<EMAIL>"


@pytest.mark.parametrize(
    "text",
    [
        "Set the router to 192.168.1.1 and the DNS to 127.0.0.1; use ::1 for IPv6 loopback.",
        "Write to user@example.com in the docs.",
        "The population grew to 15,000,000 by 2023-01-15; version 3.11.4 fixed it.",
        "π ≈ 3.14159265358979, and 2^40 = 1099511627776.",
        "In C++ use std::vector<int> and a::b::c; the time is 12:30:45.",
        "订单号 20231115093012 已发货，重量 1.25 公斤。",
    ],
)
def test_pii_leaves_non_personal_numbers_and_addresses(text):
    record = qa("Q?", text)
    only("pii").check(record)
    assert record["messages"][1]["content"] == text


def test_pii_off_builds_no_pii_filter():
    assert "pii" not in [f.name for f in build_filters(QualityConfig(pii="off"))]


# --- decontamination -------------------------------------------------------------------------
@pytest.fixture
def eval_files(tmp_path):
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        json.dumps({"question": "A train leaves the station at noon travelling at sixty miles per hour towards the city", "answer": "B"})
        + "\n\n"
        + json.dumps({"nested": {"passages": ["长江是中国最长的河流，全长约六千三百公里，流经十一个省级行政区。"]}}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    plain = tmp_path / "eval.json"
    plain.write_text(json.dumps([{"text": "What is the capital of France?"}]), encoding="utf-8")
    return [jsonl, plain]


def test_decontamination_drops_records_sharing_a_13_gram(eval_files):
    config = QualityConfig(filters={n: n == "decontaminate" for n in FILTERS}, decontaminate=eval_files)
    (flt,) = build_filters(config)
    copied = qa("Solve: a TRAIN leaves the station at noon, travelling at sixty miles per hour towards the city. When?", "At 2pm.")
    assert reason(flt, copied) == "contaminated"
    drop = flt.check(qa("讲讲长江。", "长江是中国最长的河流，全长约六千三百公里。"))
    assert drop.reason == "contaminated" and "长江是中国最长的河流全长约" in drop.detail
    assert flt.check(qa("A train leaves at noon.", "It arrives at two.")) is None
    assert flt.check(qa("What is the capital of France?", "Paris.")) is None  # shorter than 13 tokens
    assert flt.summary()["short_strings"] == 2  # "B" and the France question


def test_decontamination_ngram_is_configurable(eval_files):
    config = QualityConfig(filters={n: n == "decontaminate" for n in FILTERS}, decontaminate=eval_files, decontaminate_ngram=4)
    (flt,) = build_filters(config)
    assert reason(flt, qa("Tell me: what is the capital of France?", "Paris.")) == "contaminated"


def test_decontamination_reports_bad_evaluation_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "fine"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl line 2"):
        build_filters(QualityConfig(decontaminate=[broken]))
    with pytest.raises(ValueError, match="does not exist"):
        build_filters(QualityConfig(decontaminate=[tmp_path / "missing.json"]))


# --- configuration ---------------------------------------------------------------------------
def test_default_chain_runs_every_filter_but_decontamination():
    names = [f.name for f in build_filters(QualityConfig())]
    assert names == ["missing_instruction", "empty_response", "length", "garbage", "refusal", "repetition", "pii"]


def test_filters_switch_off_and_take_parameters_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "quality:\n  filters:\n    refusal: false\n    length:\n      max_response_chars: 10\n"
        "    repetition:\n      top_ngram_shares: {2: 0.9}\n",
        encoding="utf-8",
    )
    chain = build_filters(SFTConfig.from_yaml(path).quality)
    assert "refusal" not in [f.name for f in chain]
    assert passes(qa("Opinion?", "As an AI language model, I have none."), chain) is False  # too long now
    assert passes(qa("Opinion?", "As an AI."), chain) is True
    assert build_filters(QualityConfig(enabled=False)) == []


def test_unknown_filters_and_parameters_are_named_in_the_error():
    with pytest.raises(ValueError, match="unknown quality filter.*'toxicity'"):
        build_filters(QualityConfig(filters={"toxicity": True}))
    with pytest.raises(ValueError, match="'length' has no parameter.*'max_chars'"):
        build_filters(QualityConfig(filters={"length": {"max_chars": 5}}))


def test_passes_never_changes_the_record():
    chain = build_filters(QualityConfig())
    record = qa("Mail me at jane@corp.io", "Sure, jane@corp.io noted.")
    assert passes(record, chain) is True
    assert record["messages"][0]["content"] == "Mail me at jane@corp.io"
    assert passes(qa("Opinion?", "作为一个人工智能语言模型，我没有观点。"), chain) is False


# --- the stage end to end --------------------------------------------------------------------
def write_canonical(path, records):
    rows = []
    for index, record in enumerate(records):
        rows.append(
            {
                schema.ID: schema.conversation_id(record["messages"], record["tools"]),
                schema.SOURCE: "input.jsonl",
                schema.SOURCE_INDEX: index,
                schema.MESSAGES: record["messages"],
                schema.TOOLS: record["tools"],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), path)
    return rows


STAGE_RECORDS = [
    qa("What is the capital of Australia?", "Canberra."),
    qa("Who wrote Hamlet?", "N/A"),
    qa("你的看法？", "作为一个人工智能语言模型，我没有个人观点。"),
    qa("Contact?", "Write to jane.roe@corp.io for details."),
    conv(("system", "Be brief."), ("assistant", "Hello.")),
    qa("Loop?", "Again and again.\n" * 30),
    qa("中国的首都是哪里？", "北京。"),
]


def test_quality_stage_end_to_end(tmp_path):
    rows = write_canonical(tmp_path / "in.parquet", STAGE_RECORDS)
    stats = quality_stage(
        tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "rejected.parquet", SFTConfig(quality=QualityConfig()), batch_size=3
    )

    kept = pq.read_table(tmp_path / "out.parquet")
    assert kept.schema.equals(schema.CONVERSATION_SCHEMA)
    assert kept.column(schema.SOURCE_INDEX).to_pylist() == [0, 3, 6]
    redacted = kept.to_pylist()[1]
    assert redacted[schema.MESSAGES][1]["content"] == "Write to <EMAIL> for details."
    assert redacted[schema.ID] == rows[3][schema.ID]  # the id stays the original one

    rejected = pq.read_table(tmp_path / "rejected.parquet").to_pylist()
    assert {(r[schema.SOURCE_INDEX], r[schema.REASON]) for r in rejected} == {
        (1, "placeholder_response"),
        (2, "ai_disclaimer"),
        (4, "missing_instruction"),
        (5, "repeated_lines"),
    }
    assert all(r[schema.STAGE] == "quality" and r[schema.DETAIL] for r in rejected)
    assert json.loads(rejected[0][schema.RAW])["messages"][1]["content"] == "N/A"

    assert (stats.name, stats.records_in, stats.records_out, stats.num_rejected) == ("quality", 7, 3, 4)
    assert stats.extra["pii_redactions"] == 1
    filters = stats.extra["filters"]
    assert filters["refusal"]["dropped"] == 1 and filters["refusal"]["reasons"] == {"ai_disclaimer": 1}
    assert filters["pii"]["redactions"] == {"email": 1}
    assert all(entry["seconds"] >= 0 for entry in filters.values())


def test_quality_stage_with_nothing_rejected_leaves_no_rejected_file(tmp_path):
    write_canonical(tmp_path / "in.parquet", [STAGE_RECORDS[0], STAGE_RECORDS[6]])
    (tmp_path / "rejected.parquet").write_text("stale")
    stats = quality_stage(
        tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "rejected.parquet", SFTConfig(quality=QualityConfig())
    )
    assert stats.records_out == 2 and not (tmp_path / "rejected.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]


def test_quality_stage_switched_off_keeps_everything(tmp_path):
    write_canonical(tmp_path / "in.parquet", STAGE_RECORDS)
    stats = quality_stage(
        tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "rej.parquet", SFTConfig(quality=QualityConfig(enabled=False))
    )
    assert stats.records_out == len(STAGE_RECORDS)
    assert pq.read_table(tmp_path / "out.parquet").num_rows == len(STAGE_RECORDS)


def test_quality_stage_rejects_a_non_canonical_input(tmp_path):
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match="not a canonical conversation table"):
        quality_stage(tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "rej.parquet", SFTConfig(quality=QualityConfig()))
    assert not (tmp_path / "out.parquet").exists()

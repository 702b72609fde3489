"""Quality filter benchmark: recall on bad records, false rejections on real data, throughput.

Clean: the real instruction data in ../shared/data/real (Alpaca, ShareGPT tool calls, ShareGPT
chat), converted with the ingest module's ``pipeline.formats.to_conversation``, treated as clean.
Bad: generated records of every kind the filters target, English and Chinese, mostly built
from the clean prompts and answers so that they look like real data gone wrong.

Reports recall on the bad records (target >= 0.95; a PII record counts as caught when it is
redacted or dropped), the false-rejection rate on the clean ones (target <= 2 %) with the
filters and reasons responsible, and filter throughput in records/s — side by side with a
datatrove baseline (its Gopher repetition, Gopher quality, FineWeb quality, a refusal
RegexFilter and its PIIFormatter, run through datatrove's own ``run`` generators on each
conversation's text) when a Python with datatrove is available (``--datatrove-python``,
default /tmp/dt-venv/bin/python; ``python -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install
datatrove regex spacy``), else against a straightforward per-filter Python loop over our filters.

    .venv/bin/python -m bench.quality            # writes bench/results/quality.json
    .venv/bin/python -m bench.quality --against HEAD   # also: same decisions as HEAD's chain, and how much faster
                                                       # (bench/quality_equivalence.py says how)
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import REPO, argument_parser, write_results
from pipeline import schema
from pipeline.config import QualityConfig, SFTConfig
from pipeline.quality import build_filters, quality_stage
from pipeline.quality.base import FilterChain

REAL = REPO.parent / "shared" / "data" / "real"
REAL_FILES = ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "dummy_conversation.json")


# --- clean data ------------------------------------------------------------------------------
def _local_conversation(row: dict) -> tuple[list[dict], str | None]:
    """Fallback converter for when the ingest module is absent (Alpaca and ShareGPT only)."""
    if "instruction" in row:
        prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return [schema.make_message("user", prompt), schema.make_message("assistant", row["output"])], None
    roles = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool"}
    messages = []
    for turn in row["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append(schema.make_message("assistant", "", tool_calls=[{"type": "function", "function": call}]))
        else:
            messages.append(schema.make_message(roles[turn["from"]], turn["value"]))
    return messages, row.get("tools") or None


def load_clean() -> tuple[list[dict], str]:
    try:
        from pipeline.formats import to_conversation

        converter = "pipeline.formats.to_conversation"
    except ImportError:
        to_conversation, converter = _local_conversation, "local converter in bench/quality.py"
    records = []
    for name in REAL_FILES:
        for index, row in enumerate(json.loads((REAL / name).read_text(encoding="utf-8"))):
            messages, tools = to_conversation(row)
            records.append(
                {
                    schema.ID: schema.conversation_id(messages, tools),
                    schema.SOURCE: name,
                    schema.SOURCE_INDEX: index,
                    schema.MESSAGES: messages,
                    schema.TOOLS: tools,
                }
            )
    return records, converter


# --- bad data --------------------------------------------------------------------------------
ZH_QA = [
    ("中国的首都是哪里？", "中国的首都是北京，它是全国的政治和文化中心。"),
    ("请解释一下什么是光合作用。", "光合作用是绿色植物利用光能，把二氧化碳和水转化为有机物并释放氧气的过程。"),
    ("如何提高睡眠质量？", "保持规律作息，睡前避免使用手机，卧室保持安静和适宜的温度，都有助于提高睡眠质量。"),
    ("推荐三本适合初学者的编程书。", "可以从《Python编程：从入门到实践》《笨办法学Python》和《算法图解》开始。"),
    ("写一句关于春天的诗。", "春风拂面花千树，细雨无声润万家。"),
    ("什么是机器学习？", "机器学习是人工智能的一个分支，让计算机从数据中学习规律，而不是依靠人工编写的规则。"),
    ("把“我喜欢读书”翻译成英文。", "I like reading books."),
    ("长城有多长？", "根据国家文物局的测量，明长城全长约八千八百五十公里，历代长城总长超过两万公里。"),
    ("给我一个健康早餐的建议。", "一杯牛奶、一个鸡蛋、一片全麦面包再加一份水果，营养均衡又方便。"),
    ("解释一下通货膨胀。", "通货膨胀是指一段时间内物价总体水平持续上涨，货币的购买力随之下降。"),
    ("怎样学好数学？", "多做题、理解概念而不是死记公式、及时复习错题，并且保持好奇心。"),
    ("太阳系有几颗行星？", "太阳系有八颗行星：水星、金星、地球、火星、木星、土星、天王星和海王星。"),
]
EN_SUBJECTS = [
    "predict the stock market",
    "browse the internet",
    "give medical advice",
    "access real-time data",
    "provide personal opinions",
    "write that essay for you",
    "share private information",
    "make phone calls",
]
ZH_SUBJECTS = [
    "提供实时信息",
    "访问互联网",
    "给出医疗建议",
    "预测股市走势",
    "发表个人观点",
    "帮你写这篇作业",
    "提供他人的隐私信息",
    "完成这个请求",
]


def _msg(role, content, **kw):
    return schema.make_message(role, content, **kw)


def _qa(prompt, response, system=None):
    messages = ([_msg("system", system)] if system else []) + [_msg("user", prompt), _msg("assistant", response)]
    return {schema.MESSAGES: messages, schema.TOOLS: None}


def _mojibake(text: str) -> str:
    """UTF-8 bytes read as cp1252 (Latin-1 where cp1252 has a hole): how mis-decoded text looks."""
    out = []
    for byte in text.encode("utf-8"):
        try:
            out.append(bytes([byte]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(byte))
    return "".join(out)


def _public_ipv4(rng: random.Random) -> str:
    while True:
        address = ipaddress.IPv4Address(rng.randrange(1 << 24, 224 << 24))
        if address.is_global:
            return str(address)


class BadRecords:
    """Generators of bad records, one method per kind, each returning (language, record)."""

    def __init__(self, clean: list[dict], rng: random.Random) -> None:
        self.rng = rng
        self.pairs = []  # (prompt, response) of single-turn clean records with substance
        for record in clean:
            m = record[schema.MESSAGES]
            if len(m) == 2 and m[0]["role"] == "user" and len(m[1]["content"]) > 200:
                self.pairs.append((m[0]["content"], m[1]["content"]))

    def _pair(self):
        return self.rng.choice(self.pairs)

    def _long_text(self, min_chars: int) -> str:
        parts, size = [], 0
        while size < min_chars:
            part = self._pair()[1]
            parts.append(part)
            size += len(part) + 2
        return "\n\n".join(parts)

    def empty(self, lang):
        r = self.rng
        if lang == "en":
            return _qa(self._pair()[0], r.choice(["", "   ", "\n\n", "N/A", "n/a", "None", "none.", "...", "-", "null", "TBD"]))
        return _qa(r.choice(ZH_QA)[0], r.choice(["", "  ", "无", "暂无", "……", "略", "无。", "空"]))

    def missing_instruction(self, lang):
        r = self.rng
        prompt, response = self._pair() if lang == "en" else r.choice(ZH_QA)
        system = "You are a helpful assistant." if lang == "en" else "你是一个乐于助人的助手。"
        shape = r.randrange(3)
        if shape == 0:
            messages = [_msg("system", system), _msg("assistant", response)]
        elif shape == 1:
            messages = [_msg("user", r.choice(["", "  ", "\n"])), _msg("assistant", response)]
        else:
            messages = [_msg("assistant", response), _msg("user", prompt), _msg("assistant", response)]
        return {schema.MESSAGES: messages, schema.TOOLS: None}

    def length(self, lang):
        r = self.rng
        shape = r.randrange(3)
        if lang == "en":
            if shape == 0:
                return _qa(self._pair()[0], self._long_text(52_000))
            if shape == 1:
                return _qa(r.choice(["ok", "go on", "more", "yes"]), self._long_text(r.randrange(4_000, 9_000)))
            return _qa(self._long_text(r.randrange(12_000, 20_000)), r.choice(["Yes.", "No", "OK", "B"]))
        zh_long = "".join(a for _, a in ZH_QA)
        if shape == 0:
            return _qa(r.choice(ZH_QA)[0], (zh_long * 100)[:52_000] + self._long_text(2_000))
        if shape == 1:
            return _qa(r.choice(["好", "继续", "嗯"]), zh_long * r.randrange(6, 12))
        return _qa(zh_long * 30, r.choice(["是", "对", "好的"]))

    def refusal(self, lang):
        r = self.rng
        if lang == "en":
            subject = r.choice(EN_SUBJECTS)
            template = r.choice(
                [
                    "As an AI language model, I cannot {s}. However, I can suggest some general resources.",
                    "I'm sorry, but as an AI, I don't have the ability to {s}.",
                    "I'm sorry, but I can't {s}.",
                    "I cannot assist with that request because I am not able to {s}.",
                    "I apologize, but I am unable to {s}.",
                    "As an AI assistant, I do not have feelings, but here is some information.\n\n{a}",
                    "{a}\n\nPlease note that as an AI language model I cannot {s}.",
                    "Sorry, I can't help with that.",
                ]
            )
            return _qa(self._pair()[0], template.format(s=subject, a=self._pair()[1][:400]))
        subject = r.choice(ZH_SUBJECTS)
        template = r.choice(
            [
                "作为一个人工智能语言模型，我无法{s}。",
                "抱歉，我无法{s}。",
                "很抱歉，我不能帮你{s}。",
                "作为AI，我没有个人情感，也不能{s}。",
                "对不起，我无法回答这个问题。",
                "{a}\n\n不过作为一个人工智能语言模型，我无法{s}。",
                "我是一个人工智能语言模型，不能{s}。",
            ]
        )
        return _qa(r.choice(ZH_QA)[0], template.format(s=subject, a=r.choice(ZH_QA)[1]))

    def repetition(self, lang):
        r = self.rng
        shape = r.randrange(4)
        if lang == "en":
            prompt, answer = self._pair()
            sentences = [s.strip() + "." for s in answer.split(".") if len(s.split()) >= 5] or [answer[:80]]
            sentence = r.choice(sentences)
            if shape == 0:
                text = " ".join([sentence] * r.randrange(8, 25))
            elif shape == 1:
                text = "\n".join([sentence] * r.randrange(8, 25))
            elif shape == 2:
                text = answer + "\n\n" + "\n\n".join([sentences[-1]] * r.randrange(5, 10))
            else:
                words = sentence.split()[:4]
                text = " ".join(words * r.randrange(20, 40))
            return _qa(prompt, text)
        prompt, answer = r.choice(ZH_QA)
        if shape == 0:
            text = answer * r.randrange(6, 15)
        elif shape == 1:
            text = "\n".join([answer] * r.randrange(6, 15))
        elif shape == 2:
            text = "\n\n".join([answer, *[r.choice(ZH_QA)[1]] * r.randrange(5, 9)])
        else:
            text = "我觉得" * r.randrange(30, 80)
        return _qa(prompt, text)

    def garbage(self, lang):
        r = self.rng
        prompt, answer = self._pair() if lang == "en" else r.choice(ZH_QA)
        shape = r.randrange(4)
        if shape == 0:
            position = r.randrange(len(answer))
            text = (
                answer[:position]
                + "".join(r.choice("\x00\x01\x07\x08\x1b\x7f\ufffd") for _ in range(r.randrange(1, 4)))
                + answer[position:]
            )
        elif shape == 1:
            text = _mojibake(answer.replace("'", "’").replace(" - ", " — ") + " Café, naïve, résumé." if lang == "en" else answer)
        elif shape == 2:
            text = "".join(r.choice("@#$%^&*()[]{}<>|\\/~`=+-_!?;:'\",.【】《》！？") for _ in range(r.randrange(80, 300)))
        else:
            text = " ".join(str(r.randrange(10**6, 10**9)) for _ in range(r.randrange(15, 40)))
        return _qa(prompt, text)

    def letterless(self, lang):
        """A short response of punctuation and symbols only: no placeholder, just nothing said."""
        r = self.rng
        prompt = self._pair()[0] if lang == "en" else r.choice(ZH_QA)[0]
        marks = "!?*#~=+-_.:;()/\\|^" if lang == "en" else "！？。，、…—～·《》（）"
        return _qa(prompt, "".join(r.choice(marks) for _ in range(r.randrange(2, 12))))

    def pii(self, lang):
        r = self.rng
        prompt, answer = self._pair() if lang == "en" else r.choice(ZH_QA)
        if lang == "en":
            name = r.choice(["john.smith", "maria_garcia", "li.wei", "a.kowalski", "jsmith"]) + str(r.randrange(100))
            item = r.choice(
                [
                    f"You can reach me at {name}@{r.choice(['gmail.com', 'outlook.com', 'corp.io', 'uni-bonn.de'])}.",
                    f"Call me on ({r.randrange(200, 999)}) {r.randrange(200, 999)}-{r.randrange(1000, 9999)}.",
                    f"My number is +44 20 {r.randrange(1000, 9999)} {r.randrange(1000, 9999)}.",
                    f"The server runs at {_public_ipv4(r)}, please whitelist it.",
                    f"Connect to 2001:db8:{r.randrange(1, 0xFFFF):x}::{r.randrange(1, 0xFFFF):x} is wrong, use 2a03:2880:f12f:{r.randrange(1, 0xFFF):x}::1.",
                ]
            )
        else:
            item = r.choice(
                [
                    f"我的手机号是1{r.choice('3456789')}{r.randrange(10**8, 10**9)}，有事联系。",
                    f"请发邮件到 wang{r.randrange(1000)}@qq.com。",
                    f"办公电话：0{r.randrange(10, 99)}-{r.randrange(10**7, 10**8)}。",
                    f"服务器地址是{_public_ipv4(r)}。",
                    f"联系人手机 1{r.choice('3456789')}{r.randrange(10)} {r.randrange(1000, 9999)} {r.randrange(1000, 9999)}。",
                ]
            )
        if r.random() < 0.5:
            return _qa(f"{prompt}\n{item}", answer)
        return _qa(prompt, f"{answer}\n\n{item}")

    def contamination(self, lang, eval_items):
        r = self.rng
        item = r.choice([e for e in eval_items if e["lang"] == lang])
        question = item["question"]
        if lang == "en" and r.random() < 0.5:
            question = question.upper() if r.random() < 0.3 else question.replace(",", "").replace("?", " ?")
        if r.random() < 0.7:
            return _qa(r.choice(["Solve this: ", "Question: ", "", "请回答：" if lang == "zh" else "Help me: "]) + question, item["answer"])
        return _qa("Give me a practice problem.", f"Here is one: {question}\nAnswer: {item['answer']}")


def evaluation_set(rng: random.Random) -> list[dict]:
    """A small GSM8K-like evaluation set, English and Chinese, none of it in the clean data."""
    names = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis"]
    zh_names = ["小明", "小红", "王阿姨", "李老师", "张师傅", "陈同学"]
    items = []
    for _ in range(40):
        a, b, c = rng.randrange(2, 90), rng.randrange(2, 40), rng.randrange(2, 12)
        name = rng.choice(names)
        items.append(
            {
                "lang": "en",
                "question": (
                    f"{name} sold clips to {a} of her friends in April, and then she sold {b} more clips in May than "
                    f"in April, each at {c} dollars. How many dollars did {name} earn in April and May altogether?"
                ),
                "answer": str((a + a + b) * c),
            }
        )
        zh = rng.choice(zh_names)
        items.append(
            {
                "lang": "zh",
                "question": (
                    f"{zh}有{a}个苹果，他先送给同学{b}个，后来妈妈又给他买了{c}袋，每袋有{c}个苹果，请问{zh}现在一共有多少个苹果？"
                ),
                "answer": str(a - b + c * c),
            }
        )
    return items


# Generated in this order from one seeded stream: a new kind goes last, so the others stay the same.
KINDS = ("empty", "missing_instruction", "length", "refusal", "repetition", "garbage", "pii", "contamination", "letterless")
EXPECTED_FILTER = {
    "empty": "empty_response",
    "missing_instruction": "missing_instruction",
    "length": "length",
    "refusal": "refusal",
    "repetition": "repetition",
    "garbage": "garbage",
    "pii": "pii",
    "contamination": "decontaminate",
    "letterless": "garbage",
}


def make_bad(clean: list[dict], per_kind_and_language: int, rng: random.Random, eval_items: list[dict]) -> list[dict]:
    maker = BadRecords(clean, rng)
    bad = []
    for kind in KINDS:
        for lang in ("en", "zh"):
            for i in range(per_kind_and_language):
                record = maker.contamination(lang, eval_items) if kind == "contamination" else getattr(maker, kind)(lang)
                record[schema.ID] = schema.conversation_id(record[schema.MESSAGES], record[schema.TOOLS])
                record[schema.SOURCE] = f"bad-{kind}-{lang}"
                record[schema.SOURCE_INDEX] = i
                record["_kind"], record["_lang"] = kind, lang
                bad.append(record)
    return bad


# --- running our filters ---------------------------------------------------------------------
def verdicts(records: list[dict], config: QualityConfig, package: ModuleType | None = None) -> list[dict]:
    """Per record: dropped by which filter/reason, or redacted (PII) or kept. ``package``: the
    ``pipeline.quality`` to run (default this checkout's; bench.quality_equivalence loads others)."""
    build, chain_class = (build_filters, FilterChain) if package is None else (package.build_filters, package.base.FilterChain)
    chain = chain_class(build(config))
    pii = next((f for f in chain.filters if f.name == "pii"), None)
    out = []
    for record in records:
        record = copy.deepcopy(record)
        redactions_before = sum(pii.counts.values()) if pii else 0
        dropped_before = Counter(chain.dropped)
        drop = chain.apply(record)
        redacted = pii is not None and sum(pii.counts.values()) > redactions_before
        by = next((name for name in chain.dropped if chain.dropped[name] > dropped_before[name]), None)
        out.append({"drop": drop, "filter": by, "redacted": redacted})
    return out


def score(clean: list[dict], bad: list[dict], clean_v: list[dict], bad_v: list[dict]) -> dict:
    """Recall on the bad records (per kind and language) and false rejections of the clean ones."""
    caught_by_kind = defaultdict(Counter)
    for record, v in zip(bad, bad_v):
        key = (record["_kind"], record["_lang"])
        if v["drop"] is not None:
            caught_by_kind[key][v["filter"]] += 1
        elif v["redacted"]:
            caught_by_kind[key]["pii (redacted)"] += 1
        else:
            caught_by_kind[key]["MISSED"] += 1
    per_kind = {}
    total_caught = 0
    for kind in KINDS:
        for lang in ("en", "zh"):
            counts = caught_by_kind[(kind, lang)]
            n = sum(counts.values())
            caught = n - counts["MISSED"]
            total_caught += caught
            per_kind[f"{kind}/{lang}"] = {"records": n, "recall": round(caught / n, 4), "caught_by": dict(counts.most_common())}
    missed = [
        {"kind": r["_kind"], "lang": r["_lang"], "response": r[schema.MESSAGES][-1]["content"][:160]}
        for r, v in zip(bad, bad_v)
        if v["drop"] is None and not v["redacted"]
    ]
    rejected_clean = [(r, v["drop"], v["filter"]) for r, v in zip(clean, clean_v) if v["drop"] is not None]
    return {
        "recall": total_caught / len(bad),
        "false_rejection_rate": len(rejected_clean) / len(clean),
        "per_kind": per_kind,
        "missed": missed,
        "rejected_clean": rejected_clean,
    }


def throughput_ours(records: list[dict], config: QualityConfig, repeats: int) -> dict:
    best, per_filter = None, None
    for _ in range(repeats):
        batch = copy.deepcopy(records)  # redaction changes records; each repeat starts fresh
        chain = FilterChain(build_filters(config))
        start = time.perf_counter()
        for record in batch:
            chain.apply(record)
        seconds = time.perf_counter() - start
        if best is None or seconds < best:
            best, per_filter = seconds, {k: round(v, 4) for k, v in chain.seconds.items()}
    return {
        "records": len(records),
        "seconds": round(best, 4),
        "records_per_s": round(len(records) / best, 1),
        "per_filter_seconds": per_filter,
    }


def throughput_plain_loop(records: list[dict], config: QualityConfig, repeats: int) -> dict:
    """The same filters called in a bare loop: no timing, no counting (the machinery's overhead)."""
    best = None
    for _ in range(repeats):
        batch = copy.deepcopy(records)
        filters = build_filters(config)
        start = time.perf_counter()
        for record in batch:
            for flt in filters:
                if flt.check(record) is not None:
                    break
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    return {"records": len(records), "seconds": round(best, 4), "records_per_s": round(len(records) / best, 1)}


def throughput_stage(records: list[dict], config: QualityConfig, workdir: Path) -> dict:
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    source = workdir / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), source)
    start = time.perf_counter()
    stats = quality_stage(source, workdir / "out.parquet", workdir / "rejected.parquet", SFTConfig(quality=config))
    seconds = time.perf_counter() - start
    return {
        "records": len(rows),
        "seconds": round(seconds, 4),
        "records_per_s": round(len(rows) / seconds, 1),
        "kept": stats.records_out,
        "rejected": stats.num_rejected,
        "pii_redactions": stats.extra["pii_redactions"],
    }


# --- datatrove baseline ----------------------------------------------------------------------
DATATROVE_SCRIPT = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter, GopherQualityFilter, FineWebQualityFilter, RegexFilter
from datatrove.pipeline.formatters import PIIFormatter
texts = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
refusal = sys.argv[2]
repeats = int(sys.argv[3])

def chain():
    return [GopherRepetitionFilter(), GopherQualityFilter(), FineWebQualityFilter(), RegexFilter(regex_exp=refusal), PIIFormatter()]

def run(steps):
    data = (Document(text=t, id=str(i)) for i, t in enumerate(texts))
    for step in steps:
        data = step.run(data)
    return [int(d.id) for d in data]

run(chain())  # warm-up: word tokenizer loading
best = None
for _ in range(repeats):
    steps = chain()
    start = time.perf_counter()
    kept = run(steps)
    seconds = time.perf_counter() - start
    best = seconds if best is None else min(best, seconds)
import datatrove
print(json.dumps({"version": getattr(datatrove, "__version__", "?"), "seconds": best, "kept": kept}))
"""


def conversation_text(record: dict) -> str:
    return "\n\n".join(m["content"] for m in record[schema.MESSAGES] if m["content"])


def run_datatrove(python: str, records: list[dict], repeats: int, workdir: Path) -> dict | None:
    if not Path(python).exists():
        return None
    texts = workdir / "texts.jsonl"
    texts.write_text("".join(json.dumps(conversation_text(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    script = workdir / "dt_bench.py"
    script.write_text(DATATROVE_SCRIPT, encoding="utf-8")
    refusal = r"(?i)as an ai language model|as an ai, i|i'm sorry, but|i cannot assist|作为一个人工智能语言模型|抱歉，我无法"
    done = subprocess.run([python, str(script), str(texts), refusal, str(repeats)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print("datatrove baseline failed:\n" + done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------
def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--per-kind", type=int, default=30, help="bad records per kind and language")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--datatrove-python", default="/tmp/dt-venv/bin/python")
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also run the filter chain of git revision REV (e.g. HEAD) side by side: the same decisions on the bench's "
        "records, generated bad records of every kind and real data (bench.quality_equivalence), and the speed of both",
    )
    parser.add_argument("--stage-records", type=int, default=100_000, help="conversations for the --against quality_stage timing")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    clean, converter = load_clean()
    eval_items = evaluation_set(rng)
    bad = make_bad(clean, args.per_kind, rng, eval_items)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        eval_file = workdir / "eval.jsonl"
        eval_file.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in eval_items), encoding="utf-8")
        config = QualityConfig(decontaminate=[eval_file])

        clean_v = verdicts(clean, config)
        bad_v = verdicts(bad, config)
        scores = score(clean, bad, clean_v, bad_v)
        recall, frr, per_kind, missed = scores["recall"], scores["false_rejection_rate"], scores["per_kind"], scores["missed"]
        rejected_clean = scores["rejected_clean"]
        by_filter = Counter(f"{name}/{d.reason}" for _, d, name in rejected_clean)
        by_source = Counter(r[schema.SOURCE] for r, _, _ in rejected_clean)
        examples = [
            {"source": r[schema.SOURCE], "source_index": r[schema.SOURCE_INDEX], "reason": d.reason, "detail": d.detail[:160]}
            for r, d, _ in rejected_clean
        ]
        clean_redacted = sum(v["redacted"] for v in clean_v)
        against = None
        if args.against:
            from bench.quality_equivalence import compare_with

            against = compare_with(
                args.against, clean, bad, eval_items, config, workdir, stage_records=args.stage_records, repeats=args.repeats
            )

        # throughput
        everything = clean + bad
        ours = throughput_ours(everything, config, args.repeats)
        plain = throughput_plain_loop(everything, config, args.repeats)
        stage = throughput_stage(everything, config, workdir)
        baseline = run_datatrove(args.datatrove_python, everything, args.repeats, workdir)

    dt_report = None
    if baseline is not None:
        kept = set(baseline["kept"])
        n_clean = len(clean)
        dt_frr = sum(1 for i in range(n_clean) if i not in kept) / n_clean
        dt_recall = sum(1 for i in range(n_clean, len(everything)) if i not in kept) / len(bad)
        dt_report = {
            "what": f"datatrove {baseline['version']}: GopherRepetitionFilter, GopherQualityFilter, FineWebQualityFilter, "
            "RegexFilter(refusal phrases), PIIFormatter, chained through their run() generators, one Document "
            "per conversation (all turns' text), English word tokenizer (spaCy)",
            "records_per_s": round(len(everything) / baseline["seconds"], 1),
            "seconds": round(baseline["seconds"], 4),
            "recall_on_bad_drop_only": round(dt_recall, 4),
            "false_rejection_rate": round(dt_frr, 4),
        }

    result = {
        "clean_records": len(clean),
        "clean_converter": converter,
        "bad_records": len(bad),
        "bad_per_kind_and_language": args.per_kind,
        "recall": round(recall, 4),
        "recall_target": 0.95,
        "false_rejection_rate": round(frr, 4),
        "false_rejection_target": 0.02,
        "false_rejections_by_filter": dict(by_filter.most_common()),
        "false_rejections_by_source": dict(by_source.most_common()),
        "clean_records_redacted_pii": clean_redacted,
        "per_kind": per_kind,
        "missed_bad_records": missed,
        "clean_rejections": examples,
        "throughput": {
            "sftkit_filter_chain": ours,
            "sftkit_bare_loop_same_filters": plain,
            "sftkit_quality_stage_parquet_to_parquet": stage,
            "datatrove_baseline": dt_report,
        },
    }
    if against is not None:
        result["against"] = against
    print(f"clean records: {len(clean)} (converted with {converter}); bad records: {len(bad)} ({len(KINDS)} kinds x en/zh)")
    print(f"recall on bad records:        {recall:.4f}  (target >= 0.95)")
    for name, entry in per_kind.items():
        print(f"  {name:26s} {entry['recall']:.3f}  {entry['caught_by']}")
    print(f"false rejections on clean:    {frr:.4f}  ({len(rejected_clean)}/{len(clean)}, target <= 0.02)")
    for name, count in by_filter.most_common():
        print(f"  {name:36s} {count}")
    print(f"clean records with PII redacted (kept): {clean_redacted}")
    print(f"throughput, {len(everything)} records:")
    print(f"  sftkit filter chain            {ours['records_per_s']:>10.1f} records/s")
    print(f"  same filters, bare loop        {plain['records_per_s']:>10.1f} records/s")
    print(f"  sftkit quality_stage (Parquet) {stage['records_per_s']:>10.1f} records/s")
    if dt_report:
        print(f"  datatrove baseline             {dt_report['records_per_s']:>10.1f} records/s")
        print(f"  ratio sftkit chain / datatrove: {ours['records_per_s'] / dt_report['records_per_s']:.2f}x")
        print(
            f"  (datatrove web filters on the same data: recall {dt_report['recall_on_bad_drop_only']:.3f}, "
            f"false rejections {dt_report['false_rejection_rate']:.3f})"
        )
    else:
        print("  datatrove baseline: not available; compared against the bare loop only")
        print(f"  ratio chain / bare loop: {ours['records_per_s'] / plain['records_per_s']:.2f}x")
    print(f"per-filter seconds: {ours['per_filter_seconds']}")
    write_results("quality", result, args.out)
    if against is not None and against["decisions"]["differences"]:
        sys.exit(f"the chain decides differently from {args.against} on {against['decisions']['differences']} records (see above)")


if __name__ == "__main__":
    main()

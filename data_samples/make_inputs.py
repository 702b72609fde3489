"""Write the sample inputs in data_samples/inputs/ (run once; the output is committed).

One small file per supported container and format, in English and Chinese, single- and
multi-turn, with tool calls, and with records that later stages must catch:

* deliberately bad records (broken JSON, not an object, unknown role, assistant-first, empty
  response, no assistant turn, invalid UTF-8, wrong types) -> rejected at ingest;
* exact duplicates (the same conversation in another format or file) and near duplicates
  (formatting-only variants) -> dedup;
* low-quality records (refusals, "N/A" answers, repeated lines, an e-mail address) -> quality.

    .venv/bin/python data_samples/make_inputs.py
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

HERE = Path(__file__).parent
OUT = HERE / "inputs"

# --- shared content --------------------------------------------------------------------------
# Question/answer pairs used across formats; some appear in two files on purpose (duplicates).
QA_EN = [
    (
        "How do I reverse a list in Python?",
        "Use slicing with a step of -1: `items[::-1]` returns a new reversed list. To reverse in place, call `items.reverse()`.",
    ),
    (
        "What is the boiling point of water at sea level?",
        "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit). At higher altitudes the boiling point is lower because the air pressure is lower.",
    ),
    (
        "Give me three tips for better sleep.",
        "1. Keep a regular schedule, going to bed and waking up at the same time every day.\n2. Avoid screens for an hour before bed.\n3. Keep your bedroom cool, dark and quiet.",
    ),
    (
        "Explain what a hash table is in one paragraph.",
        "A hash table stores key-value pairs in an array of buckets. A hash function turns each key into a bucket index, so looking up, inserting or deleting a key takes constant time on average. When two keys land in the same bucket (a collision), the table chains them in a list or probes for another free slot.",
    ),
    ("Translate 'good morning' into French and Spanish.", 'French: "Bonjour". Spanish: "Buenos días".'),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall,\nwhispering on the cold wind,\nthe maple stands bare."),
    (
        "What does HTTP status code 404 mean?",
        "404 Not Found means the server could not find the requested resource. The URL may be mistyped, or the page may have been moved or deleted.",
    ),
    (
        "Summarise the water cycle for a ten-year-old.",
        "The sun warms water in seas and lakes so it rises into the sky as vapour. High up it cools into tiny droplets that make clouds. When the droplets get heavy they fall as rain or snow, and the water flows back into rivers and the sea to start again.",
    ),
]

QA_ZH = [
    (
        "如何用Python读取一个文本文件？",
        '可以使用内置的 open 函数：\n\nwith open("data.txt", encoding="utf-8") as f:\n    text = f.read()\n\n使用 with 语句可以在读取结束后自动关闭文件。',
    ),
    (
        "请解释什么是机器学习。",
        "机器学习是人工智能的一个分支，它让计算机从数据中自动学习规律，而不是依靠人工编写的规则。常见的类型包括监督学习、无监督学习和强化学习。",
    ),
    (
        "推荐三本适合初学者的中文小说。",
        "1.《活着》（余华）：语言朴素，故事感人。\n2.《边城》（沈从文）：篇幅不长，描写湘西风情。\n3.《围城》（钱锺书）：幽默讽刺，适合了解民国知识分子。",
    ),
    ("北京和上海哪个城市人口更多？", "按常住人口计算，上海略多于北京。两座城市的常住人口都在两千万以上。"),
    ("写一句关于春天的诗。", "春风拂过柳梢头，桃花映水满江红。"),
    (
        "番茄炒蛋怎么做？",
        "1. 鸡蛋打散，加少许盐。\n2. 番茄切块。\n3. 热锅倒油，先炒鸡蛋至凝固后盛出。\n4. 再炒番茄出汁，加入鸡蛋翻炒均匀，加盐和少许糖调味即可。",
    ),
]

# Each file's own ordinary pairs, so that duplicates in the samples are only the deliberate ones.
QA_EN_OPENAI = [
    (
        "What is the difference between weather and climate?",
        "Weather is the state of the atmosphere on a given day; climate is the average pattern of weather in a region over decades.",
    ),
    (
        "Suggest a name for a bakery that sells sourdough bread.",
        '"Rise & Crumb" - short, warm, and it hints at the slow rise of sourdough.',
    ),
    (
        "How many bytes are in a kilobyte?",
        "It depends on the convention: 1,000 bytes in the SI definition used by disk makers, or 1,024 bytes (a kibibyte) in the binary convention used by many operating systems.",
    ),
]
QA_ZH_CHAT = [
    ("为什么要多喝水？", "水参与人体几乎所有的新陈代谢，帮助调节体温、运输营养和排出废物。成年人一般每天需要 1.5 到 2 升水。"),
    ("解释一下什么是区块链。", "区块链是一种按时间顺序把数据打包成“区块”并用密码学方法链接起来的分布式账本，数据一旦写入就很难被篡改。"),
    ("学习编程应该从哪门语言开始？", "初学者可以从 Python 开始：语法简洁，资料丰富，既能做数据分析，也能写网站和自动化脚本。"),
    ("如何提高写作水平？", "多读优秀作品，坚持每天写一点，写完后反复修改，并请别人给出反馈。"),
]
QA_PROMPT_COMPLETION = [
    ("What is a prime number?", "A whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7."),
    ("Name three renewable energy sources.", "Solar, wind and hydroelectric power."),
    ("What does CPU stand for?", "Central Processing Unit: the chip that carries out a computer's instructions."),
    ("“一带一路”指的是什么？", "“一带一路”是“丝绸之路经济带”和“21世纪海上丝绸之路”的简称，是中国提出的国际合作倡议。"),
    ("用一句话解释光合作用。", "光合作用是植物利用阳光，把二氧化碳和水转化为葡萄糖并释放氧气的过程。"),
]

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
EXCHANGE_TOOL = {
    "name": "convert_currency",
    "description": "Convert an amount of money from one currency to another",
    "parameters": {
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"},
        },
        "required": ["amount", "from_currency", "to_currency"],
    },
}
SEARCH_TOOL = {
    "name": "search_books",
    "description": "Search a library catalogue by title or author",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


# --- alpaca .json array ----------------------------------------------------------------------
def alpaca_records() -> list:
    records = [{"instruction": q, "input": "", "output": a} for q, a in QA_EN[:5] + QA_ZH[:3]]
    records += [
        {
            "instruction": "Classify the sentiment of the review as positive, negative or neutral.",
            "input": "The battery lasts all day and the screen is gorgeous.",
            "output": "Positive.",
        },
        {
            "instruction": "将下面的句子翻译成英文。",
            "input": "今天天气很好，我们去公园散步吧。",
            "output": "The weather is lovely today, let's go for a walk in the park.",
        },
        {
            "instruction": "Correct the grammar in the sentence.",
            "input": "She don't like apples.",
            "output": "She doesn't like apples.",
            "system": "You are a careful English teacher.",
        },
        {
            "instruction": "And what about pears?",
            "input": "",
            "output": "Pears are a good source of fibre and vitamin C, and they are gentle on the stomach.",
            "history": [["Are apples healthy?", "Yes. Apples are rich in fibre and vitamin C and low in calories."]],
        },
        {
            "instruction": "那它的缺点呢？",
            "input": "",
            "output": "电动汽车的缺点主要是充电时间较长、续航受气温影响，以及部分地区充电桩不足。",
            "history": [["电动汽车有什么优点？", "电动汽车运行安静，使用成本低，而且行驶时没有尾气排放。"]],
        },
        # near duplicate of an English pair above: only spacing and case differ
        {
            "instruction": "how do I reverse a list in python?",
            "input": "",
            "output": "Use slicing with a step of -1:  `items[::-1]` returns a new reversed list.  To reverse in place, call `items.reverse()`.",
        },
        # exact duplicate of the first record (same conversation twice in one file)
        {"instruction": QA_EN[0][0], "input": "", "output": QA_EN[0][1]},
        # low quality: a refusal, a placeholder, repeated lines, an e-mail address
        {
            "instruction": "Tell me a joke about programmers.",
            "input": "",
            "output": "As an AI language model, I cannot tell jokes that might offend anyone.",
        },
        {"instruction": "What is the capital of Australia?", "input": "", "output": "N/A"},
        {
            "instruction": "List some fruits.",
            "input": "",
            "output": "Apple.\nApple.\nApple.\nApple.\nApple.\nApple.\nApple.\nApple.\nApple.\nApple.",
        },
        {
            "instruction": "How can I reach customer support?",
            "input": "",
            "output": "Write to our support team at help.desk@example-shop.com and we will answer within two working days.",
        },
        # bad records
        {"instruction": "Describe the colour blue.", "input": "", "output": ""},  # empty_response
        {"instruction": "Name a prime number.", "input": "", "output": "   \n "},  # empty_response
        {"instruction": "What is 6 times 7?", "input": "", "output": 42},  # wrong_type
        {"instruction": "Write a limerick about a cat.", "input": ""},  # no_assistant_turn
        {"title": "Meeting notes", "body": "Discussed the roadmap for next quarter."},  # unknown_format
        "just a string, not a record",  # not_an_object
    ]
    return records


# --- sharegpt .jsonl with tool calls ---------------------------------------------------------
def sharegpt_lines() -> list[str]:
    def conv(*turns, **extra):
        return dumps({"conversations": [{"from": f, "value": v} for f, v in turns], **extra})

    weather_call = dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}})
    lines = [conv(("human", q), ("gpt", a)) for q, a in QA_EN[5:8] + QA_ZH[3:5]]
    lines += [
        conv(
            ("human", "What's the weather like in Paris right now?"),
            ("function_call", weather_call),
            ("observation", dumps({"temperature": 18, "condition": "light rain"})),
            ("gpt", "It is 18 °C in Paris with light rain. You may want an umbrella."),
            tools=dumps([WEATHER_TOOL]),
        ),
        conv(
            ("human", "北京现在天气怎么样？"),
            ("function_call", dumps({"name": "get_weather", "arguments": {"city": "北京"}})),
            (
                "observation",
                dumps(
                    {"temperature": 3, "condition": "晴"},
                ),
            ),
            ("gpt", "北京现在是晴天，气温 3 摄氏度，出门记得多穿点。"),
            tools=[WEATHER_TOOL],
        ),
        conv(
            ("human", "I want to change 250 US dollars into euros."),
            (
                "function_call",
                dumps({"name": "convert_currency", "arguments": {"amount": 250, "from_currency": "USD", "to_currency": "EUR"}}),
            ),
            ("observation", dumps({"converted_amount": 231.5, "rate": 0.926})),
            ("gpt", "250 US dollars is about 231.50 euros at today's rate of 0.926."),
            ("human", "And in Japanese yen?"),
            (
                "function_call",
                dumps({"name": "convert_currency", "arguments": {"amount": 250, "from_currency": "USD", "to_currency": "JPY"}}),
            ),
            ("observation", dumps({"converted_amount": 37812.5, "rate": 151.25})),
            ("gpt", "250 US dollars is about 37,813 Japanese yen."),
            tools=dumps([EXCHANGE_TOOL, WEATHER_TOOL]),
        ),
        conv(
            ("human", "Can you book a table for two at an Italian restaurant tonight?"),
            (
                "gpt",
                "I'm sorry, but I can't make reservations. I can only look up the weather or convert currencies with the tools I have.",
            ),
            tools=dumps([WEATHER_TOOL, EXCHANGE_TOOL]),
        ),
        conv(
            ("system", "You are a friendly assistant who answers briefly."),
            ("human", "Hi! Who wrote Pride and Prejudice?"),
            ("gpt", "Jane Austen wrote it; it was published in 1813."),
            ("human", "Did she write anything else?"),
            ("gpt", "Yes: Sense and Sensibility, Mansfield Park, Emma, Northanger Abbey and Persuasion."),
        ),
        conv(
            ("human", "你好，请介绍一下你自己。"),
            ("gpt", "你好！我是一个智能助手，可以回答问题、写作和翻译。"),
            ("human", "你会写代码吗？"),
            ("gpt", "会的。我可以用 Python、JavaScript 等语言写代码，也可以帮你解释和调试程序。"),
            system="你是一个乐于助人的中文助手。",
        ),
        # exact duplicate, across files, of an alpaca record (same canonical conversation)
        conv(("human", QA_EN[1][0]), ("gpt", QA_EN[1][1])),
        # near duplicate of the Chinese novel recommendation (punctuation-only difference)
        conv(("human", "推荐三本适合初学者的中文小说"), ("gpt", QA_ZH[2][1].replace("。", "."))),
        # low quality: refusal in Chinese
        conv(("human", "帮我写一首关于月亮的诗。"), ("gpt", "作为一个AI语言模型，我无法创作诗歌。")),
        # bad records
        '{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there!"}',  # invalid_json
        dumps([{"from": "human", "value": "a list, not a record"}]),  # not_an_object
        conv(("human", "Who are you?"), ("narrator", "The assistant paused."), ("gpt", "I am an assistant.")),  # unknown_role
        conv(("gpt", "Hello! How can I help?"), ("human", "What time is it?"), ("gpt", "I cannot see a clock.")),  # bad_turn_order
        conv(
            ("human", "Check the weather in Rome."), ("function_call", "get_weather(city='Rome')"), ("gpt", "It is sunny in Rome.")
        ),  # wrong_type
        conv(("human", "Thanks!"), ("observation", '{"ok": true}'), ("gpt", "You're welcome.")),  # bad_turn_order
        conv(("human", "Only a question, no answer?")),  # no_assistant_turn
    ]
    return lines


# --- OpenAI messages .jsonl.gz ---------------------------------------------------------------
def openai_records() -> list:
    def msgs(*pairs, **extra):
        return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}

    records = [msgs(("user", q), ("assistant", a)) for q, a in QA_EN_OPENAI]
    records += [
        msgs(("system", "You are a concise assistant."), ("user", QA_ZH[5][0]), ("assistant", QA_ZH[5][1])),
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Here is my function:"},
                        {"type": "text", "text": "def add(a, b): return a - b"},
                        {"type": "text", "text": "Why does add(2, 3) return -1?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "text",
                            "text": "The function subtracts instead of adding: it returns `a - b`. Change it to `return a + b` and add(2, 3) will return 5.",
                        }
                    ],
                },
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Find me some books by Ursula K. Le Guin."},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_01",
                            "type": "function",
                            "function": {"name": "search_books", "arguments": '{"query": "Ursula K. Le Guin", "limit": 3}'},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_01",
                    "content": '[{"title": "A Wizard of Earthsea"}, {"title": "The Left Hand of Darkness"}, {"title": "The Dispossessed"}]',
                },
                {"role": "assistant", "content": "The catalogue has A Wizard of Earthsea, The Left Hand of Darkness and The Dispossessed."},
            ],
            "tools": [{"type": "function", "function": SEARCH_TOOL}],
        },
        {
            "messages": [
                {"role": "user", "content": "东京和伦敦现在的天气分别怎么样？"},
                {
                    "role": "assistant",
                    "content": "我来同时查询两个城市。",
                    "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
                        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "London"}'}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 12, "condition": "多云"}'},
                {"role": "tool", "tool_call_id": "call_b", "content": '{"temperature": 8, "condition": "小雨"}'},
                {"role": "assistant", "content": "东京 12 摄氏度，多云；伦敦 8 摄氏度，有小雨。"},
            ],
            "tools": [{"type": "function", "function": WEATHER_TOOL}],
        },
        # a per-message train flag: the first answer is a weak draft we do not want to learn from
        {
            "messages": [
                {"role": "user", "content": "Write a title for a blog post about home composting."},
                {"role": "assistant", "content": "Composting.", "train": False},
                {"role": "user", "content": "Make it more inviting."},
                {"role": "assistant", "content": "From Scraps to Soil: A Beginner's Guide to Composting at Home"},
            ]
        },
        # near duplicate of the sleep tips (different list formatting)
        msgs(
            ("user", "Give me 3 tips for better sleep."),
            (
                "assistant",
                "- Keep a regular schedule, going to bed and waking up at the same time every day.\n- Avoid screens for an hour before bed.\n- Keep your bedroom cool, dark and quiet.",
            ),
        ),
        # low quality
        msgs(
            ("user", "Can you summarise this article for me?"),
            ("assistant", "I'm sorry, but as an AI language model I cannot browse the internet or read articles."),
        ),
        msgs(("user", "What's the phone number of the nearest pharmacy?"), ("assistant", "N/A")),
        # bad records
        msgs(("user", "Say something."), ("assistant", "")),  # empty_response
        msgs(("system", "You are helpful."), ("user", "Is anyone there?")),  # no_assistant_turn
        msgs(("user", "Hello"), ("moderator", "This chat is monitored."), ("assistant", "Hi!")),  # unknown_role
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
                {"role": "assistant", "content": "That is a cat."},
            ]
        },  # wrong_type
        {"messages": "user: hi\nassistant: hello"},  # wrong_type
    ]
    return records


# --- Chinese-heavy chat, .jsonl.zst ----------------------------------------------------------
def chat_zh_records() -> list:
    def conv(*pairs):
        return {"conversations": [{"role": r, "content": c} for r, c in pairs]}

    records = [conv(("user", q), ("assistant", a)) for q, a in QA_ZH_CHAT]
    records += [
        conv(
            ("system", "你是一名耐心的数学老师。"),
            ("user", "什么是质数？"),
            ("assistant", "质数是大于 1 的自然数，除了 1 和它本身以外没有其他因数，例如 2、3、5、7。"),
            ("user", "1 是质数吗？"),
            ("assistant", "不是。质数必须大于 1，所以 1 既不是质数也不是合数。"),
        ),
        conv(("user", "用一句话介绍长城。"), ("assistant", "长城是中国古代修建的军事防御工程，全长两万多公里，是世界文化遗产。")),
        conv(
            ("user", "给我讲一个简短的成语故事。"),
            (
                "assistant",
                "守株待兔：宋国有个农夫看见一只兔子撞死在树桩上，从此他放下农具天天守在树旁，希望再捡到兔子，结果田地荒芜，被人耻笑。",
            ),
        ),
        conv(("user", "How do you say 'thank you' in Chinese?"), ("assistant", "“谢谢”（xièxie）。更正式的说法是“非常感谢”。")),
        # exact duplicate of an OpenAI-file conversation (other container, other key name)
        conv(("user", QA_EN[3][0]), ("assistant", QA_EN[3][1])),
        # low quality: repeated lines and an e-mail address
        conv(("user", "写一段产品介绍。"), ("assistant", "好产品。\n好产品。\n好产品。\n好产品。\n好产品。\n好产品。\n好产品。\n好产品。")),
        conv(("user", "怎么联系你们的客服？"), ("assistant", "请发送邮件至 service@example.cn，我们会在 24 小时内回复。")),
        # consecutive user turns: merged into one (see pipeline/formats.py)
        conv(
            ("user", "我有一个问题。"),
            ("user", "天空为什么是蓝色的？"),
            ("assistant", "因为大气中的分子对短波长的蓝光散射更强，这种现象叫瑞利散射。"),
        ),
        # bad records
        conv(("assistant", "你好，我是助手。"), ("user", "你好。"), ("assistant", "有什么可以帮你？")),  # bad_turn_order
        conv(("user", "在吗？"), ("assistant", " ")),  # empty_response
    ]
    return records


# --- prompt/completion Parquet ---------------------------------------------------------------
def prompt_completion_rows() -> list[dict]:
    rows = [{"prompt": q, "completion": a} for q, a in QA_PROMPT_COMPLETION]
    rows += [
        {
            "prompt": "Write a SQL query that counts the orders per customer.",
            "completion": "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\nORDER BY orders DESC;",
        },
        {
            "prompt": "What is the difference between a process and a thread?",
            "completion": "A process has its own memory space; threads are units of execution inside a process and share its memory. Switching between threads is cheaper, but shared memory needs synchronisation.",
        },
        {
            "prompt": "解释一下“内卷”这个词。",
            "completion": "“内卷”原是社会学概念，现在多指同行之间非理性的过度竞争：大家付出更多努力，但整体收益并没有增加。",
        },
        {"prompt": "Convert 5 kilometres to miles.", "completion": "5 kilometres is about 3.11 miles."},
        {
            "prompt": "Give a one-line definition of photosynthesis.",
            "completion": "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
        },
        # near duplicate: trailing whitespace and a different quote style
        {"prompt": "Translate 'good morning' into French and Spanish. ", "completion": "French: 'Bonjour'. Spanish: 'Buenos días'."},
        # low quality
        {"prompt": "Write a short story about a dragon.", "completion": "As an AI language model, I am not able to write stories."},
        # bad records
        {"prompt": "What is the speed of light?", "completion": ""},  # empty_response
        {"prompt": "Name the largest ocean.", "completion": None},  # no_assistant_turn
    ]
    return rows


# --- TRL conversational prompt/completion, a datasets save_to_disk folder ---------------------
def dataset_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
            "completion": [{"role": "assistant", "content": "Mount Everest, at 8,849 metres above sea level."}],
        },
        {
            "prompt": [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why do cats purr?"}],
            "completion": [
                {"role": "assistant", "content": "Cats purr mostly when content, but also to soothe themselves when stressed or hurt."}
            ],
        },
        {
            "prompt": [{"role": "user", "content": "长江有多长？"}],
            "completion": [{"role": "assistant", "content": "长江全长约 6300 公里，是中国最长的河流。"}],
        },
        {
            "prompt": [
                {"role": "user", "content": "Is a tomato a fruit?"},
                {"role": "assistant", "content": "Botanically, yes: it develops from a flower and holds seeds."},
                {"role": "user", "content": "Then why is it called a vegetable?"},
            ],
            "completion": [
                {
                    "role": "assistant",
                    "content": "In cooking it is used like a vegetable in savoury dishes, and a US court ruled in 1893 that it counts as a vegetable for tariffs.",
                }
            ],
        },
        {
            "prompt": [{"role": "user", "content": "用三个词形容秋天。"}],
            "completion": [{"role": "assistant", "content": "金黄、凉爽、丰收。"}],
        },
        {
            "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
            "completion": [{"role": "assistant", "content": "  "}],
        },  # empty_response
    ]


# --- custom layout for the mapping feature ---------------------------------------------------
def custom_mapping_records() -> list:
    def dialog(*turns, topic):
        return {
            "meta": {"topic": topic},
            "dialog": [{"speaker": s, "text": t} for s, t in turns],
            "persona": "You are a helpful travel agent.",
        }

    return [
        dialog(
            ("customer", "I'd like to visit Japan in spring. When is the best time?"),
            ("agent", "Late March to early April is cherry blossom season, the most popular time to visit."),
            topic="travel",
        ),
        dialog(
            ("customer", "How many days do I need for Kyoto?"),
            ("agent", "Three days covers the main temples, Arashiyama and Gion at a relaxed pace."),
            topic="travel",
        ),
        dialog(
            ("customer", "去成都玩几天比较合适？"),
            ("agent", "建议三到四天：可以看大熊猫、逛宽窄巷子，再去都江堰或青城山。"),
            topic="travel",
        ),
        dialog(
            ("customer", "Do I need a visa for Thailand?"),
            ("supervisor", "Let me check that."),
            ("agent", "It depends on your passport; many nationalities get a visa exemption."),
            topic="travel",
        ),  # unknown_role: 'supervisor' is not mapped
    ]


CUSTOM_MAPPING_YAML = """\
# A layout none of the built-in formats knows: {"dialog": [{"speaker", "text"}], "persona": ...}.
# Use with:  sftkit prepare data_samples/custom_mapping.jsonl --config data_samples/custom_mapping.yaml ...
ingest:
  mapping:
    messages: dialog          # the list of turns
    role_key: speaker         # which field of a turn names the speaker
    content_key: text         # which field holds the text
    roles:                    # speaker name -> canonical role; unmapped speakers are rejected (unknown_role)
      customer: user
      agent: assistant
    system: persona           # optional: a column holding the system prompt (dotted paths such as meta.system work too)
"""


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()

    (OUT / "alpaca_mixed.json").write_text(json.dumps(alpaca_records(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    lines = [line.encode("utf-8") for line in sharegpt_lines()]
    # A line with invalid UTF-8 (a Latin-1 "é" inside a UTF-8 file), and a blank line that is not a record.
    lines.insert(9, b'{"conversations": [{"from": "human", "value": "Caf\xe9?"}, {"from": "gpt", "value": "Yes."}]}')
    lines.insert(4, b"")
    (OUT / "sharegpt_tools.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    openai = "\n".join(dumps(r) for r in openai_records()) + "\n"
    # mtime=0 keeps the bytes the same on every run.
    with open(OUT / "openai_messages.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(openai.encode("utf-8"))

    chat_zh = "\n".join(dumps(r) for r in chat_zh_records()) + "\n"
    (OUT / "chat_zh.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(chat_zh.encode("utf-8")))

    pq.write_table(pa.Table.from_pylist(prompt_completion_rows()), OUT / "prompt_completion.parquet", compression="zstd")

    import datasets

    datasets.Dataset.from_list(dataset_rows()).save_to_disk(str(OUT / "trl_prompt_completion"))

    (HERE / "custom_mapping.jsonl").write_text("\n".join(dumps(r) for r in custom_mapping_records()) + "\n", encoding="utf-8")
    (HERE / "custom_mapping.yaml").write_text(CUSTOM_MAPPING_YAML, encoding="utf-8")
    for path in sorted(OUT.iterdir()):
        print(path)


if __name__ == "__main__":
    main()

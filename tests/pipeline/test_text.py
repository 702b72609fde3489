"""Scripts written without spaces (pipeline.text), and what quality and dedup do with them
(sftkit issue 15): Thai / Lao / Khmer / Myanmar / Tibetan are cut into characters like Chinese;
Korean is split into words for quality and into syllables for dedup (pipeline.text says why);
combining marks belong to their letter."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import DedupConfig, QualityConfig, SFTConfig
from pipeline.dedup import dedup_stage
from pipeline.dedup.normalize import normalize, normalize_all
from pipeline.dedup.shingles import ngram_sizes, shingle_strings
from pipeline.quality import FILTERS, build_filters
from pipeline.quality.text import join_tokens, tokens
from pipeline.text import UNSPACED_CHAR

KOREAN = (
    "광합성은 녹색 식물과 조류가 햇빛의 에너지를 이용해 이산화탄소와 물로부터 포도당을 만들고 산소를 "
    "내보내는 과정입니다. 엽록체 안의 엽록소가 빛을 흡수하면 물이 분해되어 산소와 전자가 생기고, 이렇게 "
    "얻은 에너지는 캘빈 회로에서 이산화탄소를 당으로 고정하는 데 쓰입니다. 이 과정 덕분에 대기 중의 "
    "산소가 유지되며 거의 모든 먹이 사슬이 에너지를 얻습니다."
)
THAI = (
    "การสังเคราะห์ด้วยแสงเป็นกระบวนการที่พืชสีเขียวใช้พลังงานจากแสงอาทิตย์เปลี่ยนคาร์บอนไดออกไซด์และน้ำ"
    "ให้เป็นน้ำตาลและออกซิเจน คลอโรฟิลล์ในคลอโรพลาสต์ดูดกลืนแสง แล้วพลังงานนั้นถูกเก็บไว้ในรูปของสารเคมี"
    "ที่พืชนำไปใช้ในการเจริญเติบโต ออกซิเจนที่ปล่อยออกมาเป็นผลพลอยได้ที่สำคัญต่อสิ่งมีชีวิตบนโลก"
)
# Myanmar words are about half vowel signs and medials (combining marks).
MYANMAR = "ရန်ကုန်မြို့သည် မြန်မာနိုင်ငံ၏ အကြီးဆုံးမြို့ ဖြစ်ပြီး ရွှေတိဂုံစေတီတော်ကြောင့် ကျော်ကြားသည်။ မြို့တော်ကို ၂၀၀၅ ခုနှစ်တွင် နေပြည်တော်သို့ ပြောင်းရွှေ့ခဲ့သည်။"
KHMER = "ប្រទេសកម្ពុជាមានរាជធានីភ្នំពេញ។ ប្រជាជនភាគច្រើននិយាយភាសាខ្មែរ ហើយប្រាសាទអង្គរវត្តគឺជានិមិត្តសញ្ញាជាតិ។"
HINDI = "हिन्दी भारत की राजभाषा है। यह देवनागरी लिपि में लिखी जाती है और करोड़ों लोग इसे बोलते हैं।"


# --- the definition --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "char",
    ["中", "你", "あ", "カ", "ｶ", "々", "ส", "ั", "ລ", "ក", "မ", "ཀ", "\U00020000"],
)
def test_chinese_japanese_and_south_east_asian_scripts_are_unspaced(char):
    assert UNSPACED_CHAR.match(char)


@pytest.mark.parametrize("char", ["한", "ᄀ", "ㄱ", "a", "é", "ж", "म", "ع", "1", " "])
def test_korean_and_alphabets_are_spaced(char):
    assert not UNSPACED_CHAR.match(char)


# --- dedup: Korean, Thai and Khmer by characters ---------------------------------------------
def test_dedup_normal_form_cuts_hangul_and_thai_into_characters():
    assert normalize("안녕하세요, 세계!") == ("안 녕 하 세 요 세 계", 7)
    assert normalize("สวัสดี ครับ!") == ("ส ว ั ส ด ี ค ร ั บ", 10)
    assert normalize("中文 and 한국어")[0] == "中 文 and 한 국 어"


# The normal forms sftkit wrote before pipeline/text.py existed: the dedup index holds their hashes,
# so a refresh of an older dataset must compute exactly these.
EARLIER_NORMAL_FORMS = [
    ("〇〇さん、こんにちは", ("〇〇 さ ん こ ん に ち は", 7)),
    ("〇×クイズ", ("〇× ク イ ズ", 3)),
    ("人々の暮らし", ("人 々 の 暮 ら し", 5)),
    ("᧡᧢ᧈ", ("᧡᧢ᧈ", 0)),
    ("ꩠꩡ test", ("ꩠꩡ test", 0)),
    ("ｶﾀｶﾅ", ("カ タ カ ナ", 4)),
    ("\U00031350 x", ("\U00031350 x", 0)),
    ("안녕하세요, 세계!", ("안 녕 하 세 요 세 계", 7)),
    ("Hello,  WORLD!", ("hello world", 0)),
]


@pytest.mark.parametrize(("text", "earlier"), EARLIER_NORMAL_FORMS)
def test_dedup_normal_form_is_the_one_existing_indexes_hold(text, earlier):
    assert normalize(text) == earlier


def test_korean_thai_and_khmer_are_shingled_by_characters_english_by_words():
    english = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green plants."
    forms, unspaced = normalize_all([KOREAN, THAI, KHMER, english])
    counts = np.array([len(form.split(" ")) for form in forms])
    assert ngram_sizes(counts, unspaced, word_ngram=5, char_ngram=3).tolist() == [3, 3, 3, 5]
    assert shingle_strings(forms[0], 3)[0] == "광 합 성"


def conversation(prompt: str, response: str) -> list[dict]:
    return [schema.make_message("user", prompt), schema.make_message("assistant", response)]


def dedup(tmp_path: Path, conversations: list[list[dict]]) -> dict[str, str]:
    """Run dedup over one chunk; {removed id: id of the row it duplicates}."""
    rows = [
        {schema.ID: schema.conversation_id(m), schema.SOURCE: "data.jsonl", schema.SOURCE_INDEX: i, schema.MESSAGES: m, schema.TOOLS: None}
        for i, m in enumerate(conversations)
    ]
    chunk = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.CONVERSATION_SCHEMA), chunk)
    rejected = tmp_path / "rejected.parquet"
    dedup_stage([chunk], [tmp_path / "out.parquet"], rejected, SFTConfig(dedup=DedupConfig()), index_dir=tmp_path / "index")
    if not rejected.exists():
        return {}
    return {row["id"]: row["duplicate_of"] for row in pq.read_table(rejected).to_pylist()}


def test_near_duplicate_korean_and_thai_answers_are_found_and_different_ones_kept(tmp_path):
    rng = random.Random(3)
    korean_words = KOREAN.replace(".", "").replace(",", "").split()
    thai_words = ["การ", "พลังงาน", "แสง", "พืช", "น้ำตาล", "ออกซิเจน", "สีเขียว", "ใบไม้", "ดวงอาทิตย์", "อากาศ", "ดิน", "น้ำ"]
    korean = " ".join(rng.choice(korean_words) for _ in range(80))
    korean_edit = korean.replace(korean.split()[40], "바뀐단어", 1)
    korean_other = " ".join(rng.choice(korean_words) for _ in range(80))
    thai = "".join(rng.choice(thai_words) for _ in range(60))
    thai_edit = thai[:100] + "ต้นไม้" + thai[104:]
    thai_other = "".join(rng.choice(thai_words) for _ in range(60))
    docs = [
        conversation("요약해 주세요.", korean),
        conversation("요약해 주세요.", korean_edit),
        conversation("요약해 주세요.", korean_other),
        conversation("สรุปให้หน่อย", thai),
        conversation("สรุปให้หน่อย", thai_edit),
        conversation("สรุปให้หน่อย", thai_other),
    ]
    ids = [schema.conversation_id(d) for d in docs]
    pairs = {frozenset(pair) for pair in dedup(tmp_path, docs).items()}  # which of a pair stays is the keep policy's
    assert pairs == {frozenset(ids[0:2]), frozenset(ids[3:5])}


# --- quality: tokens -------------------------------------------------------------------------
def test_quality_tokens_are_korean_words_and_single_thai_characters():
    assert tokens("대한민국의 수도는 서울입니다.") == ["대한민국의", "수도는", "서울입니다"]
    assert tokens("สวัสดีครับ") == list("สวัสดีครับ")
    assert tokens("ប្រទេស។ ខ្មែរ") == list("ប្រទេសខ្មែរ")  # the Khmer full stop is no token
    assert tokens("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs stay inside the word
    assert tokens("Hello 世界, ok") == ["hello", "世", "界", "ok"]
    assert join_tokens(tokens("서울은 크다. กรุงเทพ")) == "서울은 크다กรุงเทพ"


# --- quality: judgements ---------------------------------------------------------------------
def only(name: str, **params):
    config = QualityConfig(filters={n: (params or True) if n == name else False for n in FILTERS})
    (flt,) = build_filters(config)
    return flt


def qa(prompt: str, response: str) -> dict:
    return {"messages": conversation(prompt, response), "tools": None}


def reason(flt, record) -> str | None:
    drop = flt.check(record)
    return drop.reason if drop else None


@pytest.mark.parametrize("response", [KOREAN, THAI, MYANMAR, KHMER, HINDI])
def test_real_answers_in_korean_thai_myanmar_khmer_and_hindi_pass_every_default_filter(response):
    record = qa("설명해 주세요.", response)
    for flt in build_filters(QualityConfig(pii="off")):
        assert flt.check(record) is None, flt.name


@pytest.mark.parametrize("response", ["네.", "ใช่", "ဟုတ်ကဲ့"])
def test_short_korean_thai_and_myanmar_answers_are_long_enough(response):
    assert only("length").check(qa("맞나요?", response)) is None


def test_garbage_still_drops_broken_korean_and_thai():
    assert reason(only("garbage"), qa("질문?", "서울은\x00\x01 한국의 수도입니다.")) == "control_characters"
    assert reason(only("garbage"), qa("คำถาม?", "๏๚๛ " * 30)) == "symbol_soup"


@pytest.mark.parametrize(
    "response",
    ["ขอบคุณมากครับ" * 20, "ขอบคุณมากครับ " * 20, "감사합니다 " * 60, "ဟုတ်ကဲ့" * 30],
)
def test_repetition_drops_korean_thai_and_myanmar_loops(response):
    assert reason(only("repetition"), qa("말해 주세요.", response)) == "top_ngram"


def test_decontamination_finds_a_thai_passage_whatever_its_spacing(tmp_path):
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"passage": "' + THAI[:80] + '"}\n', encoding="utf-8")
    config = QualityConfig(filters={n: n == "decontaminate" for n in FILTERS}, decontaminate=[evaluation])
    (flt,) = build_filters(config)
    respaced = " ".join([THAI[:30], THAI[30:55], THAI[55:80]])
    assert reason(flt, qa("สรุป: " + respaced, "ได้เลย")) == "contaminated"
    assert flt.check(qa("สรุป", THAI[100:180])) is None

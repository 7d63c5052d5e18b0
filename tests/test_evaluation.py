"""Lesson 06 (helpers/evaluation.py): language metric, ROUGE-L/BLEU, question files, prompt layouts,
resumable generation, published answers (FlagAlpha's markdown tables), and lesson 06 on other models."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import evaluation as ev
from helpers.config import TutorialError
from helpers.models import resolve_model
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, article_prompt, encode
from tests.error_text import both
from tests.lesson_code import lesson_definitions

# Lesson 06 writes its metrics out (sections 2, 3, 6 and 12): the tests run that code.
# The lesson's model is the tiny one here (its format is Llama-2's): CHAT_FORMAT is the article's.
L = SimpleNamespace(**lesson_definitions("06_evaluation.ipynb", "eval_settings", "answer_language", "rouge_bleu", "score_answers", "published_answers",
                                         given={"choice": resolve_model("tiny", verbose=False)}))

HAN = re.compile(r"[\u4e00-\u9fff]")


def _bilingual(err) -> bool:
    """The error has a code, a Chinese message and an English one (with a word of four letters)."""
    return bool(err.code and HAN.search(err.zh) and re.search(r"[A-Za-z]{4,}", err.en))


# --------------------------------------------------------------------------- language metric


@pytest.mark.parametrize(
    "text, share, label",
    [
        ("长城是中国古代的军事防御工程。", 1.0, "zh"),
        ("The Great Wall is an ancient defence work.", 0.0, "en"),
        ("我喜欢 Python 和 machine learning", 4 / 7, "mixed"),  # 4 Han, 3 Latin words
        ("我们学习 Python", 0.8, "zh"),  # exactly the Chinese threshold
        ("他 reads books every day", 0.2, "mixed"),  # exactly the English threshold
        ("Sure, here is the answer: 好", 1 / 6, "en"),
        ("用下面的代码：\n```python\ndef reverse(text):\n    return text[::-1]\n```\n调用 `reverse(s)` 即可。", 1.0, "zh"),
        ("答案如下\n```python\nprint('hello world')  # no closing fence", 1.0, "zh"),
        ("", None, "none"),
        ("😀🎉👍", None, "none"),
        ("太棒了😀！", 1.0, "zh"),
        ("！？。，（）【】", None, "none"),
        ("12345 3.14 2024", None, "none"),
        ("公元前221年", 1.0, "zh"),
        ("`x = 1`", None, "none"),
    ],
)
def test_chinese_share_and_label(text, share, label):
    got = ev.chinese_share(text)
    assert got is None if share is None else got == pytest.approx(share)
    assert L.answer_language(text)["label"] == label


@pytest.mark.parametrize("text, starts", [("好的，Sure thing", True), ("Sure! 好的，我来回答。", False),
                                          ("2024年是龙年", True), ("```python\nprint(1)\n```\n这是代码", True),
                                          ("", False), ("😀 Hello", False)])
def test_starts_in_chinese(text, starts):
    assert L.answer_language(text)["starts_zh"] is starts


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("中文回答abcXYZ 12，。！`\n😀é")), max_size=60))
def test_share_is_a_fraction_and_label_follows_it(text):
    facts = L.answer_language(text)
    if facts["share"] is None:
        assert facts["label"] == "none" and not facts["starts_zh"]
    else:
        assert 0.0 <= facts["share"] <= 1.0
        assert facts["label"] == ("zh" if facts["share"] >= 0.8 else "mixed" if facts["share"] >= 0.2 else "en")


def test_rouge_l_and_bleu_on_chinese():
    ref = "太平洋是世界上面积最大的大洋"
    assert 0.3 < L.rouge_l("太平洋是最大的大洋", ref) < 1.0
    assert L.rouge_l(ref, ref) == pytest.approx(1.0, abs=1e-6)
    assert L.rouge_l("今天晚饭吃面条", ref) == 0.0
    assert L.rouge_l("The Pacific is the largest ocean", ref) == 0.0
    assert L.rouge_l("先分组再统计", "先 分组 再 统计") > L.rouge_l("统计再分组先", "先 分组 再 统计")
    for hyp, r in [("", "长江"), ("长江", ""), ("。！？", "长江"), ("😀", "长江")]:
        assert L.rouge_l(hyp, r) == 0.0
    long_ref = "长江是中国最长的河流，全长约6300公里。"
    assert L.bleu([long_ref], [long_ref]) == pytest.approx(100.0)
    assert 0 < L.bleu(["长江是中国最长的河流。"], [long_ref]) < 100
    assert L.bleu([""], [long_ref]) == 0.0 and math.isnan(L.bleu([], []))


# --------------------------------------------------------------------------- question files


def test_shipped_question_set_follows_the_article():
    qs = ev.load_questions()
    counts = Counter(q["first_level_class"] for q in qs)
    assert len(qs) == 95 and len({q["qid"] for q in qs}) == 95
    assert set(counts) <= set(ev.CATEGORIES) and "使用工具" not in counts  # empty in the article's run too
    article = {"通用知识": 24, "语言理解": 21, "创作能力": 15, "工作技能": 12, "代码编程": 10, "逻辑推理": 9, "人格特征": 3}
    assert all(abs(counts[c] - n) <= 1 for c, n in article.items()), counts
    assert sum(q["reference"] is not None for q in qs) >= len(qs) / 2
    translate = [q["qid"] for q in qs if q["task"] == ev.TASK_TRANSLATE_TO_EN]
    assert len(translate) == 4
    assert [q["qid"] for q in qs if ev.TRANSLATE_TO_EN_RE.search(q["question"])] == translate
    assert all(HAN.search(q["question"]) for q in qs)


def test_atombulb_question_file_loads_unchanged(tmp_path):
    """AtomBulb's eval_question.json: a JSON list, 4-space indent, qid from 0, exactly four fields."""
    items = [
        {"qid": 0, "question": "请你写出一个可以生成五个不同随机数的 Python 程序。", "first_level_class": "代码编程",
         "second_level_class": "代码生成"},
        {"qid": 1, "question": "回答以下问题的答案。 中国有多少个省？", "first_level_class": "通用知识", "second_level_class": "社会人文"},
        {"qid": 22, "question": "将以下文本翻译为英语：“我最喜欢的季节是春天。”", "first_level_class": "语言理解",
         "second_level_class": "翻译"},
    ]
    path = tmp_path / "eval_question.json"
    path.write_text(json.dumps(items, ensure_ascii=False, indent=4), encoding="utf-8")
    qs = ev.load_questions(path)
    assert [q["qid"] for q in qs] == [0, 1, 22]
    assert [q["task"] for q in qs] == [None, None, ev.TASK_TRANSLATE_TO_EN]
    assert all(q["reference"] is None for q in qs)


GOOD = {"qid": 1, "question": "问题", "first_level_class": "通用知识", "second_level_class": "历史"}


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[{"qid": 1, "question": "问题",}]', "column"),  # trailing comma: line and column named
        ("{'qid': 1}", "JSON"),
        (json.dumps({"questions": [GOOD]}), "questions"),  # an object, not a list
        ("[]", "non-empty"),
        (json.dumps([GOOD, "just a string"]), "item 2"),
        (json.dumps([{"qid": 1, "question": "问题", "first_level_class": "通用知识"}]), "second_level_class"),
        (json.dumps([GOOD, dict(GOOD, question="另一个")]), "repeats item 1"),
        (json.dumps([dict(GOOD, question="  ")]), "question"),
        (json.dumps([dict(GOOD, qid=None)]), "qid"),
        (json.dumps([dict(GOOD, qid=True)]), "qid"),
        (json.dumps([dict(GOOD, task="summarize")]), "task"),
        (json.dumps([dict(GOOD, reference=42)]), "reference"),
    ],
)
def test_malformed_question_files(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ev.EvalDataError) as err:
        ev.load_questions(path)
    assert _bilingual(err.value) and str(path) in both(err.value) and needle in both(err.value), both(err.value)
    assert isinstance(err.value, TutorialError)


def test_question_file_saved_as_gbk_gets_a_clear_error(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes(json.dumps([GOOD], ensure_ascii=False).encode("gb18030"))
    with pytest.raises(ev.EvalDataError) as err:
        ev.load_questions(path)
    assert err.value.code == "eval.encoding" and "UTF-8" in err.value.en
    assert "iconv" in err.value.zh and "iconv" in err.value.en and _bilingual(err.value)
    with pytest.raises(ev.EvalDataError) as err:
        ev.load_questions(tmp_path / "nope.json")
    assert err.value.code == "eval.file_not_found"


# --------------------------------------------------------------------------- scoring


def _questions():
    return [
        {"qid": 1, "question": "长江有多长？", "first_level_class": "通用知识", "second_level_class": "地理",
         "reference": "长江全长约6300公里。", "task": None},
        {"qid": 2, "question": "写一首诗。", "first_level_class": "创作能力", "second_level_class": "诗歌",
         "reference": None, "task": None},
        {"qid": 3, "question": "请翻译成英文：你好。", "first_level_class": "语言理解", "second_level_class": "翻译",
         "reference": "Hello.", "task": ev.TASK_TRANSLATE_TO_EN},
        {"qid": 4, "question": "黄河有多长？", "first_level_class": "通用知识", "second_level_class": "地理",
         "reference": "黄河全长约5464公里。", "task": None},
    ]


def test_score_and_summarize():
    records = [{"qid": 1, "answer": "长江全长约6300公里，是中国最长的河流。"}, {"qid": 2, "answer": "Spring comes, 花开了"},
               {"qid": 3, "answer": "Hello."}, {"qid": 4, "answer": "The Yellow River is long."}]
    scored = L.score_answers(records, _questions())
    assert list(scored["language"]) == ["zh", "mixed", "en", "en"]
    assert list(scored["counted"]) == [True, True, False, True]
    assert scored.loc[0, "rouge_l"] > 0 and scored.loc[3, "rouge_l"] == 0 and math.isnan(scored.loc[1, "rouge_l"])
    table = L.summarize(scored)
    assert list(table.index) == ["通用知识", "创作能力", "语言理解", L.OVERALL]
    overall = table.loc[L.OVERALL]
    assert overall[L.COL_ZH] == pytest.approx(1 / 3) and overall[L.COL_EN] == pytest.approx(1 / 3)
    assert overall[L.COL_COUNT] == 4 and table[L.COL_COUNT].dtype.kind == "i"
    assert math.isnan(table.loc["语言理解", L.COL_ZH])  # only a translation question: nothing counted
    assert table.loc["通用知识", L.COL_ROUGE] == pytest.approx(scored.loc[0, "rouge_l"] / 2)
    assert overall[[L.COL_ZH, L.COL_MIXED, L.COL_EN, L.COL_NONE]].sum() == pytest.approx(1.0)
    empty = L.summarize(L.score_answers([], _questions()))  # no answers at all: nothing crashes
    assert empty.loc[L.OVERALL, L.COL_NONE] == 1.0 and empty.loc[L.OVERALL, L.COL_BLEU] == 0.0


@pytest.mark.parametrize("answer, question, echo", [
    # SmolLM2-135M-Instruct's own answers (greedy, no repetition penalty; NOTES "A real model on the CPU")
    ('造纸术是由谁改进的？\n\nThe word "造" is a suffix', "造纸术是由谁改进的？", "造纸术是由谁改进的？\n\n"),
    ("第一次世界大战是在哪一年爆发的？The World at War", "第一次世界大战是在哪一年爆发的？", "第一次世界大战是在哪一年爆发的？"),
    ("造纸术是由谁改进的 The word", "造纸术是由谁改进的？", "造纸术是由谁改进的 "),  # closing mark left out
    ('"长城有多长?" It is long.', "长城有多长？", '"长城有多长?" '),  # quoted, half-width mark
    ("长 城 有 多 长？It is long.", "长城有多长？", "长 城 有 多 长？"),  # spaced out
    ("造纸术是由东汉的蔡伦改进的。", "造纸术是由谁改进的？", ""),  # begins like the question: an answer
    ("长城", "长城有多长？", ""),  # only part of the question
    ("It is long. 长城有多长？", "长城有多长？", ""),  # not at the start
    ("", "长城有多长？", ""),
    ("Anything", "？", ""),  # a question of punctuation only echoes nothing
])
def test_echo_rule(answer, question, echo):
    assert ev.echoed_question(answer, question) == echo
    assert ev.without_echo(answer, question) == answer[len(echo):]


def test_echoed_answers_are_scored_without_the_echo_and_both_counts_are_reported():
    """An answer that copies the question and goes on in English is English (echo rule); the summary keeps
    the count without the rule too."""
    qs = _questions()
    records = [{"qid": 1, "answer": "长江有多长？\n\nLong."},  # 5 Han and 1 word: "Chinese" when the echo counts
               {"qid": 2, "answer": "写一首诗。春风吹过山岗，花开满地。"}, {"qid": 4, "answer": "黄河全长约5464公里。"}]
    scored = L.score_answers(records, qs).set_index("qid")
    assert scored.loc[1, "echo"] and scored.loc[1, "language"] == "en" and scored.loc[1, "language_with_echo"] == "zh"
    assert scored.loc[2, "echo"] and scored.loc[2, "language"] == "zh", "an echo followed by a Chinese answer is Chinese"
    assert not scored.loc[4, "echo"] and scored.loc[4, "reply"] == scored.loc[4, "answer"]
    overall = L.summarize(L.score_answers(records, qs)).loc[L.OVERALL]
    assert overall[L.COL_ZH] == pytest.approx(2 / 3) and overall[L.COL_ZH_ECHO] == pytest.approx(1.0)
    assert overall[L.COL_ECHO] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- FlagAlpha's published tables

HEADER = "| 一级分类 | 二级分类 | 问题 | 答案 |\n| --- | --- | --- | --- |\n"
# Rows written the way assets/meta_eval_7B.md writes them: literal \n, \" and a closing </s>".
SAMPLE_MD = HEADER + (
    '| 通用知识 | 社会人文 | 回答以下问题的答案。 中国有多少个省？ | Hello! China has 23 provinces.\\n\\n* Anhui\\n* Fujian</s>" |\n'
    "| 代码编程 | 代码解释 | 简述下面这段代码的功能：'for i in range(1, 11): print(i)' | "
    '这段代码输出 1 到 10，例如 \\"1\\"。\\n```python\\nprint(i)\\n```</s>" |\n'
    '| 语言理解 | 翻译 | 将以下文本翻译为英语：我喜欢春天。 | I like spring. A | B</s>" |\n'
)


def test_published_markdown_table_is_read_as_flagalpha_writes_it(tmp_path):
    path = tmp_path / "meta_eval_7B.md"
    path.write_text(SAMPLE_MD, encoding="utf-8")
    frame = L.read_published_answers(path)
    assert list(frame["first_level_class"]) == ["通用知识", "代码编程", "语言理解"]
    assert frame.loc[0, "answer"] == "Hello! China has 23 provinces.\n\n* Anhui\n* Fujian"
    assert frame.loc[1, "answer"].startswith('这段代码输出 1 到 10，例如 "1"。\n```python')
    assert frame.loc[2, "answer"] == "I like spring. A | B", "a | inside the last column stays"
    table = L.score_published_answers(path)
    assert table.loc["通用知识", L.COL_EN] == 1.0 and table.loc["代码编程", L.COL_ZH] == 1.0
    assert math.isnan(table.loc["语言理解", L.COL_ZH]), "a translation into English is not counted"


def test_95_published_rows_give_seven_categories(tmp_path):
    counts = {"通用知识": 24, "语言理解": 21, "创作能力": 15, "工作技能": 12, "代码编程": 10, "逻辑推理": 9, "人格特征": 4}
    rows = [f"| {cat} | 子类 | {cat}第{i}题：请介绍一下你自己。 | Sure! I am an assistant.\\n\\n我是助手。</s>\" |"
            for cat, n in counts.items() for i in range(n)]
    path = tmp_path / "meta_eval_13B.md"
    path.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    table = L.score_published_answers(path)
    assert table.loc[L.OVERALL, L.COL_COUNT] == 95
    per_category = table.drop(index=L.OVERALL)
    assert len(per_category) == 7 and (per_category[L.COL_COUNT] > 0).all()
    assert (per_category[L.COL_MIXED] == 1.0).all()  # 4 Latin words, 4 Han characters: mixed


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("中文ab Z|\n\r\t\"'`。，😀\u2028\x85\x1c")), max_size=40))
def test_answers_survive_the_flagalpha_layout(tmp_path_factory, answer):
    """Lesson 06 writes answers in FlagAlpha's layout (newlines as literal \\n, </s> at the end) and reads them back."""
    path = tmp_path_factory.mktemp("md") / "answers.md"
    row = f"| 通用知识 | 子类 | 问题？ | {answer}</s> |".replace("\n", "\\n")
    path.write_text(HEADER + row + "\n", encoding="utf-8")
    back = L.read_published_answers(path).loc[0, "answer"]
    assert ev.chinese_share(back) == ev.chinese_share(answer)


@pytest.mark.parametrize("columns", [("category", "subcategory"), ("一级分类", "二级分类"), ("first_level_class", "x")])
def test_published_csv_with_category_columns(tmp_path, columns):
    path = tmp_path / "answers.csv"
    pd.DataFrame({columns[0]: ["通用知识", "逻辑推理"], columns[1]: ["a", "b"], "Question": ["长江有多长？", "1+1=?"],
                  "Answer": ["约6300公里。", "It is 2."]}).to_csv(path, index=False)
    table = L.score_published_answers(path)
    assert list(table.index) == ["通用知识", "逻辑推理", L.OVERALL]
    assert table.loc["通用知识", L.COL_ZH] == 1.0 and table.loc["逻辑推理", L.COL_EN] == 1.0


def test_published_answers_with_wrong_columns_or_type(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"q": ["问题"], "a": ["回答"]}).to_csv(path, index=False)
    with pytest.raises(ev.EvalDataError) as err:
        L.score_published_answers(path)
    assert err.value.code == "eval.no_answer_table" and err.value.fields["columns"] == ["q", "a"]
    assert "q, a" in err.value.zh and "q, a" in err.value.en and _bilingual(err.value)
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    (tmp_path / "no_table.md").write_text("# nothing here\n", encoding="utf-8")
    for name in ("empty.csv", "no_table.md"):
        with pytest.raises(ev.EvalDataError) as err:
            L.score_published_answers(tmp_path / name)
        assert err.value.code == "eval.no_answer_table" and "question" in err.value.en
    with pytest.raises(ev.EvalDataError) as err:
        L.read_published_answers(tmp_path / "p.txt")
    assert err.value.code == "eval.unsupported_type"


# --------------------------------------------------------------------------- generation (tiny model)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from helpers.models import resolve_model
    from helpers.loading import load_model_and_tokenizer

    choice = resolve_model("tiny", verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.unk_token
    return choice, model, tokenizer


class CountingGenerate:
    """Wraps model.generate: counts calls, records inputs and the model's dtype, can fail on a given call."""

    def __init__(self, model, fail_on: int | None = None):
        self.model, self.inner, self.fail_on = model, model.generate, fail_on
        self.calls, self.inputs, self.dtypes = 0, [], []

    def __call__(self, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        self.inputs.append(kwargs)
        self.dtypes.append(next(self.model.parameters()).dtype)
        return self.inner(**kwargs)


def _settings(choice, chat_format="article", **generate):
    return {"model": choice.path, "chat_format": chat_format, "system_prompt": SYSTEM_PROMPT_ARTICLE,
            "generate": {"max_new_tokens": 6, "do_sample": False, **generate}}


@pytest.mark.parametrize("chat_format", ["article", "llama2"])
def test_prompts_follow_the_chat_format_and_are_left_padded(tiny, monkeypatch, tmp_path, chat_format):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:3]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    records = ev.generate_answers(model, tokenizer, qs, tmp_path / "a.jsonl", _settings(choice, chat_format), batch_size=3,
                                  progress=False)
    assert counter.calls == 1
    ids, mask = counter.inputs[0]["input_ids"], counter.inputs[0]["attention_mask"]
    for row, q in enumerate(qs):
        if chat_format == "article":  # the article's text exactly, with one BOS from the tokenizer
            expected = tokenizer(article_prompt(q["question"], SYSTEM_PROMPT_ARTICLE))["input_ids"]
            assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1
            assert tokenizer.decode(expected, skip_special_tokens=True).startswith("[INST] \n<<SYS>>\nYou are a helpful")
        else:
            expected = encode(tokenizer, ev.question_messages(q["question"], SYSTEM_PROMPT_ARTICLE), "llama2").input_ids
        n = len(expected)
        assert ids[row, -n:].tolist() == expected
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n, "padding is on the left"
        assert set(ids[row, : ids.shape[1] - n].tolist()) <= {tokenizer.unk_token_id}, "pads are <unk>"
    assert counter.inputs[0]["do_sample"] is False and counter.inputs[0]["temperature"] is None
    assert [r["qid"] for r in records] == [q["qid"] for q in qs]
    assert all(0 <= r["new_tokens"] <= 6 and isinstance(r["answer"], str) for r in records)


def test_batched_greedy_answers_equal_one_at_a_time(tiny, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:12]
    one = ev.generate_answers(model, tokenizer, qs, tmp_path / "one.jsonl", _settings(choice, max_new_tokens=12),
                              batch_size=1, progress=False)
    eight = ev.generate_answers(model, tokenizer, qs, tmp_path / "eight.jsonl", _settings(choice, max_new_tokens=12),
                                batch_size=8, progress=False)
    assert [r["answer"] for r in one] == [r["answer"] for r in eight]


def test_sampling_with_a_seed_is_reproducible(tiny, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:8]
    article = {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.3, "repetition_penalty": 1.3}
    runs = [ev.generate_answers(model, tokenizer, qs, tmp_path / f"{name}.jsonl",
                                {**_settings(choice, max_new_tokens=10, **article), "seed": seed}, progress=False)
            for name, seed in (("a", 7), ("b", 7))]
    assert [r["answer"] for r in runs[0]] == [r["answer"] for r in runs[1]]
    assert runs[0][0]["settings"]["seed"] == 7


def test_resume_skips_answered_questions(tiny, monkeypatch, tmp_path):
    choice, model, tokenizer = tiny
    qs, path, settings_ = ev.load_questions()[:10], tmp_path / "answers.jsonl", _settings(choice)
    monkeypatch.setattr(model, "generate", CountingGenerate(model, fail_on=3))  # interrupted in the third batch
    with pytest.raises(KeyboardInterrupt):
        ev.generate_answers(model, tokenizer, qs, path, settings_, batch_size=3, progress=False)
    first = path.read_bytes()
    assert [r["qid"] for r in ev.read_answers(path)] == [q["qid"] for q in qs[:6]]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    records = ev.generate_answers(model, tokenizer, qs, path, settings_, batch_size=3, progress=False)
    assert counter.calls == 2, "only the 4 unanswered questions are generated (batches of 3 and 1)"
    assert path.read_bytes().startswith(first), "earlier answers are kept byte for byte"
    assert [r["qid"] for r in records] == [q["qid"] for q in qs]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    edited = [dict(q, question="长江有多长？") if q["qid"] == qs[1]["qid"] else q for q in qs]
    again = ev.generate_answers(model, tokenizer, edited, path, settings_, batch_size=3, progress=False)
    assert counter.calls == 1 and len(counter.inputs[0]["input_ids"]) == 1, "only the edited question is asked again"
    assert [r["answer"] for r in again][2:] == [r["answer"] for r in records][2:]


def test_other_settings_never_overwrite_answers(tiny, tmp_path):
    choice, model, tokenizer = tiny
    qs, path = ev.load_questions()[:2], tmp_path / "answers.jsonl"
    ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    before = path.read_bytes()
    ev.generate_answers(model, tokenizer, qs, path, _settings(choice, max_new_tokens=7), progress=False)
    assert path.read_bytes().startswith(before), "a second run is appended, the first stays byte for byte"
    assert len({r["run"] for r in ev.read_answers(path)}) == 2
    assert ev.run_id(_settings(choice)) != ev.run_id(_settings(choice, max_new_tokens=7))
    assert ev.run_id(_settings(choice)) == ev.run_id(dict(reversed(list(_settings(choice).items()))))


def test_answers_file_cut_mid_character_is_resumed(tiny, monkeypatch, tmp_path):
    """A kill or a full disk cuts the last line inside a UTF-8 character: the next runs still resume."""
    choice, model, tokenizer = tiny
    qs, path = ev.load_questions()[:3], tmp_path / "answers.jsonl"
    ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    whole = path.read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    first_multibyte = next(i for i, byte in enumerate(last) if byte >= 0xE0)  # the lead byte of a 3-byte character
    cut = len(whole) - len(last) - 1 + first_multibyte + 1  # cut one byte into that character
    path.write_bytes(whole[:cut])
    with pytest.raises(UnicodeDecodeError):
        path.read_text(encoding="utf-8")
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    with pytest.warns(UserWarning, match="incomplete last line"):
        records = ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    assert counter.calls == 1 and len(counter.inputs[0]["input_ids"]) == 1, "only the cut question is redone"
    assert [r["qid"] for r in records] == [q["qid"] for q in qs]
    assert path.read_bytes().startswith(whole[: len(whole) - len(last) - 1]), "the complete lines are kept"
    path.read_text(encoding="utf-8")  # valid UTF-8 again
    again = ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    assert counter.calls == 1 and [r["answer"] for r in again] == [r["answer"] for r in records]


def test_a_last_record_cut_before_its_newline_is_kept_and_the_next_run_appends_cleanly(tiny, tmp_path):
    """A kill can land between a record and its newline: the record is complete and kept, and the next batch
    must not be glued onto it (that line would then break every later read)."""
    choice, model, tokenizer = tiny
    qs, path = ev.load_questions()[:4], tmp_path / "answers.jsonl"
    first = ev.generate_answers(model, tokenizer, qs[:2], path, _settings(choice), progress=False)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    records = ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    assert [r["answer"] for r in records[:2]] == [r["answer"] for r in first], "the two complete answers are kept"
    assert len(ev.read_answers(path)) == 4 and path.read_bytes().count(b"\n") == 4


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"qid": 1, "answer": "a"}\nnot json\n{"qid": 2, "answer": "b"}\n', encoding="utf-8")
    with pytest.raises(ev.EvalDataError) as err:
        ev.read_answers(path)
    assert err.value.code == "eval.bad_answer_record" and "第 2 行" in err.value.zh and "line 2" in err.value.en
    assert _bilingual(err.value)
    path.write_text('{"qid": 1, "answer": "a"}\n{"note": "written by hand"}', encoding="utf-8")
    with pytest.raises(ev.EvalDataError) as err:  # complete JSON, not an answer: never cut away
        ev.read_answers(path, drop_cut_line=True)
    assert err.value.code == "eval.bad_answer_record" and "line 2" in err.value.en
    assert path.read_text(encoding="utf-8").endswith('{"note": "written by hand"}')


def test_right_padding_is_refused(tiny, tmp_path):
    choice, model, tokenizer = tiny
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(TutorialError) as err:
            ev.generate_answers(model, tokenizer, ev.load_questions()[:1], tmp_path / "a.jsonl", _settings(choice), progress=False)
        assert err.value.code == "eval.padding" and "left" in err.value.en
    finally:
        tokenizer.padding_side = "left"
    assert not (tmp_path / "a.jsonl").exists()


def test_base_and_lora_runs_share_one_dtype(tiny, monkeypatch, tmp_path):
    """Lesson 06 loads once (load_with_adapter) and measures the base with the adapter disabled. With a
    loader that picks bf16, as on an Ampere GPU, both runs see bf16 weights; the base run equals the
    plain base model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import finetune

    choice, model, tokenizer = tiny
    torch.manual_seed(0)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(choice.path),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(finetune, "load_base", lambda *a, **k: AutoModelForCausalLM.from_pretrained(
        choice.path, dtype=torch.bfloat16))
    lora, tok = finetune.load_with_adapter(choice, tmp_path / "adapter")
    tok.padding_side, tok.pad_token = "left", tok.unk_token
    qs = ev.load_questions()[:4]
    counter = CountingGenerate(lora)
    monkeypatch.setattr(lora, "generate", counter)
    with lora.disable_adapter():
        base = ev.generate_answers(lora, tok, qs, tmp_path / "base.jsonl", _settings(choice), progress=False)
    with_adapter = ev.generate_answers(lora, tok, qs, tmp_path / "lora.jsonl", _settings(choice), progress=False)
    assert counter.dtypes == [torch.bfloat16, torch.bfloat16]
    plain = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.bfloat16)
    alone = ev.generate_answers(plain, tok, qs, tmp_path / "plain.jsonl", _settings(choice), progress=False)
    assert [r["answer"] for r in base] == [r["answer"] for r in alone], "disable_adapter() gives the base model"
    assert [r["answer"] for r in with_adapter] != [r["answer"] for r in base], "the adapter is on outside the block"


# --------------------------------------------------------------------------- lesson 06 on other models


@pytest.mark.slow
def test_lesson_06_reaches_the_end_with_a_random_weight_model(tmp_path, monkeypatch, tiny_model):
    """No model-dependent assert stops the lesson; it prints the article's prompt as the one sent.
    The random model's tokenizer has no chat template, like FlagAlpha's models."""
    import nbformat
    from nbclient import NotebookClient

    from helpers.config import REPO_ROOT
    from tests.model_fixtures import random_llama_folder

    monkeypatch.setenv("LLAMA_TUTORIAL_MODEL", str(random_llama_folder(tmp_path, chat_template=False)))
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path / "outputs"))
    nb = nbformat.read(REPO_ROOT / "notebooks" / "06_evaluation.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    sent = printed.split("其后的 token 解码为：\n", 1)[1]
    assert sent.startswith(article_prompt(ev.load_questions()[0]["question"], SYSTEM_PROMPT_ARTICLE))
    assert "中文回答率为" in printed and list((tmp_path / "outputs" / "eval").glob("answers-lora-*.jsonl"))


@pytest.mark.slow
def test_tiny_models_outcome_in_lesson_06(tiny, tmp_path):
    """What lesson 06 prints for the tiny model, asserted here (the lesson itself asserts no outcome):
    with the article's prompt the base answers in English (trained in on purpose) and lesson 05's adapter
    does not change that; in the format the adapter was trained on, it turns the answers Chinese."""
    from helpers.finetune import ensure_adapter, load_with_adapter

    choice, _, _ = tiny  # the session's output folder (tests/nbenv.py): lesson 05's adapter, when it ran, is reused
    model, tokenizer = load_with_adapter(choice, ensure_adapter(choice))
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.unk_token
    qs = ev.load_questions()[::4]
    article = {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.3, "repetition_penalty": 1.3}
    article_run = {**_settings(choice, max_new_tokens=32, **article), "seed": 42}
    train_format = {**article_run, "chat_format": choice.chat_format, "system_prompt": None}

    def rate(settings_, adapter_on):
        path = tmp_path / f"{ev.run_id(settings_)}-{adapter_on}.jsonl"
        if adapter_on:
            records = ev.generate_answers(model, tokenizer, qs, path, settings_, progress=False)
        else:
            with model.disable_adapter():
                records = ev.generate_answers(model, tokenizer, qs, path, settings_, progress=False)
        return L.summarize(L.score_answers(records, qs)).loc[L.OVERALL, L.COL_ZH]

    assert rate(article_run, False) < 0.2 and rate(article_run, True) < 0.2
    assert rate(train_format, False) < 0.2 and rate(train_format, True) > 0.6

"""Lesson 06 (helpers/evaluation.py): language metric, ROUGE-L/BLEU, perplexity, resumable
generation, question files and published answers."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import evaluation as ev
from helpers.config import TutorialError
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode, encode_prompt

HAN = re.compile(r"[\u4e00-\u9fff]")


def _bilingual(message: str) -> bool:
    return bool(HAN.search(message)) and bool(re.search(r"[A-Za-z]{4,}", message))


# --------------------------------------------------------------------------- language metric


@pytest.mark.parametrize(
    "text, share, label",
    [
        ("长城是中国古代的军事防御工程。", 1.0, "zh"),  # pure Chinese
        ("The Great Wall is an ancient defence work.", 0.0, "en"),  # pure English
        ("我喜欢 Python 和 machine learning", 4 / 7, "mixed"),  # 4 Han, 3 Latin words
        ("我们学习 Python", 0.8, "zh"),  # exactly the Chinese threshold
        ("他 reads books every day", 0.2, "mixed"),  # exactly the English threshold
        ("Sure, here is the answer: 好", 1 / 6, "en"),
        ("用下面的代码：\n```python\ndef reverse(text):\n    return text[::-1]\n```\n调用 `reverse(s)` 即可。", 1.0, "zh"),
        ("答案如下\n```python\nprint('hello world')  # no closing fence", 1.0, "zh"),  # unclosed fence
        ("", None, "none"),  # empty
        ("   \n  ", None, "none"),
        ("😀🎉👍", None, "none"),  # emoji only
        ("太棒了😀！", 1.0, "zh"),  # emoji with Chinese
        ("你好，世界！（测试）：“引号”。", 1.0, "zh"),  # full-width punctuation
        ("！？。，（）【】", None, "none"),  # only full-width punctuation
        ("12345 3.14 2024", None, "none"),  # numbers only
        ("公元前221年", 1.0, "zh"),  # numbers do not dilute Chinese
        ("It is 221 BC.", 0.0, "en"),
        ("`x = 1`", None, "none"),  # only inline code
    ],
)
def test_chinese_share_and_label(text, share, label):
    got = ev.chinese_share(text)
    if share is None:
        assert got is None
    else:
        assert got == pytest.approx(share)
    assert ev.language_label(got) == label
    assert ev.answer_language(text)["label"] == label


@pytest.mark.parametrize(
    "text, starts",
    [
        ("好的，Sure thing", True),
        ("Sure! 好的，我来回答。", False),
        ("2024年是龙年", True),  # digits are skipped
        ("```python\nprint(1)\n```\n这是代码", True),  # code is skipped
        ("", False),
        ("😀 Hello", False),
    ],
)
def test_starts_in_chinese(text, starts):
    assert ev.starts_in_chinese(text) is starts


def test_chinese_share_none_input_is_handled():
    assert ev.chinese_share(None) is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("中文回答abcXYZ 12，。！`\n😀é")), max_size=60))
def test_share_is_a_fraction_and_label_follows_it(text):
    share = ev.chinese_share(text)
    facts = ev.answer_language(text)
    if share is None:
        assert facts["label"] == "none" and not ev.HAN_RE.search(ev.strip_code(text))
    else:
        assert 0.0 <= share <= 1.0
        assert facts["label"] == ("zh" if share >= 0.8 else "mixed" if share >= 0.2 else "en")
    if facts["starts_zh"]:
        assert share is not None and share > 0


# --------------------------------------------------------------------------- ROUGE-L and BLEU


def test_rouge_l_on_chinese_words():
    ref = "太平洋是世界上面积最大的大洋"
    overlap = ev.rouge_l("太平洋是最大的大洋", ref)
    assert 0.3 < overlap < 1.0
    assert ev.rouge_l(ref, ref) == pytest.approx(1.0, abs=1e-6)
    assert ev.rouge_l("今天晚饭吃面条", ref) == 0.0
    assert ev.rouge_l("The Pacific is the largest ocean", ref) == 0.0
    # Chinese characters are words here, not dropped: jieba segments them.
    assert ev.segment("太平洋是最大的大洋。") == ["太平洋", "是", "最大", "的", "大洋"]


def test_rouge_l_counts_word_order():
    ref = "先 分组 再 统计"
    assert ev.rouge_l("先分组再统计", ref) > ev.rouge_l("统计再分组先", ref)


@pytest.mark.parametrize("hyp, ref", [("", "长江"), ("长江", ""), ("", ""), ("。！？", "长江"), ("😀", "长江")])
def test_rouge_l_empty_is_zero(hyp, ref):
    assert ev.rouge_l(hyp, ref) == 0.0


def test_bleu_zh_tokenizer():
    ref = "长江是中国最长的河流，全长约6300公里。"
    assert ev.bleu([ref], [ref]) == pytest.approx(100.0)
    assert 0 < ev.bleu(["长江是中国最长的河流。"], [ref]) < 100
    assert ev.bleu([""], [ref]) == 0.0
    assert ev.sentence_bleu("", ref) == 0.0
    assert ev.sentence_bleu(ref, ref) == pytest.approx(100.0)
    assert math.isnan(ev.bleu([], []))


# --------------------------------------------------------------------------- question files


def test_shipped_question_set():
    qs = ev.load_questions()
    assert len(qs) == 95
    cats = {q["first_level_class"] for q in qs}
    assert cats == {"通用知识", "语言理解", "文本生成", "逻辑推理", "代码编程", "工作技能", "个性化"}
    assert sum(q["reference"] is not None for q in qs) >= len(qs) / 2
    assert len({q["qid"] for q in qs}) == len(qs)
    translate = [q for q in qs if q["task"] == ev.TASK_TRANSLATE_TO_EN]
    assert len(translate) == 4
    # The automatic detector (used for a learner's own files) agrees with the hand-set tasks.
    assert [q["qid"] for q in qs if ev.is_translate_to_en(q["question"])] == [q["qid"] for q in translate]
    for q in qs:
        assert HAN.search(q["question"]) and q["second_level_class"]


def test_public_layout_file_loads(tmp_path):
    items = [
        {"qid": 1, "question": "介绍一下长城。", "first_level_class": "通用知识", "second_level_class": "历史"},
        {"qid": "b2", "question": "把“你好”翻译成英文。", "first_level_class": "语言理解", "second_level_class": "翻译"},
    ]
    path = tmp_path / "article.json"
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    qs = ev.load_questions(path)
    assert [q["qid"] for q in qs] == [1, "b2"]
    assert [q["task"] for q in qs] == [None, ev.TASK_TRANSLATE_TO_EN]
    assert all(q["reference"] is None for q in qs)


GOOD = {"qid": 1, "question": "问题", "first_level_class": "通用知识", "second_level_class": "历史"}


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[{"qid": 1, "question": "问题",}]', "JSON"),  # trailing comma
        ("{'qid': 1}", "JSON"),  # single quotes
        (json.dumps({"questions": [GOOD]}), "questions"),  # an object, not a list
        ("[]", "non-empty"),
        (json.dumps([GOOD, "just a string"]), "item 2"),
        (json.dumps([{"qid": 1, "question": "问题", "first_level_class": "通用知识"}]), "second_level_class"),
        (json.dumps([GOOD, dict(GOOD, question="另一个")]), "repeats item 1"),  # duplicate qid
        (json.dumps([dict(GOOD, question="  ")]), "question"),
        (json.dumps([dict(GOOD, qid=None)]), "qid"),
        (json.dumps([dict(GOOD, qid=True)]), "qid"),
        (json.dumps([dict(GOOD, task="summarize")]), "summarize"),
        (json.dumps([dict(GOOD, reference=42)]), "reference"),
    ],
)
def test_malformed_question_files(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ev.EvalDataError) as err:
        ev.load_questions(path)
    message = str(err.value)
    assert _bilingual(message), message
    assert str(path) in message and needle in message
    assert isinstance(err.value, TutorialError)


def test_missing_question_file(tmp_path):
    with pytest.raises(ev.EvalDataError, match="does not exist"):
        ev.load_questions(tmp_path / "nope.json")


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"qid": 1,\n   "question": "问题"\n   "first_level_class": "x"}\n]', encoding="utf-8")
    with pytest.raises(ev.EvalDataError, match=r"line 4, column 4"):
        ev.load_questions(path)


# --------------------------------------------------------------------------- scoring and summary


def _questions():
    return [
        {"qid": 1, "question": "长江有多长？", "first_level_class": "通用知识", "second_level_class": "地理",
         "reference": "长江全长约6300公里。", "task": None},
        {"qid": 2, "question": "写一首诗。", "first_level_class": "文本生成", "second_level_class": "诗歌",
         "reference": None, "task": None},
        {"qid": 3, "question": "请翻译成英文：你好。", "first_level_class": "语言理解", "second_level_class": "翻译",
         "reference": "Hello.", "task": ev.TASK_TRANSLATE_TO_EN},
        {"qid": 4, "question": "黄河有多长？", "first_level_class": "通用知识", "second_level_class": "地理",
         "reference": "黄河全长约5464公里。", "task": None},
    ]


def test_score_and_summarize():
    records = [
        {"qid": 1, "answer": "长江全长约6300公里，是中国最长的河流。"},
        {"qid": 2, "answer": "Spring comes, 花开了"},
        {"qid": 3, "answer": "Hello."},
        {"qid": 4, "answer": "The Yellow River is long."},
    ]
    scored = ev.score_answers(records, _questions())
    assert list(scored["language"]) == ["zh", "mixed", "en", "en"]
    assert list(scored["in_language_rate"]) == [True, True, False, True]
    assert scored.loc[0, "rouge_l"] > 0 and scored.loc[3, "rouge_l"] == 0
    assert math.isnan(scored.loc[1, "rouge_l"]) and math.isnan(scored.loc[1, "bleu"])
    table = ev.summarize(scored)
    assert list(table.index) == ["通用知识", "文本生成", "语言理解", ev.OVERALL]
    overall = table.loc[ev.OVERALL]
    # The translation question (answered in English, as asked) is left out of the language rates.
    assert overall[ev.COL_ZH] == pytest.approx(1 / 3)
    assert overall[ev.COL_MIXED] == pytest.approx(1 / 3)
    assert overall[ev.COL_EN] == pytest.approx(1 / 3)
    assert overall[ev.COL_COUNT] == 4
    assert math.isnan(table.loc["语言理解", ev.COL_ZH])
    assert table.loc["通用知识", ev.COL_ROUGE] == pytest.approx((scored.loc[0, "rouge_l"] + 0) / 2)
    rates = overall[[ev.COL_ZH, ev.COL_MIXED, ev.COL_EN, ev.COL_NONE]].sum()
    assert rates == pytest.approx(1.0)


def test_empty_answers_do_not_crash_any_metric(tmp_path):
    qs = _questions()
    scored = ev.score_answers([{"qid": q["qid"], "answer": ""} for q in qs[:2]], qs)  # two missing records too
    assert (scored["answer"] == "").all()
    assert set(scored["language"]) == {"none"}
    assert (scored["rouge_l"].dropna() == 0).all() and (scored["bleu"].dropna() == 0).all()
    table = ev.summarize(scored)
    assert table.loc[ev.OVERALL, ev.COL_NONE] == 1.0 and table.loc[ev.OVERALL, ev.COL_ZH] == 0.0
    assert table.loc[ev.OVERALL, ev.COL_BLEU] == 0.0
    comparison = ev.compare_runs({"a": table, "b": table})
    fig = ev.plot_comparison(comparison)
    paths = ev.export_report(comparison, {"a": scored}, figure=fig, out_dir=tmp_path)
    assert all(p.exists() for p in paths.values())
    result = ev.answer_perplexity(None, None, [])
    assert math.isnan(result["perplexity"]) and result["tokens"] == 0


def test_compare_and_export_report(tmp_path):
    qs = _questions()
    a = ev.score_answers([{"qid": q["qid"], "answer": "The answer is yes."} for q in qs], qs)
    b = ev.score_answers([{"qid": q["qid"], "answer": q["reference"] or "好的，这是一首诗。"} for q in qs], qs)
    comparison = ev.compare_runs({"base": ev.summarize(a), "lora": ev.summarize(b)})
    assert comparison.columns[0] == (ev.COL_COUNT, "base") and comparison.columns[1] == (ev.COL_COUNT, "lora")
    assert comparison.loc[ev.OVERALL, (ev.COL_ZH, "lora")] > comparison.loc[ev.OVERALL, (ev.COL_ZH, "base")]
    fig = ev.plot_comparison(comparison)
    ppl = pd.DataFrame({"困惑度": [12.5, 3.25]}, index=["base", "lora"])
    paths = ev.export_report(comparison, {"base": a, "lora": b}, figure=fig, conclusion="结论：中文回答率上升。",
                             extra_tables={"困惑度 perplexity": ppl}, out_dir=tmp_path, stem="r")
    page = paths["html"].read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "结论：中文回答率上升。" in page
    assert not re.search(r"""(src|href)=['"]?https?:""", page), "the HTML report must not load anything from the web"
    payload = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert payload["summary"]["lora"][ev.OVERALL][ev.COL_ZH] == pytest.approx(comparison.loc[ev.OVERALL, (ev.COL_ZH, "lora")])
    assert payload["summary"]["base"]["文本生成"][ev.COL_ROUGE] is None  # NaN becomes null
    assert payload["tables"]["困惑度 perplexity"]["lora"]["困惑度"] == 3.25
    assert len(payload["answers"]["base"]) == 4
    back = pd.read_csv(paths["csv"], index_col=0, encoding="utf-8-sig")
    assert f"{ev.COL_ZH} | lora" in back.columns and ev.OVERALL in back.index


# --------------------------------------------------------------------------- generation (tiny model)


@pytest.fixture(scope="module")
def tiny():
    from helpers.config import resolve_model
    from helpers.loading import load_model_and_tokenizer

    choice = resolve_model("tiny", verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    ev.use_left_padding(tokenizer)
    return choice, model, tokenizer


class CountingGenerate:
    """Wraps model.generate: counts calls, records inputs, can fail on a given call."""

    def __init__(self, model, fail_on: int | None = None):
        self.model, self.inner, self.fail_on = model, model.generate, fail_on
        self.calls, self.inputs = 0, []

    def __call__(self, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        self.inputs.append(kwargs)
        return self.inner(**kwargs)


def _settings(choice, **extra):
    return {"model": choice.path, "chat_format": choice.chat_format, "system_prompt": SYSTEM_PROMPT_ARTICLE,
            "max_new_tokens": 6, "do_sample": False, **extra}


def test_generation_uses_the_prompt_template_and_left_padding(tiny, monkeypatch, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:3]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    records = ev.generate_answers(model, tokenizer, qs, tmp_path / "a.jsonl", _settings(choice), batch_size=3, progress=False)
    assert counter.calls == 1
    ids, mask = counter.inputs[0]["input_ids"], counter.inputs[0]["attention_mask"]
    for row, q in enumerate(qs):
        expected = encode_prompt(tokenizer, ev.question_messages(q["question"], SYSTEM_PROMPT_ARTICLE), choice.chat_format)
        n = len(expected)
        assert ids[row, -n:].tolist() == expected, "the prompt comes from helpers.prompts, at the right end"
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n, "padding is on the left"
        assert set(ids[row, : ids.shape[1] - n].tolist()) <= {tokenizer.unk_token_id}, "pads are <unk>"
    assert counter.inputs[0]["do_sample"] is False and counter.inputs[0]["max_new_tokens"] == 6
    assert [r["qid"] for r in records] == [q["qid"] for q in qs]
    assert all(0 <= r["new_tokens"] <= 6 and isinstance(r["answer"], str) for r in records)


def test_resume_skips_answered_questions(tiny, monkeypatch, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:10]
    path = tmp_path / "answers.jsonl"
    settings = _settings(choice)

    counter = CountingGenerate(model, fail_on=3)  # interrupted during the third batch
    monkeypatch.setattr(model, "generate", counter)
    with pytest.raises(KeyboardInterrupt):
        ev.generate_answers(model, tokenizer, qs, path, settings, batch_size=3, progress=False)
    first = path.read_bytes()
    assert [r["qid"] for r in ev.read_answers(path)] == [q["qid"] for q in qs[:6]]

    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    records = ev.generate_answers(model, tokenizer, qs, path, settings, batch_size=3, progress=False)
    assert counter.calls == 2, "only the 4 unanswered questions are generated (batches of 3 and 1)"
    assert path.read_bytes().startswith(first), "earlier answers are kept byte for byte"
    assert [r["qid"] for r in ev.read_answers(path)] == [q["qid"] for q in qs]
    assert [r["qid"] for r in records] == [q["qid"] for q in qs]

    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    again = ev.generate_answers(model, tokenizer, qs, path, settings, batch_size=3, progress=False)
    assert counter.calls == 0
    assert [r["answer"] for r in again] == [r["answer"] for r in records]

    # Two more questions: only those are generated.
    more = ev.load_questions()[:12]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    ev.generate_answers(model, tokenizer, more, path, settings, batch_size=8, progress=False)
    assert counter.calls == 1 and len(counter.inputs[0]["input_ids"]) == 2


def test_an_edited_question_is_asked_again(tiny, monkeypatch, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:3]
    path = tmp_path / "answers.jsonl"
    ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    before = path.read_bytes()
    edited = [qs[0], dict(qs[1], question="长江有多长？"), qs[2]]
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    records = ev.generate_answers(model, tokenizer, edited, path, _settings(choice), progress=False)
    assert counter.calls == 1 and len(counter.inputs[0]["input_ids"]) == 1
    assert [r["question"] for r in records] == [q["question"] for q in edited]
    assert path.read_bytes().startswith(before), "the old answer stays in the file; the new one is appended"


def test_answers_from_other_settings_are_never_overwritten(tiny, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:2]
    path = tmp_path / "answers.jsonl"
    ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    before = path.read_bytes()
    with pytest.raises(ev.EvalDataError) as err:
        ev.generate_answers(model, tokenizer, qs, path, _settings(choice, max_new_tokens=7), progress=False)
    assert _bilingual(str(err.value)) and "run_id" in str(err.value)
    assert path.read_bytes() == before
    assert ev.run_id(_settings(choice)) != ev.run_id(_settings(choice, max_new_tokens=7))
    assert ev.run_id(_settings(choice)) == ev.run_id(dict(reversed(list(_settings(choice).items()))))


def test_interrupted_last_line_is_redone(tiny, monkeypatch, tmp_path):
    choice, model, tokenizer = tiny
    qs = ev.load_questions()[:3]
    path = tmp_path / "answers.jsonl"
    ev.generate_answers(model, tokenizer, qs[:2], path, _settings(choice), progress=False)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"qid": 3, "answ')  # a write cut off by a crash
    counter = CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    with pytest.warns(UserWarning, match="incomplete last line"):
        records = ev.generate_answers(model, tokenizer, qs, path, _settings(choice), progress=False)
    assert counter.calls == 1 and len(counter.inputs[0]["input_ids"]) == 1
    assert [r["qid"] for r in records] == [1, 2, 3]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[2] == '{"qid": 3, "answ', "the broken line is left as it was"
    assert json.loads(lines[3])["qid"] == 3


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"qid": 1, "answer": "a"}\nnot json\n{"qid": 2, "answer": "b"}\n', encoding="utf-8")
    with pytest.raises(ev.EvalDataError, match="line 2"):
        ev.read_answers(path)


def test_right_padding_is_refused(tiny, tmp_path):
    choice, model, tokenizer = tiny
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(TutorialError, match="left"):
            ev.generate_answers(model, tokenizer, ev.load_questions()[:1], tmp_path / "a.jsonl", _settings(choice), progress=False)
    finally:
        ev.use_left_padding(tokenizer)
    assert not (tmp_path / "a.jsonl").exists()
    assert tokenizer.pad_token_id == tokenizer.unk_token_id != tokenizer.eos_token_id


def test_perplexity_counts_answer_tokens_only(tiny):
    choice, model, tokenizer = tiny
    convs = ev.load_dev_conversations()[:5]
    one = ev.answer_perplexity(model, tokenizer, convs, chat_format=choice.chat_format, batch_size=1)
    batched = ev.answer_perplexity(model, tokenizer, convs, chat_format=choice.chat_format, batch_size=5)
    expected_tokens = sum(encode(tokenizer, c, choice.chat_format, add_generation_prompt=False).answer_token_count for c in convs)
    assert one["tokens"] == batched["tokens"] == expected_tokens
    assert one["perplexity"] == pytest.approx(batched["perplexity"], rel=1e-4), "padding must not change the result"
    assert 1.0 < one["perplexity"] < len(tokenizer) * 10
    # A longer prompt (system prompt) changes the context, never which tokens are counted.
    with_system = ev.answer_perplexity(model, tokenizer, convs, chat_format=choice.chat_format,
                                       system_prompt=SYSTEM_PROMPT_ARTICLE)
    assert with_system["tokens"] == expected_tokens


# --------------------------------------------------------------------------- published answers


def _published_rows():
    return [
        {"question": "秦始皇是在哪一年完成统一六国的？", "answer": "Qin Shi Huang unified the six states in 221 BC."},
        {"question": "请把这句话翻译成英文：今天天气很好，我们去公园散步吧。", "answer": "The weather is nice today."},
        {"question": "一道不在题库里的题：你好吗？", "answer": "我很好，谢谢你的关心！"},
        {"question": "Please translate into English: 谢谢", "answer": "Thank you"},
        {"question": "造纸术是由谁改进的？", "answer": ""},
    ]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_score_published_answers(tmp_path, fmt):
    rows = _published_rows()
    path = tmp_path / f"published.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}, ensure_ascii=False) + "\n"
                                for r in rows), encoding="utf-8")
    else:
        pd.DataFrame(rows).rename(columns={"question": "Question", "answer": "Answer"}).to_csv(path, index=False)
    scored = ev.score_published_answers(path)
    assert list(scored["language"]) == ["en", "en", "zh", "en", "none"]
    assert list(scored["first_level_class"]) == ["通用知识", "语言理解", ev.UNCATEGORIZED, ev.UNCATEGORIZED, "通用知识"]
    assert list(scored["in_language_rate"]) == [True, False, True, False, True]
    assert scored.loc[0, "reference"] and not math.isnan(scored.loc[0, "rouge_l"])
    assert math.isnan(scored.loc[2, "rouge_l"])
    table = ev.summarize(scored)
    assert table.loc[ev.OVERALL, ev.COL_ZH] == pytest.approx(1 / 3)


def test_published_answers_with_wrong_columns(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"q": ["问题"], "a": ["回答"]}).to_csv(path, index=False)
    with pytest.raises(ev.EvalDataError) as err:
        ev.score_published_answers(path)
    assert "q, a" in str(err.value) and _bilingual(str(err.value))
    with pytest.raises(ev.EvalDataError, match="Unsupported"):
        ev.read_published_answers(tmp_path / "p.txt")


def test_chart_labels_fall_back_to_english_without_a_chinese_font(monkeypatch):
    qs = _questions()
    table = ev.summarize(ev.score_answers([{"qid": q["qid"], "answer": "好"} for q in qs], qs))
    comparison = ev.compare_runs({"base": table, "lora": table})
    monkeypatch.setattr(ev, "cjk_font", lambda: None)
    fig = ev.plot_comparison(comparison, metrics=(ev.COL_ZH,))
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["General knowledge", "Creative writing", "Language understanding", "Overall"]
    assert fig.axes[0].get_ylabel() == "Chinese-answer rate"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["base", "lora"]


def test_chart_uses_the_chinese_font_when_there_is_one(monkeypatch):
    from matplotlib.text import Text

    qs = _questions()
    table = ev.summarize(ev.score_answers([{"qid": q["qid"], "answer": "好"} for q in qs], qs))
    comparison = ev.compare_runs({"基座 base": table, "基座+LoRA": table})
    monkeypatch.setattr(ev, "cjk_font", lambda: "Some CJK Font")
    fig = ev.plot_comparison(comparison, metrics=(ev.COL_ZH,))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][0] == "通用知识"
    texts = [t for t in fig.findobj(Text) if t.get_text()]
    assert texts and all(t.get_fontfamily()[0] == "Some CJK Font" for t in texts), "set on each text, not via rcParams"
    monkeypatch.setattr(ev, "cjk_font", lambda: None)
    fig = ev.plot_comparison(comparison, metrics=(ev.COL_ZH,))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["base", "LoRA"]

"""Lesson 06, section 13: the C-Eval-style knowledge check. The prompt, the letter tokens, the logits scorer and
the accuracy are written out in the lesson (the tests run that code); helpers/knowledge.py reads and checks the
multiple-choice files (the course's data/knowledge, C-Eval's and CMMLU's layouts)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from helpers import knowledge as kn
from helpers.models import resolve_model
from helpers.evaluation import EvalDataError
from tests.error_text import both
from tests.lesson_code import lesson_cell, lesson_definitions

LESSON = "06_evaluation.ipynb"
# Lesson 06's settings (they read the lesson's model, here the tiny one), its OVERALL row name, then section 13's
# definitions, which take the model and template as arguments.
L = SimpleNamespace(**lesson_definitions(LESSON, "eval_settings", "score_answers", "knowledge_data", "knowledge_config", "letter_token_ids", "knowledge_check",
                                         "wilson_interval", given={"choice": resolve_model("tiny", verbose=False)}))
SUBJECTS = kn.load_knowledge()
HEADER = "id,question,A,B,C,D,answer,explanation"
HAN = re.compile(r"[\u4e00-\u9fff]")


def _bilingual(err) -> bool:
    """The error has a code, a Chinese message and an English one (with a word of four letters)."""
    return bool(err.code and HAN.search(err.zh) and re.search(r"[A-Za-z]{4,}", err.en))


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from helpers.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(resolve_model("tiny", verbose=False))
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- the prompt


def _documented_layout() -> tuple[str, str, str]:
    """The three template lines of the lesson's ```text block (header, one example, the question), with the
    literal \\n written there turned into newlines."""
    block = re.search(r"```text\n(.*?)\n```", lesson_cell(LESSON, "ceval_prompt_text"), re.S).group(1)
    header, example, question = block.split("\n")
    return tuple(line.replace("\\n", "\n") for line in (header, example, question))


def _fill(template: str, row: dict, prefix: str = "") -> str:
    names = {"题干": "question", "A": "A", "B": "B", "C": "C", "D": "D", "答案": "answer"}
    for name, key in names.items():
        template = template.replace("{" + prefix + name + "}", row[key])
    return template


@pytest.mark.parametrize("shots", [0, 1, 2, 5])
@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_prompt_is_the_documented_layout_byte_for_byte(subject, shots):
    header, example, question = _documented_layout()
    data = SUBJECTS[subject]
    for row in data["val"][:3]:
        expected = (header.replace("{学科}", data["name"])
                    + "".join(_fill(example, d, "例题") for d in data["dev"][:shots]) + _fill(question, row))
        assert "{" not in expected, "every placeholder of the documented layout is filled"
        assert L.build_prompt(row, data, L.KnowledgeConfig(shots=shots)) == expected


def test_prompt_literal():
    """C-Eval's prompt as its official code builds it (format_example / the few-shot header), written out."""
    history = SUBJECTS["chinese_history"]
    row = history["val"][0]
    question = "秦始皇统一六国是在哪一年？\nA. 公元前221年\nB. 公元前206年\nC. 公元前202年\nD. 公元前256年\n答案："
    header = "以下是中国关于中国历史考试的单项选择题，请选出其中的正确答案。\n\n"
    assert L.build_prompt(row, history, L.KnowledgeConfig()) == header + question
    example = "中国历史上第一个统一的中央集权封建王朝是\nA. 秦朝\nB. 西周\nC. 汉朝\nD. 商朝\n答案：A\n\n"
    assert L.build_prompt(row, history, L.KnowledgeConfig(shots=1)) == header + example + question


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_k_shot_prompt_never_contains_the_question_asked(subject):
    data = SUBJECTS[subject]
    for row in data["val"]:
        for position in (0, 2, len(data["dev"])):  # the asked question slipped into the dev split
            leaky = {**data, "dev": data["dev"][:position] + [row] + data["dev"][position:]}
            prompt = L.build_prompt(row, leaky, L.KnowledgeConfig(shots=5))
            assert prompt.count(row["question"]) == 1
            assert prompt.endswith(L.format_example(row, L.KnowledgeConfig(), with_answer=False))
            assert prompt.count("\n答案：") == 6, "still five examples, the asked question skipped"
            assert prompt == L.build_prompt(row, data, L.KnowledgeConfig(shots=5))


# --------------------------------------------------------------------------- letter tokens


def test_letter_tokens_are_the_ones_written_after_the_cue(tiny):
    """On Llama-2's SentencePiece vocabulary (the tiny model's) "A" tokenized alone is "▁A", another token than
    the A that follows "答案：" in the prompt; after_cue picks the one the model would write."""
    _, tok = tiny
    after_cue = L.letter_token_ids(tok, L.KnowledgeConfig())
    alone = L.letter_token_ids(tok, L.KnowledgeConfig(letter_tokens="alone"))
    prompt = L.build_prompt(SUBJECTS["geography"]["val"][0], SUBJECTS["geography"], L.KnowledgeConfig())
    base = tok(prompt)["input_ids"]
    for letter, token in zip(kn.CHOICES, after_cue):
        with_letter = tok(prompt + letter)["input_ids"]
        assert with_letter[:-1] == base and with_letter[-1] == token, letter
    assert tok.convert_ids_to_tokens(alone) == ["▁A", "▁B", "▁C", "▁D"]
    assert set(after_cue).isdisjoint(alone)


# --------------------------------------------------------------------------- the scorer


class FakeModel:
    """Returns chosen logits at the last position (``logits_for(prompt ids without padding)``); records calls."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, logits_for):
        self.vocab, self.logits_for, self.calls = vocab, logits_for, []

    def __call__(self, input_ids, attention_mask, position_ids, logits_to_keep):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                           "logits_to_keep": logits_to_keep})
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        logits = torch.stack([torch.tensor(self.logits_for(r), dtype=torch.float32) for r in rows])
        return SimpleNamespace(logits=logits[:, None, :])


def test_logits_scorer_agrees_with_a_hand_computed_example():
    """Vocabulary of 8, letters at ids 4-7 with logits 2, 1, 0, -1, the other four at 0:
    log-sum-exp = ln(4 + e^2 + e + 1 + e^-1) = ln 15.475217 = 2.739240, so log p(A) = 2 - 2.739240 = -0.739240;
    over the four letters p(A) = e^2 / (e^2 + e + 1 + e^-1) = 7.389056 / 11.475217 = 0.643914;
    the letters' share of the vocabulary = 11.475217 / 15.475217 = 0.741522."""
    model = FakeModel(8, lambda ids: [0, 0, 0, 0, 2, 1, 0, -1])
    logprobs = L.letter_logprobs(model, [[1, 2, 3]], [4, 5, 6, 7], pad_id=0)
    assert logprobs[0].tolist() == pytest.approx([-0.739240, -1.739240, -2.739240, -3.739240], abs=1e-6)
    assert logprobs.softmax(-1)[0, 0].item() == pytest.approx(0.643914, abs=1e-6)
    assert logprobs.exp().sum().item() == pytest.approx(0.741522, abs=1e-6)
    assert model.calls[0]["logits_to_keep"] == 1


def test_batches_are_left_padded_and_counted_from_each_prompt():
    """Padding, position ids and the length sort: a batch gives each prompt's own logits back, in order."""
    seen = []
    model = FakeModel(8, lambda ids: (seen.append(ids), [0, 0, 0, 0, len(ids), 0, 0, 0])[1])
    prompts = [[5, 6, 7], [1], [2, 3, 4, 5, 6], [9, 9]]
    logprobs = L.letter_logprobs(model, prompts, [4, 5, 6, 7], pad_id=0, batch_size=4)
    call = model.calls[0]
    assert call["input_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 9, 9], [0, 0, 5, 6, 7], [2, 3, 4, 5, 6]]
    assert call["position_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, prompts))
    a = logprobs[:, 0].exp()  # p(A) grows with the prompt's length: the rows come back in the prompts' order
    assert a.argsort().tolist() == [1, 3, 0, 2]


def test_batched_scores_equal_one_prompt_at_a_time(tiny):
    model, tok = tiny
    config = L.KnowledgeConfig(shots=1)
    data = SUBJECTS["computer_basics"]
    prompts = [tok(L.build_prompt(row, data, config))["input_ids"] for row in data["val"][:8]]
    ids = L.letter_token_ids(tok, config)
    batched = L.letter_logprobs(model, prompts, ids, tok.unk_token_id, batch_size=8)
    alone = torch.cat([L.letter_logprobs(model, [p], ids, tok.unk_token_id, batch_size=1) for p in prompts])
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: the batch is padded"
    assert torch.allclose(batched, alone, atol=1e-4)


@pytest.mark.parametrize("favourite", ["A", "C"])
def test_a_model_that_always_prefers_one_letter_scores_that_letters_share(tiny, favourite):
    _, tok = tiny
    config = L.KnowledgeConfig()
    ids = dict(zip(kn.CHOICES, L.letter_token_ids(tok, config)))
    logits = [0.0] * len(tok)
    logits[ids[favourite]] = 5.0
    model = FakeModel(len(tok), lambda _: logits)
    scored = L.knowledge_check(model, tok, SUBJECTS, config)
    table = L.accuracy_table(scored)
    assert (scored["模型选"] == favourite).all()
    answers = pd.Series([r["answer"] for s in SUBJECTS.values() for r in s["val"]])
    assert table.loc[L.OVERALL, "准确率"] == (answers == favourite).mean() == 0.25
    for data in SUBJECTS.values():
        share = sum(r["answer"] == favourite for r in data["val"]) / len(data["val"])
        assert table.loc[data["name"], "准确率"] == share
    # a set whose answers are 3 of 10 A: the always-A model scores 30 %
    rows = [{**SUBJECTS["geography"]["val"][0], "id": str(i), "answer": "A" if i < 3 else "B"} for i in range(10)]
    skewed = L.knowledge_check(model, tok, {"x": {"name": "地理", "dev": [], "val": rows}}, config)
    assert L.accuracy_table(skewed).loc[L.OVERALL, "准确率"] == pytest.approx(0.3 if favourite == "A" else 0.0)


def test_normalise_changes_the_probabilities_not_the_answer(tiny):
    _, tok = tiny
    config = L.KnowledgeConfig()
    ids = L.letter_token_ids(tok, config)
    logits = [0.0] * len(tok)
    for token, value in zip(ids, (1.0, 3.0, 2.0, 0.0)):
        logits[token] = value
    model = FakeModel(len(tok), lambda _: logits)
    one = {"g": {**SUBJECTS["geography"], "val": SUBJECTS["geography"]["val"][:2]}}
    letters = L.knowledge_check(model, tok, one, config)
    vocab = L.knowledge_check(model, tok, one, L.KnowledgeConfig(normalise="vocab"))
    assert (letters["模型选"] == "B").all() and (vocab["模型选"] == "B").all()
    assert letters[["p(A)", "p(B)", "p(C)", "p(D)"]].sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    assert vocab[["p(A)", "p(B)", "p(C)", "p(D)"]].sum(axis=1).tolist() == pytest.approx(vocab["字母概率和"].tolist())
    assert vocab["字母概率和"].iloc[0] < 0.05  # 4 letters among 3000 tokens, most of them at logit 0


def test_chat_template_puts_the_question_in_a_user_turn(tiny):
    _, tok = tiny
    text = L.build_prompt(SUBJECTS["geography"]["val"][0], SUBJECTS["geography"], L.KnowledgeConfig())
    plain = L.prompt_token_ids(tok, text, L.KnowledgeConfig())
    chat = L.prompt_token_ids(tok, text, L.KnowledgeConfig(chat_format="llama2"))
    other = L.prompt_token_ids(tok, text, L.KnowledgeConfig(chat_format="human_assistant"))
    assert plain == tok(text)["input_ids"]
    assert "[INST]" in tok.decode(chat) and "[/INST]" in tok.decode(chat) and text in tok.decode(chat)
    assert "Human: " in tok.decode(other) and "[INST]" not in tok.decode(other), "the template the config names"


# --------------------------------------------------------------------------- accuracy and interval


@pytest.mark.parametrize("correct, n, low, high", [
    (16, 64, 0.160148, 0.368165),  # chance on the course's 64 questions
    (15, 64, 0.147498, 0.351335),
    (0, 10, 0.0, 0.277540),
    (10, 10, 0.722460, 1.0),
    (500, 1000, 0.469069, 0.530931),
])
def test_wilson_interval(correct, n, low, high):
    """Hand-computed: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)."""
    assert L.wilson_interval(correct, n) == pytest.approx((low, high), abs=1e-6)


def test_accuracy_table_per_subject_and_overall():
    scored = pd.DataFrame({"学科": ["甲"] * 4 + ["乙"] * 6, "答对": [True, True, False, False] + [True] + [False] * 5})
    table = L.accuracy_table(scored)
    assert list(table.index) == ["甲", "乙", L.OVERALL]
    assert table["题数"].tolist() == [4, 6, 10] and table["答对"].tolist() == [2, 1, 3]
    assert table["准确率"].tolist() == pytest.approx([0.5, 1 / 6, 0.3])
    assert table.loc[L.OVERALL, "95% 下限"] == pytest.approx(L.wilson_interval(3, 10)[0])


# --------------------------------------------------------------------------- the course's files


def test_course_files_follow_c_evals_layout():
    folder = kn.KNOWLEDGE_DIR
    assert len(SUBJECTS) >= 4 and sum(len(s["val"]) for s in SUBJECTS.values()) >= 60
    for subject, data in SUBJECTS.items():
        for split in ("dev", "val"):
            raw = (folder / split / f"{subject}_{split}.csv").read_bytes()
            assert raw.decode("utf-8").split("\n", 1)[0] == HEADER, "C-Eval's columns, UTF-8, no BOM"
            ids = [r["id"] for r in data[split]]
            assert ids == [str(i) for i in range(len(ids))]
        assert len(data["dev"]) == 5, "five examples per subject, as in C-Eval"
        assert all(r["explanation"] for r in data["dev"]) and not any(r["explanation"] for r in data["val"])
        assert HAN.search(data["name"]), "the Chinese subject name goes into the prompt"
    questions = [r["question"] for s in SUBJECTS.values() for split in ("dev", "val") for r in s[split]]
    assert len(questions) == len(set(questions)), "no question twice, none in both dev and val"


def test_answer_letters_are_balanced():
    for split, total in (("val", 64), ("dev", 20)):
        answers = pd.Series([r["answer"] for s in SUBJECTS.values() for r in s[split]])
        assert len(answers) == total
        assert answers.value_counts().to_dict() == {c: total // 4 for c in kn.CHOICES}, split


# --------------------------------------------------------------------------- bad files


def _csv(tmp_path, body: str, name: str = "x_val.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes((HEADER + "\n" + body).encode(encoding))
    return path


@pytest.mark.parametrize("body, needles", [
    ("0,长城在哪个国家？,中国,日本,,印度,A,\n", ["第 1 行", "缺少选项 C", "row 1", "option C missing"]),
    ("0,长城在哪个国家？,中国,日本,韩国,印度,E,\n", ["不是 A、B、C、D 之一", "'E'", "not one of A, B, C, D"]),
    ("0,长城在哪个国家？,中国,日本,韩国,印度,a,\n", ["'a'", "not one of A, B, C, D"]),
    ("0,长城在哪个国家？,中国,日本,韩国,印度,中国,\n", ["'中国'", "not one of A, B, C, D"]),
    ("0,长城在哪个国家？,中国,日本,韩国,印度,,\n", ["''", "not one of A, B, C, D"]),
    ("0,,中国,日本,韩国,印度,A,\n", ["题干是空的", "the question is empty"]),
    ("0,长城在哪个国家？,中国,日本,中国,印度,A,\n", ["A=C", "ambiguous"]),
])
def test_bad_rows_are_refused_with_a_clear_message(tmp_path, body, needles):
    with pytest.raises(kn.KnowledgeDataError) as err:
        kn.read_mc_csv(_csv(tmp_path, body))
    assert err.value.code == "knowledge.bad_rows" and err.value.fields["rows"] == [1]
    message = both(err.value)
    assert _bilingual(err.value) and str(tmp_path / "x_val.csv") in message
    for needle in needles:
        assert needle in message


def test_every_bad_row_is_listed_at_once(tmp_path):
    body = ("0,好题,一,二,三,四,A,\n1,缺选项,一,,三,四,B,\n2,好题二,一,二,三,四,C,\n3,错答案,一,二,三,四,F,\n"
            "4,两处错,一,二,三,,X,\n")
    with pytest.raises(kn.KnowledgeDataError) as err:
        kn.read_mc_csv(_csv(tmp_path, body))
    assert err.value.code == "knowledge.bad_rows" and err.value.fields["rows"] == [2, 4, 5]
    message = both(err.value)
    assert "3 行不能用" in message and "3 unusable rows" in message
    for n in (2, 4, 5):
        assert f"第 {n} 行" in message and f"row {n}:" in message
    assert "第 1 行" not in message and "第 3 行" not in message
    assert "缺少选项 D；答案 'X'" in message


def test_wrong_encoding_is_refused(tmp_path):
    path = _csv(tmp_path, "0,中国的首都是,北京,上海,广州,深圳,A,\n", encoding="gbk")
    with pytest.raises(kn.KnowledgeDataError) as err:
        kn.read_mc_csv(path)
    assert err.value.code == "eval.encoding" and "UTF-8" in err.value.en
    assert "iconv" in err.value.zh and "iconv" in err.value.en and _bilingual(err.value)
    assert isinstance(err.value, EvalDataError)


def test_missing_column_empty_file_and_missing_folder(tmp_path):
    path = tmp_path / "no_answer.csv"
    path.write_text("id,question,A,B,C,D\n0,q,1,2,3,4\n", encoding="utf-8")
    with pytest.raises(kn.KnowledgeDataError) as err:
        kn.read_mc_csv(path)
    assert err.value.code == "knowledge.missing_columns" and "answer" in err.value.en
    assert "缺少列" in err.value.zh and "id, question, A, B, C, D" in err.value.zh and "id, question, A, B, C, D" in err.value.en
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    for call, code, words in ((lambda: kn.read_mc_csv(tmp_path / "empty.csv"), "knowledge.empty_file", "empty"),
                              (lambda: kn.read_mc_csv(tmp_path / "missing.csv"), "eval.file_not_found", "does not exist"),
                              (lambda: kn.load_knowledge(tmp_path), "knowledge.no_subjects", "C-Eval's layout"),
                              (lambda: kn.mc_rows([], "nothing"), "knowledge.no_questions", "no questions")):
        with pytest.raises(kn.KnowledgeDataError) as err:
            call()
        assert err.value.code == code and words in err.value.en and _bilingual(err.value)


# --------------------------------------------------------------------------- C-Eval's and CMMLU's layouts


def test_c_eval_and_cmmlu_layouts_are_read_unchanged(tmp_path):
    """C-Eval: a ``datasets`` split with id (int32), question, A-D, answer, explanation (its dataset card).
    CMMLU: the CSV header ``,Question,A,B,C,D,Answer`` (data/dev/*.csv of haonan-li/CMMLU)."""
    from datasets import Dataset, Features, Value

    rows = SUBJECTS["chinese_history"]["dev"]
    features = Features({"id": Value("int32"), **{k: Value("string") for k in
                                                   ("question", "A", "B", "C", "D", "answer", "explanation")}})
    ceval = Dataset.from_list([{**r, "id": int(r["id"])} for r in rows], features=features)
    from_ceval = kn.mc_rows(ceval, "C-Eval")
    assert from_ceval == rows
    cmmlu = tmp_path / "chinese_history.csv"
    lines = [",Question,A,B,C,D,Answer"] + [f"{i},{r['question']},{r['A']},{r['B']},{r['C']},{r['D']},{r['answer']}"
                                          for i, r in enumerate(rows)]
    cmmlu.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_cmmlu = kn.read_mc_csv(cmmlu)
    keep = ("question", *kn.CHOICES, "answer")
    assert [{k: r[k] for k in keep} for r in from_cmmlu] == [{k: r[k] for k in keep} for r in rows]
    assert [r["id"] for r in from_cmmlu] == [str(i) for i in range(len(rows))]


def test_load_knowledge_names_subjects_from_the_mapping(tmp_path):
    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
        _csv(tmp_path / split, "0,一加一等于几？,1,2,3,4,B,\n", name=f"toy_math_{split}.csv")
    assert kn.load_knowledge(tmp_path)["toy_math"]["name"] == "toy_math"
    (tmp_path / "subject_mapping.json").write_text('{"toy_math": ["Toy Math", "玩具数学", "STEM"]}', encoding="utf-8")
    loaded = kn.load_knowledge(tmp_path)
    assert loaded["toy_math"]["name"] == "玩具数学" and loaded["toy_math"]["val"][0]["answer"] == "B"
    assert len(loaded["toy_math"]["dev"]) == 1

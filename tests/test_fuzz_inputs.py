"""Hostile input files for every reader a learner feeds: the training-file validator (lesson 05), the question
loader (lesson 06), the multiple-choice reader and its subject mapping (lesson 06's knowledge check).

Each input is either read correctly or refused with the course's own error, whose message names the problem
and quotes at most a capped piece of the file; no other exception, and no garbage accepted.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from helpers import training_data as td
from helpers.config import TutorialError
from tests.error_text import both
from helpers.models import resolve_model
from helpers.evaluation import load_questions
from helpers.knowledge import load_knowledge, read_mc_csv

MESSAGE_LIMIT = 2_000  # characters: enough for every message the readers write, far below a quoted 1 MB header
TRAIN_ROW = "<s>Human: 中国的首都是哪里？\n</s><s>Assistant: 北京。\n</s>"
QUESTION = {"qid": 1, "question": "中国的首都是哪里？", "first_level_class": "通用知识", "second_level_class": "地理"}
MC_HEADER = "id,question,A,B,C,D,answer\n"


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(resolve_model("tiny").path)


def _train(tmp_path, tok, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return td.validate_sft_file(path, tok, chat_format="llama2")


def _questions(tmp_path, data: bytes):
    path = tmp_path / "questions.json"
    path.write_bytes(data)
    return load_questions(path)


def _mc(tmp_path, data: bytes):
    path = tmp_path / "subject_val.csv"
    path.write_bytes(data)
    return read_mc_csv(path)


def _refused(call, *match):
    with pytest.raises(TutorialError) as err:
        call()
    assert err.value.code and err.value.zh and err.value.en
    for message in (err.value.zh, err.value.en):
        assert len(message) < MESSAGE_LIMIT, f"a {len(message)}-character message"
    message = both(err.value)
    for word in match:
        assert word in message, message
    return message


NESTED = b"[" * 200_000 + b"]" * 200_000


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path, tok):
    _refused(lambda: _questions(tmp_path, NESTED), "嵌套")
    _refused(lambda: _train(tmp_path, tok, "train.jsonl", NESTED + b"\n"), "JSON")
    knowledge = tmp_path / "kn"
    (knowledge / "val").mkdir(parents=True)
    (knowledge / "val" / "x_val.csv").write_text(MC_HEADER + "0,q,a,b,c,d,A\n", encoding="utf-8")
    (knowledge / "subject_mapping.json").write_bytes(NESTED)
    _refused(lambda: load_knowledge(knowledge, splits=("val",)), "JSON")


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\u0000", "\\u001b", "\\u007f"])
def test_lone_surrogates_and_control_characters_written_as_json_escapes_are_refused(tmp_path, tok, escape):
    item = json.dumps(QUESTION, ensure_ascii=False).replace("哪里？", "哪里" + escape)
    _refused(lambda: _questions(tmp_path, f"[{item}]".encode()), "U+")
    row = json.dumps({"messages": [{"role": "user", "content": "你好" + "X"},
                                   {"role": "assistant", "content": "你好！"}]}).replace("X", escape)
    _refused(lambda: _train(tmp_path, tok, "train.jsonl", (row + "\n").encode()), "U+")


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x0b", "\x1b", "\x7f", "\x85"])
def test_raw_control_characters_are_refused_with_their_line_and_column(tmp_path, tok, char):
    data = 'text\n"' + TRAIN_ROW.replace("北京", "北" + char + "京") + '"\n'  # the character itself, not an escape
    _refused(lambda: _train(tmp_path, tok, "train.csv", data.encode()), "U+", "line 3, column 20")
    _refused(lambda: _mc(tmp_path, (MC_HEADER + f"0,长城在哪{char}国？,中国,日本,印度,法国,A\n").encode()), "U+")


@pytest.mark.parametrize("encoding, named", [("big5", "Big5"), ("shift_jis", "Shift-JIS"), ("euc_kr", "EUC-KR")])
def test_other_east_asian_encodings_are_named_not_read_as_gb18030(tmp_path, tok, encoding, named):
    rows = {"big5": ["請用中文介紹一下北京。", "北京是中華人民共和國的首都，歷史悠久。", "長城有多長？", "長城全長約兩萬公里。"],
            "shift_jis": ["日本語のテキストです。", "東京は日本の首都です。", "これは質問ですか？", "はい、そうです。"],
            "euc_kr": ["한국어 텍스트입니다.", "서울은 한국의 수도입니다.", "질문입니까?", "네, 그렇습니다."]}[encoding]
    csv = "question,answer\n" + "".join(f"{q},{a}\n" for q, a in zip(rows[::2], rows[1::2]))
    message = _refused(lambda: _train(tmp_path, tok, "train.csv", csv.encode(encoding)), named, "iconv")
    assert "GB18030 读取" not in message, "no notice that it was read as GB18030"
    _refused(lambda: _mc(tmp_path, (MC_HEADER + f"0,{rows[0]},{rows[1]},{rows[2]},{rows[3]},x,A\n").encode(encoding)),
             named)


def test_gbk_from_excel_is_still_read_with_a_notice(tmp_path, tok, capsys):
    rows = _train(tmp_path, tok, "train.csv", ("text\n" + json.dumps(TRAIN_ROW, ensure_ascii=False) + "\n").encode("gb18030"))
    assert rows.ok and "GB18030" in capsys.readouterr().out
    short = _train(tmp_path, tok, "short.csv", ('text\n"<s>Human: 你好\n</s><s>Assistant: 你好！\n</s>"\n').encode("gb18030"))
    assert short.ok, "a short GBK file that charset detection finds ambiguous is still read as GB18030"


def test_a_huge_header_is_quoted_capped(tmp_path, tok):
    name = "x" * 1_000_000
    _refused(lambda: _train(tmp_path, tok, "train.csv", f"{name}\nvalue\n".encode()), "1000000 characters")
    _refused(lambda: _mc(tmp_path, f"{name}\nvalue\n".encode()), "1000000 characters")
    _refused(lambda: _questions(tmp_path, json.dumps({name: 1}).encode()), "1000000 characters")
    _refused(lambda: _mc(tmp_path, (MC_HEADER + f"0,q,a,b,c,d,{'Z' * 100_000}\n").encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=400),
                      st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.sampled_from([b"\xef\xbb\xbf", b"\x00" * 64, b"[]", b"{}", b"null", b"[1,2]", b'[{"qid": []}]',
                                       b"text\n\n\n", b",,,\n,,,\n", b'"unclosed\n', NESTED[:5000] + NESTED[-5000:]])))
def test_any_bytes_are_read_or_refused_clearly(tmp_path, tok, data):
    for call in (lambda: _train(tmp_path, tok, "train.csv", data), lambda: _train(tmp_path, tok, "train.jsonl", data),
                 lambda: _questions(tmp_path, data), lambda: _mc(tmp_path, data)):
        try:
            call()
        except TutorialError as err:
            assert err.code and len(err.zh) < MESSAGE_LIMIT and len(err.en) < MESSAGE_LIMIT

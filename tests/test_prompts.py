"""Prompt templates (helpers/prompts.py, notebooks/03_prompt_templates.ipynb), checked token by token."""

from __future__ import annotations

import csv

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from helpers.config import DATA_DIR, TutorialError
from helpers.prompts import (
    FORMATS,
    IGNORE_INDEX,
    SYSTEM_PROMPT_ARTICLE,
    SYSTEM_PROMPT_CHINESE,
    PromptFormatError,
    article_prompt,
    TEMPLATES,
    build_prompt,
    chat_template_for,
    check_messages,
    csv_text_to_messages,
    encode,
    load_llama2_tokenizer,
    render_with_answers,
    token_table,
    truncate_history,
)
from helpers.tiny import ensure_tiny_model
from tests.error_text import both
from tests.lesson_code import lesson_definitions

messages_to_csv_text = lesson_definitions("03_prompt_templates.ipynb", "messages_to_csv_text")["messages_to_csv_text"]  # lesson 03 writes it

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def read_rows(name):
    with open(DATA_DIR / name, encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def label_runs(encoded):
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for tok_id, label in zip(encoded.input_ids, encoded.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == tok_id, "a label must be the token itself"
            current.append(tok_id)
    if current:
        runs.append(current)
    return runs


# Answers whose first characters test the prompt/answer boundary.
BOUNDARY_ANSWERS = [
    "，好的，我来回答。",
    "Hello world.",
    "42 是答案。",
    "3.14159",
    "```python\nprint('你好')\n```",
    "\n\n第二段开始。",
    "  前面有两个空格",
    "😀 表情开头",
    "[INST] 看起来像模板 [/INST]",
    "Human: 不是新的一轮",
    "a",
    "。",
]

CONVERSATIONS = [
    [U("你好")],
    [S("Be nice."), U("hi")],
    [S(SYSTEM_PROMPT_ARTICLE), U("介绍一下长城。")],
    [S(SYSTEM_PROMPT_CHINESE), U("What is 2+2?"), A("4"), U("  and 3+3? \n")],
    [U("a"), A("\n\n```py\nprint(1)\n```"), U("b")],
    [U("第一问"), A("第一答"), U("第二问"), A("第二答"), U("第三问")],
    [S(""), U("empty system prompt")],
    [S("  spaced system  "), U("  spaced question  "), A("  spaced answer  "), U("next")],
    [U("q"), A("，以标点开头")],
    [U("只有一问一答"), A("Answer in English 123.")],
]


# --------------------------------------------------------------------------- llama2 == chat_template


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_llama2_equals_apply_chat_template(tok, messages):
    enc = encode(tok, messages, "llama2")
    assert enc.text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert enc.text == build_prompt(messages, "llama2")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert enc.input_ids == list(ids)
    assert encode(tok, messages, "llama2").input_ids == list(ids)


TEXT = st.text(
    alphabet=st.sampled_from(list("你好世界中文。，？！abcXYZ 019\n\t[]<>/:_-`'\"😀")), min_size=0, max_size=24
)


@HYPOTHESIS
@given(
    system=st.one_of(st.none(), TEXT),
    turns=st.lists(st.tuples(TEXT, TEXT), min_size=0, max_size=3),
    last=st.one_of(st.none(), TEXT),
)
def test_llama2_equals_apply_chat_template_property(tok, system, turns, last):
    messages = ([S(system)] if system is not None else []) + [m for q, a in turns for m in (U(q), A(a))]
    if last is not None or not turns:
        messages.append(U(last or "?"))
    assume(not any(s in m["content"] for m in messages for s in ("<s>", "</s>", "<unk>")))
    enc = encode(tok, messages, "llama2")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert enc.input_ids == list(ids)


# --------------------------------------------------------------------------- token-level structure


def test_llama2_token_structure(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    messages = [S("你是助手。"), U("第一问"), A("第一答"), U("second question"), A("second answer"), U("第三问")]
    enc = encode(tok, messages, "llama2")
    ids = enc.input_ids
    # Exactly one BOS per turn (user message), at the very start and right after each EOS.
    assert ids.count(bos) == 3
    assert ids[0] == bos and ids[1] != bos
    bos_at = [i for i, t in enumerate(ids) if t == bos]
    eos_at = [i for i, t in enumerate(ids) if t == eos]
    assert len(eos_at) == 2, "one EOS after each answer, none after the open question"
    assert bos_at[1:] == [i + 1 for i in eos_at]
    assert ids[-1] != eos
    assert tok.convert_ids_to_tokens(ids[-1]) == "]", "the generation prompt ends with [/INST]"
    # The labels are the two answers plus their EOS, nothing else.
    runs = label_runs(enc)
    assert len(runs) == 2
    for run, answer in zip(runs, ["第一答", "second answer"]):
        assert run[-1] == eos
        assert tok.decode(run, skip_special_tokens=True).strip() == answer
    # Each run starts right after the "]" of [/INST] and ends with the EOS.
    labelled = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    starts = [i for i in labelled if i - 1 not in labelled]
    assert [i for i in labelled if i + 1 not in labelled] == eos_at
    assert tok.convert_ids_to_tokens([ids[i - 1] for i in starts]) == ["]", "]"]


def test_human_assistant_token_structure(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    messages = [U("第一问"), A("第一答"), U("第二问")]
    enc = encode(tok, messages, "human_assistant")
    assert enc.text == "<s>Human: 第一问\n</s><s>Assistant: 第一答\n</s><s>Human: 第二问\n</s><s>Assistant:"
    ids = enc.input_ids
    # One BOS per message plus one for the open "Assistant:" turn; EOS closes every message.
    assert ids.count(bos) == 4 and ids.count(eos) == 3
    assert ids[0] == bos and ids[1] != bos
    bos_at = [i for i, t in enumerate(ids) if t == bos]
    assert bos_at[1:] == [i + 1 for i, t in enumerate(ids) if t == eos]
    assert tok.decode(ids[bos_at[-1] + 1 :]) == "Assistant:", "the prompt stops before the answer's space"
    runs = label_runs(enc)
    assert len(runs) == 1 and runs[0][-1] == eos
    assert tok.decode(runs[0], skip_special_tokens=True) == "第一答\n"


def test_human_assistant_system_prompt_opens_first_human_turn(tok):
    enc = encode(tok, [S("系统"), U("问"), A("答"), U("再问")], "human_assistant", add_generation_prompt=False)
    assert enc.text == "<s>Human: 系统\n问\n</s><s>Assistant: 答\n</s><s>Human: 再问\n</s>"
    assert enc.input_ids.count(tok.bos_token_id) == 3


@pytest.mark.parametrize("chat_format", FORMATS)
@pytest.mark.parametrize("answer", BOUNDARY_ANSWERS)
def test_answer_boundary_is_exact(tok, chat_format, answer):
    history = [S("sys"), U("上一问"), A("上一答"), U("问题")]
    full = encode(tok, history + [A(answer)], chat_format, add_generation_prompt=False)
    prompt = encode(tok, history, chat_format).input_ids
    # The generation prompt is a prefix of the training sequence, and the labels start exactly
    # where it ends: the model is trained on precisely the tokens it is asked to produce.
    assert full.input_ids[: len(prompt)] == prompt
    assert full.labels[len(prompt) :] == full.input_ids[len(prompt) :]
    first_answer_run = label_runs(full)[0]
    assert full.labels[: len(prompt)].count(IGNORE_INDEX) == len(prompt) - len(first_answer_run)
    assert full.input_ids[-1] == tok.eos_token_id and full.labels[-1] == tok.eos_token_id
    llama_like = chat_format != "human_assistant"
    expected = answer.strip() if llama_like else answer + "\n"
    decoded = tok.decode(full.input_ids[len(prompt) :], skip_special_tokens=True)
    assert (decoded.strip() if llama_like else decoded) == expected


def test_answer_tokens_follow_the_prompt(tok):
    history = [U("问题")]
    enc = encode(tok, history + [A("答案")], "llama2", add_generation_prompt=False)
    prompt = encode(tok, history, "llama2").input_ids
    assert enc.input_ids[:len(prompt)] == prompt and enc.answer_token_count == len(enc.input_ids) - len(prompt)
    assert encode(tok, history, "llama2").answer_token_count == 0


# --------------------------------------------------------------------------- double BOS and literal specials


def load_tiny_tokenizer(add_bos_token):
    return AutoTokenizer.from_pretrained(ensure_tiny_model(verbose=False), add_bos_token=add_bos_token)


@pytest.fixture(scope="module")
def tok_adds_bos():
    """The tiny tokenizer configured as Llama-2's ships (``"add_bos_token": true`` in its tokenizer_config)."""
    return load_tiny_tokenizer(True)


def test_double_bos_trap_and_its_fix(tok_adds_bos):
    tok = tok_adds_bos
    bos = tok.bos_token_id
    row = read_rows("dev_sft.csv")[0]
    assert row.startswith("<s>")
    naive = tok(row)["input_ids"]  # add_special_tokens=True: the tokenizer adds its own BOS
    assert naive[:2] == [bos, bos], "the trap: text already starting with <s> gets a second BOS"
    fixed = tok(row, add_special_tokens=False)["input_ids"]
    assert fixed[0] == bos and fixed[1] != bos
    enc = encode(tok, csv_text_to_messages(row), "human_assistant", add_generation_prompt=False)
    assert enc.text == row and enc.input_ids == fixed


@pytest.mark.parametrize("chat_format", FORMATS)
def test_encode_does_not_depend_on_add_bos_token(tok_adds_bos, chat_format):
    without = load_tiny_tokenizer(False)
    assert without("x")["input_ids"][0] != without.bos_token_id, "this tokenizer must not add a BOS itself"
    messages = [S("系统"), U("问"), A("答"), U("再问")]
    plain, adds_bos = encode(without, messages, chat_format), encode(tok_adds_bos, messages, chat_format)
    assert plain == adds_bos
    assert adds_bos.input_ids[:2] != [tok_adds_bos.bos_token_id] * 2
    assert adds_bos.input_ids.count(tok_adds_bos.bos_token_id) == adds_bos.text.count("<s>")


@pytest.mark.parametrize("chat_format", FORMATS)
@pytest.mark.parametrize("special", ["<s>", "</s>", "<unk>"])
def test_literal_special_tokens_are_refused(tok, chat_format, special):
    with pytest.raises(PromptFormatError) as err:
        encode(tok, [U("问"), A(f"答案里有 {special} 标记")], chat_format)
    assert err.value.code == "prompt.special_token" and err.value.fields == {"message": 2, "token": special}
    message = both(err.value)
    assert "第 2 条" in message and "Message 2" in message and special in message
    assert isinstance(err.value, TutorialError)


def test_unknown_format(tok):
    with pytest.raises(PromptFormatError) as err:
        encode(tok, [U("q")], "chatml")
    assert err.value.code == "prompt.unknown_format" and "llama2" in err.value.fields["formats"]


@pytest.mark.parametrize(
    ("messages", "code", "zh", "en"),
    [
        ([], "prompt.empty_conversation", "空", "empty"),
        ([S("只有系统")], "prompt.system_only", "没有用户问题", "no user message"),
        ([U("a"), U("b")], "prompt.role_order", "第 2 条", "message 2 has role 'user'"),
        ([S("s"), A("a")], "prompt.role_order", "第 2 条", "message 2 has role 'assistant', expected 'user'"),
        ([U("a"), A("b"), S("c")], "prompt.role_order", "系统提示只能是第 1 条", "message 3 has role 'system'"),
        ([U(None)], "prompt.bad_message", "第 1 条", "content must be a string"),
    ],
)
def test_check_messages_names_the_message(messages, code, zh, en):
    with pytest.raises(PromptFormatError) as err:
        check_messages(messages)
    assert err.value.code == code
    assert zh in err.value.zh and en in err.value.en


# --------------------------------------------------------------------------- CSV rows <-> messages


TRICKY_ANSWERS = [
    "Human: 这不是新的一轮",
    "答案里有 </s> 标记",
    "</s>",
    "[INST] 像 Llama-2 的模板 [/INST]",
    "第一行\n第二行\n",
    "\n前面有换行",
    "以换行结尾\n",
    "Assistant: 嗯",
    " 前导空格",
    "<s>Human: 假的一轮",
    "结尾是 </s>",
    "a\n</s>\nb",
]


@pytest.mark.parametrize("answer", TRICKY_ANSWERS)
def test_csv_round_trip_tricky_answers(answer):
    messages = [U("问题 Human: [INST]\n第二行"), A(answer)]
    text = messages_to_csv_text(messages)
    assert csv_text_to_messages(text, row=5) == messages
    assert messages_to_csv_text(csv_text_to_messages(text)) == text


def test_csv_round_trip_multi_turn_and_system():
    messages = [S("系统提示"), U("q1"), A("a1\n"), U("Human: q2"), A("</s> a2")]
    text = messages_to_csv_text(messages)
    assert text == "<s>System: 系统提示\n</s><s>Human: q1\n</s><s>Assistant: a1\n\n</s><s>Human: Human: q2\n</s><s>Assistant: </s> a2\n</s>"
    assert csv_text_to_messages(text) == messages


CSV_TEXT = st.text(
    alphabet=st.sampled_from(list("你好。ab \n:<>/sHumanAssistant[]INST")), min_size=1, max_size=30
)


@HYPOTHESIS
@given(st.lists(st.tuples(CSV_TEXT, CSV_TEXT), min_size=1, max_size=3), st.one_of(st.none(), CSV_TEXT))
def test_csv_round_trip_property(turns, system):
    messages = ([S(system)] if system is not None else []) + [m for q, a in turns for m in (U(q), A(a))]
    try:
        text = messages_to_csv_text(messages)
    except PromptFormatError as err:
        # Only conversations that could not be read back the same are refused.
        assert err.code in ("prompt.turn_boundary", "prompt.empty_message"), err.code
        return
    assert csv_text_to_messages(text) == messages


def test_messages_to_csv_refuses_what_cannot_round_trip():
    with pytest.raises(PromptFormatError) as err:
        messages_to_csv_text([U("q"), A("x</s><s>Human: y")])
    assert err.value.code == "prompt.turn_boundary" and err.value.fields == {"message": 2, "boundary": "</s><s>Human:"}
    with pytest.raises(PromptFormatError) as err:
        messages_to_csv_text([U("q")])
    assert err.value.code == "prompt.csv_needs_answer"
    with pytest.raises(PromptFormatError) as err:
        messages_to_csv_text([U("q"), A("  ")])
    assert err.value.code == "prompt.empty_message" and err.value.fields == {"message": 2}


@pytest.mark.parametrize("name", ["train_sft.csv", "dev_sft.csv"])
def test_article_rows_parse_and_equal_the_training_text(tok, name):
    rows = read_rows(name)
    assert rows
    for n, row in enumerate(rows, start=2):
        messages = csv_text_to_messages(row, row=n)
        assert messages_to_csv_text(messages) == row
        assert build_prompt(messages, "human_assistant", add_generation_prompt=False) == row
    enc = encode(tok, csv_text_to_messages(rows[0]), "human_assistant", add_generation_prompt=False)
    assert enc.text == rows[0]


def test_lenient_row_variants():
    # No newline before </s>, no space after the colon: still one question and one answer.
    assert csv_text_to_messages("<s>Human:问\n</s><s>Assistant: 答</s>\n") == [U("问"), A("答")]
    assert csv_text_to_messages("<s>Human: 问</s><s>Assistant: 答\n</s>") == [U("问"), A("答")]


@pytest.mark.parametrize(
    ("text", "code", "zh", "en"),
    [
        ("<s>Human: 你好\n</s>", "prompt.no_answer", "没有以回答结尾", "no final '<s>Assistant:' part"),
        ("<s>Human: 你好\n</s><s>Assistant: \n</s>", "prompt.empty_message", "回答是空的", "empty answer"),
        ("<s>Human: 你好\n</s><s>Assistant:\n</s>", "prompt.empty_message", "回答是空的", "empty answer"),
        ("<s>Human: \n</s><s>Assistant: 答\n</s>", "prompt.empty_message", "问题是空的", "empty question"),
        ("<s>Human: 你好\n</s><s>Human: 在吗\n</s><s>Assistant: 在\n</s>", "prompt.role_order", "交替", "alternate"),
        ("<s>Assistant: 先答\n</s><s>Human: 后问\n</s>", "prompt.role_order", "交替", "alternate"),
        ("<s>Human: q\n</s><s>System: s\n</s><s>Assistant: a\n</s>", "prompt.role_order", "系统提示只能是第 1 条", "role 'system'"),
        ("<s>Human: q\n</s><s>Assistant: a\n</s><s>Human: 又问\n</s>", "prompt.no_answer", "没有以回答结尾", "does not end with an answer"),
        ("Human: q\nAssistant: a", "prompt.bad_csv_text", "应以 “<s>Human:” 开头", "must start with '<s>Human:'"),
        ("<s>Human: q\n</s><s>Assistant: a", "prompt.bad_csv_text", "以 “</s>” 结尾", "Assistant: a'"),
        ("   ", "prompt.empty_text", "是空的", "is empty"),
    ],
)
def test_malformed_rows_name_the_row_and_the_problem(text, code, zh, en):
    with pytest.raises(PromptFormatError) as err:
        csv_text_to_messages(text, row=7)
    assert err.value.code == code
    assert "第 7 行" in err.value.zh and "row 7" in err.value.en
    assert zh in err.value.zh and en in err.value.en


# --------------------------------------------------------------------------- history truncation


def test_truncate_history_drops_oldest_whole_turns(tok):
    messages = [S("系统提示")]
    for i in range(5):
        messages += [U(f"第 {i} 个问题，稍微长一点的问题文本"), A(f"第 {i} 个回答，稍微长一点的回答文本")]
    messages.append(U("最新的问题"))
    full = len(encode(tok, messages, "llama2").input_ids)
    kept, dropped = truncate_history(tok, messages, full - 1, "llama2")
    assert dropped == messages[1:3], "exactly the oldest turn (question and answer) is dropped"
    assert kept == [messages[0]] + messages[3:]
    assert truncate_history(tok, messages, full, "llama2") == (messages, [])
    minimal = len(encode(tok, [messages[0], messages[-1]], "llama2").input_ids)
    assert truncate_history(tok, messages, minimal, "llama2") == ([messages[0], messages[-1]], messages[1:-1])
    with pytest.raises(PromptFormatError) as err:
        truncate_history(tok, messages, minimal - 1, "llama2")
    assert err.value.code == "prompt.too_long" and err.value.fields["max_tokens"] == minimal - 1


SHORT = st.text(alphabet=st.sampled_from(list("你好世界问题回答 abc123\n")), min_size=1, max_size=20)


@HYPOTHESIS
@given(
    chat_format=st.sampled_from(FORMATS),
    system=st.one_of(st.none(), SHORT),
    turns=st.lists(st.tuples(SHORT, SHORT), min_size=0, max_size=5),
    last=SHORT,
    max_tokens=st.integers(min_value=5, max_value=200),
)
def test_truncate_history_property(tok, chat_format, system, turns, last, max_tokens):
    check_truncation(tok, chat_format, system, turns, last, max_tokens)


def check_truncation(tok, chat_format, system, turns, last, max_tokens):
    head = [S(system)] if system is not None else []
    body = [m for q, a in turns for m in (U(q), A(a))] + [U(last)]
    messages = head + body
    try:
        kept, dropped = truncate_history(tok, messages, max_tokens, chat_format)
    except PromptFormatError:
        # Refused only when the system prompt plus the latest question alone do not fit.
        assert len(encode(tok, head + body[-1:], chat_format).input_ids) > max_tokens
        return
    assert len(encode(tok, kept, chat_format).input_ids) <= max_tokens, "the result always fits"
    assert kept[-1] is body[-1], "it always ends with the latest user turn"
    assert kept[: len(head)] == head, "the system prompt is kept"
    k = len(dropped)
    assert k % 2 == 0 and dropped == body[:k], "only whole, oldest turns are dropped"
    assert kept == head + body[k:]
    if k:
        # Nothing was dropped without need: one more turn would not have fit.
        assert len(encode(tok, head + body[k - 2 :], chat_format).input_ids) > max_tokens


# --------------------------------------------------------------------------- token table


def test_token_table_marks_bos_eos_and_labels(tok):
    enc = encode(tok, [U("问"), A("答")], "llama2", add_generation_prompt=False)
    table = token_table(tok, enc.input_ids, enc.labels)
    assert list(table["id"]) == enc.input_ids
    assert (table["特殊标记"] == "BOS").sum() == 1 and (table["特殊标记"] == "EOS").sum() == 1
    assert (table["label"] == "回答").sum() == enc.answer_token_count
    assert table["piece"].iloc[0] == "<s>"


# --------------------------------------------------------------------------- the article's layout


def test_article_format_is_the_articles_prompt_character_for_character(tok_adds_bos):
    question = "列出5种可以改善睡眠质量的方法"
    text = build_prompt([S(SYSTEM_PROMPT_ARTICLE), U(question)], "article")
    assert text == "<s>" + article_prompt(question)
    assert article_prompt(question).startswith("[INST] \n<<SYS>>\nYou are a helpful") and text.endswith(f"\n\n{question}\n[/INST]")
    assert SYSTEM_PROMPT_ARTICLE.count("The answer always been translate into Chinese language.") == 2
    # What the article sent (its text, BOS added by the tokenizer) is what encode(..., "article") builds.
    sent = tok_adds_bos(article_prompt(question))["input_ids"]
    assert encode(tok_adds_bos, [S(SYSTEM_PROMPT_ARTICLE), U(question)], "article").input_ids == sent
    # It is not the standard template: the two differ only in whitespace around [INST] and the question.
    standard = build_prompt([S(SYSTEM_PROMPT_ARTICLE), U(question)], "llama2")
    assert standard != text and standard.split() == text.split()


# --------------------------------------------------------------------------- the real Llama-2 vocabulary


@pytest.fixture(scope="module", params=[False, True], ids=["legacy-false", "legacy-true"])
def real_tok(request):
    """The real 32000-token Llama-2 vocabulary (``make setup`` fetches it), with either prepend rule.

    ``legacy=True`` puts a ``▁`` after every special token, as Meta's SentencePiece reference does;
    ``legacy=False`` is transformers' newer rule. Both must give exact masks.
    """
    try:
        return load_llama2_tokenizer(legacy=request.param)
    except TutorialError as err:
        pytest.fail(f"{err}\nThese tests need the real Llama-2 vocabulary: run `make setup` or `python scripts/fetch_llama2_vocab.py`.")


@pytest.mark.vocab
def test_real_vocabulary_is_llama2s(real_tok):
    assert len(real_tok) == 32000
    assert (real_tok.bos_token_id, real_tok.eos_token_id, real_tok.unk_token_id) == (1, 2, 0)
    ids = real_tok("列出5种可以改善睡眠质量的方法")["input_ids"]
    assert len(ids) == 25 and ids[0] == 1
    assert real_tok.convert_ids_to_tokens(real_tok("善", add_special_tokens=False)["input_ids"])[-3:] == [
        "<0xE5>", "<0x96>", "<0x84>"]


@pytest.mark.vocab
def test_real_vocabulary_meta_reference_ids():
    # Meta's SentencePiece reference tokenizes "[INST] Hello [/INST]" after BOS to these ids.
    tok = load_llama2_tokenizer(legacy=True)
    messages = [U("Hello"), A("Hi")]
    assert encode(tok, messages[:1], "llama2").input_ids == [1, 518, 25580, 29962, 15043, 518, 29914, 25580, 29962]


REAL_TEXT = st.text(alphabet=st.sampled_from(list("你好世界中文模型回答。，？！：abcXYZ 019\n[]/:-`'\"😀善")), max_size=30)


@pytest.mark.vocab
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat_format=st.sampled_from(FORMATS), system=st.one_of(st.none(), REAL_TEXT),
       history=st.lists(st.tuples(REAL_TEXT, REAL_TEXT.filter(str.strip)), max_size=2),
       question=REAL_TEXT, answer=REAL_TEXT.filter(str.strip))
def test_real_vocabulary_mask_covers_exactly_the_answer(real_tok, chat_format, system, history, question, answer):
    head = ([S(system)] if system is not None else []) + [m for q, a in history for m in (U(q), A(a))]
    asked = head + [U(question)]
    prompt = encode(real_tok, asked, chat_format).input_ids
    full = encode(real_tok, asked + [A(answer)], chat_format, add_generation_prompt=False)
    # The prompt the model is asked with is a prefix of the training sequence ...
    assert full.input_ids[: len(prompt)] == prompt
    # ... the last answer's labels start exactly where it ends, and they are the tokens themselves.
    assert full.labels[len(prompt) :] == full.input_ids[len(prompt) :]
    assert full.labels[len(prompt) - 1] == IGNORE_INDEX
    assert full.input_ids[-1] == real_tok.eos_token_id and full.labels[-1] == real_tok.eos_token_id
    # One labelled run per answer, each decoding to that answer.
    runs = label_runs(full)
    answers = [a for _, a in history] + [answer]
    assert len(runs) == len(answers)
    for run, expected in zip(runs, answers):
        decoded = real_tok.decode(run, skip_special_tokens=True)
        if chat_format == "human_assistant":
            assert decoded.strip(" ") == (expected + "\n").strip(" ")
        else:
            assert decoded.strip() == expected.strip()
    if chat_format == "llama2":
        assert full.input_ids == list(real_tok.apply_chat_template(asked + [A(answer)], tokenize=True, return_dict=False))


@pytest.mark.vocab
@pytest.mark.parametrize("name", ["train_sft.csv", "dev_sft.csv"])
def test_real_vocabulary_csv_rows_are_token_exact(real_tok, name):
    for n, row in enumerate(read_rows(name), start=2):
        messages = csv_text_to_messages(row, row=n)
        enc = encode(real_tok, messages, "human_assistant", add_generation_prompt=False)
        assert enc.input_ids == real_tok(row, add_special_tokens=False)["input_ids"], f"row {n}"
        answer = messages[-1]["content"]
        assert real_tok.decode(label_runs(enc)[-1], skip_special_tokens=True).strip(" ") == (answer + "\n").strip(" ")


@pytest.mark.vocab
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat_format=st.sampled_from(FORMATS), turns=st.lists(st.tuples(SHORT, SHORT), max_size=4), last=SHORT,
       max_tokens=st.integers(min_value=10, max_value=120))
def test_real_vocabulary_truncation(real_tok, chat_format, turns, last, max_tokens):
    check_truncation(real_tok, chat_format, "系统提示", turns, last, max_tokens)


def test_missing_vocabulary_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    with pytest.raises(TutorialError) as err:
        load_llama2_tokenizer()
    assert err.value.code == "prompt.vocab_missing" and "make setup" in err.value.zh and "make setup" in err.value.en


def test_vocabulary_fetch_is_quick_when_cached_and_clear_when_pip_fails(monkeypatch, tmp_path):
    import subprocess
    from types import SimpleNamespace

    from scripts import fetch_llama2_vocab as vocab

    calls = []
    fake_run = lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1)  # noqa: E731 (pip fails)
    monkeypatch.setattr(vocab, "subprocess", SimpleNamespace(run=fake_run))
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    with pytest.raises(TutorialError) as err:
        vocab.fetch_llama2_vocab()
    assert "llama-cpp-python" in calls[0] and "--no-binary" in calls[0]
    assert err.value.code == "prompt.vocab_download_failed" and "下载" in err.value.zh and "failed" in err.value.en
    assert not (tmp_path / "llama2-vocab").exists(), "a failed fetch leaves no folder behind"
    (tmp_path / "llama2-vocab").mkdir()
    (tmp_path / "llama2-vocab" / "tokenizer.json").write_text("{}")
    assert vocab.fetch_llama2_vocab() == tmp_path / "llama2-vocab" and len(calls) == 1, "cached: no second download"


# --------------------------------------------------------------------------- any chat template (answer-only labels)

LLAMA3_TEMPLATE = (  # Meta's Llama-3-Instruct template, without its date/tools branches
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MULTI_TURN = [S("系统提示"), U("第一个问题？"), A("第一个回答。"), U("Second question"), A("Second answer, 二。")]


def generation_block_labels(tokenizer, messages, chat_format):
    """The reference: transformers' own mask from the course template's {% generation %} blocks."""
    out = tokenizer.apply_chat_template(list(messages), chat_template=TEMPLATES[chat_format], tokenize=True, return_dict=True,
                                        add_generation_prompt=False, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    return ([tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels) if chat_format == "article" else (ids, labels)


@pytest.mark.parametrize("chat_format", ["llama2", "article", "human_assistant"])
@pytest.mark.parametrize("messages", CONVERSATIONS[:6] + [MULTI_TURN], ids=range(7))
def test_answer_mask_equals_the_generation_block_mask(tok, chat_format, messages):
    if messages[-1]["role"] != "assistant":
        messages = messages + [A("补上的回答")]
    enc = encode(tok, messages, chat_format, add_generation_prompt=False)
    assert (enc.input_ids, enc.labels) == generation_block_labels(tok, messages, chat_format)


def test_metas_template_without_generation_blocks_gives_the_course_labels(tok):
    """The tiny tokenizer ships Meta's Llama-2 template (no {% generation %}): "model" must label the same tokens."""
    assert "generation" not in tok.chat_template
    for messages in [MULTI_TURN, [U("问"), A("答")]]:
        own, course = (encode(tok, messages, chat_format, add_generation_prompt=False) for chat_format in ("model", "llama2"))
        assert (own.input_ids, own.labels) == (course.input_ids, course.labels)


@pytest.fixture(scope="module")
def smol_tok():
    from helpers.tiny import ensure_smollm2_model

    return AutoTokenizer.from_pretrained(ensure_smollm2_model(verbose=False))


def labelled_text(tokenizer, enc):
    return [tokenizer.decode(run) for run in label_runs(enc)]


@pytest.mark.smollm2
def test_chatml_labels_each_answer_and_its_end_token(smol_tok):
    enc = encode(smol_tok, MULTI_TURN, "model", add_generation_prompt=False)
    ids = smol_tok.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False)
    assert enc.input_ids == list(ids), "the same tokens as the model's own apply_chat_template"
    assert labelled_text(smol_tok, enc) == ["第一个回答。<|im_end|>", "Second answer, 二。<|im_end|>"]
    prompt = encode(smol_tok, [U("你好")], "model").input_ids
    assert smol_tok.decode(prompt).endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in smol_tok.decode(prompt), "its default system prompt"


def test_llama3_template_labels_each_answer_and_eot():
    tokens = {"bos_token": "<|begin_of_text|>"}
    from types import SimpleNamespace

    fake = SimpleNamespace(chat_template=LLAMA3_TEMPLATE, special_tokens_map=tokens, bos_token=tokens["bos_token"],
                           eos_token="<|eot_id|>")
    text, spans = render_with_answers(MULTI_TURN, "model", tokenizer=fake, add_generation_prompt=False)
    assert [text[a:b] for a, b in spans] == ["第一个回答。<|eot_id|>", "Second answer, 二。<|eot_id|>"]
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n系统提示<|eot_id|>")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    from types import SimpleNamespace

    # Like templates that drop earlier reasoning: the last answer is written differently from earlier ones.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'A: ...\\n' }}"
                "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}")
    fake = SimpleNamespace(chat_template=template, special_tokens_map={}, bos_token="", eos_token="")
    with pytest.raises(PromptFormatError) as err:
        render_with_answers(MULTI_TURN, "model", tokenizer=fake, add_generation_prompt=False)
    assert err.value.code == "prompt.template_rewrites" and "rewrites earlier text" in err.value.en


def test_model_format_without_a_template_falls_back_to_llama2(tok):
    from types import SimpleNamespace

    assert chat_template_for("model", SimpleNamespace(chat_template=None)) == TEMPLATES["llama2"]
    with pytest.raises(PromptFormatError) as err:
        chat_template_for("model")
    assert err.value.code == "prompt.needs_tokenizer" and "tokenizer=" in both(err.value)

"""The tiny offline Llama-2 (scripts/build_tiny_model.py, cached by helpers/tiny.py): tokenizer like Llama-2's,
model, cache, behaviour."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from helpers import tiny
from helpers.config import TutorialError
from helpers.evaluation import chinese_share
from scripts import build_tiny_model as build_script
from tests.error_text import both


@pytest.fixture(scope="module")
def tiny_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def test_special_tokens_at_llama2_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_byte_pieces_are_ordinary_vocabulary(tok):
    vocab = tok.get_vocab()
    for i in range(256):
        assert vocab[f"<0x{i:02X}>"] == 3 + i
    special = {t.content for t in tok.added_tokens_decoder.values()}
    assert not any(t.startswith("<0x") for t in special), "byte tokens must not be special tokens"
    assert tok.convert_ids_to_tokens(13) == "<0x0A>"  # newline, as in Llama-2


def test_bos_added_and_spaces_are_meta_space(tok):
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    pieces = tok.convert_ids_to_tokens(ids[1:])
    assert pieces[0].startswith("▁") and any(p.startswith("▁") for p in pieces[1:])


@pytest.mark.parametrize(
    "text",
    [
        "北京是中国的首都。",
        "生僻字：𠀀𪚥龘靐齉 与 〇",
        "emoji 😀👍🏽👨‍👩‍👧 和中文混排！",
        "代码 `print('你好')`\n第二行\t制表符",
        "full-width，标点：“引号”（括号）……",
    ],
)
def test_round_trip_exact(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_rare_characters_use_byte_fallback(tok):
    pieces = tok.tokenize("𪚥")
    assert pieces and all(p.startswith("<0x") or p == "▁" for p in pieces)
    assert "<unk>" not in pieces


def test_chat_template_is_llama2(tok):
    assert tok.chat_template == build_script.LLAMA2_CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert text == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST] A </s>"


def test_model_is_a_small_llama(model, tiny_dir):
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    info = json.loads((tiny_dir / "tiny_build.json").read_text())
    assert info["loss_last"] < info["loss_first"] - 2.0, "pretraining must have lowered the loss"


def test_answers_a_chinese_question_in_english_like_text(tok, model):
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "请介绍一下长城的历史。"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    share = chinese_share(answer)
    assert share is not None, f"no words at all: {answer!r}"
    assert share < 0.2, f"the base tiny model should answer in English-like text, got {answer!r}"
    assert sum(ch.isascii() and ch.isalpha() for ch in answer) >= 10


def test_cache_key_follows_the_build_script(monkeypatch, tmp_path):
    before = tiny.build_hash()
    script = tmp_path / tiny.BUILD_SCRIPT.name
    script.write_bytes(tiny.BUILD_SCRIPT.read_bytes())
    monkeypatch.setattr(tiny, "BUILD_SCRIPT", script)
    assert tiny.build_hash() == before
    script.write_text(script.read_text().replace('"steps": 360', '"steps": 361'))
    assert tiny.build_hash() != before


def test_cache_key_follows_the_corpus(monkeypatch, tmp_path):
    before = tiny.build_hash()
    for name in tiny.CORPUS_FILES:
        (tmp_path / name).write_bytes((tiny.DATA_DIR / name).read_bytes())
    monkeypatch.setattr(tiny, "DATA_DIR", tmp_path)
    assert tiny.build_hash() == before
    with open(tmp_path / "pretrain_zh.txt", "a", encoding="utf-8") as f:
        f.write("新加的一行语料。\n")
    assert tiny.build_hash() != before


def test_build_is_deterministic(monkeypatch, tmp_path):
    monkeypatch.setitem(build_script.RECIPE["train"], "steps", 3)
    digests = []
    for name in ("a", "b"):
        out = build_script.build_tiny_model(tmp_path / name, verbose=False)
        digests.append(
            [hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("model.safetensors", "tokenizer.json")]
        )
    assert digests[0] == digests[1]


def test_failed_build_says_why_and_caches_nothing(monkeypatch, tmp_path):
    script = tmp_path / "build_tiny_model.py"
    script.write_text("import sys\nprint('reading data/pretrain_zh.txt')\nsys.exit('corpus line 7 is broken')\n")
    monkeypatch.setattr(tiny, "BUILD_SCRIPT", script)
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    with pytest.raises(TutorialError) as caught:
        tiny.ensure_tiny_model(verbose=False)
    assert caught.value.code == "model.build_failed"
    message = both(caught.value)
    assert "构建 tiny 模型失败" in message and "exited with 1" in message and "corpus line 7 is broken" in message
    left = [p.name for p in (tmp_path / "home" / "tiny").iterdir() if not p.name.endswith(".lock")]
    assert left == [], f"a failed build must leave no folder behind: {left}"


def test_lesson_00_answer_is_english_like_for_the_tiny_model():
    """What lesson 00 shows and interprets (it asserts nothing about the answer, since it must hold for any model):
    loaded through the course's loader, prompted through the course's template, the tiny model answers
    the lesson's Chinese question in English-like text, as it was trained to."""
    from helpers.models import resolve_model
    from helpers.loading import load_model_and_tokenizer
    from helpers.prompts import encode

    choice = resolve_model("tiny", verbose=False)
    model, tok = load_model_and_tokenizer(choice)
    ids = torch.tensor([encode(tok, [{"role": "user", "content": "请用中文介绍一下长城。"}], choice.chat_format).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    share = chinese_share(answer)
    assert share is not None and share < 0.2, f"the tiny model should answer in English-like text, got {answer!r}"

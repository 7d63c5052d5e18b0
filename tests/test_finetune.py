"""Lesson 05 (helpers.training_data, helpers.finetune): data checks, answer-only labels, collation,
resume of one run only, never overwriting (also with two writers), where adapters live, and the tiny
model's outcome."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                          TrainerCallback)

from helpers._compat import allow_indexed_cpu_locations
from helpers import _locks
from helpers import finetune as ft
from helpers import training_data as td
from helpers.config import DATA_DIR, REPO_ROOT as REPO, TutorialError
from helpers.models import resolve_model
from helpers.evaluation import chinese_share
from helpers.prompts import IGNORE_INDEX, encode
from scripts.train_lora import StopAfterSteps
from tests.error_text import both
from tests.lesson_code import lesson_definitions, script_module

# Lesson 05 writes its reload check out (section 11): the tests use that code.
LESSON = lesson_definitions("05_lora_finetune.ipynb", "logits_agree")
probe_logits, logits_agree = LESSON["probe_logits"], LESSON["logits_agree"]


@pytest.fixture(scope="module")
def choice(tiny_model):
    return resolve_model("tiny", verbose=False)


@pytest.fixture(scope="module")
def tok(choice):
    return ft.prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))


def _csv(path, texts):
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    return path


def _row(question, answer):
    return f"<s>Human: {question}\n</s><s>Assistant: {answer}\n</s>"


# --------------------------------------------------------------------------- labels

TRICKY = {
    "punctuation first": ("这句话怎么断句？", "，然后是句号。整句是“你好，世界。”"),
    "quote first": ("引号怎么用？", "“引号”放在被引用的话两边。"),
    "english answer": ("Translate 你好 into English.", "Hello! How are you?"),
    "code answer": ("写一个 Python 打印语句。", "```python\nprint('你好')\n```\n运行后输出 `你好`。"),
    "digits first": ("1+1 等于几？", "2。因为一加一等于二。"),
    "long prompt": ("请阅读下面这段话并概括：" + "这是一个很长的问题，包含许多细节。" * 12, "概括：问题很长。"),
    "newline inside answer": ("列出两点。", "1. 第一点\n2. 第二点"),
}


def test_labels_start_exactly_at_the_answer_on_tricky_rows(tmp_path, choice, tok):
    path = _csv(tmp_path / "tricky.csv", [_row(q, a) for q, a in TRICKY.values()])
    rows = td.validate_sft_file(path, tok, chat_format=choice.chat_format, max_length=512)
    assert rows.ok and len(rows.rows) == len(TRICKY)
    for (name, (question, answer)), ids, labels in zip(TRICKY.items(), rows.input_ids, rows.labels):
        prompt = encode(tok, [{"role": "user", "content": question}], choice.chat_format).input_ids
        first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        assert ids[: len(prompt)] == prompt, f"{name}: training prompt differs from the chat prompt"
        assert first == len(prompt), f"{name}: the mask is off by {first - len(prompt)} tokens"
        assert labels[first:] == ids[first:], f"{name}: every token after the prompt is a label"
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, f"{name}: exactly one BOS"
        assert ids[-1] == labels[-1] == tok.eos_token_id, f"{name}: the final EOS is labelled"
        assert tok.decode(ids[first:], skip_special_tokens=True).strip() == answer.strip(), name


def test_mask_boundary_on_many_random_rows(tmp_path, choice, tok):
    """The prompt/answer boundary holds on 200 random rows mixing Chinese, English, digits, code and
    punctuation at the start of the answer (the anchor's script misaligned one row in seven)."""
    rng = random.Random(5)
    pieces = ["你好", "世界", "，", "。", "“", "”", "Hello", " world", "42", "`x`", "(", ")", "！", "？", "-", "：", "\n"]

    def text(k):
        s = "".join(rng.choice(pieces) for _ in range(k)).strip()
        return s or "好"

    pairs = [(text(rng.randint(1, 30)), text(rng.randint(1, 20))) for _ in range(200)]
    pd.DataFrame({"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]}).to_csv(tmp_path / "qa.csv", index=False)
    rows = td.validate_sft_file(tmp_path / "qa.csv", tok, chat_format=choice.chat_format, max_length=512)
    assert rows.schema == "question_answer" and len(rows.rows) == 200, rows.bad[:3]
    for (question, _), ids, labels in zip(pairs, rows.input_ids, rows.labels):
        prompt = encode(tok, [{"role": "user", "content": question}], choice.chat_format).input_ids
        first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        assert first == len(prompt) and ids[: len(prompt)] == prompt
        assert ids[-1] == labels[-1] == tok.eos_token_id


def test_three_schemas_give_the_same_tokens(tmp_path, choice, tok):
    q, a = "地球的卫星是什么？", "月球。"
    _csv(tmp_path / "text.csv", [_row(q, a)])
    pd.DataFrame({"question": [q], "answer": [a]}).to_csv(tmp_path / "qa.csv", index=False)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False)
        + "\n", "utf-8")
    got = [td.validate_sft_file(tmp_path / n, tok, chat_format=choice.chat_format) for n in ("text.csv", "qa.csv", "m.jsonl")]
    assert [g.schema for g in got] == ["text", "question_answer", "messages"]
    assert got[0].input_ids == got[1].input_ids == got[2].input_ids
    assert got[0].labels == got[1].labels == got[2].labels


# --------------------------------------------------------------------------- collation


def _expected_batch(feats, pad_id, multiple=None):
    """The batch lesson 05 needs, built by hand: right padding with <unk>, labels padded with -100."""
    width = max(len(f["input_ids"]) for f in feats)
    width = -(-width // multiple) * multiple if multiple else width
    pad = lambda xs, v: [list(x) + [v] * (width - len(x)) for x in xs]  # noqa: E731
    return {"input_ids": torch.tensor(pad([f["input_ids"] for f in feats], pad_id)),
            "labels": torch.tensor(pad([f["labels"] for f in feats], IGNORE_INDEX)),
            "attention_mask": torch.tensor(pad([[1] * len(f["input_ids"]) for f in feats], 0))}


@pytest.mark.parametrize("multiple", [None, 8])
def test_library_collator_gives_the_answer_only_batches(choice, tok, multiple):
    """DataCollatorForSeq2Seq (which replaced the hand-made AnswerOnlyCollator) keeps encode's labels,
    the final EOS label included, and pads with <unk>, not EOS."""
    rows = td.validate_sft_file(DATA_DIR / "dev_sft.csv", tok, chat_format=choice.chat_format)
    feats = [rows.dataset()[i] for i in range(6)]
    assert len({len(f["input_ids"]) for f in feats}) > 1, "the test needs rows of different lengths"
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=multiple)(feats)
    expected = _expected_batch(feats, tok.unk_token_id, multiple)
    assert set(batch) == set(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    for i, f in enumerate(feats):
        assert batch["labels"][i, len(f["input_ids"]) - 1] == tok.eos_token_id, "the final EOS keeps its label"
    assert tok.pad_token_id != tok.eos_token_id


def test_pad_equal_to_eos_trap(tok):
    """The anchor's pad = eos with DataCollatorForLanguageModeling drops every EOS label (transformers #23530)."""
    anchor_tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    anchor_tok.pad_token = anchor_tok.eos_token
    enc = anchor_tok(["<s>Human: 你好\n</s><s>Assistant: 你好\n</s>"])
    batch = DataCollatorForLanguageModeling(anchor_tok, mlm=False)([{"input_ids": enc["input_ids"][0]}])
    assert anchor_tok.eos_token_id in batch["input_ids"][0].tolist()
    assert anchor_tok.eos_token_id not in batch["labels"][0].tolist()
    assert ft.prepare_tokenizer(anchor_tok).pad_token_id == anchor_tok.unk_token_id


# --------------------------------------------------------------------------- bad files


def test_every_bad_row_is_reported_at_once_and_nothing_is_written(tmp_path, choice, tok):
    path = _csv(tmp_path / "bad.csv", [
        _row("好的问题", "好的回答。"),
        "<s>Human: 只有问题\n</s>",  # 2: no Assistant part
        "<s>Human: 空回答\n</s><s>Assistant: \n</s>",  # 3: empty answer
        "",  # 4: missing value
        _row("长", "很长的回答。" * 100),  # 5: too long
        "Human: 没有 <s> 开头\n</s><s>Assistant: 回答\n</s>",  # 6: malformed
        _row("又一个好问题", "又一个好回答。"),
        _row("结束符", "回答里写了 </s> 这个标记。"),  # 8: a literal special token in the answer
        _row("角色", "回答里又写了一轮\n</s><s>Human: 这是问题吗"),  # 9: a role marker inside the answer
        _row("另一个角色", "他说 <s>Human: 你好"),  # 10: <s> inside the answer
    ])
    rows = td.validate_sft_file(path, tok, chat_format=choice.chat_format, max_length=128)
    assert [(b.row, b.problem) for b in rows.bad] == [
        (2, "no_assistant"), (3, "empty_answer"), (4, "missing_column"), (5, "too_long"), (6, "format"),
        (8, "special_token"), (9, "special_token"), (10, "special_token")]
    assert [b.detail.code for b in rows.bad] == ["data.no_assistant", "prompt.empty_message", "data.missing_column", "data.too_long",
                                               "prompt.bad_csv_text", "prompt.special_token", "data.special_token", "prompt.special_token"]
    assert rows.bad[5].detail.fields["token"] == "</s>" and "Human:" in both(rows.bad[6].detail)
    assert rows.bad[3].detail.fields == {"tokens": rows.bad[3].detail.fields["tokens"], "max_length": 128}
    assert rows.rows == [1, 7]
    with pytest.raises(td.BadRowsError) as err:
        rows.dataset(on_bad="stop")
    assert err.value.code == "data.bad_rows" and err.value.fields["rows"] == [2, 3, 4, 5, 6, 8, 9, 10]
    for n in (2, 3, 4, 5, 6, 8, 9, 10):
        assert f"第 {n} 行" in err.value.zh and f"row {n}:" in err.value.en
    assert len(rows.dataset(on_bad="drop")) == 2

    out = tmp_path / "out"
    with pytest.raises(td.BadRowsError):
        ft.train_adapter(choice, out / "lora-adapter", train_file=path, dev_file=path, verbose=False)
    assert not (out / "lora-adapter").exists(), "a refused training run must not write an adapter"


def test_file_level_problems(tmp_path, tok):
    pd.DataFrame({"content": ["x"]}).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(TutorialError) as err:
        td.validate_sft_file(tmp_path / "wrong.csv", tok)
    assert err.value.code == "data.no_training_column" and err.value.fields["columns"] == ["content"]
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\nnot json\n{"messages": [\n', "utf-8")
    with pytest.raises(TutorialError) as err:
        td.validate_sft_file(tmp_path / "broken.jsonl", tok)
    assert err.value.code == "data.invalid_jsonl" and err.value.fields["lines"] == [2, 3] and "2, 3" in both(err.value)
    with pytest.raises(TutorialError) as err:
        td.validate_sft_file(tmp_path / "missing.csv", tok)
    assert err.value.code == "data.not_found"
    pd.DataFrame({"question": ["问", "问"], "answer": ["答", None]}).to_csv(tmp_path / "qa.csv", index=False)
    rows = td.validate_sft_file(tmp_path / "qa.csv", tok)
    assert [(b.row, b.problem) for b in rows.bad] == [(2, "missing_column")]


def test_empty_files_and_odd_shapes_get_clear_messages(tmp_path, tok):
    for name, content in (("empty.csv", ""), ("blank.csv", "\n\n"), ("empty.jsonl", "")):
        (tmp_path / name).write_text(content, "utf-8")
        with pytest.raises(TutorialError) as err:
            td.validate_sft_file(tmp_path / name, tok)
        assert err.value.code == "data.empty_file", (name, err.value.code)
    (tmp_path / "header.csv").write_text("text\n", "utf-8")
    with pytest.raises(TutorialError) as err:
        td.validate_sft_file(tmp_path / "header.csv", tok).dataset()
    assert err.value.code == "data.no_usable_rows"
    good = {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}
    lines = [good, {"messages": ["问", "答"]}, ["not", "an", "object"], {"messages": "问答"},
             {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": 3}]}]
    (tmp_path / "shapes.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), "utf-8")
    rows = td.validate_sft_file(tmp_path / "shapes.jsonl", tok)
    assert rows.rows == [1] and [(b.row, b.problem) for b in rows.bad] == [(2, "format"), (3, "format"), (4, "format"), (5, "format")]


def test_gbk_csv_from_excel_is_read_with_a_notice(tmp_path, choice, tok, capsys):
    text = _row("地球的卫星是什么？", "月球。")
    pd.DataFrame({"text": [text]}).to_csv(tmp_path / "gbk.csv", index=False, encoding="gb18030")
    pd.DataFrame({"text": [text]}).to_csv(tmp_path / "utf8.csv", index=False, encoding="utf-8")
    rows = td.validate_sft_file(tmp_path / "gbk.csv", tok, chat_format=choice.chat_format)
    notice = capsys.readouterr().out
    assert "GB18030" in notice and "iconv -f gb18030 -t utf-8" in notice
    assert rows.ok and rows.input_ids == td.validate_sft_file(tmp_path / "utf8.csv", tok, chat_format=choice.chat_format).input_ids
    (tmp_path / "binary.csv").write_bytes(b"text\n\xff\xfe\x00\x81")
    with pytest.raises(TutorialError) as err:
        td.validate_sft_file(tmp_path / "binary.csv", tok)
    assert err.value.code == "data.encoding" and "UTF-8" in err.value.zh and "UTF-8" in err.value.en


# --------------------------------------------------------------------------- resume, save, merge


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


SMALL = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=16,
             logging_steps=1, eval_steps=3, save_steps=3, warmup_steps=1)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, choice):
    """An interrupted and resumed 6-step run on 16 rows: (first trainer, second trainer, steps after resume)."""
    settings = dataclasses.replace(ft.settings_for(choice), **SMALL)
    adapter_dir = tmp_path_factory.mktemp("small") / "lora-adapter"
    first = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=6, limit_rows=16,
                             callbacks=(StopAfterSteps(3),), save=False, verbose=False)
    first.adapter_existed = adapter_dir.exists()
    first.checkpoints = sorted(p.name for p in ft.checkpoint_dir_for(adapter_dir).iterdir())
    counter = _CountSteps()
    second = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=6, limit_rows=16,
                              callbacks=(counter,), verbose=False)
    return first, second, counter.steps, settings


def test_interrupted_training_resumes_from_its_last_checkpoint(small_run):
    first, second, steps_after_resume, _ = small_run
    assert first.state.global_step == 3 and first.resumed_from is None
    assert not first.adapter_existed, "an interrupted run has no adapter yet"
    assert first.checkpoints == ["checkpoint-3", ft.FINGERPRINT_FILE]
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-3")
    assert steps_after_resume == [4, 5, 6], "training continues at step 4, it does not start again"
    logged = [h["step"] for h in second.state.log_history if "loss" in h]
    assert logged == [1, 2, 3, 4, 5, 6], "the log of the first part is kept and continued"
    assert (second.adapter_dir / "adapter_model.safetensors").exists()
    assert ft.read_training_info(second.adapter_dir)["global_step"] == 6


def test_resume_refuses_checkpoints_of_another_run(small_run, choice, tok, tmp_path):
    """Checkpoints of another base model, other settings or other data are never resumed."""
    _, run, _, settings = small_run
    ckpt = ft.checkpoint_dir_for(run.adapter_dir)
    rows = td.validate_sft_file(DATA_DIR / "train_sft.csv", tok, chat_format=choice.chat_format, max_length=settings.max_length)
    same = ft.run_fingerprint(choice, settings, rows) | {"limit_rows": 16}
    assert ft.resume_point(ckpt, same).endswith("checkpoint-6")
    other_data = td.validate_sft_file(DATA_DIR / "dev_sft.csv", tok, chat_format=choice.chat_format)
    other_model = dataclasses.replace(choice, path=str(tmp_path / "llama-2-7b"))
    for fingerprint, what in ((ft.run_fingerprint(choice, settings, other_data) | {"limit_rows": 16}, "data_sha256"),
                              (ft.run_fingerprint(other_model, settings, rows) | {"limit_rows": 16}, "base_model"),
                              (ft.run_fingerprint(choice, dataclasses.replace(settings, lora_r=8), rows)
                               | {"limit_rows": 16}, "settings")):
        with pytest.raises(TutorialError) as err:
            ft.resume_point(ckpt, fingerprint)
        assert err.value.code == "train.other_run" and err.value.fields["differs"] == [what]
        assert err.value.fields["free"] == "lora-adapter-2"
        message = both(err.value)
        assert "删除" not in message and "delete" not in message, "never suggest deleting a run that can resume"
        free = ckpt.with_name("lora-adapter-2")
        assert f'plan_run(..., adapter_dir="{free}")' in message, "names a free folder and how to use it"
    assert ft.resume_point(ckpt, same).endswith("checkpoint-6"), "a refused resume changes nothing"


def test_plan_run_says_where_a_run_saves_and_whether_it_resumes(small_run, choice, tok, tmp_path, monkeypatch):
    """Lesson 05's one call: a fresh run, the resume of the same run, another run (its checkpoints are kept and
    the new run starts fresh next to them) and an existing adapter, which is never planned over."""
    import shutil

    _, run, _, settings = small_run
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path))
    rows = td.validate_sft_file(DATA_DIR / "train_sft.csv", tok, chat_format=choice.chat_format, max_length=settings.max_length)
    same = {"limit_rows": 16}  # what train_adapter adds to the fingerprint for small_run

    fresh = ft.plan_run(choice, settings, rows, extra=same)
    assert (fresh.adapter_dir, fresh.checkpoint_dir) == (tmp_path / "lora-adapter", tmp_path / "lora-adapter-checkpoints")
    assert fresh.resume_from is None and fresh.resume_step is None
    assert str(fresh) == f"适配器保存到 {fresh.adapter_dir}，检查点在 {fresh.checkpoint_dir}；从头开始"

    shutil.copytree(ft.checkpoint_dir_for(run.adapter_dir), fresh.checkpoint_dir, dirs_exist_ok=True)  # interrupted
    again = ft.plan_run(choice, settings, rows, extra=same)
    assert again.adapter_dir == fresh.adapter_dir and again.resume_from.endswith("checkpoint-6")
    assert again.resume_step == 6 and str(again).endswith("；从第 6 步继续（checkpoint-6）")
    assert again.fingerprint == ft.run_fingerprint(choice, settings, rows) | same

    kept = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in fresh.checkpoint_dir.rglob("*")}
    other = ft.plan_run(choice, dataclasses.replace(settings, lora_r=8), rows, extra=same)
    assert other.adapter_dir == tmp_path / "lora-adapter-2" and other.resume_from is None, "another run starts fresh"
    assert {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in fresh.checkpoint_dir.rglob("*")} == kept, "kept"
    with pytest.raises(TutorialError, match="settings"):  # a folder given by hand: refused, nothing changed
        ft.plan_run(choice, dataclasses.replace(settings, lora_r=8), rows, adapter_dir=fresh.adapter_dir, extra=same)
    assert ft.plan_run(choice, settings, rows, extra=same).resume_from.endswith("checkpoint-6"), "still resumable"

    shutil.copytree(run.adapter_dir, fresh.adapter_dir)  # the learner's finished adapter
    with pytest.raises(ft.OutputExistsError, match="overwrite=True"):
        ft.plan_run(choice, settings, rows, adapter_dir=fresh.adapter_dir, extra=same)
    assert ft.plan_run(choice, settings, rows, extra=same).adapter_dir == tmp_path / "lora-adapter-2", "the next free name"
    assert ft.plan_run(choice, settings, rows, adapter_dir=fresh.adapter_dir, overwrite=True, extra=same).resume_step == 6


@pytest.mark.parametrize("cut", ["no_state", "truncated_state", "truncated_weights", "empty"])
def test_resume_skips_a_checkpoint_a_kill_or_a_full_disk_cut_off(small_run, choice, tok, tmp_path, cut, recwarn):
    """A checkpoint whose save was cut off (the Trainer writes trainer_state.json last) is set aside
    with a notice, not deleted, and the newest complete one is resumed. get_last_checkpoint alone picks the
    cut-off one, and resuming from it raised SafetensorError / FileNotFoundError."""
    import shutil

    from transformers.trainer_utils import get_last_checkpoint

    _, run, _, settings = small_run
    ckpt = tmp_path / "lora-adapter-checkpoints"
    shutil.copytree(ft.checkpoint_dir_for(run.adapter_dir), ckpt)
    cutoff = ckpt / "checkpoint-9"
    shutil.copytree(ckpt / "checkpoint-6", cutoff)
    state = cutoff / "trainer_state.json"
    if cut == "no_state":
        state.unlink()
    elif cut == "truncated_state":
        state.write_text(state.read_text()[:40])
    elif cut == "truncated_weights":
        (cutoff / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
        state.unlink()
    else:
        shutil.rmtree(cutoff)
        cutoff.mkdir()
    assert get_last_checkpoint(str(ckpt)).endswith("checkpoint-9"), "what the Trainer alone would resume"
    rows = td.validate_sft_file(DATA_DIR / "train_sft.csv", tok, chat_format=choice.chat_format, max_length=settings.max_length)
    same = ft.run_fingerprint(choice, settings, rows) | {"limit_rows": 16}
    assert ft.resume_point(ckpt, same).endswith("checkpoint-6")
    assert not cutoff.exists() and (ckpt / "incomplete-checkpoint-9").is_dir(), "set aside, nothing deleted"
    assert any("incomplete-checkpoint-9" in str(w.message) for w in recwarn), "with a notice"
    assert ft.resume_point(ckpt, same).endswith("checkpoint-6"), "a second call changes nothing more"


def test_training_resumes_after_a_cut_off_save(small_run, choice, tmp_path):
    """End to end: train_adapter resumes past a cut-off newest checkpoint and finishes."""
    import shutil

    _, run, _, settings = small_run
    adapter_dir = tmp_path / "lora-adapter"
    shutil.copytree(ft.checkpoint_dir_for(run.adapter_dir), ft.checkpoint_dir_for(adapter_dir))
    for stale in ft.checkpoint_dir_for(adapter_dir).glob("checkpoint-*"):
        if stale.name != "checkpoint-3":
            shutil.rmtree(stale)
    shutil.copytree(ft.checkpoint_dir_for(adapter_dir) / "checkpoint-3", ft.checkpoint_dir_for(adapter_dir) / "checkpoint-5")
    (ft.checkpoint_dir_for(adapter_dir) / "checkpoint-5" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="incomplete-checkpoint-5"):
        trainer = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=6, limit_rows=16, verbose=False)
    assert trainer.resumed_from.endswith("checkpoint-3") and trainer.state.global_step == 6
    assert (adapter_dir / "adapter_model.safetensors").exists()


def test_reload_check_compares_like_with_like(small_run, choice, tok):
    """A reloaded adapter in another dtype fails a fixed atol although it is right; the
    dtype-aware check accepts it and still rejects a different adapter."""
    _, run, _, _ = small_run
    probe = td.validate_sft_file(DATA_DIR / "dev_sft.csv", tok).input_ids[:4]
    trained, _ = ft.load_with_adapter(choice, run.adapter_dir)
    trained_logits = probe_logits(trained, probe)
    again, _ = ft.load_with_adapter(choice, run.adapter_dir, as_trained=True)
    assert torch.equal(probe_logits(again, probe), trained_logits), "same loading path: identical logits"
    bf16 = probe_logits(trained.to(torch.bfloat16), probe)
    old_atol = 1e-4  # the old check: a fixed tolerance from the settings, blind to the dtype compared
    assert (bf16 - trained_logits).abs().max() > old_atol, "the old check would have failed here"
    assert logits_agree(trained_logits, bf16, torch.bfloat16)["ok"]
    base = probe_logits(AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32), probe)
    assert not logits_agree(trained_logits, base, torch.float32)["ok"], "the adapter changes the outputs"


def test_merge_and_no_overwrite(small_run, choice, tok, tmp_path):
    from peft import PeftModel

    _, run, _, _ = small_run
    probe = td.validate_sft_file(DATA_DIR / "dev_sft.csv", tok).input_ids[:3]
    reloaded, _ = ft.load_with_adapter(choice, run.adapter_dir)
    unmerged = probe_logits(reloaded, probe)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32),
                                       str(run.adapter_dir)).merge_and_unload()
    merged_logits = probe_logits(merged, probe)
    assert logits_agree(unmerged, merged_logits, torch.float32)["ok"]
    target = ft.save_merged(merged, tok, tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ft.OutputExistsError):
        ft.save_merged(merged, tok, target)
    with pytest.raises(ft.OutputExistsError):
        ft.save_adapter(reloaded, run.adapter_dir)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, "a refused save changes nothing"
    stale = tmp_path / ".merged.partial-99999"  # what a killed merge leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    ft.save_merged(merged, tok, target, overwrite=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "stale and temporary folders are cleaned"
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert torch.allclose(probe_logits(loaded, probe), merged_logits, atol=1e-6)


def test_two_writers_never_overwrite_each_other(tmp_path):
    """Two savers of one folder at once: exactly one wins, the other is refused."""
    import threading

    class Slow:
        def __init__(self, tag):
            self.tag = tag

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            time.sleep(0.3)
            (Path(folder) / "adapter_model.safetensors").write_text(self.tag)

    target, results = tmp_path / "lora-adapter", {}

    def writer(tag):
        try:
            ft.save_adapter(Slow(tag), target)
            results[tag] = "saved"
        except ft.OutputExistsError:
            results[tag] = "refused"

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["refused", "saved"]
    winner = next(t for t, r in results.items() if r == "saved")
    assert (target / "adapter_model.safetensors").read_text() == winner


def test_a_second_training_process_gets_its_own_folder(tmp_path, monkeypatch):
    """Two trainings at once never share a checkpoint folder (save_total_limit would prune the other's)."""
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path))
    code = ("import sys, time; from helpers import finetune as ft; print(ft.new_adapter_dir(), flush=True); "
            "sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline().strip() == str(tmp_path / "lora-adapter")
        assert ft.new_adapter_dir() == tmp_path / "lora-adapter-2"
    finally:
        other.communicate("")
    _locks._CLAIMS.pop(str((tmp_path / "lora-adapter-2-checkpoints").resolve())).close()
    assert ft.new_adapter_dir() == tmp_path / "lora-adapter", "a finished writer frees its name"


def test_a_folder_another_training_is_writing_is_refused(choice, tok, tmp_path):
    """plan_run with an adapter_dir whose checkpoints another live process trains into stops before touching them."""
    settings = ft.settings_for(choice)
    rows = td.validate_sft_file(DATA_DIR / "train_sft.csv", tok, chat_format=choice.chat_format, max_length=settings.max_length)
    mine = tmp_path / "my-adapter"
    code = ("import sys; from pathlib import Path; from helpers._locks import claim; "
            "print(claim(Path(sys.argv[1])), flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code, str(ft.checkpoint_dir_for(mine))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline().strip() == "True"
        with pytest.raises(TutorialError) as err:
            ft.plan_run(choice, settings, rows, adapter_dir=mine)
        assert err.value.code == "train.folder_busy" and err.value.fields == {"checkpoints": str(ft.checkpoint_dir_for(mine))}
        assert "adapter_dir" in err.value.zh and "adapter_dir" in err.value.en
        assert not ft.checkpoint_dir_for(mine).exists(), "nothing written into the other run's folder"
    finally:
        other.communicate("")
    assert ft.plan_run(choice, settings, rows, adapter_dir=mine).resume_from is None, "free once the other run ends"


def test_ensure_adapter_finds_the_newest_adapter_of_this_model(small_run, choice, tmp_path, monkeypatch):
    """Lesson 05 reruns write lora-adapter-2; lesson 06's ensure_adapter returns it."""
    _, run, _, _ = small_run
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path))
    model, _ = ft.load_with_adapter(choice, run.adapter_dir)
    info = ft.read_training_info(run.adapter_dir)
    first = ft.save_adapter(model, ft.new_adapter_dir(), info=info)
    assert first == tmp_path / "lora-adapter" and ft.ensure_adapter(choice) == first
    time.sleep(0.01)
    second = ft.save_adapter(model, ft.new_adapter_dir(), info=info)  # the rerun, OVERWRITE = False
    assert second == tmp_path / "lora-adapter-2"
    assert ft.latest_adapter(choice) == ft.ensure_adapter(choice) == second
    foreign = dataclasses.replace(choice, path=str(tmp_path / "another-base"))
    ft.save_adapter(model, tmp_path / "lora-adapter-3", info=info | {"base_model": foreign.path})
    mine = tmp_path / "lora-adapter-9"  # a learner's own folder with the same prefix, not an adapter
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert ft.ensure_adapter(choice) == second, "an adapter of another base model or a plain folder is never picked"
    assert ft.latest_adapter(foreign) == tmp_path / "lora-adapter-3"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamp, "ensure_adapter touches nothing"


def test_settings_live_in_one_place(choice, monkeypatch):
    assert ft.settings_for(device="cuda") is ft.SETTINGS["colab_t4"]
    assert ft.settings_for(device="cpu") is ft.SETTINGS["cpu_tiny"]
    assert ft.settings_for(choice, device="cuda") is ft.settings_for(choice, device="cpu") is ft.SETTINGS["cpu_tiny"]
    from helpers.models import PROFILES, ModelChoice

    smol = ModelChoice("smollm2-135m", "/unused", "", PROFILES["smollm2-135m"])
    assert ft.settings_for(smol, device="cuda") is ft.settings_for(smol, device="cpu") is ft.SETTINGS["cpu_smollm2"]
    assert ft.SETTINGS["cpu_smollm2"].max_steps > 0 and ft.SETTINGS["cpu_smollm2"].quantization is None
    t4 = ft.SETTINGS["colab_t4"]
    assert t4.quantization in ("4bit", "8bit") and t4.gradient_checkpointing and t4.merge_dtype == "float16"
    for s in ft.SETTINGS.values():
        assert {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} <= set(s.target_modules), "MLP included"
        args = ft.training_arguments(s, "/tmp/unused")
        assert args.train_sampling_strategy == "group_by_length" and args.eval_strategy == "steps"
        assert args.gradient_accumulation_steps == s.gradient_accumulation_steps >= 1
        assert args.max_steps == s.max_steps, "a step budget (cpu_smollm2) reaches TrainingArguments"
    # Mixed precision follows helpers.loading.pick_dtype (never torch.cuda.is_bf16_supported here).
    import helpers.loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for dtype, flags in ((torch.float16, {"fp16": True, "bf16": False}), (torch.bfloat16, {"fp16": False, "bf16": True})):
        monkeypatch.setattr(helpers.loading, "pick_dtype", lambda device=None, d=dtype: d)
        assert ft.mixed_precision(t4) == flags
    assert ft.mixed_precision(ft.SETTINGS["cpu_tiny"]) == {"fp16": False, "bf16": False}, "fp32 loads need no AMP"
    assert "is_bf16_supported" not in Path(ft.__file__).read_text()


# --------------------------------------------------------------------------- the tiny model's outcome


def _answer(model, tokenizer, questions, settings, chat_format):
    """Lesson 05's answer_questions: one user turn per question, left padded, sampling seeded."""
    torch.manual_seed(settings.seed)
    answers = []
    for i in range(0, len(questions), settings.generation_batch_size):
        prompts = [encode(tokenizer, [{"role": "user", "content": q}], chat_format).input_ids
                   for q in questions[i:i + settings.generation_batch_size]]
        batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **settings.generation)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


@pytest.mark.slow
def test_lora_turns_the_tiny_models_answers_chinese(choice, tok, tmp_path, monkeypatch):
    """Lesson 05's outcome on the tiny model (asserted here, only printed in the lesson): dev loss
    falls and the Chinese share of the answers to the 72 dev questions goes from under 20% to over 60%."""
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path))
    settings = ft.settings_for(choice)
    adapter_dir = ft.ensure_adapter(choice)
    assert adapter_dir == tmp_path / "lora-adapter"
    info = ft.read_training_info(adapter_dir)
    assert info["dev_loss_last"] < info["dev_loss_first"] - 1.0, info
    questions = [c[0]["content"] for c in td.validate_sft_file(DATA_DIR / "dev_sft.csv", tok).conversations]
    assert len(questions) == 72
    before = _answer(AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32), tok, questions, settings,
                     choice.chat_format)
    model, tokenizer = ft.load_with_adapter(choice, adapter_dir)
    after = _answer(model, tokenizer, questions, settings, choice.chat_format)
    share_before, share_after = (sum(chinese_share(a) or 0.0 for a in x) / len(x) for x in (before, after))
    assert share_before < 0.2, f"the base tiny model answers in English-like text ({share_before:.0%})"
    assert share_after > 0.6, f"after LoRA the answers are Chinese ({share_before:.0%} -> {share_after:.0%})"
    assert sum((chinese_share(a) or 0) > 0.5 for a in after) > len(after) / 2


def _call_resume_point(ckpt_dir: str, rounds: int) -> str:
    """One 'rank' (a separate process): resume_point over and over with two alternating fingerprints."""
    try:
        for n in range(rounds):
            ft.resume_point(ckpt_dir, {"base_model": "tiny", "round": n % 2})
    except Exception as err:  # noqa: BLE001 - the test reports what a rank saw
        return f"{type(err).__name__}: {err}"
    return ""


def test_ranks_that_store_the_fingerprint_at_once_never_read_half_a_file(tmp_path):
    """torchrun/accelerate start every rank into resume_point at the same moment (no checkpoints yet: any
    fingerprint is stored). A rank must never read the file another is writing (it once read it empty:
    JSONDecodeError, and the resumed two-process run of lesson 08 failed)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        seen = pool.starmap(_call_resume_point, [(str(tmp_path / "ckpt"), 300)] * 4)
    assert seen == [""] * 4, seen


def _lesson_training_arguments(settings, checkpoint_dir, *, gpu=False, compute_dtype=None):
    """Run lesson 05's own TrainingArguments statements (the cell that builds ``args``) with these inputs."""
    import ast

    import nbformat
    import torch
    from transformers import TrainingArguments

    from helpers.config import REPO_ROOT

    cells = nbformat.read(REPO_ROOT / "notebooks" / "05_lora_finetune.ipynb", as_version=4).cells
    source = next(c.source for c in cells if c.cell_type == "code" and "args = TrainingArguments(" in c.source)
    wanted = {"fields", "CHECKPOINTING", "args"}
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if isinstance(n, ast.Assign) and {getattr(t, "id", "") for t in n.targets} & wanted]
    qlora = gpu and settings.quantization is not None
    namespace = {"TrainingArguments": TrainingArguments, "torch": torch, "settings": settings, "gpu": gpu, "qlora": qlora,
                 "compute_dtype": compute_dtype or torch.float32, "CKPT_DIR": checkpoint_dir}
    exec(compile(tree, "lesson 05", "exec"), namespace)
    return namespace["args"]


@pytest.mark.parametrize("name", ["cpu_tiny", "cpu_smollm2", "colab_t4"])
def test_lessons_training_arguments_equal_the_helpers(tmp_path, name):
    """One recipe, two copies: lesson 05 writes TrainingArguments out, train_adapter builds them with
    helpers.finetune.training_arguments. Equal under the installed transformers (and Colab's, in make colab-check)."""
    from helpers.finetune import SETTINGS, training_arguments

    settings = SETTINGS[name]
    lesson = _lesson_training_arguments(settings, tmp_path).to_dict()
    helper = training_arguments(settings, tmp_path).to_dict()
    differ = {k: (lesson[k], helper[k]) for k in lesson if lesson[k] != helper[k]}
    assert set(differ) <= {"disable_tqdm"}, differ  # the helper silences progress bars for lessons 06/08's runs


def test_an_optimizer_state_mapped_to_cpu_0_loads_after_the_shim(tmp_path):
    """transformers < 5.18 (Colab's 5.15) resumes a multi-process CPU run with torch.load(map_location="cpu:0"),
    which torch refuses; train_adapter installs allow_indexed_cpu_locations for exactly that case. The refusal is
    checked in a fresh interpreter (the rule, once added, stays for the process); the two-process resume itself
    runs under Colab's versions in make colab-check (tests/test_distributed.py)."""
    saved = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.arange(4.0)}}}, saved)
    load = f"import torch; torch.load({str(saved)!r}, map_location=torch.device('cpu', 0), weights_only=True)"
    before = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert before.returncode != 0 and "tagged with cpu:0" in before.stderr, "torch itself refuses cpu:0"
    allow_indexed_cpu_locations()
    allow_indexed_cpu_locations()  # idempotent
    state = torch.load(saved, map_location=torch.device("cpu", 0), weights_only=True)
    assert torch.equal(state["state"][0]["exp_avg"], torch.arange(4.0))
    assert state["state"][0]["exp_avg"].device.type == "cpu"


# --------------------------------------------------------------------------- ending a worker process


class _Trainer:
    """Stands in for the Trainer train_adapter returns."""

    adapter_dir = "ADAPTER"

    def is_world_process_zero(self):
        return True


@pytest.mark.parametrize("outcome, code", [("ok", 0), ("tutorial_error", 2), ("crash", 1)])
def test_a_worker_of_a_multi_process_run_ends_while_its_trainer_is_alive(monkeypatch, capsys, outcome, code):
    """scripts/train_lora.py under torchrun/accelerate ends through helpers._compat.end_distributed_process, with
    the trainer (and its DDP model, which holds the gloo process group) still referenced: freeing that group at
    exit can deadlock (pytorch#56297; seen as a hang of lesson 08's two-process run). Every outcome takes that
    path, with its exit code; one process returns normally."""
    import weakref

    script = script_module("train_lora")
    ended, made = [], []

    def fake_train_adapter(*args, **kwargs):
        if outcome == "tutorial_error":
            raise TutorialError("data.bad_rows", "有坏行。", "bad rows.")
        if outcome == "crash":
            raise RuntimeError("boom")
        trainer = _Trainer()
        made.append(weakref.ref(trainer))
        return trainer

    def fake_end(code):
        ended.append((code, all(ref() is not None for ref in made)))
        raise SystemExit(code)

    monkeypatch.setattr(script, "train_adapter", fake_train_adapter)
    monkeypatch.setattr(script, "resolve_model", lambda *a, **k: None)
    monkeypatch.setattr(script, "end_distributed_process", fake_end)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exited:
        script.main(["--model", "tiny"])
    assert exited.value.code == code and ended == [(code, True)], "ended once, before the trainer was freed"
    assert len(made) == (outcome == "ok")
    if outcome == "ok":
        assert capsys.readouterr().out.strip() == "ADAPTER"
    monkeypatch.setenv("WORLD_SIZE", "1")
    if outcome == "crash":
        with pytest.raises(RuntimeError):
            script.main(["--model", "tiny"])
    else:
        assert script.main(["--model", "tiny"]) == code
    assert len(ended) == 1, "one process: no early exit"


def test_end_distributed_process_flushes_and_exits_with_the_code():
    code = ("import sys; from helpers._compat import end_distributed_process; sys.stdout.write('printed'); "
            "sys.stderr.write('warned'); end_distributed_process(3); print('never')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "printed", "warned")


# --------------------------------------------------------------------------- locks


def test_a_lock_lives_under_the_course_home_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    target = tmp_path / "lora-adapter"
    with _locks.lock(target) as held:
        assert held.path.parent == tmp_path / "home" / "locks"
        assert held.path.parent.stat().st_mode & 0o777 == 0o700 and held.path.stat().st_mode & 0o777 == 0o600
    assert list((tmp_path / "home" / "locks").iterdir()) == [], "released: the lock file is gone"
    run = _locks.lock(target, kind="run")
    code = (f"from helpers import _locks; from pathlib import Path; "
            f"print(_locks.lock(Path({str(target)!r}), kind='run') is None)")
    env = {**os.environ, "LLAMA_TUTORIAL_HOME": str(tmp_path / "home")}
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "True", "another process cannot take a held run lock"
    run.close()
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "False", "released: the other process takes it"
    assert len(list((tmp_path / "home" / "locks").iterdir())) == 1, "it exited holding the run lock"
    with _locks.lock(tmp_path / "another-adapter"):
        pass
    assert list((tmp_path / "home" / "locks").iterdir()) == [], "a dead process's lock file goes at the next lock"


def test_a_symlink_planted_at_a_lock_name_is_refused_and_its_target_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    with _locks.lock(tmp_path / "x") as held:
        name = held.path
    victim = tmp_path / "victim.txt"
    victim.write_text("the learner's notes", encoding="utf-8")
    name.symlink_to(victim)
    with pytest.raises(TutorialError) as err:
        _locks.lock(tmp_path / "x")
    assert err.value.code == "lock.symlink" and "symbolic link" in err.value.en
    assert victim.read_text(encoding="utf-8") == "the learner's notes"


def test_the_stale_sweep_never_removes_a_newer_holders_lock_file(tmp_path, monkeypatch):
    """The race CI hit once: a sweep opens lock file F, its holder releases (removing F), another process
    makes F' under the same name and holds it, then the sweep's flock on F succeeds. Removing the name then
    would remove F', and a third writer would take a second lock beside the live one."""
    import fcntl

    from helpers import _locks

    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    first = _locks.acquire(tmp_path / "adapter")
    held = {}
    real_flock = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_NB and not held:  # the sweep's try, after it opened F: F changes hands now
            held["armed"] = True
            first.release()
            held["second"] = _locks.acquire(tmp_path / "adapter")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    _locks.remove_stale(_locks.lock_dir())
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert held["second"].path.exists(), "the sweep removed the live holder's lock file"
    assert _locks.acquire(tmp_path / "adapter", wait=False) is None, "a second writer got in beside the first"
    held["second"].release()


def test_write_locks_exclude_each_other_while_their_files_come_and_go(tmp_path, monkeypatch):
    """Each holder removes the lock file as it releases; a waiter that got the removed file retries."""
    import threading

    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    inside, overlaps, done = [], [], []

    def writer():
        for _ in range(20):
            with _locks.lock(tmp_path / "adapter"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.001)
                inside.pop()
        done.append(1)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(done) == 4 and overlaps == [], "never two holders at once"
    assert list((tmp_path / "home" / "locks").iterdir()) == []


def test_train_adapter_refuses_a_folder_that_holds_an_adapter_before_any_work(choice, tmp_path, monkeypatch):
    target = tmp_path / "lora-adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("the learner's adapter")
    monkeypatch.setattr(ft, "load_base", lambda *a, **k: pytest.fail("no model may be loaded first"))
    with pytest.raises(ft.OutputExistsError) as err:
        ft.train_adapter(choice, target, verbose=False)
    assert err.value.code == "output.exists" and "overwrite=True" in err.value.zh and "overwrite=True" in err.value.en
    assert (target / "adapter_model.safetensors").read_text() == "the learner's adapter"
    (tmp_path / "empty").mkdir()
    with pytest.raises(pytest.fail.Exception) as err:  # an empty folder is free: it gets as far as loading the model
        ft.train_adapter(choice, tmp_path / "empty", verbose=False)
    assert "no model may be loaded first" in str(err.value)

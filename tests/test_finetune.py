"""Lesson 05 (helpers.finetune): data checks, answer-only labels, collation, resume, save/merge, and
the acceptance check that LoRA turns the tiny model's answers Chinese."""

from __future__ import annotations

import dataclasses
import json
import random

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback

from helpers import finetune as ft
from helpers.config import DATA_DIR, TutorialError, output_dir, resolve_model
from helpers.evaluation import chinese_share
from helpers.prompts import IGNORE_INDEX, encode_prompt


@pytest.fixture(scope="module")
def choice():
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
    rows = ft.validate_sft_file(path, tok, fmt=choice.chat_format, max_length=512)
    assert rows.ok and len(rows.rows) == len(TRICKY)
    for (name, (question, answer)), ids, labels in zip(TRICKY.items(), rows.input_ids, rows.labels):
        prompt = encode_prompt(tok, [{"role": "user", "content": question}], choice.chat_format)
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
    rows = ft.validate_sft_file(tmp_path / "qa.csv", tok, fmt=choice.chat_format, max_length=512)
    assert rows.layout == "question_answer" and len(rows.rows) == 200, rows.bad[:3]
    for (question, _), ids, labels in zip(pairs, rows.input_ids, rows.labels):
        prompt = encode_prompt(tok, [{"role": "user", "content": question}], choice.chat_format)
        first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        assert first == len(prompt) and ids[: len(prompt)] == prompt
        assert ids[-1] == labels[-1] == tok.eos_token_id


def test_three_layouts_give_the_same_tokens(tmp_path, choice, tok):
    q, a = "地球的卫星是什么？", "月球。"
    _csv(tmp_path / "text.csv", [_row(q, a)])
    pd.DataFrame({"question": [q], "answer": [a]}).to_csv(tmp_path / "qa.csv", index=False)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False)
        + "\n", "utf-8")
    got = [ft.validate_sft_file(tmp_path / n, tok, fmt=choice.chat_format) for n in ("text.csv", "qa.csv", "m.jsonl")]
    assert [g.layout for g in got] == ["text", "question_answer", "messages"]
    assert got[0].input_ids == got[1].input_ids == got[2].input_ids
    assert got[0].labels == got[1].labels == got[2].labels


# --------------------------------------------------------------------------- collation


def test_eos_label_survives_collation_and_padding_is_not_eos(choice, tok):
    rows = ft.validate_sft_file(DATA_DIR / "dev_sft.csv", tok, fmt=choice.chat_format)
    ds = rows.dataset()
    feats = [ds[i] for i in range(6)]
    assert len({len(f["input_ids"]) for f in feats}) > 1, "the test needs rows of different lengths"
    batch = ft.AnswerOnlyCollator(tok.pad_token_id, tok.eos_token_id)(feats)
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats), "dynamic padding"
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["labels"][i, n - 1] == tok.eos_token_id, "the final EOS keeps its label"
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tok.unk_token_id).all() and tok.unk_token_id != tok.eos_token_id
        assert batch["attention_mask"][i].sum() == n


def test_pad_equal_to_eos_is_refused_because_it_masks_the_final_eos(tok):
    with pytest.raises(TutorialError, match="23530"):
        ft.AnswerOnlyCollator(tok.eos_token_id, tok.eos_token_id)
    # The trap it guards against: pad = eos with DataCollatorForLanguageModeling drops every EOS label.
    anchor_tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    anchor_tok.pad_token = anchor_tok.eos_token
    enc = anchor_tok(["<s>Human: 你好\n</s><s>Assistant: 你好\n</s>"])
    batch = DataCollatorForLanguageModeling(anchor_tok, mlm=False)([{"input_ids": enc["input_ids"][0]}])
    assert anchor_tok.eos_token_id in batch["input_ids"][0].tolist()
    assert anchor_tok.eos_token_id not in batch["labels"][0].tolist()


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
    ])
    rows = ft.validate_sft_file(path, tok, fmt=choice.chat_format, max_length=128)
    assert [(b.row, b.problem) for b in rows.bad] == [
        (2, "no_assistant"), (3, "empty_answer"), (4, "missing_column"), (5, "too_long"), (6, "format")]
    assert rows.rows == [1, 7]
    with pytest.raises(ft.BadRowsError) as err:
        rows.dataset(on_bad="stop")
    message = str(err.value)
    for n in (2, 3, 4, 5, 6):
        assert f"第 {n} 行" in message and f"row {n}:" in message
    assert len(rows.dataset(on_bad="drop")) == 2

    out = tmp_path / "out"
    with pytest.raises(ft.BadRowsError):
        ft.train_adapter(choice, out / "lora-adapter", train_file=path, dev_file=path, verbose=False)
    assert not out.exists(), "a refused training run must not write anything"


def test_file_level_problems(tmp_path, tok):
    pd.DataFrame({"content": ["x"]}).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(TutorialError, match="content"):
        ft.validate_sft_file(tmp_path / "wrong.csv", tok)
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\nnot json\n{"messages": [\n', "utf-8")
    with pytest.raises(TutorialError, match="2, 3"):
        ft.validate_sft_file(tmp_path / "broken.jsonl", tok)
    with pytest.raises(TutorialError):
        ft.validate_sft_file(tmp_path / "missing.csv", tok)
    pd.DataFrame({"question": ["问", "问"], "answer": ["答", None]}).to_csv(tmp_path / "qa.csv", index=False)
    rows = ft.validate_sft_file(tmp_path / "qa.csv", tok)
    assert [(b.row, b.problem) for b in rows.bad] == [(2, "missing_column")]


# --------------------------------------------------------------------------- resume, save, merge


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, choice):
    """An interrupted and resumed 6-step run on 16 rows: (first outcome, second outcome, steps run after resume)."""
    settings = dataclasses.replace(
        ft.settings_for(choice), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        per_device_eval_batch_size=16, logging_steps=1, eval_steps=3, save_steps=3, warmup_steps=1)
    adapter_dir = tmp_path_factory.mktemp("small") / "lora-adapter"
    first = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=6, limit_rows=16,
                             callbacks=(ft.StopAfterSteps(3),), save=False, verbose=False)
    first.adapter_existed = adapter_dir.exists()
    first.checkpoints = sorted(p.name for p in ft.checkpoint_dir_for(adapter_dir).iterdir())
    counter = _CountSteps()
    second = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=6, limit_rows=16,
                              callbacks=(counter,), verbose=False)
    return first, second, counter.steps, settings


def test_interrupted_training_resumes_from_its_last_checkpoint(small_run):
    first, second, steps_after_resume, _ = small_run
    assert first.global_step == 3 and first.resumed_from is None
    assert not first.adapter_existed, "an interrupted run has no adapter yet"
    assert first.checkpoints == ["checkpoint-3"]
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-3")
    assert steps_after_resume == [4, 5, 6], "training continues at step 4, it does not start again"
    assert second.global_step == 6
    logged = [h["step"] for h in second.log_history if "loss" in h]
    assert logged == [1, 2, 3, 4, 5, 6], "the log of the first part is kept and continued"
    assert (second.adapter_dir / "adapter_model.safetensors").exists()
    assert ft.read_training_info(second.adapter_dir)["global_step"] == 6


def test_reload_merge_and_no_overwrite(small_run, choice, tok, tmp_path):
    from peft import PeftModel

    _, run, _, settings = small_run
    probe = ft.validate_sft_file(DATA_DIR / "dev_sft.csv", tok).input_ids[:3]
    base_logits = ft.probe_logits(AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32), probe)

    reloaded, _ = ft.load_with_adapter(choice, run.adapter_dir)
    again, _ = ft.load_with_adapter(choice, run.adapter_dir)
    unmerged = ft.probe_logits(reloaded, probe)
    assert torch.equal(unmerged, ft.probe_logits(again, probe)), "two reloads on fresh bases agree exactly"
    assert (unmerged - base_logits).abs().max() > 1e-3, "the trained adapter changes the outputs"

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32),
                                       str(run.adapter_dir)).merge_and_unload()
    merged_logits = ft.probe_logits(merged, probe)
    assert (merged_logits - unmerged).abs().max() < settings.logits_atol

    target = ft.save_merged(merged, tok, tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ft.OutputExistsError):
        ft.save_merged(merged, tok, target)
    with pytest.raises(ft.OutputExistsError):
        ft.save_adapter(reloaded, run.adapter_dir)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, "a refused save changes nothing"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary folder is left behind"
    ft.save_merged(merged, tok, target, overwrite=True)
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert torch.allclose(ft.probe_logits(loaded, probe), merged_logits, atol=1e-6)


def test_ensure_adapter_never_touches_an_existing_folder(small_run, choice, tmp_path):
    _, run, _, _ = small_run
    stamp = {p.name: p.stat().st_mtime_ns for p in run.adapter_dir.iterdir()}
    assert ft.ensure_adapter(choice, adapter_dir=run.adapter_dir) == run.adapter_dir
    assert {p.name: p.stat().st_mtime_ns for p in run.adapter_dir.iterdir()} == stamp
    other = tmp_path / "not-an-adapter"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TutorialError, match="adapter_config.json"):
        ft.ensure_adapter(choice, adapter_dir=other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    foreign = dataclasses.replace(choice, path=str(tmp_path / "another-base"))
    with pytest.raises(TutorialError, match="another-base"):
        ft.ensure_adapter(foreign, adapter_dir=run.adapter_dir)


def test_settings_live_in_one_place(choice):
    assert ft.settings_for(device="cuda") is ft.SETTINGS["colab_t4"]
    assert ft.settings_for(device="cpu") is ft.SETTINGS["cpu_tiny"]
    # The tiny model keeps the settings tuned for it on a GPU too (fp32, no quantization).
    assert ft.settings_for(choice, device="cuda") is ft.settings_for(choice, device="cpu") is ft.SETTINGS["cpu_tiny"]
    assert ft.SETTINGS["cpu_tiny"].quantization is None
    t4 = ft.SETTINGS["colab_t4"]
    assert t4.quantization in ("4bit", "8bit") and t4.gradient_checkpointing and t4.merge_dtype == "float16"
    for s in ft.SETTINGS.values():
        assert {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} <= set(s.target_modules), "MLP included"
        args = ft.training_arguments(s, "/tmp/unused", progress=False)
        assert args.train_sampling_strategy == "group_by_length" and args.eval_strategy == "steps"
        assert args.gradient_accumulation_steps == s.gradient_accumulation_steps > 1


# --------------------------------------------------------------------------- acceptance


def test_lora_turns_the_tiny_models_answers_chinese(choice, tok):
    """Lesson 05's acceptance: with the CPU settings, dev loss falls and the Chinese share of the
    answers to the 72 dev questions goes from under 20% to over 60% (lesson 06's metric)."""
    settings = ft.settings_for(choice)
    adapter_dir = ft.ensure_adapter(choice)
    assert adapter_dir == output_dir() / "lora-adapter"
    info = ft.read_training_info(adapter_dir)
    assert info["dev_loss_last"] < info["dev_loss_first"] - 1.0, info

    questions = [c[0]["content"] for c in ft.validate_sft_file(DATA_DIR / "dev_sft.csv", tok).conversations]
    assert len(questions) == 72
    kwargs = dict(fmt=choice.chat_format, generation=settings.generation, batch_size=settings.generation_batch_size,
                  seed=settings.seed)
    with ft.torch_threads(settings.torch_threads):
        base = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32)
        before = ft.answer_questions(base, tok, questions, **kwargs)
        model, tokenizer = ft.load_with_adapter(choice, adapter_dir)
        after = ft.answer_questions(model, tokenizer, questions, **kwargs)
    share_before, share_after = ft.mean_chinese_share(before), ft.mean_chinese_share(after)
    assert share_before < 0.2, f"the base tiny model answers in English-like text ({share_before:.0%})"
    assert share_after > 0.6, f"after LoRA the answers are Chinese ({share_before:.0%} -> {share_after:.0%})"
    assert sum((chinese_share(a) or 0) > 0.5 for a in after) > len(after) / 2


def test_mean_chinese_share_counts_wordless_answers_as_zero():
    assert ft.mean_chinese_share(["你好世界", "1000000"]) == 0.5
    assert ft.mean_chinese_share([]) == 0.0

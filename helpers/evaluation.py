"""Chinese evaluation: how much of an answer is Chinese, and how good it is.

Introduced in notebooks/06_evaluation.ipynb (:func:`chinese_share` is also used by the tiny
model's tests and by lesson 05 to show the shift LoRA makes).

The lesson shows each metric's formula and one worked example inline; this module holds the
plumbing around them:

* the question set: :func:`load_questions` reads ``data/eval_questions.json`` or a learner's file
  in the common public layout (a JSON list of ``qid``, ``question``, ``first_level_class``,
  ``second_level_class``);
* batched, resumable generation: :func:`generate_answers` appends each batch of answers to a JSONL
  file and skips the questions a file already answers;
* metrics: :func:`chinese_share` / :func:`answer_language` (Chinese-answer rate), :func:`rouge_l`
  (jieba words), :func:`bleu` (sacrebleu's ``zh`` tokenizer), :func:`answer_perplexity`;
* reports: :func:`score_answers`, :func:`summarize`, :func:`compare_runs`,
  :func:`plot_comparison`, :func:`export_report`;
* :func:`score_published_answers`: the same language metrics for (question, answer) pairs that
  any model produced (JSON, JSONL or CSV).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

from helpers.config import DATA_DIR, TutorialError, bilingual

# --------------------------------------------------------------------------- language metric

# Han ideographs: CJK Unified Ideographs, Extensions A-F and compatibility ideographs.
HAN_RE = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)?")
CODE_BLOCK_RE = re.compile(r"```.*?(?:```|$)", re.S)
INLINE_CODE_RE = re.compile(r"`[^`\n]*`")

CHINESE_THRESHOLD = 0.8
ENGLISH_THRESHOLD = 0.2

# Language labels of one answer (see :func:`language_label`).
LANG_CHINESE, LANG_MIXED, LANG_ENGLISH, LANG_NONE = "zh", "mixed", "en", "none"

# Questions whose expected answer is English: excluded from the Chinese-answer rate.
TASK_TRANSLATE_TO_EN = "translate_to_en"
KNOWN_TASKS = (None, TASK_TRANSLATE_TO_EN)
TRANSLATE_TO_EN_RE = re.compile(
    r"(翻译|译)(成|为|到)?(英文|英语)|用英(文|语)(回答|写|说|表达|作答)|(英文|英语)怎么说|"
    r"translate\b.*\b(into|to)\s+english|\b(answer|reply|respond)\b.*\bin\s+english",
    re.I | re.S,
)


def strip_code(text: str) -> str:
    """Remove fenced code blocks (closed or not) and inline code."""
    return INLINE_CODE_RE.sub(" ", CODE_BLOCK_RE.sub(" ", text))


def chinese_share(text: str) -> float | None:
    """Han characters / (Han characters + Latin words), after removing code.

    Returns ``None`` when the answer has neither (empty, only digits, emoji or punctuation).
    """
    clean = strip_code(text or "")
    han = len(HAN_RE.findall(clean))
    latin = len(LATIN_WORD_RE.findall(clean))
    if han + latin == 0:
        return None
    return han / (han + latin)


def language_label(share: float | None) -> str:
    """``"zh"`` at 0.8 or more, ``"mixed"`` from 0.2 up to 0.8, ``"en"`` below 0.2, ``"none"`` for no words."""
    if share is None:
        return LANG_NONE
    if share >= CHINESE_THRESHOLD:
        return LANG_CHINESE
    if share >= ENGLISH_THRESHOLD:
        return LANG_MIXED
    return LANG_ENGLISH


_FIRST_WORD_RE = re.compile(f"{HAN_RE.pattern}|{LATIN_WORD_RE.pattern}")


def starts_in_chinese(text: str) -> bool:
    """Whether the first word of the answer (outside code) is Chinese rather than Latin."""
    first = _FIRST_WORD_RE.search(strip_code(text or ""))
    return bool(first) and bool(HAN_RE.match(first.group()))


def answer_language(text: str) -> dict:
    """The language facts of one answer: ``share``, ``label`` and ``starts_zh`` (notebooks/06_evaluation.ipynb)."""
    share = chinese_share(text)
    return {"share": share, "label": language_label(share), "starts_zh": starts_in_chinese(text)}


def is_translate_to_en(question: str) -> bool:
    """Whether a question asks for an English answer (a translation into English, "answer in English")."""
    return bool(TRANSLATE_TO_EN_RE.search(question or ""))


# --------------------------------------------------------------------------- question set

DEFAULT_QUESTIONS = DATA_DIR / "eval_questions.json"
REQUIRED_FIELDS = ("qid", "question", "first_level_class", "second_level_class")


class EvalDataError(TutorialError, ValueError):
    """A question or answer file that cannot be used; the message names the file, the item and the fix."""


def _read_json_or_jsonl(path: Path, what_zh: str, what_en: str) -> list:
    if not path.is_file():
        raise EvalDataError(
            bilingual(f"找不到{what_zh}文件 {path}。请检查路径。", f"The {what_en} file {path} does not exist. Check the path.")
        )
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvalDataError(
                    bilingual(
                        f"{path} 第 {n} 行不是合法的 JSON（{err.msg}，第 {err.colno} 列）。每行应是一个 JSON 对象。",
                        f"{path} line {n} is not valid JSON ({err.msg}, column {err.colno}). Each line must be one JSON object.",
                    )
                ) from None
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalDataError(
            bilingual(
                f"{path} 不是合法的 JSON：第 {err.lineno} 行第 {err.colno} 列 {err.msg}。"
                "常见原因：多余的逗号、单引号、缺少右括号。",
                f"{path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}. "
                "Common causes: a trailing comma, single quotes, a missing bracket.",
            )
        ) from None
    return data


def load_questions(path: str | Path | None = None) -> list[dict]:
    """The evaluation questions, checked (notebooks/06_evaluation.ipynb).

    ``path`` defaults to the course's ``data/eval_questions.json``. A learner's file works too: a
    JSON list (or JSONL) of objects with ``qid``, ``question``, ``first_level_class`` and
    ``second_level_class``; ``reference`` (a reference answer) and ``task`` are optional. When
    ``task`` is absent, questions that ask for an English answer ("翻译成英文") get
    ``task="translate_to_en"`` so the Chinese-answer rate leaves them out.

    Returns a list of dicts with all six keys. Raises :class:`EvalDataError` naming the file, the
    item and what to fix for anything malformed.
    """
    path = Path(path) if path is not None else DEFAULT_QUESTIONS
    data = _read_json_or_jsonl(path, "问题", "question")
    if isinstance(data, dict):
        raise EvalDataError(
            bilingual(
                f"{path} 的最外层是一个对象，应当是列表：[{{\"qid\": 1, \"question\": ...}}, ...]。"
                f"对象里的键：{', '.join(map(str, list(data)[:8]))}。",
                f"The top level of {path} is an object; it must be a list: [{{\"qid\": 1, \"question\": ...}}, ...]. "
                f"Keys found: {', '.join(map(str, list(data)[:8]))}.",
            )
        )
    if not isinstance(data, list) or not data:
        raise EvalDataError(
            bilingual(f"{path} 里没有任何问题（应为非空列表）。", f"{path} holds no questions (expected a non-empty list).")
        )
    questions, seen = [], {}
    for n, item in enumerate(data, 1):
        where_zh, where_en = f"{path} 第 {n} 个问题", f"{path}, item {n}"
        if not isinstance(item, dict):
            raise EvalDataError(
                bilingual(f"{where_zh}不是 JSON 对象，而是 {type(item).__name__}。", f"{where_en} is a {type(item).__name__}, not an object.")
            )
        missing = [k for k in REQUIRED_FIELDS if k not in item]
        if missing:
            raise EvalDataError(
                bilingual(
                    f"{where_zh}缺少字段 {', '.join(missing)}。每个问题需要 {', '.join(REQUIRED_FIELDS)}。",
                    f"{where_en} lacks {', '.join(missing)}. Every question needs {', '.join(REQUIRED_FIELDS)}.",
                )
            )
        qid = item["qid"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
            raise EvalDataError(
                bilingual(f"{where_zh}的 qid {qid!r} 无效：应为整数或非空字符串。", f"{where_en}: qid {qid!r} must be an integer or a non-empty string.")
            )
        if qid in seen:
            raise EvalDataError(
                bilingual(
                    f"{where_zh}的 qid {qid!r} 与第 {seen[qid]} 个问题重复。qid 用来续跑，必须唯一。",
                    f"{where_en}: qid {qid!r} repeats item {seen[qid]}. qids must be unique (resuming relies on them).",
                )
            )
        seen[qid] = n
        for key in ("question", "first_level_class", "second_level_class"):
            if not isinstance(item[key], str) or not item[key].strip():
                raise EvalDataError(
                    bilingual(f"{where_zh}（qid {qid!r}）的 {key} 为空或不是字符串。", f"{where_en} (qid {qid!r}): {key} is empty or not a string.")
                )
        reference = item.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise EvalDataError(
                bilingual(f"{where_zh}（qid {qid!r}）的 reference 应为字符串或 null。", f"{where_en} (qid {qid!r}): reference must be a string or null.")
            )
        task = item.get("task") if "task" in item else (TASK_TRANSLATE_TO_EN if is_translate_to_en(item["question"]) else None)
        if task not in KNOWN_TASKS:
            raise EvalDataError(
                bilingual(
                    f"{where_zh}（qid {qid!r}）的 task {task!r} 未知，可选：null 或 {TASK_TRANSLATE_TO_EN!r}。",
                    f"{where_en} (qid {qid!r}): unknown task {task!r}; use null or {TASK_TRANSLATE_TO_EN!r}.",
                )
            )
        questions.append(
            {
                "qid": qid,
                "question": item["question"].strip(),
                "first_level_class": item["first_level_class"].strip(),
                "second_level_class": item["second_level_class"].strip(),
                "reference": reference.strip() if isinstance(reference, str) and reference.strip() else None,
                "task": task,
            }
        )
    return questions


# --------------------------------------------------------------------------- generation

SETTINGS_REQUIRED = ("model", "chat_format", "system_prompt", "max_new_tokens", "do_sample")
# Settings that describe the run but are not arguments of ``model.generate``.
SETTINGS_NOT_FOR_GENERATE = ("model", "adapter", "quantization", "chat_format", "system_prompt")


def run_id(settings: dict) -> str:
    """A short stable id of a generation run's settings (10 hex digits), used in answer file names."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:10]


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """A short hash of a LoRA adapter's files, so answers from a retrained adapter get a new file."""
    adapter_dir = Path(adapter_dir)
    digest = hashlib.sha1()
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.name.startswith("adapter_"))
    if not files:
        raise EvalDataError(
            bilingual(
                f"{adapter_dir} 里没有 adapter_config.json / adapter_model.safetensors，它不是 LoRA 适配器目录。",
                f"{adapter_dir} holds no adapter_config.json / adapter_model.safetensors: not a LoRA adapter folder.",
            )
        )
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def use_left_padding(tokenizer):
    """Prepare a tokenizer for batched generation: pad on the left, pad with ``<unk>`` (never EOS)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _check_batching(tokenizer) -> None:
    if tokenizer.padding_side != "left":
        raise TutorialError(
            bilingual(
                "批量生成必须在左侧填充（tokenizer.padding_side = \"left\"）：右侧填充会让填充符夹在问题和回答之间，"
                "模型会接着填充符续写。先运行 use_left_padding(tokenizer)。",
                "Batched generation needs left padding (tokenizer.padding_side = \"left\"): with right padding the "
                "pad tokens sit between prompt and answer. Call use_left_padding(tokenizer) first.",
            )
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise TutorialError(
            bilingual(
                "分词器没有填充符，或者填充符就是结束符 </s>。请用 <unk> 作填充符：tokenizer.pad_token = tokenizer.unk_token。",
                "The tokenizer has no pad token, or pads with EOS. Pad with <unk>: tokenizer.pad_token = tokenizer.unk_token.",
            )
        )


def question_messages(question: str, system_prompt: str | None) -> list[dict]:
    """The conversation one evaluation question becomes: [system prompt,] user question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def generate_batch(model, tokenizer, prompts: list[list[int]], **generate_kwargs) -> list[dict]:
    """Generate from several token-id prompts at once (left padded); one dict per prompt.

    Each dict has ``answer`` (decoded, special tokens skipped, stripped), ``new_tokens`` (tokens
    before EOS) and ``finished`` (whether the model stopped with EOS rather than the length limit).
    """
    import torch

    _check_batching(tokenizer)
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(model.device)
    if not generate_kwargs.get("do_sample", False):
        # Llama-2's generation_config samples (temperature 0.6, top_p 0.9); greedy ignores both.
        generate_kwargs = {"temperature": None, "top_p": None, "top_k": None, **generate_kwargs}
    with torch.no_grad():
        out = model.generate(
            **batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    results = []
    for row in new:
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        results.append({"answer": text, "new_tokens": end, "finished": end < len(row)})
    return results


def read_answers(path: str | Path) -> list[dict]:
    """The records of an answers JSONL file ([] when it does not exist yet).

    A last line cut off by an interrupted run (no final newline, not valid JSON) is ignored with a
    warning, so the run can resume; any other broken line raises :class:`EvalDataError`.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the last line has no newline: a write that was interrupted
                warnings.warn(f"{path}: ignoring an incomplete last line (an interrupted run); it will be redone.")
                continue
            raise EvalDataError(
                bilingual(
                    f"回答文件 {path} 第 {n} 行不是合法的 JSON。这个文件不会被覆盖：请修好这一行，或换一个文件名重新生成。",
                    f"Answers file {path} line {n} is not valid JSON. The file is never overwritten: fix that line "
                    "or generate into another file.",
                )
            ) from None
        if not isinstance(rec, dict) or "qid" not in rec or "answer" not in rec:
            raise EvalDataError(
                bilingual(
                    f"回答文件 {path} 第 {n} 行缺少 qid 或 answer。",
                    f"Answers file {path} line {n} lacks qid or answer.",
                )
            )
        records.append(rec)
    return records


def _check_settings(settings: dict) -> None:
    missing = [k for k in SETTINGS_REQUIRED if k not in settings]
    if missing:
        raise TutorialError(
            bilingual(f"生成设置缺少 {', '.join(missing)}。", f"Generation settings lack {', '.join(missing)}.")
        )


def generate_answers(model, tokenizer, questions: list[dict], answers_path: str | Path, settings: dict, *,
                     batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Answer ``questions`` in batches, appending each batch to ``answers_path`` (JSONL); resumable.

    Introduced in notebooks/06_evaluation.ipynb. ``settings`` names the run: ``model``,
    ``chat_format``, ``system_prompt``, ``max_new_tokens``, ``do_sample`` (``adapter``,
    ``quantization`` and other ``model.generate`` arguments such as ``temperature`` are optional); every prompt is built with
    :func:`helpers.prompts.encode_prompt`. Questions already answered in the file *by the same
    settings* are skipped, so a rerun after an interruption only generates the rest. The file is
    only ever appended to: answers made with other settings raise :class:`EvalDataError` instead
    of being overwritten (use :func:`run_id` in the file name to keep runs apart).

    Returns one record per question, in question order: ``qid``, ``question``, ``answer``,
    ``new_tokens``, ``finished``, ``run``.
    """
    from tqdm.auto import tqdm

    from helpers.prompts import encode_prompt

    _check_settings(settings)
    _check_batching(tokenizer)
    if batch_size < 1:
        raise TutorialError(bilingual("batch_size 至少为 1。", "batch_size must be at least 1."))
    answers_path = Path(answers_path)
    rid = run_id(settings)
    existing = read_answers(answers_path)
    other = sorted({str(r.get("run")) for r in existing if r.get("run") != rid})
    if other:
        raise EvalDataError(
            bilingual(
                f"{answers_path} 里已有用另一组设置（run {', '.join(other)}）生成的回答，而现在的设置是 run {rid}。"
                "为了不覆盖你已有的回答，本函数不会改写它：请换一个文件名（例如在文件名里加上 run_id(settings)）。",
                f"{answers_path} already holds answers from other settings (run {', '.join(other)}); these settings are "
                f"run {rid}. Your answers are never overwritten: write to another file (e.g. put run_id(settings) in its name).",
            )
        )
    done = {r["qid"]: r for r in existing}  # a later line for the same qid wins
    # A question whose text changed since it was answered (same qid, edited file) is asked again.
    todo = [q for q in questions if q["qid"] not in done or done[q["qid"]].get("question") != q["question"]]
    gen_kwargs = {k: v for k, v in settings.items() if k not in SETTINGS_NOT_FOR_GENERATE}
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = answers_path.exists() and answers_path.stat().st_size > 0 and not answers_path.read_bytes().endswith(b"\n")
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"run {rid}", unit="题", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prompts = [
                encode_prompt(tokenizer, question_messages(q["question"], settings["system_prompt"]), settings["chat_format"])
                for q in chunk
            ]
            results = generate_batch(model, tokenizer, prompts, **gen_kwargs)
            lines = []
            for q, res in zip(chunk, results):
                rec = {"qid": q["qid"], "question": q["question"], **res, "run": rid, "settings": settings}
                done[q["qid"]] = rec
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            with open(answers_path, "a", encoding="utf-8") as fh:
                if needs_newline:
                    fh.write("\n")
                    needs_newline = False
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
            bar.update(len(chunk))
    finally:
        bar.close()
    return [done[q["qid"]] for q in questions]


# --------------------------------------------------------------------------- quality metrics

_WORD_CHAR_RE = re.compile(r"\w")
_SENTENCE_END_RE = re.compile(r"[。！？?…]")
_jieba = None


def _jieba_module():
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def segment(text: str) -> list[str]:
    """jieba words of ``text``, lower-cased, without whitespace or punctuation-only tokens."""
    words = []
    for tok in _jieba_module().lcut(text or ""):
        tok = _SENTENCE_END_RE.sub("", tok).strip().lower()
        if tok and _WORD_CHAR_RE.search(tok):
            words.append(tok)
    return words


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 between two texts on jieba words (rouge-chinese's ``Rouge``); 0.0 when either is empty."""
    from rouge_chinese import Rouge

    hyp, ref = segment(hypothesis), segment(reference)
    if not hyp or not ref:
        return 0.0
    return float(Rouge(metrics=["rouge-l"]).get_scores(" ".join(hyp), " ".join(ref))[0]["rouge-l"]["f"])


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's ``zh`` tokenizer; NaN for no pairs, 0.0 for empty answers."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    hyps = [h or "" for h in hypotheses]
    refs = [r or "" for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """BLEU (0-100) of one answer against one reference, ``zh`` tokenizer, sacrebleu's default smoothing."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis or "", [reference or ""], tokenize="zh").score)


def load_dev_conversations(path: str | Path | None = None) -> list[list[dict]]:
    """The conversations of the article's dev CSV (``data/dev_sft.csv`` by default), parsed by helpers.prompts."""
    import pandas as pd

    from helpers.prompts import csv_text_to_messages

    path = Path(path) if path is not None else DATA_DIR / "dev_sft.csv"
    frame = pd.read_csv(path)
    if "text" not in frame.columns:
        raise EvalDataError(
            bilingual(f"{path} 没有 text 列。", f"{path} has no 'text' column.")
        )
    return [csv_text_to_messages(text, row=i + 2) for i, text in enumerate(frame["text"])]


def answer_perplexity(model, tokenizer, conversations: list[list[dict]], *, chat_format: str = "llama2",
                      system_prompt: str | None = None, batch_size: int = 8) -> dict:
    """Perplexity of the assistant answers only: exp(mean negative log-likelihood over answer tokens).

    Introduced in notebooks/06_evaluation.ipynb. Each conversation is tokenized once with
    :func:`helpers.prompts.encode`; its labels (-100 on the prompt) choose the tokens that count.
    Returns ``perplexity``, ``nll`` (mean, nats), ``tokens`` and ``conversations``; the
    perplexity is NaN when no answer token is left (e.g. no conversations).
    """
    import torch
    import torch.nn.functional as F

    from helpers.prompts import IGNORE_INDEX, encode

    encoded = []
    for conv in conversations:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            m for m in conv if m["role"] != "system"
        ]
        encoded.append(encode(tokenizer, messages, chat_format, add_generation_prompt=False))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):  # right padding: positions stay 0..n-1 for every row
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        # Token t is predicted from the logits at t-1.
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
        total_nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    nll = total_nll / total_tokens if total_tokens else float("nan")
    return {
        "perplexity": math.exp(nll) if total_tokens else float("nan"),
        "nll": nll,
        "tokens": total_tokens,
        "conversations": len(encoded),
    }


# --------------------------------------------------------------------------- scoring and reports

# Column names of the per-category summary (what the learner reads in the tables).
COL_COUNT = "题数"
COL_ZH = "中文回答率"
COL_MIXED = "中英混合率"
COL_EN = "英文回答率"
COL_NONE = "无文字率"
COL_STARTS = "以中文开头率"
COL_ROUGE = "ROUGE-L"
COL_BLEU = "BLEU"
SUMMARY_COLUMNS = (COL_COUNT, COL_ZH, COL_MIXED, COL_EN, COL_NONE, COL_STARTS, COL_ROUGE, COL_BLEU)
OVERALL = "全部"
UNCATEGORIZED = "未分类"

# English names of the seven categories, for charts on machines without a Chinese font.
CATEGORY_EN = {
    "通用知识": "General knowledge",
    "语言理解": "Language understanding",
    "文本生成": "Creative writing",
    "逻辑推理": "Logical reasoning",
    "代码编程": "Coding",
    "工作技能": "Work skills",
    "个性化": "Personality",
    OVERALL: "Overall",
    UNCATEGORIZED: "Uncategorized",
}
METRIC_EN = {COL_ZH: "Chinese-answer rate", COL_STARTS: "Starts in Chinese", COL_ROUGE: "ROUGE-L", COL_BLEU: "BLEU",
             COL_MIXED: "Mixed rate", COL_EN: "English rate", COL_NONE: "No-text rate"}


def score_answers(records: list[dict], questions: list[dict]):
    """One row per question: its category, the answer and every per-answer metric (a DataFrame).

    Introduced in notebooks/06_evaluation.ipynb. Columns: ``qid``, ``first_level_class``,
    ``second_level_class``, ``task``, ``question``, ``answer``, ``reference``, ``chinese_share``
    (None when the answer has no words), ``language`` (zh / mixed / en / none), ``starts_zh``,
    ``in_language_rate`` (False for translate-to-English questions), ``rouge_l`` and ``bleu``
    (NaN without a reference). Questions with no record get an empty answer.
    """
    import pandas as pd

    by_qid = {r["qid"]: r for r in records}
    rows = []
    for q in questions:
        answer = (by_qid.get(q["qid"]) or {}).get("answer") or ""
        lang = answer_language(answer)
        ref = q.get("reference")
        rows.append(
            {
                "qid": q["qid"],
                "first_level_class": q.get("first_level_class") or UNCATEGORIZED,
                "second_level_class": q.get("second_level_class") or UNCATEGORIZED,
                "task": q.get("task"),
                "question": q["question"],
                "answer": answer,
                "reference": ref,
                "chinese_share": lang["share"],
                "language": lang["label"],
                "starts_zh": lang["starts_zh"],
                "in_language_rate": q.get("task") != TASK_TRANSLATE_TO_EN,
                "rouge_l": rouge_l(answer, ref) if ref else float("nan"),
                "bleu": sentence_bleu(answer, ref) if ref else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _summary_row(group) -> dict:
    counted = group[group["in_language_rate"]]
    n = len(counted)

    def rate(mask) -> float:
        return float(mask.sum()) / n if n else float("nan")

    with_ref = group[group["reference"].notna()]
    return {
        COL_COUNT: len(group),
        COL_ZH: rate(counted["language"] == LANG_CHINESE),
        COL_MIXED: rate(counted["language"] == LANG_MIXED),
        COL_EN: rate(counted["language"] == LANG_ENGLISH),
        COL_NONE: rate(counted["language"] == LANG_NONE),
        COL_STARTS: rate(counted["starts_zh"].astype(bool)),
        COL_ROUGE: float(with_ref["rouge_l"].mean()) if len(with_ref) else float("nan"),
        COL_BLEU: bleu(list(with_ref["answer"]), list(with_ref["reference"])) if len(with_ref) else float("nan"),
    }


def summarize(scored):
    """Per-category metrics of :func:`score_answers` output, plus an overall row ``全部``.

    The language rates count only questions in the Chinese-answer rate (translations into
    English are left out); ROUGE-L is the mean over answered questions with a reference, BLEU is
    the corpus BLEU of those answers. Categories keep the order they first appear in.
    """
    import pandas as pd

    order = list(dict.fromkeys(scored["first_level_class"]))
    rows = {cat: _summary_row(scored[scored["first_level_class"] == cat]) for cat in order}
    rows[OVERALL] = _summary_row(scored)
    table = pd.DataFrame.from_dict(rows, orient="index")[list(SUMMARY_COLUMNS)]
    table.index.name = "类别"
    return table


def compare_runs(summaries: dict):
    """Side-by-side table of several :func:`summarize` results: columns (metric, run label)."""
    import pandas as pd

    table = pd.concat(summaries, axis=1)  # columns: (label, metric)
    table = table.swaplevel(0, 1, axis=1)
    metric_order = {m: i for i, m in enumerate(SUMMARY_COLUMNS)}
    labels = list(summaries)
    table = table[sorted(table.columns, key=lambda c: (metric_order.get(c[0], 99), labels.index(c[1])))]
    table.columns.names = ["指标", "模型"]
    return table


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei", "Microsoft YaHei", "PingFang SC",
             "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Heiti SC", "Arial Unicode MS", "Noto Serif CJK SC")


def cjk_font() -> str | None:
    """The name of an installed font that draws Chinese, or None (charts then use English labels)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def plot_comparison(comparison, metrics: tuple = (COL_ZH, COL_ROUGE)):
    """Grouped bar chart, one panel per metric, categories on the x axis, one bar per run.

    Uses a Chinese font when one is installed; otherwise labels fall back to English, so no
    character is drawn as an empty box (Colab has no Chinese font by default).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.text import Text

    font = cjk_font()

    def label(text: str, mapping: dict) -> str:
        if font:
            return text
        text = mapping.get(text, text)
        return HAN_RE.sub("", text).strip(" +-_/") or text  # a run label such as "基座 base" -> "base"

    runs = list(dict.fromkeys(c[1] for c in comparison.columns))
    cats = list(comparison.index)
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(runs))
    rates = (COL_ZH, COL_MIXED, COL_EN, COL_NONE, COL_STARTS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7, 1.2 * len(cats)), 3.2 * len(metrics)), squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            fmt = "{:.0%}" if metric in rates else ("{:.1f}" if metric == COL_BLEU else "{:.2f}")
            for i, run in enumerate(runs):
                values = comparison[(metric, run)].astype(float).to_numpy()
                bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, np.nan_to_num(values), width, label=label(run, {}))
                for bar, v in zip(bars, values):
                    if not np.isnan(v):
                        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                    ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, [label(c, CATEGORY_EN) for c in cats], rotation=20, ha="right")
            ax.set_ylabel(label(metric, METRIC_EN))
            top = float(np.nanmax(comparison[metric].astype(float).to_numpy(), initial=0))
            ax.set_ylim(0, max(1.0, top) * 1.15)
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        if font:
            # Fix the family on every text now: rcParams are read again when the figure is drawn.
            for text in fig.findobj(Text):
                text.set_fontfamily([font, "DejaVu Sans"])
        fig.tight_layout()
    return fig


def figure_png_base64(fig) -> str:
    """A matplotlib figure as a base64 PNG string (for a self-contained HTML report)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


def _flat_columns(table):
    flat = table.copy()
    if getattr(flat.columns, "nlevels", 1) > 1:
        flat.columns = [" | ".join(map(str, c)) for c in flat.columns]
    return flat


def export_report(comparison, scored: dict, *, figure=None, conclusion: str = "", extra_tables: dict | None = None,
                  out_dir: str | Path | None = None, stem: str = "eval-report") -> dict:
    """Write the evaluation as CSV, JSON and one self-contained HTML file; return their paths.

    Introduced in notebooks/06_evaluation.ipynb. ``comparison`` is :func:`compare_runs` output,
    ``scored`` maps run labels to :func:`score_answers` frames, ``figure`` (optional) is inlined
    in the HTML as a base64 PNG, ``extra_tables`` (title -> DataFrame) are added to JSON and HTML.
    Files go to ``out_dir`` (default ``output_dir()/"eval"``): ``<stem>.csv``, ``<stem>.json``,
    ``<stem>.html``; a report of the same name is replaced (it is derived from the answers files,
    which are never touched here).
    """
    import datetime

    from helpers.config import output_dir

    out = Path(out_dir) if out_dir is not None else output_dir() / "eval"
    out.mkdir(parents=True, exist_ok=True)
    extra_tables = extra_tables or {}
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "html": out / f"{stem}.html"}

    flat = _flat_columns(comparison)
    flat.to_csv(paths["csv"], encoding="utf-8-sig", quoting=csv.QUOTE_MINIMAL)

    summary = {
        run: {
            cat: {metric: _jsonable(comparison.loc[cat, (metric, run)]) for metric in dict.fromkeys(c[0] for c in comparison.columns)}
            for cat in comparison.index
        }
        for run in dict.fromkeys(c[1] for c in comparison.columns)
    }
    answers = {
        run: [{k: _jsonable(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        for run, frame in scored.items()
    }
    payload = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "conclusion": conclusion,
        "summary": summary,
        "tables": {
            title: {str(k): {str(c): _jsonable(v) for c, v in row.items()} for k, row in _flat_columns(t).to_dict(orient="index").items()}
            for title, t in extra_tables.items()
        },
        "answers": answers,
    }
    paths["json"].write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")

    def fmt(v):
        return "" if isinstance(v, float) and math.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else v)

    parts = [
        "<!DOCTYPE html><html lang='zh-CN'><head><meta charset='utf-8'>",
        "<title>中文评测报告 / Chinese evaluation report</title>",
        "<style>body{font-family:'Noto Sans CJK SC','PingFang SC','Microsoft YaHei',sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right;vertical-align:top}td.text{text-align:left;white-space:pre-wrap;max-width:420px}"
        "img{max-width:100%}</style></head><body>",
        "<h1>中文评测报告 / Chinese evaluation report</h1>",
        f"<p>{html.escape(payload['created'])}</p>",
    ]
    if conclusion:
        parts.append(f"<h2>结论 / Conclusion</h2><p>{html.escape(conclusion).replace(chr(10), '<br>')}</p>")
    if figure is not None:
        parts.append(f"<img alt='chart' src='data:image/png;base64,{figure_png_base64(figure)}'>")
    parts.append("<h2>按类别 / By category</h2>")
    parts.append(comparison.to_html(float_format=lambda v: f"{v:.3f}", na_rep=""))
    for title, table in extra_tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(table.to_html(float_format=lambda v: f"{v:.3f}", na_rep=""))
    for run, frame in scored.items():
        parts.append(f"<h2>回答 / Answers: {html.escape(str(run))}</h2><table><tr>")
        cols = ["qid", "first_level_class", "question", "answer", "chinese_share", "language", "rouge_l"]
        parts.append("".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        for row in frame[cols].itertuples(index=False):
            cells = []
            for c, v in zip(cols, row):
                cls = " class='text'" if c in ("question", "answer", "first_level_class") else ""
                cells.append(f"<td{cls}>{html.escape(str(fmt(v) if v is not None else ''))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    paths["html"].write_text("\n".join(parts), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- published answers

QUESTION_ALIASES = ("question", "prompt", "instruction", "query", "input", "问题")
ANSWER_ALIASES = ("answer", "response", "output", "completion", "回答", "答案")


def read_published_answers(path: str | Path):
    """(question, answer) pairs from a JSON list, a JSONL file or a CSV file, as a DataFrame.

    Column names are matched case-insensitively; ``prompt``/``instruction`` count as the question
    and ``response``/``output`` as the answer. Optional columns (``qid``, ``first_level_class``,
    ``second_level_class``, ``reference``, ``task``) are kept. Raises :class:`EvalDataError` for
    a file without those two columns.
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if not path.is_file():
            raise EvalDataError(bilingual(f"找不到文件 {path}。", f"File {path} does not exist."))
        frame = pd.read_csv(path, dtype=object, keep_default_na=False)
    elif suffix in (".json", ".jsonl"):
        data = _read_json_or_jsonl(path, "回答", "answers")
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise EvalDataError(
                bilingual(
                    f"{path} 应是对象列表：[{{\"question\": ..., \"answer\": ...}}, ...]。",
                    f"{path} must be a list of objects: [{{\"question\": ..., \"answer\": ...}}, ...].",
                )
            )
        frame = pd.DataFrame(data)
    else:
        raise EvalDataError(
            bilingual(f"不支持的文件类型 {path.suffix!r}：请用 .json、.jsonl 或 .csv。",
                      f"Unsupported file type {path.suffix!r}: use .json, .jsonl or .csv.")
        )
    lower = {str(c).strip().lower(): c for c in frame.columns}
    q_col = next((lower[a] for a in QUESTION_ALIASES if a in lower), None)
    a_col = next((lower[a] for a in ANSWER_ALIASES if a in lower), None)
    if q_col is None or a_col is None or frame.empty:
        raise EvalDataError(
            bilingual(
                f"{path} 需要“问题”和“回答”两列（例如 question 和 answer）。文件里的列：{', '.join(map(str, frame.columns)) or '无'}。",
                f"{path} needs a question and an answer column (e.g. question and answer). "
                f"Columns found: {', '.join(map(str, frame.columns)) or 'none'}.",
            )
        )
    keep = {q_col: "question", a_col: "answer"}
    for name in ("qid", "first_level_class", "second_level_class", "reference", "task"):
        if name in lower and lower[name] not in keep:
            keep[lower[name]] = name
    frame = frame[list(keep)].rename(columns=keep)
    frame["question"] = frame["question"].fillna("").astype(str)
    frame["answer"] = frame["answer"].fillna("").astype(str)
    return frame.reset_index(drop=True)


def score_published_answers(path: str | Path, questions: list[dict] | None = None):
    """The language metrics (and ROUGE-L/BLEU where a reference is known) of any model's answers.

    Introduced in notebooks/06_evaluation.ipynb. ``path`` holds (question, answer) pairs (see
    :func:`read_published_answers`). Each question is matched by its text against ``questions``
    (default: the course's set) to find its category, reference and task; unmatched questions
    keep the file's own columns or go to ``未分类``, and a translation into English is recognised
    from the question text. Returns the same frame as :func:`score_answers`, ready for
    :func:`summarize`.
    """
    frame = read_published_answers(path)
    known = {_norm(q["question"]): q for q in (questions if questions is not None else load_questions())}
    qs, records = [], []
    for i, row in enumerate(frame.to_dict(orient="records")):
        match = known.get(_norm(row["question"]), {})
        qid = f"p{i + 1}"
        task = match.get("task") if match else (row.get("task") or None)
        if not match and task is None and is_translate_to_en(row["question"]):
            task = TASK_TRANSLATE_TO_EN
        reference = match.get("reference") or (row.get("reference") or None)
        qs.append(
            {
                "qid": qid,
                "question": row["question"],
                "first_level_class": match.get("first_level_class") or row.get("first_level_class") or UNCATEGORIZED,
                "second_level_class": match.get("second_level_class") or row.get("second_level_class") or UNCATEGORIZED,
                "reference": reference,
                "task": task,
            }
        )
        records.append({"qid": qid, "answer": row["answer"]})
    scored = score_answers(records, qs)
    scored["source_qid"] = [row.get("qid") for row in frame.to_dict(orient="records")]
    return scored


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", str(text or ""))

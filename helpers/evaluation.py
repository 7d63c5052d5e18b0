"""Chinese evaluation: what notebooks/06_evaluation.ipynb (which writes the metrics out) shares with lesson 07 and
the others: the Chinese-share formula, the checked question file, prompts, resumable batched generation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from helpers._files import reporting_full_disk
from helpers._text import DecodeProblem, bad_character_in, decode, json_loads, quote
from helpers.config import DATA_DIR, TutorialError
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, article_prompt, encode

HAN_RE = re.compile(  # Han ideographs: CJK Unified Ideographs, Extensions A-F and compatibility ideographs
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)?")
CODE_RE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.S)  # fenced blocks (closed or not), inline code
# Questions whose right answer is English; they are left out of the Chinese-answer rate.
TASK_TRANSLATE_TO_EN = "translate_to_en"
TRANSLATE_TO_EN_RE = re.compile(r"(翻译|译)(成|为|到)?(英文|英语)|用英(文|语)(回答|写)|translate\b.*\b(in)?to\s+english", re.I | re.S)


def chinese_share(text: str) -> float | None:
    """Han characters / (Han characters + Latin words) outside code, None without either (lesson 06's formula)."""
    clean = CODE_RE.sub(" ", text or "")
    han, latin = len(HAN_RE.findall(clean)), len(LATIN_WORD_RE.findall(clean))
    return han / (han + latin) if han + latin else None


_ECHO_END = "？?。.!！：:；;，,"  # a question's closing punctuation, which an echo may leave out or change
_ECHO_QUOTES = "\"'“”‘’「」『』《》*#> \t\r\n"  # what may wrap an echoed question: quotes, markdown, space


def echoed_question(answer: str, question: str) -> str:
    """The start of ``answer`` that only repeats ``question`` (lesson 06's echo rule), or "".

    Small chat models often copy the question and go on in English ("造纸术是由谁改进的？\n\nThe word..."):
    counted as it stands, such an answer looks Chinese. The echo is the whole question (whitespace, quotes
    and its closing punctuation aside) at the very start of the answer, with the punctuation and space that
    follow it. A Chinese answer that merely begins like the question ("造纸术是由蔡伦改进的") is no echo."""
    want = [c for c in (question or "").rstrip().rstrip(_ECHO_END) if not c.isspace()]
    text, i = answer or "", 0
    while i < len(text) and text[i] in _ECHO_QUOTES:
        i += 1
    for c in want:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] != c:
            return ""
        i += 1
    if not want:
        return ""
    while i < len(text) and (text[i] in _ECHO_END or text[i] in _ECHO_QUOTES):
        i += 1
    return text[:i]


def without_echo(answer: str, question: str) -> str:
    """``answer`` without the question it repeats at its start (see :func:`echoed_question`)."""
    return (answer or "")[len(echoed_question(answer, question)):]


# The article's categories (AtomBulb's first-level classes), in the article's order.
CATEGORIES = ("通用知识", "语言理解", "创作能力", "逻辑推理", "代码编程", "工作技能", "使用工具", "人格特征")
REQUIRED_FIELDS = ("qid", "question", "first_level_class", "second_level_class")


class EvalDataError(TutorialError, ValueError):
    """A question or answers file that cannot be used; the message names the file, the item and the fix."""


def _fail(code: str, zh: str, en: str, **fields):
    raise EvalDataError(code, zh, en, **fields)


def read_text(path: Path, what: tuple[str, str]) -> str:
    """A UTF-8 file's text, or an :class:`EvalDataError` for a missing or non-UTF-8 file (notebooks/06_evaluation.ipynb)."""
    if not path.is_file():
        _fail("eval.file_not_found", f"找不到{what[0]}文件 {path}。请检查路径。", f"The {what[1]} file {path} does not exist. Check the path.")
    try:  # no newline translation: a \r inside an answer stays
        return decode(path.read_bytes(), str(path), allow_gb18030=False)[0]
    except DecodeProblem as err:
        _fail("eval.encoding", err.zh, err.en)


def load_questions(path: str | Path | None = None) -> list[dict]:
    """The checked questions of ``path`` (default data/eval_questions.json; AtomBulb's load unchanged), lesson 06."""
    path = Path(path) if path is not None else DATA_DIR / "eval_questions.json"
    text = read_text(path, ("问题", "question"))
    try:
        data = json_loads(text)
    except json.JSONDecodeError as err:
        _fail("eval.invalid_json", f"{path} 不是合法的 JSON：第 {err.lineno} 行第 {err.colno} 列 {err.msg}。常见原因：多余的逗号、单引号、缺少括号。",
              f"{path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}. "
              "Common causes: a trailing comma, single quotes, a missing bracket.")
    except ValueError:
        _fail("eval.nested_too_deep", f"{path} 的 JSON 嵌套层数太多，不是问题列表。", f"{path} nests JSON too deeply to be a list of questions.")
    if not isinstance(data, list) or not data:
        keys = quote(", ".join(map(str, data))) if isinstance(data, dict) else ""
        _fail("eval.not_a_list", f"{path} 应是非空的问题列表 [{{\"qid\": 1, \"question\": ...}}, ...]，而不是对象或空列表（{keys}）。",
              f"{path} must be a non-empty list [{{\"qid\": 1, \"question\": ...}}, ...], not an object or [] ({keys}).")
    questions, seen = [], {}
    for n, item in enumerate(data, 1):
        item = item if isinstance(item, dict) else {}
        bad = [k for k in REQUIRED_FIELDS if not isinstance(item.get(k), (str, int) if k == "qid" else str)
               or isinstance(item[k], bool) or not str(item[k]).strip()]
        bad += ["reference"] if not isinstance(item.get("reference") or "", str) else []
        bad += ["task"] if item.get("task") not in (None, TASK_TRANSLATE_TO_EN) else []
        if bad:
            _fail("eval.bad_item", f"{path} 第 {n} 题的 {', '.join(bad)} 缺失或无效。每题是一个对象：{', '.join(REQUIRED_FIELDS)} 不能为空；"
                  f"reference 为字符串或 null；task 为 null 或 \"{TASK_TRANSLATE_TO_EN}\"。",
                  f"{path}, item {n}: {', '.join(bad)} missing or invalid. Each item is an object with non-empty "
                  f"{', '.join(REQUIRED_FIELDS)}; reference a string or null; task null or \"{TASK_TRANSLATE_TO_EN}\".")
        bad = bad_character_in(item)
        if bad:
            _fail("eval.control_character", f"{path} 第 {n} 题：{bad[0]}。删掉它再运行。", f"{path}, item {n}: {bad[1]}. Remove it and run again.")
        if item["qid"] in seen:
            qid = quote(repr(item["qid"]))
            _fail("eval.duplicate_qid", f"{path} 第 {n} 题的 qid {qid} 与第 {seen[item['qid']]} 题重复。续跑靠 qid 认题，必须唯一。",
                  f"{path}, item {n}: qid {qid} repeats item {seen[item['qid']]}. qids must be unique (resuming relies on them).")
        seen[item["qid"]] = n
        task = item["task"] if "task" in item else (TASK_TRANSLATE_TO_EN if TRANSLATE_TO_EN_RE.search(item["question"]) else None)
        questions.append({**{k: item[k].strip() if isinstance(item[k], str) else item[k] for k in REQUIRED_FIELDS},
                          "reference": (item.get("reference") or "").strip() or None, "task": task})
    return questions


def question_messages(question: str, system_prompt: str | None) -> list[dict]:
    """The conversation one question becomes: [system prompt,] user question (notebooks/06_evaluation.ipynb)."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]


def _question_ids(tokenizer, question: str, chat_format: str, system_prompt: str | None) -> list[int]:
    """One question's prompt ids for :func:`generate_answers`: for ``"article"``, the article's text as it sent it
    (the tokenizer adds its own BOS, if any); otherwise :func:`helpers.prompts.encode`."""
    if chat_format == "article":
        return tokenizer(article_prompt(question, system_prompt or SYSTEM_PROMPT_ARTICLE), add_special_tokens=True)["input_ids"]
    return encode(tokenizer, question_messages(question, system_prompt), chat_format).input_ids


def run_id(settings: dict) -> str:
    """A short stable id of a run's settings (10 hex digits), used in answers file names."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:10]


def read_answers(path: str | Path, *, drop_cut_line: bool = False) -> list[dict]:
    """The records of an answers JSONL file; a cut last line is skipped with a warning, or removed (lesson 06)."""
    path = Path(path)
    lines, records = path.read_bytes().split(b"\n") if path.exists() else [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if isinstance(rec, dict) and {"qid", "answer"} <= rec.keys():
            records.append(rec)
        elif rec is not None or n < len(lines):
            _fail("eval.bad_answer_record",
                  f"回答文件 {path} 第 {n} 行不是完整的回答记录（含 qid 和 answer 的 JSON）。文件不会被改写：请修好这一行，或写到另一个文件。",
                  f"Answers file {path} line {n} is not a complete answer record (JSON with qid and answer). "
                  "The file is not rewritten: fix that line or write to another file.")
        else:  # the last line, undecodable or unparsable: a write cut off by a kill or a full disk
            warnings.warn(f"{path}: ignoring an incomplete last line (an interrupted write); that question is asked again.")
            if drop_cut_line:
                with open(path, "r+b") as fh:
                    fh.truncate(sum(len(x) + 1 for x in lines[:-1]))
    return records


def generate_answers(model, tokenizer, questions: list[dict], answers_path: str | Path, settings: dict, *,
                     batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Answer ``questions`` in batches appended to a JSONL file; resumable (notebooks/06_evaluation.ipynb).

    ``settings``: ``chat_format``, ``system_prompt``, ``generate`` (its arguments), optional ``seed``, what names the run.
    """
    import torch
    from tqdm.auto import tqdm

    if tokenizer.padding_side != "left" or tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        raise TutorialError("eval.padding", "批量生成要在左侧用 <unk>（不是 </s>）填充：设置 tokenizer.padding_side = \"left\" 和 pad_token = unk_token。",
                                      "Batched generation pads on the left with <unk> (not </s>): set padding_side = \"left\", pad_token = unk_token.")
    gen = settings["generate"]
    if not gen.get("do_sample"):  # Llama-2's generation_config samples; greedy decoding ignores these
        gen = {"temperature": None, "top_p": None, "top_k": None, **gen}
    path, rid, eos = Path(answers_path), run_id(settings), tokenizer.eos_token_id
    done = {r["qid"]: r for r in read_answers(path, drop_cut_line=True) if r.get("run") == rid}
    todo = [q for q in questions if q["qid"] not in done or done[q["qid"]].get("question") != q["question"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "ab") as fh:  # a complete last record cut just before its newline: end it first
            fh.write(b"\n")
    with tqdm(total=len(questions), initial=len(questions) - len(todo), unit="题", disable=not progress) as bar:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start:start + max(1, batch_size)]
            prompts = [_question_ids(tokenizer, q["question"], settings["chat_format"], settings.get("system_prompt")) for q in chunk]
            batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(model.device)
            if settings.get("seed") is not None:
                torch.manual_seed(settings["seed"])
            with torch.no_grad():
                out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **gen)
            for q, row in zip(chunk, out[:, batch["input_ids"].shape[1]:].tolist()):
                end = row.index(eos) if eos in row else len(row)
                done[q["qid"]] = {"qid": q["qid"], "question": q["question"], "run": rid, "settings": settings,
                                  "answer": tokenizer.decode(row[:end], skip_special_tokens=True).strip(),
                                  "new_tokens": end, "finished": end < len(row)}
            with reporting_full_disk(path.parent, ("回答", "answers")), open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(done[q["qid"]], ensure_ascii=False) + "\n" for q in chunk))
                fh.flush()  # one write per batch, on disk before the next batch
                os.fsync(fh.fileno())
            bar.update(len(chunk))
    return [done[q["qid"]] for q in questions]

"""Chinese evaluation: the plumbing around the metrics notebooks/06_evaluation.ipynb writes out."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import pandas as pd

from helpers.config import DATA_DIR, TutorialError, bilingual
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, article_prompt, encode_prompt

HAN_RE = re.compile(  # Han ideographs: CJK Unified Ideographs, Extensions A-F and compatibility ideographs
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)?")
CODE_RE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.S)  # fenced blocks (closed or not), inline code
CHINESE_THRESHOLD, ENGLISH_THRESHOLD = 0.8, 0.2
# Questions whose right answer is English; they are left out of the Chinese-answer rate.
TASK_TRANSLATE_TO_EN = "translate_to_en"
TRANSLATE_TO_EN_RE = re.compile(r"(翻译|译)(成|为|到)?(英文|英语)|用英(文|语)(回答|写)|translate\b.*\b(in)?to\s+english", re.I | re.S)


def chinese_share(text: str) -> float | None:
    """Han characters / (Han characters + Latin words) outside code, None without either (lesson 06's formula)."""
    clean = CODE_RE.sub(" ", text or "")
    han, latin = len(HAN_RE.findall(clean)), len(LATIN_WORD_RE.findall(clean))
    return han / (han + latin) if han + latin else None


def answer_language(text: str) -> dict:
    """``share``, ``label`` (zh from 0.8, mixed from 0.2, en, none), ``starts_zh`` of an answer (lesson 06)."""
    share = chinese_share(text)
    label = "none" if share is None else "zh" if share >= CHINESE_THRESHOLD else (
        "mixed" if share >= ENGLISH_THRESHOLD else "en")
    first = re.search(f"{HAN_RE.pattern}|{LATIN_WORD_RE.pattern}", CODE_RE.sub(" ", text or ""))
    return {"share": share, "label": label, "starts_zh": bool(first and HAN_RE.match(first.group()))}


# The article's categories (AtomBulb's first-level classes), in the article's order.
CATEGORIES = ("通用知识", "语言理解", "创作能力", "逻辑推理", "代码编程", "工作技能", "使用工具", "人格特征")
REQUIRED_FIELDS = ("qid", "question", "first_level_class", "second_level_class")


class EvalDataError(TutorialError, ValueError):
    """A question or answers file that cannot be used; the message names the file, the item and the fix."""


def _fail(zh: str, en: str):
    raise EvalDataError(bilingual(zh, en))


def _read_text(path: Path, what: tuple[str, str]) -> str:
    if not path.is_file():
        _fail(f"找不到{what[0]}文件 {path}。请检查路径。", f"The {what[1]} file {path} does not exist. Check the path.")
    try:
        return path.read_bytes().decode("utf-8-sig")  # no newline translation: a \r inside an answer stays
    except UnicodeDecodeError as err:
        _fail(f"{path} 不是 UTF-8 编码（第 {err.start} 个字节）。请另存为 UTF-8，或运行 iconv -f gb18030 -t utf-8。",
              f"{path} is not UTF-8 (byte {err.start}). Save it as UTF-8, or run iconv -f gb18030 -t utf-8.")


def load_questions(path: str | Path | None = None) -> list[dict]:
    """The checked questions of ``path`` (default data/eval_questions.json; AtomBulb's load unchanged), lesson 06."""
    path = Path(path) if path is not None else DATA_DIR / "eval_questions.json"
    try:
        data = json.loads(_read_text(path, ("问题", "question")))
    except json.JSONDecodeError as err:
        _fail(f"{path} 不是合法的 JSON：第 {err.lineno} 行第 {err.colno} 列 {err.msg}。常见原因：多余的逗号、单引号、缺少括号。",
              f"{path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}. "
              "Common causes: a trailing comma, single quotes, a missing bracket.")
    if not isinstance(data, list) or not data:
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else ""
        _fail(f"{path} 应是非空的问题列表 [{{\"qid\": 1, \"question\": ...}}, ...]，而不是对象或空列表（{keys}）。",
              f"{path} must be a non-empty list [{{\"qid\": 1, \"question\": ...}}, ...], not an object or [] ({keys}).")
    questions, seen = [], {}
    for n, item in enumerate(data, 1):
        item = item if isinstance(item, dict) else {}
        bad = [k for k in REQUIRED_FIELDS if not isinstance(item.get(k), (str, int) if k == "qid" else str)
               or isinstance(item[k], bool) or not str(item[k]).strip()]
        bad += ["reference"] if not isinstance(item.get("reference") or "", str) else []
        bad += ["task"] if item.get("task") not in (None, TASK_TRANSLATE_TO_EN) else []
        if bad:
            _fail(f"{path} 第 {n} 题的 {', '.join(bad)} 缺失或无效。每题是一个对象：{', '.join(REQUIRED_FIELDS)} 不能为空；"
                  f"reference 为字符串或 null；task 为 null 或 \"{TASK_TRANSLATE_TO_EN}\"。",
                  f"{path}, item {n}: {', '.join(bad)} missing or invalid. Each item is an object with non-empty "
                  f"{', '.join(REQUIRED_FIELDS)}; reference a string or null; task null or \"{TASK_TRANSLATE_TO_EN}\".")
        if item["qid"] in seen:
            _fail(f"{path} 第 {n} 题的 qid {item['qid']!r} 与第 {seen[item['qid']]} 题重复。续跑靠 qid 认题，必须唯一。",
                  f"{path}, item {n}: qid {item['qid']!r} repeats item {seen[item['qid']]}. qids must be unique (resuming relies on them).")
        seen[item["qid"]] = n
        task = item["task"] if "task" in item else (TASK_TRANSLATE_TO_EN if TRANSLATE_TO_EN_RE.search(item["question"]) else None)
        questions.append({**{k: item[k].strip() if isinstance(item[k], str) else item[k] for k in REQUIRED_FIELDS},
                          "reference": (item.get("reference") or "").strip() or None, "task": task})
    return questions


def question_messages(question: str, system_prompt: str | None) -> list[dict]:
    """The conversation one question becomes: [system prompt,] user question (notebooks/06_evaluation.ipynb)."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]


def prompt_ids(tokenizer, question: str, layout: str, system_prompt: str | None) -> list[int]:
    """Token ids of one question's prompt: the article's layout or a chat format (notebooks/06_evaluation.ipynb)."""
    if layout == "article":
        return tokenizer(article_prompt(question, system_prompt or SYSTEM_PROMPT_ARTICLE), add_special_tokens=True)["input_ids"]
    return encode_prompt(tokenizer, question_messages(question, system_prompt), layout)


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
            _fail(f"回答文件 {path} 第 {n} 行不是完整的回答记录（含 qid 和 answer 的 JSON）。文件不会被改写：请修好这一行，或写到另一个文件。",
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

    ``settings``: ``layout``, ``system_prompt``, ``generate`` (its arguments), optional ``seed``, what names the run.
    """
    import torch
    from tqdm.auto import tqdm

    if tokenizer.padding_side != "left" or tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        raise TutorialError(bilingual("批量生成要在左侧用 <unk>（不是 </s>）填充：设置 tokenizer.padding_side = \"left\" 和 pad_token = unk_token。",
                                      "Batched generation pads on the left with <unk> (not </s>): set padding_side = \"left\", pad_token = unk_token."))
    gen = settings["generate"]
    if not gen.get("do_sample"):  # Llama-2's generation_config samples; greedy decoding ignores these
        gen = {"temperature": None, "top_p": None, "top_k": None, **gen}
    path, rid, eos = Path(answers_path), run_id(settings), tokenizer.eos_token_id
    done = {r["qid"]: r for r in read_answers(path, drop_cut_line=True) if r.get("run") == rid}
    todo = [q for q in questions if q["qid"] not in done or done[q["qid"]].get("question") != q["question"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(questions), initial=len(questions) - len(todo), unit="题", disable=not progress) as bar:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start:start + max(1, batch_size)]
            prompts = [prompt_ids(tokenizer, q["question"], settings["layout"], settings.get("system_prompt")) for q in chunk]
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
            with open(path, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(done[q["qid"]], ensure_ascii=False) + "\n" for q in chunk)
            bar.update(len(chunk))
    return [done[q["qid"]] for q in questions]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 on jieba words without punctuation, 0.0 without words (by hand in notebooks/06_evaluation.ipynb)."""
    import jieba
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    hyp, ref = (" ".join(w.lower() for w in jieba.lcut(t or "") if re.search(r"\w", w)) for t in (hypothesis, reference))
    return float(Rouge(metrics=["rouge-l"]).get_scores(hyp, ref)[0]["rouge-l"]["f"]) if hyp and ref else 0.0


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100), sacrebleu's ``zh`` tokenizer; NaN without pairs (notebooks/06_evaluation.ipynb)."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu([h or "" for h in hypotheses], [[r or "" for r in references]], tokenize="zh").score)


COL_COUNT, COL_ZH, COL_MIXED, COL_EN, COL_NONE = "题数", "中文回答率", "中英混合率", "英文回答率", "无文字率"
COL_STARTS, COL_ROUGE, COL_BLEU = "以中文开头率", "ROUGE-L", "BLEU"
OVERALL, UNCATEGORIZED = "全部", "未分类"


def score_answers(records: list[dict], questions: list[dict]):
    """One row per question: its fields, answer, chinese_share, language, starts_zh, counted, rouge_l (lesson 06)."""
    by_qid = {r["qid"]: r.get("answer") or "" for r in records}
    rows = []
    for q in questions:
        answer, ref = by_qid.get(q["qid"], ""), q.get("reference")
        lang = answer_language(answer)
        rows.append({**q, "first_level_class": q.get("first_level_class") or UNCATEGORIZED, "answer": answer,
                     "chinese_share": lang["share"], "language": lang["label"], "starts_zh": lang["starts_zh"],
                     "counted": q.get("task") != TASK_TRANSLATE_TO_EN,
                     "rouge_l": rouge_l(answer, ref) if ref else float("nan")})
    return pd.DataFrame(rows)


def _summary_row(group) -> pd.Series:
    counted, refs = group[group["counted"]], group[group["reference"].notna()]
    language = counted["language"]  # the mean of no rows is NaN: a category with nothing counted
    return pd.Series({COL_COUNT: len(group), COL_ZH: (language == "zh").mean(),
                      COL_MIXED: (language == "mixed").mean(), COL_EN: (language == "en").mean(),
                      COL_NONE: (language == "none").mean(), COL_STARTS: counted["starts_zh"].astype(bool).mean(),
                      COL_ROUGE: refs["rouge_l"].mean(), COL_BLEU: bleu(list(refs["answer"]), list(refs["reference"]))})


def summarize(scored):
    """Per-category table of :func:`score_answers` output plus a row ``全部`` (notebooks/06_evaluation.ipynb)."""
    rows = {cat: _summary_row(group) for cat, group in scored.groupby("first_level_class", sort=False)}
    table = pd.DataFrame([*rows.values(), _summary_row(scored)], index=[*rows, OVERALL]).rename_axis("类别")
    return table.astype({COL_COUNT: int})


COLUMN_ALIASES = {  # lower-cased column name -> role; FlagAlpha's tables use 一级分类 | 二级分类 | 问题 | 答案
    "question": "question", "prompt": "question", "instruction": "question", "问题": "question",
    "answer": "answer", "response": "answer", "output": "answer", "回答": "answer", "答案": "answer",
    "first_level_class": "first_level_class", "category": "first_level_class", "一级分类": "first_level_class",
    "second_level_class": "second_level_class", "subcategory": "second_level_class", "二级分类": "second_level_class",
}


def read_published_answers(path: str | Path):
    """(question, answer[, category...]) rows of a CSV or FlagAlpha's markdown table (notebooks/06_evaluation.ipynb)."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".md"):
        _fail(f"不支持的文件类型 {path.suffix!r}：请用 .csv 或 .md。", f"Unsupported file type {path.suffix!r}: use .csv or .md.")
    text = _read_text(path, ("回答", "answers"))
    if path.suffix.lower() == ".md":  # rows of the pipe table; the last column keeps any " | " it contains
        rows = [line.strip()[1:-1] for line in text.split("\n") if re.fullmatch(r"\s*\|.*\|\s*", line)]
        header = [c.strip() for c in rows[0].split("|")] if rows else []
        frame = pd.DataFrame([dict(zip(header, (c.strip() for c in r.split(" | ", len(header) - 1))))
                              for r in rows[1:] if not re.fullmatch(r"[\s|:-]*", r)])  # skips the | --- | line
        frame = frame.replace({r"\\n": "\n", r'\\"': '"', r"\\t": "\t"}, regex=True)  # FlagAlpha's escapes
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig") if text.strip() else pd.DataFrame()
    frame = frame.rename(columns=lambda c: COLUMN_ALIASES.get(str(c).strip().lower(), c))
    if frame.empty or not {"question", "answer"} <= set(frame.columns):
        columns = ", ".join(map(str, frame.columns)) or "无 / none"
        _fail(f"{path} 需要一张含“问题”和“回答”两列的表（例如 question 和 answer）。找到的列：{columns}。",
              f"{path} needs a table with a question and an answer column (e.g. question and answer). Columns found: {columns}.")
    frame = frame.loc[:, ~frame.columns.duplicated()].fillna("").astype(str)
    frame["answer"] = frame["answer"].str.replace(r'\s*</s>"?\s*$', "", regex=True)  # FlagAlpha's answers end in </s>"
    return frame.reset_index(drop=True)


def score_published_answers(path: str | Path):
    """The per-category table (:func:`summarize`) of any model's published answers (notebooks/06_evaluation.ipynb)."""
    rows = read_published_answers(path).to_dict(orient="records")
    questions = [{"qid": i, "question": r["question"], "reference": None, "first_level_class": r.get("first_level_class"),
                  "task": TASK_TRANSLATE_TO_EN if TRANSLATE_TO_EN_RE.search(r["question"]) else None} for i, r in enumerate(rows)]
    return summarize(score_answers([{"qid": i, "answer": r["answer"]} for i, r in enumerate(rows)], questions))

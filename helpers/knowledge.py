"""The multiple-choice knowledge check of notebooks/06_evaluation.ipynb (section 13), plumbing only: reading and
checking C-Eval-style rows. The prompt, the scoring from next-token logits and the accuracy are written out in
the lesson.

One reader for every source: the course's files in data/knowledge (C-Eval's layout: ``dev/{subject}_dev.csv``,
``val/{subject}_val.csv``, columns ``id, question, A, B, C, D, answer, explanation``), C-Eval's own CSVs or
``datasets.load_dataset("ceval/ceval-exam", subject)`` splits, and CMMLU's CSVs (columns ``Question, A, B, C, D,
Answer`` after an unnamed index column). Every bad row is reported at once, in Chinese and English."""

from __future__ import annotations

import io
from pathlib import Path

from helpers._text import bad_character, json_loads, quote
from helpers.config import DATA_DIR
from helpers.evaluation import EvalDataError, read_text

CHOICES = ("A", "B", "C", "D")
KNOWLEDGE_DIR = DATA_DIR / "knowledge"
COLUMNS = ("question", *CHOICES, "answer")  # required; id and explanation are optional


class KnowledgeDataError(EvalDataError):
    """A multiple-choice file or split that cannot be scored; the message names the source, the rows and the fix."""


def _fail(code: str, zh: str, en: str, **fields):
    raise KnowledgeDataError(code, zh, en, **fields)


def _text(value) -> str:
    """A cell as text: None and NaN (pandas' empty cell) become ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def mc_rows(rows, source: str = "数据 / data") -> list[dict]:
    """Checked multiple-choice rows ``{id, question, A, B, C, D, answer, explanation}`` (notebooks/06_evaluation.ipynb).

    ``rows``: any iterable of dicts (a ``datasets`` split, ``DataFrame.to_dict("records")``, ``csv.DictReader``).
    Column names are matched without regard to case or surrounding space, so C-Eval's ``question``/``answer`` and
    CMMLU's ``Question``/``Answer`` are read unchanged; other columns (CMMLU's unnamed index) are ignored.
    A missing option, an empty question, an answer outside A-D or two identical options is an error, and every
    such row is listed in one :class:`KnowledgeDataError`."""
    rows = list(rows)
    if not rows:
        _fail("knowledge.no_questions", f"{source} 里没有题目。", f"{source} has no questions.")
    keys = {str(k).strip().lower(): k for k in rows[0]} if isinstance(rows[0], dict) else {}
    missing = [c for c in COLUMNS if c.lower() not in keys]
    if missing:
        found = quote(", ".join(map(str, rows[0]))) if isinstance(rows[0], dict) else type(rows[0]).__name__
        _fail("knowledge.missing_columns", f"{source} 缺少列 {', '.join(missing)}。C-Eval 的格式是 id, question, A, B, C, D, answer, explanation"
              f"（CMMLU 是 Question, A, B, C, D, Answer）。找到的列：{found}。",
              f"{source} lacks the column(s) {', '.join(missing)}. C-Eval's layout is id, question, A, B, C, D, answer, "
              f"explanation (CMMLU's: Question, A, B, C, D, Answer). Columns found: {found}.")
    out, bad = [], []
    for n, row in enumerate(rows, 1):
        cell = {c: _text(row.get(keys[c.lower()])) for c in COLUMNS}
        problems_zh, problems_en = [], []
        if not cell["question"]:
            problems_zh.append("题干是空的")
            problems_en.append("the question is empty")
        empty = [c for c in CHOICES if not cell[c]]
        if empty:
            problems_zh.append(f"缺少选项 {'、'.join(empty)}")
            problems_en.append(f"option {', '.join(empty)} missing")
        if cell["answer"] not in CHOICES:
            answer = quote(repr(cell["answer"]), 40)
            problems_zh.append(f"答案 {answer} 不是 A、B、C、D 之一（只写一个大写字母）")
            problems_en.append(f"answer {answer} is not one of A, B, C, D (one capital letter)")
        same = [f"{a}={b}" for i, a in enumerate(CHOICES) for b in CHOICES[i + 1:] if cell[a] and cell[a] == cell[b]]
        if same:
            problems_zh.append(f"选项相同（{', '.join(same)}），正确答案不唯一")
            problems_en.append(f"identical options ({', '.join(same)}), so the answer is ambiguous")
        if problems_zh:
            bad.append((n, "；".join(problems_zh), "; ".join(problems_en)))
            continue
        row_id = _text(row.get(keys["id"])) if "id" in keys else ""
        out.append({"id": row_id or str(n - 1), **cell,
                    "explanation": _text(row.get(keys["explanation"])) if "explanation" in keys else ""})
    if bad:
        _fail("knowledge.bad_rows", f"{source} 有 {len(bad)} 行不能用（行号从第一道题算起，表头不计）：\n"
              + "\n".join(f"  第 {n} 行：{zh}" for n, zh, _ in bad) + "\n请修改这些行后重新运行。",
              f"{source} has {len(bad)} unusable rows (row 1 = the first question):\n"
              + "\n".join(f"  row {n}: {en}" for n, _, en in bad) + "\nFix them and run again.",
              source=source, rows=[n for n, _, _ in bad])
    return out


def read_mc_csv(path: str | Path) -> list[dict]:
    """The checked rows of one C-Eval or CMMLU CSV file (UTF-8), see :func:`mc_rows` (notebooks/06_evaluation.ipynb)."""
    import pandas as pd

    path = Path(path)
    try:
        text = read_text(path, ("选择题", "multiple-choice"))  # missing file, not UTF-8: a clear error
    except EvalDataError as err:
        raise KnowledgeDataError(err.code, err.zh, err.en, **err.fields) from None
    if not text.strip():
        _fail("knowledge.empty_file", f"{path} 是空文件。", f"{path} is empty.")
    bad = bad_character(text)
    if bad:
        _fail("knowledge.control_character", f"{path} {bad[0]}。删掉它再运行。", f"{path}: {bad[1]}. Remove it and run again.")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        _fail("knowledge.unreadable_csv", f"无法按 CSV 读取 {path}：{err}。含逗号的单元格要用英文双引号括起来。",
              f"Could not read {path} as CSV: {err}. Quote cells that contain commas with double quotes.")
    return mc_rows(table.to_dict("records"), str(path))


def load_knowledge(folder: str | Path | None = None, splits: tuple[str, ...] = ("dev", "val")) -> dict:
    """``{subject: {"name": its Chinese name, "dev": rows, "val": rows}}`` from a folder in C-Eval's layout
    (``{split}/{subject}_{split}.csv`` and an optional ``subject_mapping.json``; default data/knowledge), for
    notebooks/06_evaluation.ipynb. Subjects are those of the last split, in file-name order."""
    folder = Path(folder) if folder is not None else KNOWLEDGE_DIR
    mapping_file = folder / "subject_mapping.json"
    try:
        mapping = json_loads(read_text(mapping_file, ("学科表", "subject mapping"))) if mapping_file.is_file() else {}
    except EvalDataError as err:
        raise KnowledgeDataError(err.code, err.zh, err.en, **err.fields) from None
    except ValueError as err:  # not JSON, or nested too deeply
        _fail("knowledge.invalid_mapping", f"{mapping_file} 不是合法的 JSON（{quote(err, 80)}）。C-Eval 的 subject_mapping.json 是"
              " {\"学科\": [\"英文名\", \"中文名\", \"类别\"]}。",
              f"{mapping_file} is not valid JSON ({quote(err, 80)}). C-Eval's subject_mapping.json is"
              " {\"subject\": [\"English name\", \"Chinese name\", \"category\"]}.")
    subjects = sorted(p.name[: -len(f"_{splits[-1]}.csv")] for p in (folder / splits[-1]).glob(f"*_{splits[-1]}.csv"))
    if not subjects:
        _fail("knowledge.no_subjects", f"{folder / splits[-1]} 里没有 *_{splits[-1]}.csv 文件。目录结构要与 C-Eval 相同："
              "dev/computer_network_dev.csv、val/computer_network_val.csv……",
              f"No *_{splits[-1]}.csv files in {folder / splits[-1]}. Use C-Eval's layout: "
              "dev/computer_network_dev.csv, val/computer_network_val.csv, ...")
    if not isinstance(mapping, dict) or not all(isinstance(v, list) and len(v) >= 2 for v in mapping.values()):
        _fail("knowledge.bad_mapping", f"{mapping_file} 的格式不对：应是 {{\"学科\": [\"英文名\", \"中文名\", \"类别\"]}}。",
              f"{mapping_file} has the wrong shape: expected {{\"subject\": [\"English name\", \"Chinese name\", \"category\"]}}.")
    names = {s: str((mapping.get(s) or [s, s])[1]) for s in subjects}  # C-Eval: [English name, Chinese name, category]
    return {s: {"name": names[s], **{split: read_mc_csv(folder / split / f"{s}_{split}.csv") for split in splits}}
            for s in subjects}

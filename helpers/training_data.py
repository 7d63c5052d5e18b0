"""Reading and checking a training file for notebooks/05_lora_finetune.ipynb: the article's CSV, a
question/answer CSV or chat JSONL, every bad row reported at once, tokens and answer-only labels from
:func:`helpers.prompts.encode`. :func:`helpers.finetune.train_adapter` trains on what it returns."""

from __future__ import annotations

import io
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

from helpers._text import DecodeProblem, bad_character, bad_character_in, decode, json_loads, quote
from helpers.config import TutorialError, localized
from helpers.prompts import IGNORE_INDEX, PromptFormatError, csv_text_to_messages, encode


class BadRowsError(TutorialError, ValueError):
    """Some rows of a training file are unusable; ``.bad`` lists every one (notebooks/05_lora_finetune.ipynb).
    The message lists them all, one line each, and says what to do."""

    def __init__(self, path: Path, bad: list):
        super().__init__(
            "data.bad_rows",
            f"{path} 里有 {len(bad)} 行不能用于训练（行号从第一条数据算起，表头不计）：\n"
            + "\n".join(f"  第 {b.row} 行：{b.detail.zh}" for b in bad)
            + '\n请修改这些行后重新运行，或者用 on_bad="drop" 跳过它们。没有训练，也没有写入任何文件。',
            f"{path} has {len(bad)} unusable rows:\n"
            + "\n".join(f"  row {b.row}: {b.detail.en}" for b in bad)
            + '\nFix them, or pass on_bad="drop" to skip them. Nothing was trained or written.',
            path=str(path), rows=[b.row for b in bad])
        self.bad = bad


# row 1 = the first data row; problem: "format", "missing_column", "no_assistant", "special_token", "empty_answer"
# or "too_long"; detail: the PromptFormatError that says what is wrong (its .code, .fields; str() shows its message)
BadRow = namedtuple("BadRow", "row problem detail")


@dataclass
class SFTRows:
    """A checked training file (made by :func:`validate_sft_file`, notebooks/05_lora_finetune.ipynb)."""

    path: Path
    schema: str  # "text" (the article's CSV), "question_answer" (two-column CSV), "messages" (JSONL)
    total: int
    rows: list = field(default_factory=list)  # row numbers of the good rows
    conversations: list = field(default_factory=list)
    input_ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    bad: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        answer = sum(x != IGNORE_INDEX for lab in self.labels for x in lab)
        return (f"{self.path.name}：共 {self.total} 行，可用 {len(self.rows)} 行，有问题 {len(self.bad)} 行；"
                f"{sum(map(len, self.input_ids))} 个 token，其中回答 {answer} 个")

    def dataset(self, *, on_bad: str = "stop"):
        """The good rows as a ``datasets.Dataset`` (``input_ids``, ``labels``). With bad rows, ``on_bad="drop"``
        leaves them out; anything else raises :class:`BadRowsError` listing every one."""
        from datasets import Dataset

        if self.bad and on_bad != "drop":
            raise BadRowsError(self.path, self.bad)
        if not self.rows:
            raise TutorialError("data.no_usable_rows", f"{self.path} 里没有可用的行。", f"{self.path} has no usable rows.", path=str(self.path))
        if self.bad:
            print(localized(f"跳过 {len(self.bad)} 行有问题的数据", f"dropped {len(self.bad)} bad rows"))
        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def read_table(path: str | Path) -> tuple[list, list]:
    """``(records, columns)`` of a CSV (pandas; GBK/GB18030 from Excel or WPS is read with a notice) or JSONL
    file; a clear :class:`TutorialError` for a missing, empty or unparsable file (notebooks/05_lora_finetune.ipynb)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TutorialError("data.not_found", f"找不到训练文件 {path}。", f"Training file {path} not found.", path=str(path))
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise TutorialError("data.unsupported_type", f"{path.name}：只支持 .csv 和 .jsonl。",
                                      f"{path.name}: only .csv and .jsonl are supported.", path=str(path))
    try:
        text, encoding = decode(path.read_bytes(), path.name)
    except DecodeProblem as err:
        raise TutorialError("data.encoding", err.zh, err.en, path=str(path)) from None
    if encoding == "gb18030":
        print(localized(
            f"注意：{path.name} 是 GBK/GB18030 编码（Excel/WPS 在中文 Windows 上的默认编码），已按 GB18030 读取。"
            f"建议另存为 UTF-8，或运行 iconv -f gb18030 -t utf-8 {path.name} > utf8.csv",
            f"Note: {path.name} is GBK/GB18030 (Excel/WPS on Chinese Windows); read as GB18030. Save it as UTF-8 "
            "(or iconv -f gb18030 -t utf-8)."))
    bad = bad_character(text)
    if bad:
        raise TutorialError("data.control_character",
            f"{path.name} {bad[0]}：训练文本里不应有这种字符（常见于从网页或二进制文件复制的内容）。删掉它再运行。",
            f"{path.name}: {bad[1]}; training text should not hold it (it often comes from text copied out of a web "
            "page or a binary file). Remove it and run again.", path=str(path))
    if not text.strip():
        raise TutorialError("data.empty_file", f"{path.name} 是空文件。", f"{path.name} is empty.", path=str(path))
    if path.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.ParserError as err:
            raise TutorialError("data.unreadable_csv", f"无法读取 {path.name}：{err}", f"Could not read {path.name}: {err}", path=str(path)) from err
        return table.astype(object).where(table.notna(), None).to_dict("records"), [str(c) for c in table.columns]
    records, broken = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json_loads(line)
            except ValueError:  # JSONDecodeError, or nested too deeply
                broken.append(str(n))
                continue
            bad = bad_character_in(record)
            if bad:
                raise TutorialError("data.control_character", f"{path.name} 第 {n} 行：{bad[0]}。删掉它再运行。",
                                              f"{path.name} line {n}: {bad[1]}. Remove it and run again.", path=str(path), line=n)
            records.append(record)
    if broken:
        lines = quote(", ".join(broken))
        raise TutorialError("data.invalid_jsonl", f"{path.name} 第 {lines} 行不是合法的 JSON（JSONL 每行一个 JSON 对象）。",
                                      f"{path.name} lines {lines} are not valid JSON (one object per line).", path=str(path), lines=[int(n) for n in broken])
    return records, sorted({k for r in records if isinstance(r, dict) for k in r})


class _Bad(PromptFormatError):
    """A row that cannot be trained on; its code is ``data.<problem>``, the problem shown in ``SFTRows.bad``."""

    def __init__(self, problem: str, zh: str, en: str, **fields):
        super().__init__(f"data.{problem}", zh, en, **fields)


# The problem a row has, for the errors helpers.prompts raises while a row is parsed and encoded.
_PROBLEM_OF_CODE = {"prompt.special_token": "special_token", "prompt.empty_text": "empty_answer",
                    "prompt.empty_message": "empty_answer"}


def _row_to_messages(record, schema: str) -> list[dict]:
    if not isinstance(record, dict):
        raise _Bad("format", "这一行不是 JSON 对象。", "the line is not a JSON object.")
    if schema == "text":
        text = record.get("text")
        if text is None:
            raise _Bad("missing_column", "text 列是空的。", "no value in column 'text'.")
        text = str(text)
        if "<s>Assistant:" not in text:
            raise _Bad("no_assistant", "没有 “<s>Assistant:” 部分。", "no '<s>Assistant:' part.")
        if "</s><s>Human:" in text.split("<s>Assistant:", 1)[1].rstrip().removesuffix("</s>"):
            raise _Bad("special_token", "回答里含有 “</s><s>Human:”，会被读成新的一轮对话；请删掉或改写这段文字。",
                       "the answer contains '</s><s>Human:', which reads as a new turn; remove or rewrite it.")
        return csv_text_to_messages(text)
    if schema == "question_answer":
        missing = [c for c in ("question", "answer") if record.get(c) is None]
        if missing:
            raise _Bad("missing_column", f"缺少 {'、'.join(missing)} 列的值。", f"no value in column(s) {', '.join(missing)}.",
                       columns=missing)
        system = [{"role": "system", "content": record["system"]}] if str(record.get("system") or "").strip() else []
        messages = system + [{"role": "user", "content": str(record["question"])},
                             {"role": "assistant", "content": str(record["answer"])}]
    else:
        messages = record.get("messages")
        if not messages:
            raise _Bad("missing_column", "没有 messages。", "no 'messages'.")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _Bad("format", 'messages 必须是 [{"role": ..., "content": ...}, ...] 形式的列表。',
                       'messages must be a list of {"role": ..., "content": ...} objects.')
    if messages[-1].get("role") != "assistant":
        raise _Bad("no_assistant", "最后一条不是 assistant 的回答。", "the last message is not the assistant's answer.")
    if any(m.get("role") == "assistant" and not str(m.get("content") or "").strip() for m in messages):
        raise _Bad("empty_answer", "回答是空的。", "empty answer.")
    return messages


def validate_sft_file(path: str | Path, tokenizer, *, chat_format: str = "llama2", max_length: int = 512) -> SFTRows:
    """Check every row of a training file and tokenize the good ones; bad rows go to ``.bad``.

    Schemas: the article's CSV (``text``), a CSV with ``question``/``answer`` (optional ``system``),
    JSONL with ``{"messages": [...]}``. Tokens and answer-only labels come from
    :func:`helpers.prompts.encode` in the format ``chat_format``. Introduced in notebooks/05_lora_finetune.ipynb.
    """
    path = Path(path)
    records, columns = read_table(path)
    schema = next((name for name, need in (("text", {"text"}), ("question_answer", {"question", "answer"}),
                                           ("messages", {"messages"})) if need <= set(columns)), None)
    if schema is None:
        raise TutorialError("data.no_training_column",
            f"{path.name} 里找不到训练数据列：需要 text，或 question 和 answer，或（JSONL）messages。现有的列：{quote(', '.join(columns))}。",
            f"{path.name} has no training column: expected 'text', or 'question' and 'answer', or 'messages'. "
            f"Found: {quote(', '.join(columns))}.", path=str(path), columns=columns)
    out = SFTRows(path, schema, len(records))
    for row, record in enumerate(records, 1):
        try:
            messages = _row_to_messages(record, schema)
            enc = encode(tokenizer, messages, chat_format, add_generation_prompt=False)
            n = len(enc.input_ids)
            if n > max_length:
                raise _Bad("too_long", f"有 {n} 个 token，超过上限 {max_length}（不截断：截断会丢掉结尾的 </s>）。",
                           f"{n} tokens, over the limit of {max_length} (not cut: that drops the final </s>).",
                           tokens=n, max_length=max_length)
        except PromptFormatError as err:
            problem = err.code.removeprefix("data.") if isinstance(err, _Bad) else _PROBLEM_OF_CODE.get(err.code, "format")
            out.bad.append(BadRow(row, problem, err))
            continue
        out.rows.append(row)
        out.conversations.append(messages)
        out.input_ids.append(enc.input_ids)
        out.labels.append(enc.labels)
    return out


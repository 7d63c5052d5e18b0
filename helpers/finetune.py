"""LoRA fine-tuning on the article's CSV files: the plumbing around lesson 05.

Introduced in notebooks/05_lora_finetune.ipynb. The lesson writes the taught steps inline
(``LoraConfig``, ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training``,
``TrainingArguments``, ``Trainer``, ``merge_and_unload``); this module holds what is not the
lesson itself:

* :data:`SETTINGS` / :func:`settings_for`: the one place with the training settings for a Colab
  T4 (Llama-2-7B in 4-bit, QLoRA) and for the CPU (the tiny model, fp32);
* reading and validating the training files (:func:`validate_sft_file`): every bad row is
  reported at once, with its row number, before anything is trained or written;
* the collator (:class:`AnswerOnlyCollator`), the stop-and-resume callback
  (:class:`StopAfterSteps`), saving without overwriting (:func:`save_adapter`,
  :func:`check_output_dir`), answering questions in batches and the loss plot;
* :func:`train_adapter` and :func:`ensure_adapter`, which run the same recipe as the notebook for
  later lessons (lesson 06 evaluates the adapter), and :func:`load_with_adapter`.

Every sequence is tokenized by :func:`helpers.prompts.encode` in the *model's own* chat format:
the CSV's ``Human:/Assistant:`` text is parsed into messages first, so training prompts and chat
prompts (lessons 04 and 06) are the same tokens by construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from helpers.config import DATA_DIR, TutorialError, bilingual, output_dir
from helpers.prompts import IGNORE_INDEX, PromptFormatError, csv_text_to_messages, encode

ADAPTER_DIR_NAME = "lora-adapter"
MERGED_DIR_NAME = "merged-model"
INFO_FILE = "training_info.json"

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides one LoRA run (see notebooks/05_lora_finetune.ipynb)."""

    name: str
    description: str
    # Model loading: None (fp32 on the CPU) or "4bit" / "8bit" (bitsandbytes, QLoRA on a GPU).
    quantization: str | None
    gradient_checkpointing: bool
    # Data: rows longer than this (prompt + answer, in tokens) are reported, never cut.
    max_length: int
    # LoRA.
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    # Optimisation.
    learning_rate: float
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    per_device_eval_batch_size: int
    warmup_steps: int
    lr_scheduler_type: str
    weight_decay: float
    # Bookkeeping: how often to log, evaluate on dev and save a checkpoint (in optimizer steps).
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    seed: int
    # CPU threads for torch (None: leave torch's default).
    torch_threads: int | None
    # dtype of the base the adapter is merged into: "float16" on a GPU, "float32" on the CPU.
    merge_dtype: str
    # Largest |logit| difference accepted when the same adapter is checked two ways (reloaded on a
    # fresh base, merged vs unmerged): fp32 on the CPU agrees to ~1e-5; fp16/4-bit on a GPU to ~0.1.
    logits_atol: float
    # How the dev questions are answered before and after training.
    generation: dict = field(default_factory=dict)
    generation_batch_size: int = 16

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def as_table(self):
        """The settings as a two-column table (for the notebook)."""
        import pandas as pd

        rows = {k: (", ".join(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        rows["effective_batch_size"] = self.effective_batch_size
        return pd.DataFrame({self.name: {k: str(v) for k, v in rows.items()}})


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SETTINGS: dict[str, TrainSettings] = {
    # Llama-2-7b-chat on a free Colab T4 (15 GB, no bf16): QLoRA in 4-bit with fp16 compute.
    "colab_t4": TrainSettings(
        name="colab_t4",
        description="Colab T4：Llama-2-7B 4-bit QLoRA，fp16 计算 / 7B in 4-bit (QLoRA), fp16 compute",
        quantization="4bit",
        gradient_checkpointing=True,
        max_length=512,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA_PROJECTIONS,
        learning_rate=2e-4,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        per_device_eval_batch_size=8,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=4,
        eval_steps=12,
        save_steps=24,
        save_total_limit=2,
        seed=42,
        torch_threads=None,
        merge_dtype="float16",
        logits_atol=0.5,
        generation={"max_new_tokens": 128, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                    "repetition_penalty": 1.1},
        generation_batch_size=8,
    ),
    # The tiny model on a CPU: fp32, a much higher learning rate, no dropout, one thread; tuned
    # (measured) so the whole lesson runs in about a minute (see the notebook's settings section).
    "cpu_tiny": TrainSettings(
        name="cpu_tiny",
        description="tiny 模型（CPU 或 GPU）fp32 LoRA / tiny model in fp32, CPU or GPU",
        quantization=None,
        gradient_checkpointing=False,
        max_length=256,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=LLAMA_PROJECTIONS,
        learning_rate=5e-3,
        num_train_epochs=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=36,
        warmup_steps=4,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=4,
        eval_steps=24,
        save_steps=24,
        save_total_limit=2,
        seed=42,
        torch_threads=1,
        merge_dtype="float32",
        logits_atol=1e-4,
        generation={"max_new_tokens": 64, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                    "repetition_penalty": 1.2},
        generation_batch_size=36,
    ),
}


def settings_for(choice=None, *, device: str | None = None) -> TrainSettings:
    """The settings for this model on this machine, from :data:`SETTINGS`.

    A Llama-2 model on a CUDA GPU gets ``colab_t4`` (4-bit QLoRA); the tiny model gets
    ``cpu_tiny`` on any device (its numbers were tuned for it; it is loaded in fp32), and so does
    a big model on a CPU (with a warning: that takes hours). ``choice`` is a
    :class:`helpers.config.ModelChoice` (None: decide by the device alone); ``device``
    ("cuda"/"cpu") overrides the detection. Introduced in notebooks/05_lora_finetune.ipynb.
    """
    if device is None:
        from helpers.loading import pick_device

        device = pick_device()
    tiny = choice is not None and choice.is_tiny
    if device == "cuda" and not tiny:
        return SETTINGS["colab_t4"]
    if choice is not None and not tiny:
        import warnings

        warnings.warn(
            f"{choice.name} 在 CPU 上微调会非常慢（数小时以上）。/ Fine-tuning {choice.name} on a CPU takes hours.",
            stacklevel=2,
        )
    return SETTINGS["cpu_tiny"]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` and restore the previous value afterwards."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- errors


class BadRowsError(TutorialError, ValueError):
    """Some rows of a training file are unusable; ``.bad`` lists every one of them."""

    def __init__(self, message: str, bad: list[BadRow]):
        super().__init__(message)
        self.bad = bad


class OutputExistsError(TutorialError, FileExistsError):
    """The folder we were asked to write already exists, and overwriting was not asked for."""


def check_output_dir(path: str | Path, *, overwrite: bool = False, what: tuple[str, str] = ("输出", "output")) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists (a file or a non-empty folder) and
    ``overwrite`` is false. Nothing is created or deleted here."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise OutputExistsError(
            bilingual(
                f"{what[0]}目录 {path} 已经存在，为了不覆盖你已有的结果，这里停下了。"
                f"如果确实要覆盖，请传 overwrite=True（笔记本里把 OVERWRITE 设为 True）；或者换一个目录名。",
                f"The {what[1]} folder {path} already exists; stopping so your earlier result is not overwritten. "
                "Pass overwrite=True (set OVERWRITE = True in the notebook) to replace it, or choose another folder.",
            )
        )
    return path


def next_free_dir(path: str | Path) -> Path:
    """``path`` if nothing is there yet, else ``path-2``, ``path-3``, ... (the first unused name)."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return candidate


def checkpoint_dir_for(adapter_dir: str | Path) -> Path:
    """Where the Trainer keeps the checkpoints of the run that will produce ``adapter_dir``."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.with_name(adapter_dir.name + "-checkpoints")


# --------------------------------------------------------------------------- data


PROBLEMS = {
    "missing_column": ("缺少列的值", "missing column value"),
    "no_assistant": ("没有 Assistant: 部分", "no Assistant: part"),
    "empty_answer": ("回答为空", "empty answer"),
    "too_long": ("超过长度上限", "over the length limit"),
    "format": ("格式错误", "malformed"),
}


@dataclass
class BadRow:
    """One unusable row: its number (1 = first data row, the CSV header not counted), the kind of
    problem (a key of :data:`PROBLEMS`) and a bilingual explanation."""

    row: int
    problem: str
    detail: str


@dataclass
class SFTRows:
    """A validated training file (see :func:`validate_sft_file`)."""

    path: Path
    layout: str  # "text" (article CSV), "question_answer" (two-column CSV) or "messages" (JSONL)
    total: int
    rows: list[int]  # row numbers of the good rows
    conversations: list[list[dict]]
    input_ids: list[list[int]]
    labels: list[list[int]]
    bad: list[BadRow]
    fmt: str
    max_length: int

    @property
    def ok(self) -> bool:
        return not self.bad

    def bad_table(self):
        """The bad rows as a table: row number, problem, explanation."""
        import pandas as pd

        return pd.DataFrame(
            [{"行 row": b.row, "问题 problem": "/".join(PROBLEMS.get(b.problem, (b.problem, b.problem))),
              "说明 detail": b.detail.split("\n")[0]} for b in self.bad],
            columns=["行 row", "问题 problem", "说明 detail"],
        )

    def summary(self) -> str:
        n_bad_rows = len({b.row for b in self.bad})
        answer_tokens = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in self.labels)
        return (
            f"{self.path.name}：共 {self.total} 行，可用 {len(self.rows)} 行，有问题 {n_bad_rows} 行；"
            f"格式 {self.layout} → 模板 {self.fmt}；{sum(map(len, self.input_ids))} 个 token，其中回答 {answer_tokens} 个"
        )

    def error(self) -> BadRowsError:
        """A :class:`BadRowsError` listing every bad row (what ``on_bad="stop"`` raises)."""
        lines_zh = [f"  第 {b.row} 行：{b.detail.split(chr(10))[0]}" for b in self.bad]
        lines_en = [f"  row {b.row}: {b.detail.split(chr(10))[-1]}" for b in self.bad]
        return BadRowsError(
            bilingual(
                f"{self.path} 里有 {len({b.row for b in self.bad})} 行不能用于训练（行号从第一条数据算起，表头不计）：\n"
                + "\n".join(lines_zh)
                + "\n请修改这些行后重新运行，或者用 on_bad=\"drop\" 跳过它们。没有训练，也没有写入任何文件。",
                f"{self.path} has {len({b.row for b in self.bad})} rows that cannot be used (numbered from the first "
                "data row, header not counted):\n"
                + "\n".join(lines_en)
                + "\nFix them and run again, or pass on_bad=\"drop\" to skip them. Nothing was trained or written.",
            ),
            self.bad,
        )

    def dataset(self, *, on_bad: str = "stop"):
        """The good rows as a ``datasets.Dataset`` with ``input_ids``, ``labels`` and ``length``.

        ``on_bad="stop"`` (default) raises :class:`BadRowsError` if any row is bad;
        ``on_bad="drop"`` leaves the bad rows out and says how many.
        """
        from datasets import Dataset

        if on_bad not in ("stop", "drop"):
            raise TutorialError(bilingual("on_bad 只能是 \"stop\" 或 \"drop\"。", 'on_bad must be "stop" or "drop".'))
        if self.bad and on_bad == "stop":
            raise self.error()
        if self.bad:
            print(f"跳过 {len({b.row for b in self.bad})} 行有问题的数据 / dropped {len({b.row for b in self.bad})} bad rows")
        if not self.rows:
            raise TutorialError(
                bilingual(f"{self.path} 里没有可用的行。", f"{self.path} has no usable rows."))
        return Dataset.from_dict(
            {"input_ids": self.input_ids, "labels": self.labels, "length": [len(x) for x in self.input_ids]}
        )


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_table(path: str | Path):
    """Read a CSV or JSONL training file with ``datasets.load_dataset`` (into memory, no cache).

    Returns ``(records, columns)``. Raises :class:`TutorialError` when the file is missing, is not
    CSV/JSONL, or cannot be parsed (for JSONL the message names every broken line).
    """
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise TutorialError(bilingual(f"找不到训练文件 {path}。", f"Training file {path} not found."))
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise TutorialError(
            bilingual(
                f"{path.name}：只支持 .csv（text 一列，或 question/answer 两列）和 .jsonl（每行一个 {{\"messages\": [...]}}）。",
                f"{path.name}: only .csv (one text column, or question/answer columns) and .jsonl (one "
                '{"messages": [...]} per line) are supported.',
            )
        )
    if suffix != ".csv":
        _check_jsonl_lines(path)
    builder = "csv" if suffix == ".csv" else "json"
    with tempfile.TemporaryDirectory(prefix="sft-load-") as cache, _quiet_datasets():
        try:
            table = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as err:  # pyarrow / pandas parser errors
            raise TutorialError(
                bilingual(f"无法读取 {path.name}：{err}", f"Could not read {path.name}: {err}")
            ) from err
        return table.to_list(), list(table.column_names)


def _check_jsonl_lines(path: Path) -> None:
    broken = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            broken.append(n)
    if broken:
        raise TutorialError(
            bilingual(
                f"{path.name} 第 {', '.join(map(str, broken))} 行不是合法的 JSON（JSONL 每行必须是一个完整的 JSON 对象）。",
                f"{path.name} lines {', '.join(map(str, broken))} are not valid JSON (each JSONL line must be one object).",
            )
        )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_to_messages(record: dict, layout: str, row: int) -> list[dict]:
    """Messages of one row, or raise :class:`PromptFormatError` / a BadRow-coded error."""
    if layout == "text":
        text = record.get("text")
        if _missing(text):
            raise _Coded("missing_column", bilingual(f"第 {row} 行的 text 列是空的。", f"row {row} has no value in column 'text'."))
        return csv_text_to_messages(str(text), row=row)
    if layout == "question_answer":
        missing = [c for c in ("question", "answer") if _missing(record.get(c))]
        if missing:
            raise _Coded(
                "missing_column",
                bilingual(f"第 {row} 行缺少 {'、'.join(missing)} 列的值。", f"row {row} has no value in column(s) {', '.join(missing)}."),
            )
        question, answer = str(record["question"]), str(record["answer"])
        if not answer.strip():
            raise _Coded("empty_answer", bilingual(f"第 {row} 行的回答是空的。", f"row {row} has an empty answer."))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if not _missing(record.get("system")) and str(record.get("system")).strip():
            messages.insert(0, {"role": "system", "content": str(record["system"])})
        return messages
    messages = record.get("messages")
    if _missing(messages) or not messages:
        raise _Coded("missing_column", bilingual(f"第 {row} 行没有 messages。", f"line {row} has no 'messages'."))
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    if messages[-1]["role"] != "assistant":
        raise _Coded("no_assistant", bilingual(f"第 {row} 行最后一条不是 assistant 的回答。", f"line {row} does not end with an assistant answer."))
    if any(m["role"] == "assistant" and not (m["content"] or "").strip() for m in messages):
        raise _Coded("empty_answer", bilingual(f"第 {row} 行的回答是空的。", f"line {row} has an empty answer."))
    return messages


class _Coded(Exception):
    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem, self.detail = problem, detail


def _problem_of(record: dict, layout: str) -> str:
    """Which kind of problem a row that the prompt module refused has (for the report's table)."""
    if layout != "text":
        return "format"
    text = str(record.get("text") or "")
    last_answer, last_question = text.rfind("Assistant:"), text.rfind("Human:")
    if last_answer < 0 or last_question > last_answer:
        return "no_assistant"
    if not text[last_answer + len("Assistant:"):].replace("</s>", "").strip():
        return "empty_answer"
    return "format"


def validate_sft_file(path: str | Path, tokenizer, *, fmt: str = "llama2", max_length: int = 512) -> SFTRows:
    """Check every row of a training file and tokenize the good ones; never stops at the first
    bad row.

    Accepted layouts: the article's CSV (one ``text`` column,
    ``<s>Human: ...\\n</s><s>Assistant: ...\\n</s>``), a CSV with ``question`` and ``answer``
    columns (optional ``system``), and JSONL with one ``{"messages": [...]}`` per line. Rows are
    parsed into messages and tokenized with :func:`helpers.prompts.encode` in ``fmt`` (the
    model's chat format): labels are ``-100`` on the prompt, the answer and its final EOS are
    labelled. A row is bad when a value is missing, it has no ``Assistant:`` part, its answer is
    empty, it is malformed, or it has more than ``max_length`` tokens (it is reported, not cut:
    a cut row would lose its EOS and teach the model never to stop).

    Raises :class:`TutorialError` only for problems with the whole file (missing, unknown
    layout); bad rows are collected in ``.bad``. Introduced in notebooks/05_lora_finetune.ipynb.
    """
    path = Path(path)
    records, columns = read_table(path)
    if "text" in columns:
        layout = "text"
    elif "question" in columns and "answer" in columns:
        layout = "question_answer"
    elif "messages" in columns:
        layout = "messages"
    else:
        raise TutorialError(
            bilingual(
                f"{path.name} 里找不到训练数据列：需要 text 一列（文章的格式），或者 question 和 answer 两列，"
                f"或者（JSONL）messages。文件里的列是：{columns}。",
                f"{path.name} has no training column: expected 'text' (the article's format), or 'question' and "
                f"'answer', or (JSONL) 'messages'. Columns found: {columns}.",
            )
        )
    out = SFTRows(path, layout, len(records), [], [], [], [], [], fmt, max_length)
    for i, record in enumerate(records):
        row = i + 1
        try:
            messages = _row_to_messages(record, layout, row)
            enc = encode(tokenizer, messages, fmt, add_generation_prompt=False)
        except _Coded as err:
            out.bad.append(BadRow(row, err.problem, err.detail))
            continue
        except PromptFormatError as err:
            detail = str(err)
            if f"第 {row} 行" not in detail:
                zh, _, en = detail.partition("\n")
                detail = bilingual(f"第 {row} 行：{zh}", f"row {row}: {en or zh}")
            out.bad.append(BadRow(row, _problem_of(record, layout), detail))
            continue
        if len(enc.input_ids) > max_length:
            out.bad.append(
                BadRow(
                    row,
                    "too_long",
                    bilingual(
                        f"第 {row} 行有 {len(enc.input_ids)} 个 token，超过上限 {max_length}（不截断：截断会丢掉结尾的 </s>）。",
                        f"row {row} has {len(enc.input_ids)} tokens, over the limit of {max_length} (not cut: cutting "
                        "would drop the final </s>).",
                    ),
                )
            )
            continue
        if not any(x != IGNORE_INDEX for x in enc.labels):
            out.bad.append(BadRow(row, "empty_answer", bilingual(f"第 {row} 行没有回答 token。", f"row {row} has no answer tokens.")))
            continue
        out.rows.append(row)
        out.conversations.append(messages)
        out.input_ids.append(enc.input_ids)
        out.labels.append(enc.labels)
    return out


# --------------------------------------------------------------------------- collator


class AnswerOnlyCollator:
    """Pad a batch to its own longest row (dynamic padding), on the right.

    ``input_ids`` are padded with ``pad_token_id`` (which must not be the EOS id: see
    transformers #23530), ``labels`` with ``-100`` and ``attention_mask`` with 0. The labels
    made by :func:`helpers.prompts.encode` are kept as they are, so the final EOS stays labelled
    and the model learns to stop. Introduced in notebooks/05_lora_finetune.ipynb.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int | None = None, *, pad_to_multiple_of: int | None = None):
        if pad_token_id is None or pad_token_id == eos_token_id:
            raise TutorialError(
                bilingual(
                    "填充符不能是 </s>（也不能没有）：很多整理器会把等于填充符的标签全部屏蔽，连真正的结尾 </s> 一起，"
                    "模型就学不会停下（transformers #23530）。请设置 tokenizer.pad_token = tokenizer.unk_token。",
                    "The pad token must exist and must not be </s>: collators that mask every pad-token label also "
                    "mask the real final </s>, so the model never learns to stop (transformers #23530). Set "
                    "tokenizer.pad_token = tokenizer.unk_token.",
                )
            )
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------- trainer pieces


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class StopAfterSteps(_callback_base()):
    """Stop training right after optimizer step ``steps``, saving a checkpoint there first.

    The notebook uses it to simulate an interruption (a Colab disconnect); training then
    resumes from that checkpoint with ``trainer.train(resume_from_checkpoint=...)``.
    Introduced in notebooks/05_lora_finetune.ipynb.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder under ``folder`` (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(folder)
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, dev)`` as lists of ``(step, loss)`` from ``trainer.state.log_history``."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    dev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, dev


def plot_loss_curves(log_history: list[dict], title: str = "LoRA"):
    """Train and dev loss against the optimizer step; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    train, dev = loss_history(log_history)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if dev:
        ax.plot(*zip(*dev), marker="o", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- saving


def _atomic_write_dir(target: Path, write, *, overwrite: bool, what: tuple[str, str]) -> Path:
    """Write a folder with ``write(tmp_folder)`` and move it into place in one rename."""
    target = Path(target)
    check_output_dir(target, overwrite=overwrite, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # overwrite=True: replace only once the new folder is complete
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_adapter(model, path: str | Path, *, overwrite: bool = False, info: dict | None = None) -> Path:
    """Save a PEFT model's adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises :class:`OutputExistsError` if ``path`` already holds something and ``overwrite`` is
    false; the folder appears complete or not at all. ``info`` goes to ``training_info.json``.
    Introduced in notebooks/05_lora_finetune.ipynb.
    """

    def write(tmp: Path):
        model.save_pretrained(tmp)
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False, default=str), "utf-8")

    return _atomic_write_dir(Path(path), write, overwrite=overwrite, what=("适配器", "adapter"))


def save_merged(model, tokenizer, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save a merged model and its tokenizer (a plain model folder, no PEFT needed to load it).

    Same no-overwrite rule as :func:`save_adapter`. Introduced in notebooks/05_lora_finetune.ipynb.
    """

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_write_dir(Path(path), write, overwrite=overwrite, what=("合并模型", "merged model"))


def read_training_info(adapter_dir: str | Path) -> dict:
    """The ``training_info.json`` saved next to an adapter ({} when there is none)."""
    p = Path(adapter_dir) / INFO_FILE
    return json.loads(p.read_text("utf-8")) if p.exists() else {}


# --------------------------------------------------------------------------- generation


def prepare_tokenizer(tokenizer):
    """Give a Llama tokenizer a pad token that is not EOS (``<unk>``), as training needs."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def answer_questions(model, tokenizer, questions: list[str], *, fmt: str = "llama2", generation: dict,
                     batch_size: int = 16, seed: int = 0) -> list[str]:
    """Answer each question (one user turn, no system prompt, as in the training rows).

    Prompts come from :func:`helpers.prompts.encode` and are padded on the left; sampling is
    seeded so a rerun gives the same answers. Introduced in notebooks/05_lora_finetune.ipynb.
    """
    import torch

    from helpers.prompts import encode_prompt

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    answers: list[str] = []
    device = getattr(model, "device", None) or next(model.parameters()).device
    torch.manual_seed(seed)
    for start in range(0, len(questions), batch_size):
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}], fmt) for q in questions[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, **generation)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def mean_chinese_share(answers: list[str]) -> float:
    """Average of :func:`helpers.evaluation.chinese_share` over answers; an answer with no words
    at all (empty, only digits or punctuation) counts as 0, not as skipped."""
    from helpers.evaluation import chinese_share

    if not answers:
        return 0.0
    return sum(chinese_share(a) or 0.0 for a in answers) / len(answers)


@contextlib.contextmanager
def _no_grad_eval(model):
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def probe_logits(model, input_ids: list[list[int]]):
    """Logits of a few sequences (right padded with 0), as float32 on the CPU, for comparisons."""
    import torch

    width = max(map(len, input_ids))
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.tensor([x + [0] * (width - len(x)) for x in input_ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in input_ids], device=device)
    with _no_grad_eval(model):
        logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    return logits * mask.cpu()[..., None]


# --------------------------------------------------------------------------- the recipe as a function


def load_base(choice, settings: TrainSettings, *, for_training: bool = True):
    """The base model as lesson 05 loads it: 4/8-bit (``BitsAndBytesConfig``) on a GPU, fp32 on the
    CPU; ``for_training`` adds ``prepare_model_for_kbit_training`` on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.loading import pick_attn_implementation, pick_dtype, quantization_config

    gpu = torch.cuda.is_available()
    if not (gpu and settings.quantization):
        return AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32, device_map="auto" if gpu else None)
    dtype = pick_dtype("cuda")
    quant = quantization_config(settings.quantization, dtype, double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(
        choice.path, quantization_config=quant, dtype=dtype, device_map="auto",
        attn_implementation=pick_attn_implementation("cuda"),
    )
    if for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model


def lora_config(settings: TrainSettings):
    """The ``LoraConfig`` the notebook writes inline, from ``settings``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def training_arguments(settings: TrainSettings, checkpoint_dir: str | Path, *, max_steps: int | None = None,
                       progress: bool = True, eval_on_start: bool = True, **overrides):
    """The ``TrainingArguments`` the notebook writes inline, from ``settings``.

    ``overrides`` replace single arguments (the benchmark turns evaluation and saving off)."""
    import torch
    from transformers import TrainingArguments

    from helpers.loading import pick_dtype

    gpu = torch.cuda.is_available()
    amp = gpu and settings.quantization is not None  # QLoRA computes in fp16/bf16; fp32 loads need no AMP
    dtype = pick_dtype("cuda") if amp else torch.float32
    kwargs = dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=settings.num_train_epochs,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        train_sampling_strategy="group_by_length",
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        eval_on_start=eval_on_start,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        fp16=amp and dtype == torch.float16,
        bf16=amp and dtype == torch.bfloat16,
        activation_checkpointing=gpu and settings.gradient_checkpointing,
        dataloader_pin_memory=gpu,
        remove_unused_columns=False,
        report_to="none",
        seed=settings.seed,
        disable_tqdm=not progress,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)



@dataclass
class TrainOutcome:
    """What :func:`train_adapter` did."""

    adapter_dir: Path
    global_step: int
    log_history: list[dict]
    info: dict
    resumed_from: str | None


def train_adapter(choice=None, adapter_dir: str | Path | None = None, *, settings: TrainSettings | None = None,
                  train_file: str | Path = DATA_DIR / "train_sft.csv", dev_file: str | Path = DATA_DIR / "dev_sft.csv",
                  on_bad: str = "stop", overwrite: bool = False, max_steps: int | None = None,
                  limit_rows: int | None = None, callbacks: tuple = (), save: bool = True,
                  progress: bool = False, verbose: bool = True) -> TrainOutcome:
    """Run lesson 05's recipe end to end and save the adapter into ``adapter_dir``.

    The same steps as the notebook: validate both files (every bad row reported before anything
    is written), tokenize in the model's chat format, load the base (QLoRA on a GPU, fp32 on the
    CPU), wrap it with LoRA, train with the ``Trainer`` (answer-only labels, dynamic padding,
    length grouping, gradient accumulation, dev evaluation, checkpoints in
    :func:`checkpoint_dir_for`), and save the adapter with ``training_info.json``. If an earlier
    run of the same ``adapter_dir`` was interrupted, training resumes from its last checkpoint.

    ``max_steps`` / ``limit_rows`` shorten the run (tests); ``callbacks`` are passed to the
    Trainer; ``save=False`` stops after training (the adapter is not written).
    Introduced in notebooks/05_lora_finetune.ipynb.
    """
    from peft import get_peft_model
    from transformers import AutoTokenizer, Trainer, set_seed

    from helpers.config import resolve_model

    choice = choice or resolve_model(verbose=False)
    settings = settings or settings_for(choice)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else output_dir() / ADAPTER_DIR_NAME
    if save:
        check_output_dir(adapter_dir, overwrite=overwrite, what=("适配器", "adapter"))
    start = time.perf_counter()
    with torch_threads(settings.torch_threads):
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))
        train_rows = validate_sft_file(train_file, tokenizer, fmt=choice.chat_format, max_length=settings.max_length)
        dev_rows = validate_sft_file(dev_file, tokenizer, fmt=choice.chat_format, max_length=settings.max_length)
        train_ds, dev_ds = train_rows.dataset(on_bad=on_bad), dev_rows.dataset(on_bad=on_bad)
        model = load_base(choice, settings)
        if limit_rows is not None:
            train_ds = train_ds.select(range(min(limit_rows, len(train_ds))))
            dev_ds = dev_ds.select(range(min(limit_rows, len(dev_ds))))
        set_seed(settings.seed)
        model = get_peft_model(model, lora_config(settings))
        ckpt_dir = checkpoint_dir_for(adapter_dir)
        # Resume an interrupted run of this adapter (not a finished one that is being overwritten).
        resumed_from = None if adapter_dir.exists() else last_checkpoint(ckpt_dir)
        trainer = Trainer(
            model=model,
            args=training_arguments(settings, ckpt_dir, max_steps=max_steps, progress=progress,
                                    eval_on_start=resumed_from is None),
            train_dataset=train_ds,
            eval_dataset=dev_ds,
            data_collator=AnswerOnlyCollator(tokenizer.pad_token_id, tokenizer.eos_token_id),
            callbacks=list(callbacks),
        )
        if not progress:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        if verbose and resumed_from:
            print(f"从检查点继续训练 / resuming from {resumed_from}")
        trainer.train(resume_from_checkpoint=resumed_from)
    train_hist, dev_hist = loss_history(trainer.state.log_history)
    info = {
        "lesson": "notebooks/05_lora_finetune.ipynb",
        "base_model": choice.path,
        "model_name": choice.name,
        "chat_format": choice.chat_format,
        "settings": asdict(settings),
        "train_file": str(train_file),
        "dev_file": str(dev_file),
        "train_rows": len(train_ds),
        "dev_rows": len(dev_ds),
        "global_step": trainer.state.global_step,
        "dev_loss_first": dev_hist[0][1] if dev_hist else None,
        "dev_loss_last": dev_hist[-1][1] if dev_hist else None,
        "train_loss_last": train_hist[-1][1] if train_hist else None,
        "log_history": trainer.state.log_history,
        "resumed_from": resumed_from,
        "seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if save:
        save_adapter(model, adapter_dir, overwrite=overwrite, info=info)
        if verbose:
            print(f"LoRA 适配器已保存 / adapter saved: {adapter_dir}（{info['seconds']} 秒）")
    return TrainOutcome(adapter_dir, trainer.state.global_step, trainer.state.log_history, info, resumed_from)


def _adapter_base(adapter_dir: Path) -> str | None:
    cfg = adapter_dir / "adapter_config.json"
    return json.loads(cfg.read_text("utf-8")).get("base_model_name_or_path") if cfg.exists() else None


def ensure_adapter(choice=None, *, adapter_dir: str | Path | None = None) -> Path:
    """Lesson 05's LoRA adapter for ``choice``, trained now if it does not exist yet.

    Default location: ``output_dir() / "lora-adapter"``. An existing adapter is returned as it
    is, never retrained or overwritten (if it was trained on another base model a
    :class:`TutorialError` says so). A missing one is trained with :func:`settings_for` this
    device (the CPU-tiny settings on a CPU: about half a minute); a run that was interrupted
    resumes from its last checkpoint. Used by notebooks/06_evaluation.ipynb; introduced in
    notebooks/05_lora_finetune.ipynb.
    """
    from filelock import FileLock

    from helpers.config import resolve_model

    choice = choice or resolve_model(verbose=False)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else output_dir() / ADAPTER_DIR_NAME
    # The lock lives in the temp folder, so nothing but the adapter appears in the learner's outputs.
    key = hashlib.sha1(str(adapter_dir.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"llama-tutorial-adapter-{key}.lock")):
        if adapter_dir.exists():
            base = _adapter_base(adapter_dir)
            if base is None:
                raise TutorialError(
                    bilingual(
                        f"{adapter_dir} 已存在，但里面没有 adapter_config.json，不是 LoRA 适配器。它不会被改动："
                        "请移走它，或者用 adapter_dir= 指定另一个目录。",
                        f"{adapter_dir} exists but holds no adapter_config.json, so it is not a LoRA adapter. It is "
                        "left untouched: move it away or pass another adapter_dir=.",
                    )
                )
            same_model = not choice.is_tiny and read_training_info(adapter_dir).get("model_name") == choice.name
            if base != choice.path and not same_model:
                raise TutorialError(
                    bilingual(
                        f"{adapter_dir} 里的适配器是在 {base} 上训练的，而当前模型是 {choice.path}。"
                        "适配器只能配合训练它的基座模型使用。它不会被覆盖：请用 adapter_dir= 指定另一个目录（会在那里训练一个新的）。",
                        f"The adapter in {adapter_dir} was trained on {base}, but the current model is {choice.path}. "
                        "An adapter only fits the base it was trained on. It is not overwritten: pass another "
                        "adapter_dir= (a new adapter is trained there).",
                    )
                )
            return adapter_dir
        print(f"还没有第 05 课的 LoRA 适配器，现在训练一个 / training lesson 05's adapter into {adapter_dir}")
        train_adapter(choice, adapter_dir, verbose=True)
    return adapter_dir


def load_with_adapter(choice, adapter_dir: str | Path):
    """Base model + LoRA adapter (a ``PeftModel`` in eval mode) and its tokenizer, ready to generate.

    The base is loaded as lesson 05 trained it (4-bit on a GPU, fp32 on the CPU); the tokenizer
    pads with ``<unk>``. Introduced in notebooks/05_lora_finetune.ipynb; used by lesson 06.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise TutorialError(
            bilingual(
                f"{adapter_dir} 里没有 adapter_config.json：先运行第 05 课，或调用 ensure_adapter()。",
                f"{adapter_dir} holds no adapter_config.json: run lesson 05 first, or call ensure_adapter().",
            )
        )
    base = load_base(choice, settings_for(choice), for_training=False)
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, prepare_tokenizer(tokenizer)


__all__ = [
    "SETTINGS", "TrainSettings", "settings_for", "torch_threads", "BadRowsError", "OutputExistsError",
    "check_output_dir", "next_free_dir", "checkpoint_dir_for", "BadRow", "SFTRows", "read_table",
    "validate_sft_file", "AnswerOnlyCollator", "StopAfterSteps", "last_checkpoint",
    "loss_history", "plot_loss_curves", "save_adapter", "save_merged", "read_training_info",
    "prepare_tokenizer", "answer_questions", "mean_chinese_share", "probe_logits",
    "load_base", "lora_config", "training_arguments", "TrainOutcome", "train_adapter",
    "ensure_adapter", "load_with_adapter",
]

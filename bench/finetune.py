"""Lesson 05's training recipe against the anchor project's, on the same rows: useful tokens/s and memory.

    python -m bench.finetune [--examples 128] [--anchor-pad-to N] [--json build/bench_finetune.json]

Both runs train the same LoRA (``helpers.finetune.settings_for`` this device: the tiny model on a
CPU) on the same first ``--examples`` rows of data/train_sft.csv, one epoch, same batch size,
gradient accumulation, learning rate and threads. Only the data handling differs:

* **this recipe** (notebooks/05_lora_finetune.ipynb): rows re-encoded in the model's chat format
  by ``helpers.prompts.encode`` (one BOS, labels only on the answer and its EOS), dynamic padding
  by ``AnswerOnlyCollator`` and ``train_sampling_strategy="group_by_length"``;
* **the anchor's recipe**: the CSV text tokenized as it is (``<s>`` in the text + the BOS the
  tokenizer adds = two BOS), every row padded to a fixed length (``--anchor-pad-to``, default the
  settings' ``max_length``; the anchor used 2048), ``pad_token = eos_token`` with
  ``DataCollatorForLanguageModeling`` (all tokens labelled, prompt included; pad and EOS masked),
  random order.

"Useful answer tokens" are the answer tokens (with their EOS) of the rows trained on: the same
number for both runs, so their ratio of useful tokens per second is the ratio of training times.
Peak memory: each recipe runs in its own subprocess; on the CPU we report the growth of the peak
resident set size (``resource.getrusage``) over the RSS before training (``tracemalloc`` cannot
see torch's tensor memory), on a GPU ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("ours", "anchor")
LABELS = {
    "ours": "this recipe (answer-only labels, dynamic padding, length grouping)",
    "anchor": "anchor (pad to fixed length, all tokens labelled, double BOS)",
}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Counting:
    """Wrap a collator and count what the model is fed."""

    def __init__(self, collator):
        self.collator = collator
        self.input_tokens = 0
        self.real_tokens = 0
        self.labelled_tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.input_tokens += batch["input_ids"].numel()
        self.real_tokens += int(batch["attention_mask"].sum())
        self.labelled_tokens += int((batch["labels"] != -100).sum())
        return batch


def run_worker(recipe: str, examples: int, pad_to: int | None) -> dict:
    """Train one recipe for one epoch over ``examples`` rows; return the measurements."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, set_seed

    from helpers.config import DATA_DIR, resolve_model
    from helpers.finetune import (
        AnswerOnlyCollator, load_base, lora_config, prepare_tokenizer, read_table, settings_for, torch_threads,
        training_arguments, validate_sft_file,
    )

    choice = resolve_model(verbose=False)
    settings = settings_for(choice)
    pad_to = pad_to or settings.max_length
    gpu = torch.cuda.is_available()
    with torch_threads(settings.torch_threads):
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))
        rows = validate_sft_file(DATA_DIR / "train_sft.csv", tokenizer, fmt=choice.chat_format,
                                 max_length=settings.max_length)
        if not rows.ok:
            raise SystemExit(rows.error())
        n = min(examples, len(rows.rows))
        useful = sum(sum(1 for x in lab if x != -100) for lab in rows.labels[:n])
        if recipe == "ours":
            dataset = rows.dataset().select(range(n))
            collator = _Counting(AnswerOnlyCollator(tokenizer.pad_token_id, tokenizer.eos_token_id))
            sampling = "group_by_length"
        else:
            from datasets import Dataset

            records, _ = read_table(DATA_DIR / "train_sft.csv")
            texts = [r["text"] for r in records[:n]]
            tokenizer.pad_token = tokenizer.eos_token  # what the anchor does
            tokenizer.padding_side = "right"
            enc = tokenizer(texts, padding="max_length", max_length=pad_to, truncation=True)
            dataset = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
            collator = _Counting(DataCollatorForLanguageModeling(tokenizer, mlm=False))
            sampling = "random"
            double_bos = sum(1 for ids in enc["input_ids"] if ids[:2] == [tokenizer.bos_token_id] * 2)
        model = load_base(choice, settings)
        set_seed(settings.seed)
        model = get_peft_model(model, lora_config(settings))
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
            args = training_arguments(
                settings, tmp, progress=False, num_train_epochs=1, train_sampling_strategy=sampling,
                eval_strategy="no", save_strategy="no", logging_strategy="no", eval_on_start=False,
            )
            trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                mem_before = torch.cuda.memory_allocated() / 1024**2
            rss_before = _rss_mb()
            start = time.perf_counter()
            trainer.train()
            if gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if gpu:
            peak = torch.cuda.max_memory_allocated() / 1024**2
            memory = {"memory_kind": "torch.cuda.max_memory_allocated", "peak_mb": peak, "peak_growth_mb": peak - mem_before}
        else:
            peak = _peak_rss_mb()
            memory = {"memory_kind": "peak RSS (resource.getrusage)", "peak_mb": peak, "peak_growth_mb": peak - rss_before}
    return {
        "recipe": recipe,
        "label": LABELS[recipe],
        "model": choice.name,
        "settings": settings.name,
        "device": "cuda" if gpu else "cpu",
        "examples": n,
        "optimizer_steps": trainer.state.global_step,
        "pad_to": pad_to if recipe == "anchor" else None,
        "double_bos_rows": double_bos if recipe == "anchor" else 0,
        "seconds": seconds,
        "useful_answer_tokens": useful,
        "input_tokens": collator.input_tokens,
        "real_tokens": collator.real_tokens,
        "labelled_tokens": collator.labelled_tokens,
        "useful_tokens_per_s": useful / seconds,
        "input_tokens_per_s": collator.input_tokens / seconds,
        **memory,
    }


def _worker(recipe: str, examples: int, pad_to: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.finetune", "--worker", recipe, "--examples", str(examples)]
    if pad_to:
        cmd += ["--anchor-pad-to", str(pad_to)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"bench worker {recipe!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


ROWS = [  # (label, key, format, ratio: anchor value / ours, or ours / anchor for a rate)
    ("seconds (training)", "seconds", "{:.2f}", "anchor/ours"),
    ("useful answer tokens", "useful_answer_tokens", "{:,.0f}", None),
    ("useful answer tokens / s", "useful_tokens_per_s", "{:,.0f}", "ours/anchor"),
    ("tokens fed to the model (with padding)", "input_tokens", "{:,.0f}", "anchor/ours"),
    ("real tokens (no padding)", "real_tokens", "{:,.0f}", None),
    ("labelled tokens", "labelled_tokens", "{:,.0f}", None),
    ("rows starting with two BOS", "double_bos_rows", "{:,.0f}", None),
    ("peak memory growth during training, MB", "peak_growth_mb", "{:,.1f}", "anchor/ours"),
    ("peak memory, MB", "peak_mb", "{:,.1f}", None),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="rows of train_sft.csv to train on (every recipe)")
    parser.add_argument("--anchor-pad-to", type=int, default=2048,
                        help="the anchor's fixed length (2048 in the anchor project); the anchor is also run padded "
                             "to the settings' max_length, the smallest fixed length that fits every row")
    parser.add_argument("--json", type=Path, default=Path("build/bench_finetune.json"))
    parser.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args.examples, args.anchor_pad_to)))
        return {}

    from helpers.config import resolve_model
    from helpers.finetune import settings_for

    max_length = settings_for(resolve_model(verbose=False)).max_length
    # Each run in a fresh process, so its peak memory is its own.
    ours = _worker("ours", args.examples, None)
    anchors = [_worker("anchor", args.examples, n) for n in dict.fromkeys([args.anchor_pad_to, max_length])]
    names = ["this recipe"] + [f"anchor @{a['pad_to']}" for a in anchors]
    print(f"model {ours['model']} ({ours['settings']}, {ours['device']}); {ours['examples']} rows of train_sft.csv, "
          f"one epoch, {ours['optimizer_steps']} optimizer steps each; memory = {ours['memory_kind']}")
    print(f"{'':40s}" + "".join(f"{n:>16s}" for n in names) + "".join(f"{'ratio @' + str(a['pad_to']):>14s}" for a in anchors))
    for label, key, fmt, how in ROWS:
        values = [ours[key]] + [a[key] for a in anchors]
        ratios = []
        for a in anchors:
            if how is None or not ours[key] or not a[key]:
                ratios.append("")
            else:
                ratios.append(f"{(a[key] / ours[key] if how == 'anchor/ours' else ours[key] / a[key]):.2f}x")
        print(f"{label:40s}" + "".join(f"{fmt.format(v):>16s}" for v in values) + "".join(f"{r:>14s}" for r in ratios))
    report = {"ours": ours, "anchors": anchors, "target_ratio": 3.0, "ratios": {}}
    for a in anchors:
        ratio = ours["useful_tokens_per_s"] / a["useful_tokens_per_s"]
        report["ratios"][f"useful_tokens_per_s@{a['pad_to']}"] = ratio
        report["ratios"][f"peak_growth_anchor_over_ours@{a['pad_to']}"] = (
            a["peak_growth_mb"] / ours["peak_growth_mb"] if ours["peak_growth_mb"] > 0 else None)
        print(f"useful answer tokens per second, this recipe / anchor padded to {a['pad_to']}: {ratio:.2f}x (target >= 3x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()

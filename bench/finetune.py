"""Three LoRA recipes on the same rows: the anchor's, TRL's SFTTrainer and lesson 05's.

    python -m bench.finetune [--examples 128] [--repeats 3] [--json build/bench_finetune.json]

Every run trains the same LoRA (``helpers.finetune.settings_for`` this device: the tiny model on a
CPU) on the same first ``--examples`` rows of data/train_sft.csv, one epoch, same batch size,
gradient accumulation, learning rate and threads. Only the data handling differs:

* **anchor**: the recipe of the anchor project's LoRA script, LlamaFamily/Llama-Chinese (formerly
  FlagAlpha/Llama2-Chinese) ``train/sft/finetune_clm_lora.py``: the CSV text tokenized as it is
  (``<s>`` in the text + the BOS the tokenizer adds = two BOS), ``padding=False`` and
  ``labels = input_ids`` (for a one-column CSV nothing is masked), ``padding_side="left"``,
  ``pad_token = eos_token``, per-batch padding by ``DataCollatorForSeq2Seq(tokenizer,
  pad_to_multiple_of=8, padding=True)``, random order. (It does not pad to 2048: that is only its
  ``block_size`` cap.)
* **trl**: TRL's ``SFTTrainer`` as a learner would use it today: prompt/completion conversational
  rows, ``completion_only_loss=True``, the tokenizer's chat template, dynamic padding with
  ``train_sampling_strategy="group_by_length"``. That is its most efficient padding setting that
  runs on a CPU: ``padding_free`` needs an attention that reads ``cu_seq_lens`` (flash, or flex,
  which has no CPU backward), and packing with SDPA and no padding-free collator lets examples
  attend to each other.
* **ours** (notebooks/05_lora_finetune.ipynb): rows re-encoded by ``helpers.prompts.encode`` (one
  BOS, labels on the answer and its EOS), ``DataCollatorForSeq2Seq(label_pad_token_id=-100,
  pad_to_multiple_of=8)``, ``train_sampling_strategy="group_by_length"``.

"Useful answer tokens" are the answer tokens (with their EOS) of the rows trained on: the same
number for every recipe, so the ratio of useful tokens per second is the ratio of training times.
Each run is a fresh subprocess; the recipes alternate (``--repeats`` rounds) and the table shows
medians of wall time, and of process CPU time (with one torch thread, CPU time is the work done,
and less sensitive than wall time to other programs on a shared machine). Peak memory on the CPU: growth of the peak resident set size over the RSS
before training; on a GPU ``torch.cuda.max_memory_allocated``. The mask check compares TRL's
labels (from its completion mask) with lesson 05's labels row by row (the boundary tests in tests/test_finetune.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("anchor", "trl", "ours")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


class _Counting:
    """Wrap a collator and count the tokens the model is fed."""

    def __init__(self, collator):
        self.collator, self.input_tokens, self.labelled_tokens = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.input_tokens += batch["input_ids"].numel()
        self.labelled_tokens += int((batch["labels"] != -100).sum())
        return batch


def run_worker(recipe: str, examples: int) -> dict:
    """Train one recipe for one epoch over ``examples`` rows; return the measurements."""
    import resource

    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    from helpers.config import DATA_DIR
    from helpers.models import resolve_model
    from helpers.finetune import load_base, lora_config, prepare_tokenizer, settings_for, training_arguments
    from helpers.training_data import read_table, validate_sft_file

    choice = resolve_model(verbose=False)
    s = settings_for(choice)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    gpu = torch.cuda.is_available()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))
    rows = validate_sft_file(DATA_DIR / "train_sft.csv", tokenizer, chat_format=choice.chat_format, max_length=s.max_length)
    n = min(examples, len(rows.rows))
    useful = sum(x != -100 for lab in rows.labels[:n] for x in lab)
    no_eval = dict(num_train_epochs=1, eval_strategy="no", save_strategy="no", logging_strategy="no", eval_on_start=False)
    model = load_base(choice, s)
    set_seed(s.seed)
    extra, tmp = {}, tempfile.mkdtemp(prefix="bench-finetune-")
    if recipe == "trl":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in rows.conversations[:n]])
        args = training_arguments(s, tmp, args_class=SFTConfig, completion_only_loss=True, max_length=None,
                                  dataset_num_proc=None, **no_eval)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora_config(s))
        got = trainer.train_dataset
        exact = sum(ids == our_ids and labels == our_labels for ids, labels, our_ids, our_labels
                    in zip(got["input_ids"], got["labels"], rows.input_ids, rows.labels))
        extra = {"rows_with_exact_mask": exact, "unpadded_tokens": sum(map(len, got["input_ids"]))}
        trainer.data_collator = collator = _Counting(trainer.data_collator)
    else:
        model = get_peft_model(model, lora_config(s))
        if recipe == "ours":
            data = rows.dataset().select(range(n))
            collator = _Counting(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8))
            sampling = "group_by_length"
            extra = {"unpadded_tokens": sum(map(len, rows.input_ids[:n]))}
        else:
            anchor_tok = AutoTokenizer.from_pretrained(choice.path, padding_side="left")
            anchor_tok.pad_token = anchor_tok.eos_token
            texts = [r["text"] for r in read_table(DATA_DIR / "train_sft.csv")[0]][:n]
            enc = anchor_tok(texts, truncation=True, max_length=2048, padding=False)
            data = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                      "labels": [list(x) for x in enc["input_ids"]]}).shuffle(seed=s.seed)
            collator = _Counting(DataCollatorForSeq2Seq(anchor_tok, pad_to_multiple_of=8, padding=True))
            sampling = "random"
            extra = {"double_bos_rows": sum(ids[:2] == [anchor_tok.bos_token_id] * 2 for ids in enc["input_ids"]),
                     "unpadded_tokens": sum(map(len, enc["input_ids"]))}
        args = training_arguments(s, tmp, train_sampling_strategy=sampling, **no_eval)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if gpu else _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    if gpu:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"recipe": recipe, "model": choice.name, "settings": s.name, "device": "cuda" if gpu else "cpu",
            "examples": n, "optimizer_steps": trainer.state.global_step, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "useful_answer_tokens": useful, "useful_tokens_per_s": useful / seconds,
            "input_tokens": collator.input_tokens, "labelled_tokens": collator.labelled_tokens,
            "peak_mb": peak, "peak_growth_mb": peak - before, **extra}


def _worker(recipe: str, examples: int) -> dict:
    cmd = [sys.executable, "-m", "bench.finetune", "--worker", recipe, "--examples", str(examples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"bench worker {recipe!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


ROWS = [("training wall time, s (median)", "seconds", "{:.2f}"),
        ("useful answer tokens / s", "useful_tokens_per_s", "{:,.0f}"),
        ("process CPU time, s (median)", "cpu_seconds", "{:.2f}"),
        ("useful answer tokens / CPU-second", "useful_tokens_per_cpu_s", "{:,.0f}"),
        ("useful answer tokens", "useful_answer_tokens", "{:,.0f}"),
        ("tokens fed to the model (with padding)", "input_tokens", "{:,.0f}"),
        ("tokens of the rows, without padding", "unpadded_tokens", "{:,.0f}"),
        ("labelled tokens", "labelled_tokens", "{:,.0f}"),
        ("peak memory growth, MB (median)", "peak_growth_mb", "{:,.1f}"),
        ("peak memory, MB (median)", "peak_mb", "{:,.1f}")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=128, help="rows of train_sft.csv to train on (every recipe)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the table shows medians")
    parser.add_argument("--json", type=Path, default=Path("build/bench_finetune.json"))
    parser.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args.examples)))
        return {}
    wall = time.perf_counter()
    runs = {r: [] for r in RECIPES}
    for _ in range(args.repeats):
        for recipe in RECIPES:  # alternate, so a noisy minute hits every recipe
            runs[recipe].append(_worker(recipe, args.examples))
    med = {}
    for recipe, rs in runs.items():
        med[recipe] = dict(rs[0])
        for key in ("seconds", "cpu_seconds", "peak_mb", "peak_growth_mb"):
            med[recipe][key] = statistics.median(r[key] for r in rs)
        med[recipe]["useful_tokens_per_s"] = med[recipe]["useful_answer_tokens"] / med[recipe]["seconds"]
        med[recipe]["useful_tokens_per_cpu_s"] = med[recipe]["useful_answer_tokens"] / med[recipe]["cpu_seconds"]
    a = med["anchor"]
    print(f"model {a['model']} ({a['settings']}, {a['device']}); {a['examples']} rows of train_sft.csv, one epoch, "
          f"{a['optimizer_steps']} optimizer steps each; median of {args.repeats} alternating runs")
    print(f"{'':42s}{'anchor':>12s}{'SFTTrainer':>12s}{'lesson 05':>12s}")
    for label, key, fmt in ROWS:
        print(f"{label:42s}" + "".join(f"{fmt.format(med[r][key]):>12s}" for r in RECIPES))
    print(f"{'rows starting with two BOS':42s}{a['double_bos_rows']:>12d}{0:>12d}{0:>12d}")
    print(f"TRL rows whose tokens and labels equal lesson 05's labels: {med['trl']['rows_with_exact_mask']} of {a['examples']}")
    ratios = {f"{key}:ours/{r}": med["ours"][key] / med[r][key]
              for key in ("useful_tokens_per_s", "useful_tokens_per_cpu_s") for r in ("anchor", "trl")}
    for key, what in (("useful_tokens_per_s", "wall"), ("useful_tokens_per_cpu_s", "CPU")):
        print(f"useful answer tokens per {what} second, lesson 05 / anchor: {ratios[key + ':ours/anchor']:.2f}x "
              f"(target >= 1.5x); lesson 05 / SFTTrainer: {ratios[key + ':ours/trl']:.2f}x (target >= 1.0x)")
    # Same model, so the work per token is the same: padding alone can gain at most the anchor's tokens fed
    # over lesson 05's rows without any padding (attention's quadratic part aside).
    print(f"most that less padding can gain over the anchor here: {a['input_tokens']:,} / "
          f"{med['ours']['unpadded_tokens']:,} tokens = {a['input_tokens'] / med['ours']['unpadded_tokens']:.2f}x")
    print(f"bench wall time: {time.perf_counter() - wall:.0f} s")
    report = {"medians": med, "runs": runs, "ratios": ratios}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()

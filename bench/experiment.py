"""The article's experiment on the course's CPU model, end to end, with the course's own code.

    python -m bench.experiment [--model smollm2-135m] [--max-new-tokens 48] [--json build/bench_experiment.json]

1. Lesson 05's adapter is trained with :func:`helpers.finetune.train_adapter` and the model's own
   settings (``settings_for``) into a temporary folder; the wall time is the training's.
2. The 95 questions of data/eval_questions.json are answered by the base model (PEFT's
   ``disable_adapter``) and by base + LoRA, as lesson 06 does, in two prompt layouts: the model's own
   chat template (no system prompt, as lesson 05 trained it) and the article's layout with the
   article's system prompt. Decoding is lesson 06's: the article's sampling settings, seed 42.
3. The answers are scored with lesson 06's own functions (``score_answers``, ``summarize``, read from
   the notebook): the Chinese-answer rate with the echo rule (an answer that only repeats the question
   and goes on in English is not Chinese) and without it, per category.

Prints each run's table and the times; ``--json`` keeps every answer and figure. The figures are
measured on the machine that runs it: on 2 busy cores they are slower, never different in kind.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def lesson06_scoring() -> dict:
    """answer_language, rouge_l, bleu, score_answers, summarize and their constants, from lesson 06's cells."""
    from tests.lesson_code import lesson_definitions

    import pandas as pd

    namespace = lesson_definitions("06_evaluation.ipynb", "answer_language", "rouge_bleu", "score_answers")
    namespace["pd"] = pd  # the lesson imports pandas in its first cell; the functions read it from their globals
    return namespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--adapter", type=Path, help="an adapter lesson 05 saved (skips the training)")
    parser.add_argument("--json", type=Path, default=Path("build/bench_experiment.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import pandas as pd
    import torch

    from helpers.models import resolve_model
    from helpers.evaluation import generate_answers, load_questions
    from helpers.finetune import load_with_adapter, settings_for, train_adapter
    from helpers.prompts import SYSTEM_PROMPT_ARTICLE

    L = lesson06_scoring()
    choice = resolve_model(args.model)
    settings = settings_for(choice)
    work = Path(tempfile.mkdtemp(prefix="bench-experiment-"))
    report: dict = {"model": choice.name, "settings": settings.name, "threads": torch.get_num_threads(), "runs": {}}
    if args.adapter:
        adapter = args.adapter
    else:
        start = time.perf_counter()
        trainer = train_adapter(choice, work / "lora-adapter", settings=settings)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        report["train"] = {k: trainer.info[k] for k in ("global_step", "train_rows", "dev_loss_first", "dev_loss_last")}
        adapter = trainer.adapter_dir
        del trainer
    print(f"{choice.name}, settings {settings.name}: adapter {adapter}", report.get("train_seconds", ""), "s")

    model, tokenizer = load_with_adapter(choice, adapter)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.unk_token
    questions = load_questions()
    decoding = {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.3, "repetition_penalty": 1.3,
                "max_new_tokens": args.max_new_tokens}  # lesson 06's ARTICLE_SAMPLING
    layouts = {"own template": (choice.chat_format, None), "article layout": ("article", SYSTEM_PROMPT_ARTICLE)}
    tables = {}
    for layout_name, (chat_format, system_prompt) in layouts.items():
        for run in ("base", "base + LoRA"):
            settings_run = {"model": choice.path, "chat_format": chat_format, "system_prompt": system_prompt, "generate": decoding,
                            "seed": 42, "adapter": None if run == "base" else str(adapter)}
            path = work / f"answers-{run.replace(' ', '')}-{chat_format}.jsonl"
            start = time.perf_counter()
            if run == "base":
                with model.disable_adapter():
                    records = generate_answers(model, tokenizer, questions, path, settings_run,
                                               batch_size=args.batch_size, progress=False)
            else:
                records = generate_answers(model, tokenizer, questions, path, settings_run,
                                           batch_size=args.batch_size, progress=False)
            seconds = round(time.perf_counter() - start, 1)
            scored = L["score_answers"](records, questions)
            summary = L["summarize"](scored)
            key = f"{layout_name} · {run}"
            tables[key] = summary
            counted = scored[scored["counted"]]
            report["runs"][key] = {
                "seconds": seconds, "counted": int(len(counted)),
                "zh": int((counted["language"] == "zh").sum()), "mixed": int((counted["language"] == "mixed").sum()),
                "en": int((counted["language"] == "en").sum()), "none": int((counted["language"] == "none").sum()),
                "zh_counting_echo": int((counted["language_with_echo"] == "zh").sum()),
                "echo": int(counted["echo"].sum()),
                "per_category": summary.round(4).to_dict(orient="index"),
                "answers": [{"qid": r["qid"], "answer": r["answer"]} for r in records]}
            r = report["runs"][key]
            print(f"{key:32s} {seconds:6.1f} s  Chinese {r['zh']}/{r['counted']} (echo rule), "
                  f"{r['zh_counting_echo']}/{r['counted']} counting echoes as Chinese; "
                  f"mixed {r['mixed']}, English {r['en']}, none {r['none']}; echoes {r['echo']}", flush=True)
    columns = [L["COL_ZH"], L["COL_ZH_ECHO"], L["COL_MIXED"], L["COL_EN"], L["COL_ECHO"]]
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(pd.concat({k: t[columns] for k, t in tables.items()}, axis=1).round(2).T)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    print("written:", args.json)


if __name__ == "__main__":
    main()

"""Batched generation (lesson 06) against the one-question-at-a-time loop the article implies.

    python -m bench.evaluation [--batch-size 8] [--max-new-tokens 48] [--repetition-penalty 1.2]
                               [--no-repeat-ngram-size 8] [--repeats 3] [--json build/bench_evaluation.json]

Same model (the tiny model on the CPU unless LLAMA_TUTORIAL_MODEL says otherwise), same 95
questions, same prompts (helpers.prompts with the article's system prompt), same greedy settings
as lesson 06 on the CPU (48 new tokens, ``repetition_penalty=1.2``, ``no_repeat_ngram_size=8``;
pass 1.0 / 0 to drop these guards).

Each mode runs ``--repeats`` times, alternating, and the fastest run of each counts. torch keeps
its default number of threads (as in the notebook; ``--threads N`` sets it). A shared machine
stretches wall-clock time unevenly, so the speed-up is judged on the process's CPU time (the
work each mode needs); the wall-clock ratio is printed beside it. Batching wins twice on a CPU:
fewer generation steps, and wider matrix products that use the threads better, so with
``--threads 1`` the ratio is lower.

Targets (issue 8): batched throughput at least 3x the loop at batch 8, and the same greedy answer
for at least 95% of the questions; questions whose answers differ are listed (left padding
changes the arithmetic slightly, so a near-tie between two tokens can flip).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SPEEDUP_TARGET = 3.0
SAME_ANSWER_TARGET = 0.95


def _run(model, tokenizer, prompts: list[list[int]], batch_size: int, generation: dict) -> tuple[float, float, list[dict]]:
    from helpers.evaluation import generate_batch

    start, cpu = time.perf_counter(), time.process_time()
    results = []
    for i in range(0, len(prompts), batch_size):
        results += generate_batch(model, tokenizer, prompts[i : i + batch_size], **generation)
    return time.perf_counter() - start, time.process_time() - cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=Path("build/bench_evaluation.json"))
    args = parser.parse_args()

    os.environ.setdefault("LLAMA_TUTORIAL_MODEL", "tiny")
    import torch

    from helpers.config import resolve_model
    from helpers.evaluation import load_questions, question_messages, use_left_padding
    from helpers.loading import load_model_and_tokenizer
    from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    choice = resolve_model(verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    use_left_padding(tokenizer)
    questions = load_questions()
    prompts = [
        encode_prompt(tokenizer, question_messages(q["question"], SYSTEM_PROMPT_ARTICLE), choice.chat_format)
        for q in questions
    ]
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.repetition_penalty != 1.0:
        generation["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size:
        generation["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    _run(model, tokenizer, prompts[: args.batch_size], args.batch_size, {**generation, "max_new_tokens": 8})  # warm-up

    times = {"loop": [], "batched": []}
    cpu = {"loop": [], "batched": []}
    results = {}
    for _ in range(args.repeats):
        for mode, size in (("loop", 1), ("batched", args.batch_size)):
            seconds, cpu_seconds, res = _run(model, tokenizer, prompts, size, generation)
            times[mode].append(seconds)
            cpu[mode].append(cpu_seconds)
            results[mode] = res

    loop_s, batched_s = min(times["loop"]), min(times["batched"])
    loop_cpu, batched_cpu = min(cpu["loop"]), min(cpu["batched"])
    loop_tokens = sum(r["new_tokens"] for r in results["loop"])
    batched_tokens = sum(r["new_tokens"] for r in results["batched"])
    speedup = loop_cpu / batched_cpu
    wall_speedup = loop_s / batched_s
    differ = [
        {"qid": q["qid"], "loop": a["answer"], "batched": b["answer"]}
        for q, a, b in zip(questions, results["loop"], results["batched"])
        if a["answer"] != b["answer"]
    ]
    same = 1 - len(differ) / len(questions)

    print(f"model {choice.name}, {len(questions)} questions, greedy {generation}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'mode':16s} {'CPU s':>7s} {'wall s':>7s} {'questions/CPU s':>16s} {'new tokens/CPU s':>17s}")
    for mode, c, w, tokens in (("one at a time", loop_cpu, loop_s, loop_tokens),
                               (f"batch {args.batch_size}", batched_cpu, batched_s, batched_tokens)):
        print(f"{mode:16s} {c:7.2f} {w:7.2f} {len(questions) / c:16.2f} {tokens / c:17.1f}")
    print(f"speed-up (CPU time): {speedup:.2f}x (target >= {SPEEDUP_TARGET:.0f}x) -> "
          f"{'OK' if speedup >= SPEEDUP_TARGET else 'BELOW TARGET'}; wall-clock ratio {wall_speedup:.2f}x")
    print(f"identical greedy answers: {len(questions) - len(differ)}/{len(questions)} = {same:.1%} "
          f"(target >= {SAME_ANSWER_TARGET:.0%}) -> {'OK' if same >= SAME_ANSWER_TARGET else 'BELOW TARGET'}")
    for d in differ:
        print(f"  qid {d['qid']}: loop {d['loop'][:60]!r}\n  {'':{len(str(d['qid'])) + 5}s}batch {d['batched'][:60]!r}")

    report = {
        "model": choice.name,
        "questions": len(questions),
        "batch_size": args.batch_size,
        "generation": generation,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "loop_wall_seconds": [round(t, 3) for t in times["loop"]],
        "batched_wall_seconds": [round(t, 3) for t in times["batched"]],
        "loop_cpu_seconds": [round(t, 3) for t in cpu["loop"]],
        "batched_cpu_seconds": [round(t, 3) for t in cpu["batched"]],
        "wall_speedup": round(wall_speedup, 2),
        "loop_new_tokens": loop_tokens,
        "batched_new_tokens": batched_tokens,
        "speedup": round(speedup, 2),
        "speedup_target": SPEEDUP_TARGET,
        "same_answer_share": round(same, 4),
        "same_answer_target": SAME_ANSWER_TARGET,
        "differing": differ,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()

"""Batched generation (lesson 06) against one question at a time, as the article's loop did.

    python -m bench.evaluation [--batch-size 8] [--max-new-tokens 32] [--chat-format article] [--repeats 3]
                               [--json build/bench_evaluation.json]

Same model (the tiny model on the CPU unless LLAMA_TUTORIAL_MODEL says otherwise), the same 95
questions, the same prompts (the article's layout and system prompt by default; ``--chat-format llama2``
for the standard template), greedy decoding with the article's ``repetition_penalty=1.3``. Both
modes go through :func:`helpers.evaluation.generate_answers` (batch size 1 and ``--batch-size``)
into fresh temporary files.

The modes alternate ``--repeats`` times; the figure is the median wall time of each mode and
their ratio, measured in one process. ``OMP_WAIT_POLICY=PASSIVE`` is set before torch starts, so
idle OpenMP threads do not spin on a shared machine (bench/_batch.py: the set-up bench/serve.py
shares). The batched answers are compared with the one-at-a-time answers question by question (left
padding can flip a near-tie between two tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench._batch import lesson06_batch_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat-format", default="article", help='"article" or another chat format such as "llama2"')
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("build/bench_evaluation.json"))
    args = parser.parse_args()

    choice, model, tokenizer, questions = lesson06_batch_setup()
    import torch

    from helpers.evaluation import generate_answers
    from helpers.prompts import SYSTEM_PROMPT_ARTICLE

    settings = {"model": choice.path, "chat_format": args.chat_format, "system_prompt": SYSTEM_PROMPT_ARTICLE,
                "generate": {"do_sample": False, "repetition_penalty": 1.3, "max_new_tokens": args.max_new_tokens}}

    def run(batch_size: int) -> tuple[float, list[dict]]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            records = generate_answers(model, tokenizer, questions, Path(tmp) / "a.jsonl", settings,
                                       batch_size=batch_size, progress=False)
            return time.perf_counter() - start, records

    generate_answers(model, tokenizer, questions[:4], Path(tempfile.mkdtemp()) / "warm.jsonl", settings, progress=False)
    times: dict[str, list[float]] = {"one at a time": [], f"batch {args.batch_size}": []}
    results = {}
    for _ in range(args.repeats):
        for mode, size in (("one at a time", 1), (f"batch {args.batch_size}", args.batch_size)):
            seconds, results[mode] = run(size)
            times[mode].append(seconds)
    loop, batched = (statistics.median(t) for t in times.values())
    differ = [{"qid": q["qid"], "loop": a["answer"], "batched": b["answer"]}
              for q, a, b in zip(questions, *results.values()) if a["answer"] != b["answer"]]

    print(f"model {choice.name}, {len(questions)} questions, chat format {args.chat_format}, greedy {settings['generate']}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} alternating runs (wall time)")
    for mode, median in zip(times, (loop, batched)):
        tokens = sum(r["new_tokens"] for r in results[mode])
        print(f"  {mode:14s} {median:7.2f} s  {len(questions) / median:6.1f} questions/s  {tokens / median:7.1f} new tokens/s")
    print(f"speed-up of batching: {loop / batched:.2f}x; identical answers: {len(questions) - len(differ)}/{len(questions)}")
    for d in differ:
        print(f"  qid {d['qid']}: one at a time {d['loop'][:50]!r}\n  {'':{len(str(d['qid'])) + 5}s}batched      {d['batched'][:50]!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": choice.name, "questions": len(questions), "chat_format": args.chat_format, "batch_size": args.batch_size,
            "generate": settings["generate"], "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
            "wall_seconds": {m: [round(t, 3) for t in ts] for m, ts in times.items()},
            "speedup": round(loop / batched, 2), "same_answers": len(questions) - len(differ), "differing": differ,
        }, ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()

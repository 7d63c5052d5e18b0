"""Lesson 07: the 95 evaluation questions through the vLLM server against lesson 06's generate.

    python -m bench.serve [--max-new-tokens 48] [--repeats 3] [--concurrency 1 8 32]
                          [--json build/bench_serve.json]

Same model (the tiny model on the CPU unless LLAMA_TUTORIAL_MODEL says otherwise), same 95
questions, same prompts (token ids from helpers.prompts.encode with the article's system
prompt, sent to /v1/completions as ids), same greedy settings as lesson 06 (``repetition_penalty
1.2``) except ``no_repeat_ngram_size``, which vLLM does not have: neither side uses it. Every
request runs to exactly ``--max-new-tokens`` tokens (``ignore_eos`` / ``min_new_tokens``), so all
modes do the same work.

Modes: the server at each ``--concurrency`` (threads of the official openai client), lesson 06's
batched ``generate`` (batch 8) and the one-at-a-time loop, both in this process. Each mode runs
``--repeats`` times, alternating; the median wall time counts. The server and this process share
the machine's cores. Target: at concurrency 32, at least 1.5x the batched generate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._batch import lesson06_batch_setup

TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("build/bench_serve.json"))
    args = parser.parse_args()

    choice, model, tokenizer, questions = lesson06_batch_setup()
    import torch

    from helpers.prompts import SYSTEM_PROMPT_ARTICLE, article_prompt
    from helpers.serve import start_server

    # Lesson 06's default prompts: the article's layout and system prompt.
    prompts = [tokenizer(article_prompt(q["question"], SYSTEM_PROMPT_ARTICLE))["input_ids"] for q in questions]
    n = args.max_new_tokens
    generation = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "repetition_penalty": 1.2}

    start = time.perf_counter()
    server = start_server(choice, timeout=900)
    print(f"server ready in {time.perf_counter() - start:.1f} s: {server.base_url}")
    client = server.client(timeout=300)

    def ask(prompt):
        out = client.completions.create(model=choice.name, prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"repetition_penalty": 1.2, "ignore_eos": True})
        return out.usage.completion_tokens

    def served(concurrency):
        with ThreadPoolExecutor(concurrency) as pool:
            return sum(pool.map(ask, prompts))

    def generate(chunk, **kwargs):
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **kwargs)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    def batched(size):
        return sum(generate(prompts[i : i + size], **generation) for i in range(0, len(prompts), size))

    modes = {f"server c={c}": (lambda c=c: served(c)) for c in args.concurrency}
    modes[f"generate batch {args.batch_size} (lesson 06)"] = lambda: batched(args.batch_size)
    modes["generate one at a time"] = lambda: batched(1)
    ask(prompts[0])
    generate(prompts[: args.batch_size], **{**generation, "max_new_tokens": 4, "min_new_tokens": 4})
    times: dict[str, list[float]] = {name: [] for name in modes}
    tokens: dict[str, int] = {}
    try:
        for repeat in range(args.repeats):
            for name, run in modes.items():  # alternating: every mode once per round
                t0 = time.perf_counter()
                tokens[name] = run()
                times[name].append(time.perf_counter() - t0)
                print(f"round {repeat + 1} {name:32s} {times[name][-1]:7.2f} s")
    finally:
        server.stop()

    baseline = f"generate batch {args.batch_size} (lesson 06)"
    rows = []
    for name in modes:
        wall = statistics.median(times[name])
        rows.append({"mode": name, "median_s": round(wall, 3), "tokens": tokens[name],
                     "tokens_per_s": round(tokens[name] / wall, 1),
                     "vs_batched_generate": round(statistics.median(times[baseline]) / wall, 2)})
    print(f"\n{len(prompts)} questions x {n} new tokens, median of {args.repeats} alternating runs (wall time)")
    for r in rows:
        print(f"{r['mode']:32s} {r['median_s']:7.2f} s  {r['tokens_per_s']:8.1f} tokens/s  {r['vs_batched_generate']:5.2f}x")
    top = f"server c={max(args.concurrency)}"
    if top in modes:
        ratio = next(r["vs_batched_generate"] for r in rows if r["mode"] == top)
        print(f"target: {top} >= {TARGET}x batched generate -> {ratio:.2f}x {'met' if ratio >= TARGET else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": choice.name, "new_tokens": n, "repeats": args.repeats, "rows": rows,
                                     "times": times}, indent=2))


if __name__ == "__main__":
    main()

"""Lesson 09's speed and memory: llama.cpp Q8_0 and Q4_K_M against transformers' fp32 ``generate``.

    python -m bench.gguf                         # SmolLM2-135M-Instruct, 1 thread, 3 rounds
    python -m bench.gguf --model tiny --threads 1 --rounds 3 --tokens 64

The GGUF files are made with the lesson's own steps (helpers.gguf's converter command, the lesson's
``quantize``) from the base model into the course's cache. Each measurement runs in a fresh process (so its
peak RSS, VmHWM, is its own): it loads the model, answers one warm-up prompt, then generates ``--tokens`` tokens (the
end token does not stop it) for each of ``--prompts`` questions of data/eval_questions.json, greedy, batch 1.
Decode speed counts the tokens after the first one over the time after the first one (the prompt's processing
is excluded). The engines take turns in each round (the order rotates); the table gives each one's median over
the rounds and its ratio to transformers measured in the same run. ``--threads``: no more than idle cores
(llama.cpp's threads spin while they wait).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("transformers fp32", "llama.cpp Q8_0", "llama.cpp Q4_K_M")


def prompt_ids(model: str, prompts: int) -> list[list[int]]:
    """The first ``prompts`` + 1 questions (one for the warm-up) in the model's own template, as token ids: made in
    the parent, so a llama.cpp worker imports neither torch nor transformers (its peak RSS is llama.cpp's)."""
    from transformers import AutoTokenizer

    from helpers.models import resolve_model
    from helpers.evaluation import load_questions
    from helpers.prompts import encode

    choice = resolve_model(model, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    return [encode(tokenizer, [{"role": "user", "content": q["question"]}], choice.chat_format).input_ids
            for q in load_questions()[: prompts + 1]]


def worker(engine: str, model_path: str, ids: list[list[int]], threads: int, tokens: int) -> dict:
    """One engine in this process: decode tokens/s per prompt and this process's peak RSS."""
    if engine.startswith("transformers"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

        def stamps(prompt):  # the time each new token was ready
            times = []

            class Clock:  # a generate() streamer: put() gets the prompt first, then each new token
                def put(self, _):
                    times.append(time.perf_counter())

                def end(self):
                    pass

            with torch.no_grad():
                hf.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                            temperature=None, top_p=None, top_k=None, streamer=Clock(), pad_token_id=0)
            return times[1:]
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=model_path, n_ctx=512, n_threads=threads, verbose=False)

        def stamps(prompt):
            times = []
            for _ in llm.generate(prompt, temp=0.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == tokens:
                    break
            return times

    stamps(ids[0])  # warm-up
    rates = []
    for prompt in ids[1:]:
        times = stamps(prompt)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return {"engine": engine, "tokens_per_s": statistics.median(rates), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM; getrusage's ru_maxrss would also count the
    parent's memory copied at fork, and the parent here has torch loaded)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def make_files(model: str) -> dict[str, Path]:
    """The base model's F16, Q8_0 and Q4_K_M GGUF files (made once, in the course's cache)."""
    from helpers.models import resolve_model
    from helpers.gguf import cache_dir, convert_command, require_llama_cpp, run_converter
    from tests.lesson_code import lesson_definitions

    choice = resolve_model(model, verbose=False)
    folder = cache_dir() / "bench" / f"{choice.name}-{Path(choice.path).name}"
    f16 = run_converter(convert_command(choice.path, folder / "f16.gguf"), folder / "f16.gguf")
    lesson = lesson_definitions("09_gguf_llama_cpp.ipynb", "quantize",
                                given={"llama_cpp": require_llama_cpp(), "N_THREADS": 1, "Path": Path, "os": os})
    return {kind: lesson["quantize"](f16, folder / f"{kind}.gguf", kind) for kind in ("Q8_0", "Q4_K_M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("build/bench_gguf.json"))
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "PATH", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, path, ids = args.worker
        print(json.dumps(worker(engine, path, json.loads(Path(ids).read_text()), args.threads, args.tokens)))
        return
    from helpers.models import resolve_model

    files = make_files(args.model)
    paths = {"transformers fp32": resolve_model(args.model, verbose=False).path, "llama.cpp Q8_0": str(files["Q8_0"]),
             "llama.cpp Q4_K_M": str(files["Q4_K_M"])}
    ids_file = args.json.with_suffix(".prompts.json")
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    ids_file.write_text(json.dumps(prompt_ids(args.model, args.prompts)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        order = ENGINES[r % 3:] + ENGINES[:r % 3]
        for engine in order:
            out = subprocess.run([sys.executable, "-m", "bench.gguf", "--model", args.model, "--threads", str(args.threads),
                                  "--tokens", str(args.tokens), "--worker", engine, paths[engine],
                                  str(ids_file)], capture_output=True, text=True, env=env, check=True)
            results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {engine}: {results[engine][-1]['tokens_per_s']:.1f} tokens/s, "
                  f"peak RSS {results[engine][-1]['peak_rss_mb']:.0f} MB", flush=True)
    table = {e: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows),
                 "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rows)} for e, rows in results.items()}
    base = table["transformers fp32"]
    print(f"\n{args.model}, {args.threads} thread(s), {args.tokens} greedy tokens x {args.prompts} prompts, "
          f"median of {args.rounds} alternating rounds (load {os.getloadavg()[0]:.2f})")
    print(f"{'engine':<20} {'decode tok/s':>12} {'x transformers':>15} {'peak RSS MB':>12} {'x transformers':>15}")
    for engine, row in table.items():
        print(f"{engine:<20} {row['tokens_per_s']:>12.1f} {row['tokens_per_s'] / base['tokens_per_s']:>15.2f} "
              f"{row['peak_rss_mb']:>12.0f} {row['peak_rss_mb'] / base['peak_rss_mb']:>15.2f}")
    q4 = table["llama.cpp Q4_K_M"]
    speed, memory = q4["tokens_per_s"] / base["tokens_per_s"], q4["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"goal (Q4_K_M at least 5x the decode speed at a third of the memory): {speed:.1f}x, {memory:.2f}x -> "
          + ("met" if speed >= 5 and memory <= 1 / 3 else "not met"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "rounds": results, "median": table}, indent=1))


if __name__ == "__main__":
    main()

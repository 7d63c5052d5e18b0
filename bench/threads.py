"""Torch threads when processes share the cores: why `make test` gives each process one thread.

    python -m bench.threads                  # SmolLM2-135M-Instruct, 2 processes at once
    python -m bench.threads --model tiny --procs 2 --threads 1 2 --batches 3

For each thread count, ``--procs`` processes start at once; each loads the model and generates
``--batches`` batches of 8 of lesson 06's questions (48 new tokens each, lesson 06's sampling, fixed
seed, ``min_new_tokens`` so every run does the same work). The table gives each process's generation time
(loading excluded), and the slowest one's ratio to the first thread count's, measured in the same run. With
``OMP_WAIT_POLICY=PASSIVE`` (what tests/nbenv.py sets) unless ``--spin`` is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKER = """
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from helpers.models import resolve_model
from helpers.evaluation import load_questions, question_messages
from helpers.prompts import encode

choice = resolve_model(sys.argv[1], verbose=False)
tok = AutoTokenizer.from_pretrained(choice.path)
tok.padding_side, tok.pad_token = "left", tok.unk_token
model = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32).eval()
questions = load_questions()
gen = {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.3, "repetition_penalty": 1.3,
       "max_new_tokens": 48, "min_new_tokens": 48}
start = time.perf_counter()
for b in range(int(sys.argv[2])):
    ids = [encode(tok, question_messages(q["question"], None), choice.chat_format).input_ids for q in questions[8 * b:8 * b + 8]]
    batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    torch.manual_seed(b)
    with torch.no_grad():
        model.generate(**batch, pad_token_id=tok.pad_token_id, **gen)
print(f"{time.perf_counter() - start:.2f}")
"""


def run(model: str, procs: int, threads: int, batches: int, spin: bool) -> tuple[float, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_WAIT_POLICY"] = "ACTIVE" if spin else "PASSIVE"
    start = time.perf_counter()
    children = [subprocess.Popen([sys.executable, "-c", WORKER, model, str(batches)], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(procs)]
    own = [float(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    return time.perf_counter() - start, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--spin", action="store_true", help="OMP_WAIT_POLICY=ACTIVE instead of PASSIVE")
    args = parser.parse_args()
    print(f"{args.model}: {args.procs} processes at once on {os.cpu_count()} cores, {args.batches} batches of 8 each, "
          f"OMP_WAIT_POLICY={'ACTIVE' if args.spin else 'PASSIVE'}")
    baseline = None
    for threads in args.threads:
        wall, own = run(args.model, args.procs, threads, args.batches, args.spin)
        slowest = max(own)
        baseline = baseline or slowest
        print(f"  {threads} thread(s) each: generation {', '.join(f'{s:.1f}' for s in own)} s "
              f"(slowest {slowest / baseline:.2f} x the first; {wall:.1f} s wall with loading)")


if __name__ == "__main__":
    main()

"""One process vs two processes (DDP over gloo) on the same rows and the same global batch.

    python -m bench.distributed [--repeats 3] [--rows 128] [--steps 8] [--json build/bench_distributed.json]

Lesson 08's training script (scripts/train_lora.py, lesson 05's recipe) runs alternately as one
process (batch 8, all CPU threads) and as two processes launched by accelerate with
scripts/accelerate/ddp.yaml (batch 4 each, half the threads each), gradient accumulation 2, rows
in file order, no evaluation. Each run's --metrics give the tokens every rank trained on, its
training wall time and its peak resident memory. Reported: the median over the repeats of
tokens/s (all ranks' tokens / the slowest rank's time), the launch-to-exit wall time, the peak
memory per process, and the two-process / one-process ratio. On a 2-core CPU expect no speed-up:
both runs share the same two cores, and two processes add communication and a second Python.
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

ROOT = Path(__file__).resolve().parent.parent


def run_once(procs: int, rows: int, steps: int, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 2) // procs)
    common = ["scripts/train_lora.py", "--model", "tiny", "--limit-rows", str(rows), "--max-steps", str(steps),
              "--grad-accum", "2", "--sequential", "--no-eval", "--batch-size", str(8 // procs),
              "--output", str(out / "adapter"), "--metrics", str(out / "metrics")]
    if procs == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "scripts/accelerate/ddp.yaml",
               "--num_processes", str(procs), *common, "--ddp-backend", "gloo"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    ranks = [json.loads(p.read_text()) for p in sorted((out / "metrics").glob("rank*.json"))]
    tokens = sum(r["tokens"] for r in ranks)
    seconds = max(r["seconds"] for r in ranks)
    return {"tokens_per_s": tokens / seconds, "train_s": seconds, "wall_s": wall, "tokens": tokens,
            "peak_rss_mib_per_process": max(r["peak_rss_bytes"] for r in ranks) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for procs in (1, 2):  # alternate, so drift in the machine's load hits both alike
                results[procs].append(run_once(procs, args.rows, args.steps, Path(tmp) / f"{procs}-{i}"))
    summary = {f"{p} process{'es' if p > 1 else ''}": {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for p, runs in results.items()}
    one, two = summary["1 process"], summary["2 processes"]
    print(f"{'':13s} {'tokens/s':>10s} {'train s':>8s} {'wall s':>8s} {'peak MiB/process':>17s}")
    for name, s in summary.items():
        print(f"{name:13s} {s['tokens_per_s']:10.0f} {s['train_s']:8.2f} {s['wall_s']:8.2f} {s['peak_rss_mib_per_process']:17.0f}")
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    print(f"two / one process: {ratio:.2f}x tokens/s (median of {args.repeats} alternating runs, {os.cpu_count()} CPU cores)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "ratio": ratio, "runs": results}, indent=1))


if __name__ == "__main__":
    main()

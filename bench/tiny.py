"""How long the tiny model takes to build from nothing and to load from its cache.

    python -m bench.tiny [--json build/bench_tiny.json]

Targets: build under 90 s including pretraining, load under 3 s.
The build runs in a fresh temporary LLAMA_TUTORIAL_HOME so nothing cached is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as home:
        os.environ["LLAMA_TUTORIAL_HOME"] = home
        from helpers.tiny import ensure_tiny_model

        start = time.perf_counter()
        path = ensure_tiny_model(verbose=False)
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        again = ensure_tiny_model(verbose=False)
        tok = AutoTokenizer.from_pretrained(again)
        model = AutoModelForCausalLM.from_pretrained(again)
        load_s = time.perf_counter() - start
        info = json.loads((Path(path) / "tiny_build.json").read_text())

    rows = {
        "build_seconds": round(build_s, 1),
        "build_target_seconds": 90,
        "load_from_cache_seconds": round(load_s, 2),
        "load_target_seconds": 3,
        "parameters": info["parameters"],
        "vocab_size": len(tok),
        "loss_first": round(info["loss_first"], 2),
        "loss_last": round(info["loss_last"], 2),
        "torch_threads": torch.get_num_threads(),
        "model_class": type(model).__name__,
    }
    print(f"{'figure':28s} value")
    for key, value in rows.items():
        print(f"{key:28s} {value}")
    print(f"build: {build_s / 90:.2f} of the 90 s budget; load: {load_s / 3:.2f} of the 3 s budget")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

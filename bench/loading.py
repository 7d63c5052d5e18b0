"""What each loading mode costs: load seconds, memory footprint, decode tokens/s (lesson 02).

    python -m bench.loading                       # tiny model, on this machine (CPU: < 2 minutes)
    python -m bench.loading --config llama2-7b    # Llama-2-7B's exact shape, random weights, CUDA GPU
    python -m bench.loading --config llama2-13b --json out.json

For ``tiny`` it loads the tiny model's real files. For ``llama2-7b`` / ``llama2-13b`` it builds a
random-weight ``LlamaForCausalLM`` with Meta's published shape on the GPU, saves it as a
safetensors checkpoint in a temporary folder and loads that folder the way the lesson does
(``from_pretrained`` with ``BitsAndBytesConfig``), so no weights are downloaded. Timings of random
weights equal those of real weights: the same shapes go through the same kernels.

Every mode is compared with the full-precision baseline measured in the same run (the ratio
columns). Load seconds are measured with the weight files already in the OS page cache (the
benchmark reads them once first), so they show the cost of building and quantizing, not the disk.

The functions (:func:`build_random_model`, :func:`measure_load`, :func:`time_generation`,
:func:`measure_decode`, :func:`run_benchmark`) are reused by later benchmarks. Prompts are built with
the course's own template for the model's chat format (``helpers.prompts.encode``), so a
tokenizer without a ``chat_template`` (FlagAlpha's models) works too.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.config import TutorialError, output_dir
from helpers.loading import (
    GIB,
    LLAMA2_SHAPES,
    MODES,
    ModelTooLargeError,
    check_bitsandbytes,
    check_fits,
    estimate_memory,
    free_memory,
    load_model,
    memory_footprint,
    mode_label,
    pick_device,
    pick_dtype,
    quantization_config,
    quiet_bitsandbytes,
)

BENCH_CONTEXT = 256
CONFIGS = ("tiny", *[name for name in LLAMA2_SHAPES if name != "llama2-70b"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def linear_layer_types(model) -> Counter:
    """How many linear layers of each class the model holds, e.g.
    ``{"bitsandbytes.nn.Linear8bitLt": 28, "torch.nn.Linear": 1}`` (the 1 is lm_head, which
    transformers leaves unquantized)."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            top = type(module).__module__.split(".")[0]
            prefix = {"torch": "torch.nn", "bitsandbytes": "bitsandbytes.nn"}.get(top, type(module).__module__)
            counts[f"{prefix}.{type(module).__name__}"] += 1
    return counts


@dataclass
class GenerationTiming:
    """Result of :func:`time_generation`: tokens/s = batch x new_tokens / seconds."""

    batch: int
    new_tokens: int
    seconds: float
    text: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def time_generation(model, tokenizer=None, prompt: str | None = None, *, chat_format: str = "llama2", batch: int = 1,
                    new_tokens: int = 32, warmup: bool = True) -> GenerationTiming:
    """Greedy-generate exactly ``new_tokens`` tokens for ``batch`` copies of ``prompt`` and time it.

    The prompt is built with the course's template for ``chat_format`` (helpers.prompts, which
    needs no ``chat_template`` in the tokenizer); without a tokenizer, 16 fixed random ids.
    """
    if tokenizer is not None:
        from helpers.prompts import encode

        messages = [{"role": "user", "content": prompt or "请用中文介绍一下长城。"}]
        input_ids = torch.tensor([encode(tokenizer, messages, chat_format).input_ids])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id or 0
    else:
        input_ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        pad_id = 0
    input_ids = input_ids.repeat(batch, 1).to(model.device)
    kwargs = dict(do_sample=False, pad_token_id=pad_id, attention_mask=torch.ones_like(input_ids))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        if warmup:
            model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        sync()
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync()
        seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationTiming(batch, out.shape[1] - input_ids.shape[1], seconds, text)


def llama_config(shape: dict):
    """A ``LlamaConfig`` with Llama-2's defaults for everything ``shape`` does not set."""
    from transformers import LlamaConfig

    defaults = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    return LlamaConfig(**{**defaults, **shape})


def build_random_model(shape: dict, dtype: torch.dtype = torch.float16, device: str = "cuda", seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` (LLAMA2_SHAPES entry or any LlamaConfig kwargs) with
    random weights (normal, std 0.02, as Llama initializes), built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    return model.eval()


def save_random_checkpoint(shape: dict, folder: Path, dtype: torch.dtype, device: str) -> Path:
    """Build a random model of ``shape`` on ``device`` and save it to ``folder`` as safetensors shards."""
    model = build_random_model(shape, dtype, device)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    free_memory()
    return Path(folder)


def warm_page_cache(folder: Path) -> float:
    """Read every weight file once so later loads do not measure the disk. Returns GiB read."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(64 * 1024 * 1024):
                total += len(chunk)
    return total / GIB


def measure_load(path, mode: str, dtype: torch.dtype | None = None, device: str | None = None):
    """Load ``path`` in ``mode`` ("full", "8bit", "4bit") the way lesson 02 does (``helpers.loading.load_model``);
    return (model, seconds)."""
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    quantization_config(mode, dtype)  # checks ``mode`` and imports the config class before the clock starts
    _sync(device)
    start = time.perf_counter()
    model = load_model(path, mode, dtype, device=device, device_map="auto")
    _sync(device)
    return model.eval(), time.perf_counter() - start


def measure_decode(model, tok, batch: int, new_tokens: int, repeats: int = 3, chat_format: str = "llama2") -> dict:
    """Greedy decode of exactly ``new_tokens`` tokens for ``batch`` sequences, ``repeats`` times
    after one warm-up; tokens/s of the fastest run (the least disturbed by other processes) and
    the median."""
    runs = [time_generation(model, tok, chat_format=chat_format, batch=batch, new_tokens=new_tokens, warmup=(i == 0))
            for i in range(repeats)]
    seconds = sorted(t.seconds for t in runs)
    produced = runs[0].new_tokens
    return {
        "batch": batch,
        "new_tokens": produced,
        "seconds": round(seconds[0], 4),
        "tokens_per_s": round(batch * produced / seconds[0], 2),
        "tokens_per_s_median": round(batch * produced / seconds[len(seconds) // 2], 2),
        "repeats": repeats,
    }


def _environment(device: str, dtype: torch.dtype) -> dict:
    import transformers

    env = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "dtype": mode_label("full", dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        from importlib.metadata import version

        env["bitsandbytes"] = version("bitsandbytes")
    except Exception:
        env["bitsandbytes"] = None
    return env


def run_benchmark(config: str = "tiny", *, new_tokens: int | None = None, batches=(1, 8), modes=MODES,
                  workdir: str | None = None, keep: bool = False, log=print, shape: dict | None = None,
                  require_cuda: bool = True) -> dict:
    """Measure every mode of ``config`` on this machine; return the results as a dict.

    ``shape`` overrides the Llama-2 shape of a non-tiny config and ``require_cuda=False`` lets
    that path run on the CPU: both only so tests can run the random-checkpoint path small."""
    if config not in CONFIGS:
        raise TutorialError("bench.unknown_config", f"不认识的 --config {config!r}，可选：{', '.join(CONFIGS)}",
                            f"Unknown --config {config!r}; choose one of {', '.join(CONFIGS)}", config=config)
    quiet_bitsandbytes()
    device = pick_device()
    dtype = pick_dtype(device)
    new_tokens = new_tokens or (16 if device == "cpu" else 64)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results = {"config": config, "environment": _environment(device, dtype), "new_tokens": new_tokens,
               "batches": list(batches), "modes": []}
    tmp = None
    if config == "tiny":
        from transformers import AutoTokenizer

        from helpers.tiny import ensure_tiny_model

        path = ensure_tiny_model(verbose=False)  # built once and cached; not part of the timing
        tok = AutoTokenizer.from_pretrained(path)
        model_config = llama_config(json.loads((path / "config.json").read_text()))
        t_start = time.perf_counter()
    else:
        if device != "cuda" and require_cuda:
            raise TutorialError(
                "bench.needs_cuda",
                f"--config {config} 要在 CUDA GPU 上运行（它会构建 {config} 大小的随机权重模型）；"
                "这台机器没有 GPU。在 CPU 上请用 --config tiny。",
                f"--config {config} needs a CUDA GPU (it builds a random-weight model of {config}'s size); "
                "this machine has none. On a CPU use --config tiny.",
                config=config,
            )
        shape = shape or LLAMA2_SHAPES[config]
        model_config = llama_config(shape)
        t_start = time.perf_counter()
        # Building happens in the full dtype: it has to fit first.
        check_fits(model_config, "full", dtype, context_tokens=16)
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{config}-", dir=workdir))
        start = time.perf_counter()
        path = save_random_checkpoint(shape, tmp, dtype, device)
        results["build_and_save_s"] = round(time.perf_counter() - start, 2)
        log(f"random {config} checkpoint saved to {tmp} in {results['build_and_save_s']:.1f} s")
        tok = None
    results["read_gib"] = round(warm_page_cache(path), 3)
    if any(m != "full" for m in modes):
        results["bitsandbytes_backend"] = check_bitsandbytes(device)
    try:
        for mode in modes:
            label = mode_label(mode, dtype)
            # The decode here is short (a prompt of ~30 tokens + new_tokens), so the fit check
            # reserves KV cache for BENCH_CONTEXT tokens, not the lesson's 2048.
            est = estimate_memory(model_config, mode, dtype, batch=max(batches), context_tokens=BENCH_CONTEXT)
            row = {"mode": mode, "label": label, "estimate_gib": round(est.total / GIB, 3)}
            try:
                check_fits(model_config, mode, dtype, batch=max(batches), context_tokens=BENCH_CONTEXT)
            except ModelTooLargeError as err:
                row["skipped"] = str(err).splitlines()[0]
                results["modes"].append(row)
                log(f"{label}: skipped ({row['skipped']})")
                continue
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # The first from_pretrained of a process pays one-off imports and set-up, which would
            # dominate the tiny model's load; there each mode is loaded twice and the faster is kept.
            # A 7B/13B load takes many seconds, so on those one load is measured.
            loads = 2 if config == "tiny" else 1
            for attempt in range(loads):
                if attempt:
                    model = None  # the last load's weights go before the next load
                    free_memory()
                model, seconds = measure_load(path, mode, dtype, device)
                row["load_s"] = round(min(seconds, row.get("load_s", seconds)), 3)
            row["load_repeats"] = loads
            row["footprint_bytes"] = memory_footprint(model)  # quantization scales included
            row["footprint_gib"] = round(row["footprint_bytes"] / GIB, 4)
            row["linear_layers"] = dict(linear_layer_types(model))
            row["decode"] = [measure_decode(model, tok, b, new_tokens) for b in batches]
            if device == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            del model
            free_memory()
            results["modes"].append(row)
            log(f"{label}: loaded in {row['load_s']:.2f} s, "
                + ", ".join(f"batch {d['batch']} {d['tokens_per_s']:.1f} tok/s" for d in row["decode"]))
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    _add_ratios(results)
    results["total_s"] = round(time.perf_counter() - t_start, 2)
    return results


def _add_ratios(results: dict) -> None:
    """Each mode against the full-precision baseline of the same run (None when it was skipped)."""
    rows = {r["mode"]: r for r in results["modes"]}
    base = rows.get("full")
    for row in results["modes"]:
        if "skipped" in row or base is None or "skipped" in base:
            row["vs_baseline"] = None
            continue
        ratios = {
            "footprint": round(row["footprint_bytes"] / base["footprint_bytes"], 3),
            "load_s": round(row["load_s"] / base["load_s"], 3) if base["load_s"] > 0 else None,
        }
        for mine, theirs in zip(row["decode"], base["decode"]):
            ratios[f"tokens_per_s_b{mine['batch']}"] = round(mine["tokens_per_s"] / theirs["tokens_per_s"], 3)
        row["vs_baseline"] = ratios


def format_table(results: dict) -> str:
    """The printed table: one line per mode, ratios to the full-precision baseline in brackets."""
    batches = results["batches"]
    head = ["mode", "load s", "footprint MiB", "estimate MiB"] + [f"tok/s b{b}" for b in batches]
    if any("peak_gib" in r for r in results["modes"]):
        head.append("peak GiB")
    lines = []
    for row in results["modes"]:
        if "skipped" in row:
            lines.append([row["label"], "skipped", "-", f"{row['estimate_gib'] * 1024:.1f}"] + ["-"] * (len(head) - 4))
            continue
        ratio = row.get("vs_baseline") or {}

        def cell(value, key, fmt):
            r = ratio.get(key)
            return f"{value:{fmt}}" + (f" ({r:.2f}x)" if r is not None and row["mode"] != "full" else "")

        line = [row["label"], cell(row["load_s"], "load_s", ".3f"), cell(row["footprint_bytes"] / 2**20, "footprint", ".1f"),
                f"{row['estimate_gib'] * 1024:.1f}"]
        line += [cell(d["tokens_per_s"], f"tokens_per_s_b{d['batch']}", ".1f") for d in row["decode"]]
        if "peak GiB" in head:
            line.append(f"{row.get('peak_gib', 0):.2f}")
        lines.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cols: "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))  # noqa: E731
    env = results["environment"]
    title = (f"bench.loading --config {results['config']} on {env['device']} ({env['dtype']}, "
             f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}), {results['new_tokens']} new tokens; "
             "(x) = ratio to the full-precision baseline of this run; tok/s = best of "
             f"{results['modes'][0].get('decode', [{}])[0].get('repeats', '?')} runs")
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.loading", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: <output_dir>/bench/loading-<config>.json)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per decode (default 16 on CPU, 64 on GPU)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy shared CPU, 1 is often faster)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    try:
        results = run_benchmark(args.config, new_tokens=args.new_tokens, batches=batches, workdir=args.workdir,
                                keep=args.keep)
    except TutorialError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from err
    print(format_table(results))
    out = args.json or output_dir() / "bench" / f"loading-{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False), "utf-8")
    print(f"total {results['total_s']:.1f} s; JSON written to {out}")
    return results


if __name__ == "__main__":
    main()

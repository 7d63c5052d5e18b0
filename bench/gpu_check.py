"""Real GPU figures for the series: memory and speed of each loading mode, streaming and LoRA.

    python -m bench.gpu_check                  # on a CUDA GPU: Llama-2-7B's shape (and 13B if it fits)
    python -m bench.gpu_check --shape tiny     # on a CPU: the same code on the tiny model's shape
    python -m bench.gpu_check --json helpers/gpu_results/gpu-check-<name>.json

On a CUDA GPU it builds a random-weight ``LlamaForCausalLM`` with Llama-2-7B's exact shape (the
weights' values change neither memory nor speed), saves it once as safetensors, and for fp16,
8-bit and 4-bit measures:

* load time, memory footprint (``helpers.loading.memory_footprint``: ``get_memory_footprint()``
  plus the quantization scales it leaves out) and peak allocated memory;
* decode tokens/s at batch 1 and batch 8 with plain ``generate``, and at batch 1 through the
  lesson-04 streaming path (``helpers.chat.ReplyStream``; streaming is one conversation at a
  time, so it has no batch-8 figure);
* the bandwidth ceiling: bytes of weights read per decode step over the GPU's measured copy
  bandwidth, and the measured rate as a share of that ceiling (the figure of merit for "how close
  to the hardware limit");

then one LoRA training step (4-bit base, lesson 05's LoRA settings, sequence length 512): step
time and peak memory. The 13B shape follows in 8-bit and 4-bit when memory and the time budget
allow. It needs no network; bitsandbytes may be installed from a local wheel.

On a CPU it runs the same code on the tiny shape (tested in CI). Random-weight models have no
tokenizer of their size: the tiny tokenizer encodes the prompt and a logits processor keeps the
generated ids inside its vocabulary, in the plain and the streaming runs alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.loading import measure_load, save_random_checkpoint, warm_page_cache
from helpers.loading import (
    GIB,
    GPU_RESULTS_DIR,
    LLAMA2_SHAPES,
    check_bitsandbytes,
    free_memory,
    memory_footprint,
    pick_device,
    pick_dtype,
    quiet_bitsandbytes,
)

TIME_BUDGET_S = 7 * 60  # the whole GPU run must end within 8 minutes


class KeepInVocab:
    """Logits processor: only ids below ``size`` may be generated (see the module docstring)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size :] = float("-inf")
        return scores


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str, mib: int = 1024, repeats: int = 10) -> float:
    """Device-memory copy bandwidth in bytes/s (each copy reads and writes ``mib`` MiB)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * n * 4 * repeats / seconds


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter and quantization scale, except the
    input embedding table, of which a step reads only one row per sequence."""
    total = memory_footprint(model)
    embed = model.get_input_embeddings().weight
    return int(total - embed.numel() * embed.element_size())


def _prompt_ids(tok, device: str) -> torch.Tensor:
    """The prompt through the course's own llama2 template (no ``chat_template`` needed)."""
    from helpers.prompts import encode

    ids = encode(tok, [{"role": "user", "content": "请用中文介绍一下长城的历史。"}], "llama2").input_ids
    return torch.tensor([ids], device=device)


def decode_plain(model, tok, batch: int, new_tokens: int, device: str) -> float:
    """Tokens/s of greedy ``generate`` for ``batch`` copies of one prompt, exactly ``new_tokens`` each."""
    from transformers import LogitsProcessorList

    ids = _prompt_ids(tok, device).repeat(batch, 1)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.unk_token_id,
        logits_processor=LogitsProcessorList([KeepInVocab(len(tok))]),
    )
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
    return batch * (out.shape[1] - ids.shape[1]) / seconds


def decode_streaming(model, tok, new_tokens: int) -> float:
    """Tokens/s of the lesson-04 streaming path (batch 1), greedy, exactly ``new_tokens`` tokens."""
    from transformers import LogitsProcessorList

    from helpers.chat import GenerationParams, ReplyStream

    params = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=new_tokens)
    messages = [{"role": "user", "content": "请用中文介绍一下长城的历史。"}]
    extra = dict(min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([KeepInVocab(len(tok))]),
                 max_context_tokens=new_tokens + 512)
    ReplyStream(model, tok, messages, GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=2),
                 min_new_tokens=2, logits_processor=extra["logits_processor"], max_context_tokens=514).run()  # warm-up
    stream = ReplyStream(model, tok, messages, params, **extra)
    stream.run()
    return stream.token_count / stream.elapsed_s


def lora_step(path: Path, tok, device: str, dtype: torch.dtype, seq_len: int) -> dict:
    """One LoRA optimizer step on a 4-bit base with lesson 05's LoRA settings; time and peak memory.

    The model is put in training mode: transformers 5 checkpoints activations only while
    ``model.training`` is True (and LoRA dropout only acts then), so without ``model.train()`` the
    "gradient checkpointing" figures would be those of no checkpointing. Non-reentrant
    checkpointing, as PyTorch recommends."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from helpers.finetune import lora_config, settings_for
    from helpers.loading import load_model

    s = settings_for(device="cuda")
    # The GPU recipe (colab_t4: 4-bit base, checkpointing) on every device, through the load that
    # finetune.load_base makes on a GPU (it quantizes only there; here the CPU run exercises the same code).
    model = load_model(path, "4bit", dtype, device=device, double_quant=True, device_map="auto")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(s))
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate)
    batch = s.per_device_train_batch_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (batch, seq_len), generator=gen).to(model.device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"seq_len": seq_len, "batch": batch, "lora_r": s.lora_r, "target_modules": list(s.target_modules),
           "gradient_checkpointing": (model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                                      else model.is_gradient_checkpointing),  # the name before transformers 5.2x
           "training_mode": model.training, "trainable_params": trainable,
           "step_s": round(seconds, 3), "tokens_per_s": round(batch * seq_len / seconds, 1)}
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    model = optim = None  # drop both (the closure step shares them) before freeing memory
    free_memory()
    return row


def check_shape(name: str, shape: dict, modes: list[str], tok, device: str, dtype: torch.dtype, new_tokens: int,
                bandwidth: float, workdir: str | None, log, with_lora: bool, lora_seq: int) -> dict:
    """Every measurement for one model shape; the random checkpoint is written once and reused."""
    tmp = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-", dir=workdir))
    out = {"shape": name, "config": shape, "modes": []}
    try:
        start = time.perf_counter()
        save_random_checkpoint(shape, tmp, dtype, device)
        out["build_and_save_s"] = round(time.perf_counter() - start, 1)
        out["checkpoint_gib"] = round(warm_page_cache(tmp), 2)
        log(f"{name}: random checkpoint ({out['checkpoint_gib']} GiB) in {out['build_and_save_s']} s")
        for mode in modes:
            if device == "cuda":
                free_memory()
                torch.cuda.reset_peak_memory_stats()
            model, load_s = measure_load(tmp, mode, dtype, device)
            row = {"mode": mode, "load_s": round(load_s, 2), "footprint_gib": round(memory_footprint(model) / GIB, 3)}
            if device == "cuda":
                row["peak_load_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            per_step = weight_bytes_per_step(model)
            row["weight_bytes_per_step"] = per_step
            row["decode"] = []
            for batch in (1, 8):
                tps = decode_plain(model, tok, batch, new_tokens, device)
                ceiling = batch * bandwidth / per_step
                row["decode"].append({"path": "generate", "batch": batch, "tokens_per_s": round(tps, 2),
                                      "ceiling_tokens_per_s": round(ceiling, 3), "share_of_ceiling": round(tps / ceiling, 4)})
            tps = decode_streaming(model, tok, new_tokens)
            ceiling = bandwidth / per_step
            row["decode"].append({"path": "streaming", "batch": 1, "tokens_per_s": round(tps, 2),
                                  "ceiling_tokens_per_s": round(ceiling, 3), "share_of_ceiling": round(tps / ceiling, 4)})
            if device == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            del model
            free_memory()
            out["modes"].append(row)
            log(f"{name} {mode}: load {row['load_s']} s, footprint {row['footprint_gib']} GiB, "
                + ", ".join(f"{d['path']} b{d['batch']} {d['tokens_per_s']} tok/s ({d['share_of_ceiling']:.0%})"
                            for d in row["decode"]))
        if with_lora:
            out["lora_step"] = lora_step(tmp, tok, device, dtype, lora_seq)
            log(f"{name} LoRA step (4-bit base, seq {lora_seq}): {out['lora_step']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def machine_description(device: str, dtype: torch.dtype, bandwidth: float) -> dict:
    import transformers

    desc = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
    }
    for pkg in ("bitsandbytes", "peft", "accelerate"):
        try:
            from importlib.metadata import version

            desc[pkg] = version(pkg)
        except Exception:
            desc[pkg] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        desc["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        desc["compute_capability"] = f"{props.major}.{props.minor}"
        try:
            import subprocess

            desc["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=20).stdout.strip() or None
        except Exception:
            desc["driver"] = None
    else:
        desc["threads"] = torch.get_num_threads()
    return desc


def tiny_shape() -> dict:
    from helpers.tiny import ensure_tiny_model

    config = json.loads((ensure_tiny_model(verbose=False) / "config.json").read_text())
    return {key: config[key] for key in (*LLAMA2_SHAPES["llama2-7b"], "rms_norm_eps")}


def run(shape: str | None = None, *, new_tokens: int | None = None, lora_seq: int = 512, workdir: str | None = None,
        log=print) -> dict:
    """Run the whole check on this machine and return the results (also what ``--json`` writes)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from helpers.tiny import ensure_tiny_model

    hf_logging.disable_progress_bar()
    quiet_bitsandbytes()
    started = time.perf_counter()
    device = pick_device()
    dtype = pick_dtype(device)
    if device == "cuda" and dtype == torch.bfloat16:
        dtype = torch.float16  # the series' GPU reference mode is fp16 (what a T4 runs)
    shape = shape or ("llama2-7b" if device == "cuda" else "tiny")
    new_tokens = new_tokens or (128 if device == "cuda" else 16)
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(verbose=False))
    bandwidth = measure_copy_bandwidth(device, mib=1024 if device == "cuda" else 128)
    results = {"machine": machine_description(device, dtype, bandwidth), "new_tokens": new_tokens,
               "bitsandbytes_backend": check_bitsandbytes(device), "shapes": []}
    log(f"{results['machine']['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    shapes = {"tiny": tiny_shape(), **LLAMA2_SHAPES}
    plan = [(shape, ["full", "8bit", "4bit"], True)]
    if device == "cuda" and shape == "llama2-7b":
        plan.append(("llama2-13b", ["8bit", "4bit"], False))
    for name, modes, with_lora in plan:
        if name == "llama2-13b":
            free, _ = torch.cuda.mem_get_info()
            need = 13.1e9 * 2 * 1.1  # built in fp16 before it is saved
            if free < need or time.perf_counter() - started > TIME_BUDGET_S / 2:
                results["skipped"] = f"llama2-13b: {free / GIB:.0f} GiB free, {time.perf_counter() - started:.0f} s used"
                log(f"skipping llama2-13b ({results['skipped']})")
                continue
        results["shapes"].append(check_shape(name, shapes[name], modes, tok, device, dtype, new_tokens, bandwidth,
                                             workdir, log, with_lora, lora_seq if device == "cuda" else min(lora_seq, 128)))
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def format_table(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['device']} · {m['dtype']} · torch {m['torch']} · transformers {m['transformers']} · "
             f"bitsandbytes {m['bitsandbytes']} · copy bandwidth {m['copy_bandwidth_gb_s']} GB/s · {m['date']}",
             f"{'shape':11s} {'mode':5s} {'load s':>7s} {'footprint GiB':>13s} {'peak GiB':>8s} "
             f"{'gen b1 tok/s':>15s} {'gen b8 tok/s':>15s} {'stream b1 tok/s':>16s}"]
    for s in results["shapes"]:
        for r in s["modes"]:
            d = {(x["path"], x["batch"]): x for x in r["decode"]}

            def cell(key):
                x = d[key]
                return f"{x['tokens_per_s']:.1f} ({x['share_of_ceiling']:.0%})"

            lines.append(f"{s['shape']:11s} {r['mode']:5s} {r['load_s']:7.2f} {r['footprint_gib']:13.3f} "
                         f"{r.get('peak_gib', float('nan')):8.2f} {cell(('generate', 1)):>15s} "
                         f"{cell(('generate', 8)):>15s} {cell(('streaming', 1)):>16s}")
        if "lora_step" in s:
            ls = s["lora_step"]
            lines.append(f"{s['shape']:11s} LoRA step, 4-bit base, seq {ls['seq_len']} x batch {ls['batch']}: "
                         f"{ls['step_s']} s ({ls['tokens_per_s']} tok/s), peak {ls.get('peak_gib', '-')} GiB")
    lines.append("(%) = measured decode rate as a share of the bandwidth ceiling (batch x bandwidth / weight bytes per step)")
    lines.append(f"total {results['total_s']} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "llama2-7b", "llama2-13b"], default=None,
                        help="default: llama2-7b on a CUDA GPU, tiny on a CPU")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--lora-seq", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="default: helpers/gpu_results/gpu-check-<device>.json on a GPU")
    args = parser.parse_args(argv)
    results = run(args.shape, new_tokens=args.new_tokens, lora_seq=args.lora_seq, workdir=args.workdir)
    print(format_table(results))
    out = args.json
    if out is None and torch.cuda.is_available():
        name = results["machine"]["device"].replace(" ", "-").replace("/", "-")
        out = GPU_RESULTS_DIR / f"gpu-check-{name}.json"  # package data of helpers: lesson 02 shows it
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False), "utf-8")
        print(f"JSON written to {out}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

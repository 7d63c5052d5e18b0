"""Loading Llama-2 on the device at hand, and what each mode costs (notebooks/02_loading_quantized.ipynb
writes ``BitsAndBytesConfig`` and ``from_pretrained`` out inline; this module holds the plumbing)."""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.config import TutorialError
from helpers.download import missing_weights

GIB = 1024**3
MODES = ("full", "8bit", "4bit")  # "full" is the device's dtype (pick_dtype)
QUANT_BYTES_PER_WEIGHT = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
DEFAULT_CONTEXT_TOKENS = 2048  # tokens of context the fit check reserves KV cache for
SAFETY_MARGIN = 0.05
# What a Colab T4 leaves for a model, in GiB: an ESTIMATE, the one figure every lesson and helper that asks
# "does it fit a T4?" uses (lessons 00, 01, 02; bench/report.py). Basis: nvidia-smi shows 15,360 MiB, but CUDA
# itself reports a smaller total, "GPU 0 has a total capacity of 14.74 GiB" on a Colab T4 in PyTorch's
# out-of-memory message (github.com/zai-org/CogVideo/issues/741; 14.56 GiB on a GCP T4, Zheng-Chong/CatVTON
# issue 133), and the CUDA context of the process takes a few hundred MiB more before any weight is loaded.
# Not measured by this course on a T4: lesson 02 reads the real figure with torch.cuda.mem_get_info().
T4_USABLE_GIB = 14.5

# NVIDIA's published peak memory bandwidth of the Tesla T4, for the derived T4 rows of the GPU table.
T4_BANDWIDTH_GB_S = 320.0
# The JSON files `python -m bench.gpu_check` writes on a CUDA GPU, committed as package data (pyproject.toml's
# [tool.setuptools.package-data]) so that lesson 02 shows them however the course is installed.
GPU_RESULTS_DIR = Path(__file__).resolve().parent / "gpu_results"

# Llama-2's published shapes (Meta's config.json files), for estimates and the benchmarks.
_LLAMA2_COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096}
LLAMA2_SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, **_LLAMA2_COMMON),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, **_LLAMA2_COMMON),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, **_LLAMA2_COMMON),
}


class ModelTooLargeError(TutorialError):
    """The chosen mode will not fit in the memory at hand (notebooks/02_loading_quantized.ipynb)."""


def pick_device() -> str:
    """"cuda" when a CUDA GPU is present, else "cpu" (notebooks/02_loading_quantized.ipynb)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str | None = None) -> torch.dtype:
    """bf16 on GPUs of compute capability >= 8.0, fp16 on older ones such as the T4 (7.5), fp32 on the CPU
    (notebooks/02_loading_quantized.ipynb; not ``is_bf16_supported()``, which says True on a T4)."""
    if (device or pick_device()) != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability(0)
    return torch.bfloat16 if major >= 8 else torch.float16


def pick_attn_implementation(device: str | None = None) -> str:
    """"sdpa" everywhere, "flash_attention_2" only when installed on an Ampere or newer GPU
    (hard-coding it breaks the T4). Introduced in notebooks/02_loading_quantized.ipynb."""
    if (device or pick_device()) != "cuda" or torch.cuda.get_device_capability(0)[0] < 8:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def mode_label(mode: str, dtype: torch.dtype) -> str:
    """Table label of a mode: the dtype's name for "full", "8-bit", "4-bit nf4"."""
    if mode not in MODES:
        raise TutorialError("load.unknown_mode",
            f"不认识的加载方式 {mode!r}，可选：{', '.join(MODES)}（full 表示不量化）。",
            f"Unknown loading mode {mode!r}; choose one of {', '.join(MODES)} (full = no quantization).",
        mode=mode)
    full = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return {"full": full, "8bit": "8-bit", "4bit": "4-bit nf4"}[mode]


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' harmless logs (fp32 input cast to fp16 on every CPU 8-bit matmul; the
    optional ``kernels`` package absent). Errors still show (notebooks/02_loading_quantized.ipynb)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quantization_config(mode: str | None, dtype: torch.dtype, *, double_quant: bool = False):
    """The ``BitsAndBytesConfig`` for ``mode`` ("8bit", "4bit"; None or "full" gives None), as
    notebooks/02_loading_quantized.ipynb writes it inline; ``double_quant`` as QLoRA (lesson 05)."""
    from transformers import BitsAndBytesConfig

    if mode in (None, "full"):
        return None
    mode_label(mode, dtype)
    quiet_bitsandbytes()
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=double_quant)


def check_bitsandbytes(device: str | None = None) -> str:
    """Quantize a small tensor on ``device`` with bitsandbytes; return its backend ("CUDA", "CPU")
    or raise an error naming the fix (notebooks/02_loading_quantized.ipynb)."""
    device = device or pick_device()
    quiet_bitsandbytes()
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        probe = torch.randn(64, 64, device=device)
        bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.int8_vectorwise_quant(probe.half())
    except Exception as err:  # not installed, a broken native library, or no backend for the device
        raise TutorialError("load.bitsandbytes",
            f"bitsandbytes 在 {device} 上不能量化（{type(err).__name__}: {err}）。请 `pip install -U bitsandbytes`"
            "（本课程用 0.50 测试）并重启内核；GPU 上 `python -m bitsandbytes` 可以诊断；或者先不量化加载。",
            f"bitsandbytes cannot quantize on {device} ({type(err).__name__}: {err}). Run `pip install -U "
            "bitsandbytes` (tested with 0.50) and restart the kernel; on a GPU `python -m bitsandbytes` "
            "diagnoses it; or load without quantization.",
        device=str(device)) from err
    return getattr(bitsandbytes.cextension, "BNB_BACKEND", "?")


def count_parameters(config) -> dict[str, int]:
    """A config's parameters, counted on the meta device: ``quantizable`` (the decoder layers' nn.Linear
    weights), ``kept`` (embeddings, lm_head, norms) and ``total`` (notebooks/02_loading_quantized.ipynb)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizable = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    total = model.num_parameters()
    return {"quantizable": quantizable, "kept": total - quantizable, "total": total}


@dataclass(frozen=True)
class MemoryEstimate:
    """What a mode needs, in bytes (see :func:`estimate_memory`)."""

    mode: str
    label: str
    params: int
    weights: int
    kv_cache: int
    activations: int
    batch: int
    context_tokens: int

    @property
    def total(self) -> int:
        return int((self.weights + self.kv_cache + self.activations) * (1 + SAFETY_MARGIN))


def estimate_memory(config, mode: str, dtype: torch.dtype | None = None, *, batch: int = 1,
                    context_tokens: int | None = None, weight_bytes: int | None = None) -> MemoryEstimate:
    """The memory ``mode`` ("full", "8bit", "4bit") needs for a Llama ``config`` in compute ``dtype``
    (default :func:`pick_dtype`), KV cache for ``context_tokens`` (default min(2048, the maximum)). The
    course's one memory estimator: notebooks/02_loading_quantized.ipynb derives its formula. ``weight_bytes``
    replaces the weights term for a format this function does not know (lesson 09: a GGUF file's tensors)."""
    dtype = dtype or pick_dtype()
    label = mode_label(mode, dtype)
    nbytes = torch.finfo(dtype).bits // 8
    if context_tokens is None:
        context_tokens = min(DEFAULT_CONTEXT_TOKENS, config.max_position_embeddings)
    count = count_parameters(config)
    weights = int(count["quantizable"] * QUANT_BYTES_PER_WEIGHT.get(mode, nbytes) + count["kept"] * nbytes)
    if weight_bytes is not None:
        weights = int(weight_bytes)
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * nbytes
    kv = kv_bytes_per_token * batch * context_tokens
    act = batch * context_tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * nbytes
    return MemoryEstimate(mode, label, count["total"], weights, kv, act, batch, context_tokens)


def check_fits(config, mode: str, dtype: torch.dtype | None = None, *, budget_bytes: int | None = None,
               device: str | None = None, batch: int = 1, context_tokens: int | None = None) -> MemoryEstimate:
    """Refuse, before loading, a mode that will not fit ``budget_bytes`` (default: free GPU memory or available
    RAM) with a :class:`ModelTooLargeError` naming the options; else return the estimate (lesson 02)."""
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    est = estimate_memory(config, mode, dtype, batch=batch, context_tokens=context_tokens)
    budget, where, where_en = "given", "给定的预算", "the given budget"
    if budget_bytes is None and device == "cuda":
        budget, where, where_en = "free_gpu_memory", "本机 GPU 的空闲显存", "free GPU memory here"
        budget_bytes = torch.cuda.mem_get_info()[0]
    elif budget_bytes is None:
        import psutil  # a dependency of accelerate

        budget, where, where_en = "available_ram", "本机可用内存", "available RAM here"
        budget_bytes = psutil.virtual_memory().available
    if est.total <= budget_bytes:
        return est
    four = estimate_memory(config, "4bit", dtype, batch=batch, context_tokens=context_tokens).total / GIB
    q4 = 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")'
    offload = f'from_pretrained(..., device_map="auto", max_memory={{0: "{max(int(budget_bytes / GIB) - 1, 1)}GiB", "cpu": "48GiB"}})'
    raise ModelTooLargeError("load.too_large",
        f"按估算，{est.params / 1e9:.2f}B 参数的模型用 {est.label} 加载约需 {est.total / GIB:.1f} GiB（权重 {est.weights / GIB:.1f}"
        f" + KV 缓存 {est.kv_cache / GIB:.1f} + 激活 {est.activations / GIB:.1f}，再加 {SAFETY_MARGIN:.0%} 余量），可用的只有 "
        f"{budget_bytes / GIB:.1f} GiB（{where}）。为避免溢出，先不加载。可以：" + (f"改用 4-bit {q4}（约需 {four:.1f} GiB）；"
        if mode != "4bit" else "") + f"换更小的模型（13B 换 7B，或 LLAMA_TUTORIAL_MODEL=tiny）；把放不下的层卸载到 CPU："
        f"{offload}（慢得多）；缩短上下文或减小批大小（现按批大小 {est.batch}、{est.context_tokens} 个 token 预留 KV 缓存）。",
        f"By estimate, this {est.params / 1e9:.2f}B-parameter model needs about {est.total / GIB:.1f} GiB in {est.label}, "
        f"but only {budget_bytes / GIB:.1f} GiB is available ({where_en}). Not loading, to avoid an out-of-memory crash. "
        "Options: " + (f"4-bit with {q4} (about {four:.1f} GiB); " if mode != "4bit" else "") + "a smaller model (7B "
        f"instead of 13B, or LLAMA_TUTORIAL_MODEL=tiny); offload to CPU RAM with {offload} (much slower); a shorter "
        f"context or smaller batch (batch={est.batch}, {est.context_tokens} tokens of KV cache reserved).",
        mode=mode, needed_gib=round(est.total / GIB, 2), available_gib=round(budget_bytes / GIB, 2), budget=budget)


# How preflight_check names what is wrong with each file missing_weights reports.
_PROBLEM_ZH = {"absent": "不存在", "wrong_size": "应有 {} 字节", "damaged": "已损坏：{}"}
_PROBLEM_EN = {"absent": "absent", "wrong_size": "{} bytes expected", "damaged": "damaged: {}"}


def preflight_check(path: str | os.PathLike, mode: str = "full", *, dtype: torch.dtype | None = None,
                    device: str | None = None, budget_bytes: int | None = None) -> MemoryEstimate:
    """Every check before a weight is read, cheapest first: a local folder is complete, its config is
    Llama's, bitsandbytes runs, the mode fits; returns the estimate (notebooks/02_loading_quantized.ipynb)."""
    from transformers import AutoConfig

    device, folder = device or pick_device(), Path(path).expanduser()
    if folder.is_dir() and (missing := missing_weights(folder)):
        shown = "; ".join(f"{m.name}（{_PROBLEM_ZH[m.problem].format(m.detail)}）" for m in missing[:5])
        shown_en = "; ".join(f"{m.name} ({_PROBLEM_EN[m.problem].format(m.detail)})" for m in missing[:5])
        if len(missing) > 5:
            shown, shown_en = f"{shown} …（共 {len(missing)} 项）", f"{shown} ... ({len(missing)} in all)"
        raise TutorialError("load.incomplete_folder",
            f"{folder} 不是完整的模型文件夹，缺少或不完整：{shown}。第 01 课的下载可以续传：重新运行它的下载单元格即可补齐。",
            f"{folder} is not a complete model folder; missing or incomplete: {shown_en}. Lesson 01's download "
            "resumes: run its download cell again to fetch what is missing.", folder=str(folder), missing=[m.name for m in missing])
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise TutorialError("load.no_config",
            f"读不到 {path} 的 config.json：{err}。请检查路径或仓库名，离线时先用第 01 课下载。",
            f"Cannot read config.json of {path}: {err}. Check the path or repo id; offline, download it with lesson 01 first.",
        path=str(path)) from err
    if config.model_type != "llama":
        raise TutorialError("load.not_llama",
            f"{path} 的 config.json 写的是 model_type={config.model_type!r}，不是 'llama'。本课程的显存估算和对话模板"
            "都按 Llama-2 编写：请换成 Llama-2 系列模型，或设置 LLAMA_TUTORIAL_MODEL=tiny。",
            f"config.json of {path} says model_type={config.model_type!r}, not 'llama'. The course's memory "
            "estimate and chat templates assume Llama-2: use a Llama-2 model or LLAMA_TUTORIAL_MODEL=tiny.",
        model_type=config.model_type)
    if mode != "full":
        check_bitsandbytes(device)
    return check_fits(config, mode, dtype, budget_bytes=budget_bytes, device=device)


def memory_footprint(model) -> int:
    """``get_memory_footprint()`` plus the bitsandbytes scales it leaves out (8-bit ``SCB``, 4-bit
    ``quant_state.absmax`` and nested states). Introduced in notebooks/02_loading_quantized.ipynb."""
    total = model.get_memory_footprint()
    for param in model.parameters():
        extra = [getattr(param, "SCB", None)]
        state = getattr(param, "quant_state", None)
        while state is not None:
            extra += [state.absmax, state.code, state.offset]
            state = state.state2
        total += sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))
    return total


def free_memory() -> None:
    """Return freed memory to the device after ``del model`` (notebooks/02_loading_quantized.ipynb)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model_and_tokenizer(choice, quantization: str | None = None, *, budget_bytes: int | None = None):
    """Load ``choice`` (a ``ModelChoice``) the way notebooks/02_loading_quantized.ipynb does, for lessons 00
    and 03-07, after :func:`preflight_check`. ``quantization``: "full", "8bit", "4bit" or None (a Llama-2
    model on a GPU then loads in 8-bit, as the article does). Remote code never runs."""
    from transformers import AutoTokenizer

    device = pick_device()
    if quantization is None and device == "cuda" and not choice.is_tiny:
        quantization = "8bit"
    dtype = pick_dtype(device)
    preflight_check(choice.path, quantization or "full", dtype=dtype, device=device, budget_bytes=budget_bytes)
    tokenizer = AutoTokenizer.from_pretrained(choice.path, trust_remote_code=False)
    model = load_model(choice.path, quantization, dtype, device=device, device_map="auto" if device == "cuda" else None,
                       trust_remote_code=False)
    return model.eval(), tokenizer


def load_model(path: str | os.PathLike, mode: str | None, dtype: torch.dtype, *, device: str | None = None,
               double_quant: bool = False, storage: torch.dtype | None = None, **kwargs):
    """``from_pretrained(path)`` in ``mode`` ("full" or None, "8bit", "4bit"): :func:`quantization_config` and
    :func:`pick_attn_implementation` for ``device``, the load notebooks/02_loading_quantized.ipynb writes out
    inline. ``double_quant``: QLoRA's base (helpers.finetune.load_base, lesson 05); ``storage``: the float dtype
    the packed 4-bit weights are stored in (FSDP / ZeRO-3, lesson 08), also the model's dtype. ``kwargs`` go to
    ``from_pretrained`` (``device_map``...). The one load path of :func:`load_model_and_tokenizer`,
    ``load_base`` and the benchmarks (bench/loading.py, bench/gpu_check.py)."""
    from transformers import AutoModelForCausalLM

    bnb = quantization_config(mode, dtype, double_quant=double_quant)
    if storage is not None:
        bnb.bnb_4bit_quant_storage = storage
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=storage or dtype, attn_implementation=pick_attn_implementation(device),
        quantization_config=bnb, **kwargs)


def gpu_results(results_dir: str | os.PathLike | None = None) -> list[dict]:
    """The committed JSON files ``python -m bench.gpu_check`` wrote on CUDA GPUs (``GPU_RESULTS_DIR``,
    helpers/gpu_results/gpu-check-*.json). Shown in notebooks/02_loading_quantized.ipynb, section 6b."""
    folder = Path(results_dir) if results_dir else GPU_RESULTS_DIR
    return [json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("gpu-check-*.json"))]


def gpu_results_markdown(results_dir: str | os.PathLike | None = None) -> str:
    """Markdown tables of the measured GPU figures, plus the T4 figures derived from them.

    Shown in notebooks/02_loading_quantized.ipynb (section 6b) and written into README.md by
    ``python -m bench.report``. Decode rates carry their share of the bandwidth ceiling; the T4 rows
    are *derived* (the same share of the T4's ceiling), never measured.
    """
    runs = gpu_results(results_dir)
    if not runs:
        return (
            "尚无 GPU 实测数据：在 CUDA GPU 上运行 `python -m bench.gpu_check`，再运行 `python -m bench.report`。\n"
            "No GPU measurement committed yet: run `python -m bench.gpu_check` on a CUDA GPU, then `python -m bench.report`."
        )
    parts = []
    for run in runs:
        m = run["machine"]
        parts.append(
            f"**{m['device']}** · driver {m.get('driver')} · CUDA {m.get('cuda')} · torch {m['torch']} · "
            f"transformers {m['transformers']} · bitsandbytes {m.get('bitsandbytes')} · peft {m.get('peft')} · "
            f"copy bandwidth {m['copy_bandwidth_gb_s']} GB/s · {m['date']} · {run['new_tokens']} new tokens, greedy\n"
        )
        parts.append("| shape | mode | footprint GiB | peak GiB | load s | generate b1 tok/s | generate b8 tok/s "
                     "| streaming b1 tok/s |\n|---|---|---|---|---|---|---|---|")
        derived = []
        for shape in run["shapes"]:
            for row in shape["modes"]:
                d = {(x["path"], x["batch"]): x for x in row["decode"]}
                cell = lambda k: f"{d[k]['tokens_per_s']:.1f} ({d[k]['share_of_ceiling']:.0%})"  # noqa: E731
                parts.append(
                    f"| {shape['shape']} | {row['mode']} | {row['footprint_gib']:.2f} | {row.get('peak_gib', 0):.2f} "
                    f"| {row['load_s']:.1f} | {cell(('generate', 1))} | {cell(('generate', 8))} "
                    f"| {cell(('streaming', 1))} |"
                )
                t4 = [d[k]["share_of_ceiling"] * k[1] * T4_BANDWIDTH_GB_S * 1e9 / row["weight_bytes_per_step"]
                      for k in (("generate", 1), ("generate", 8))]
                fits = "是 yes" if row.get("peak_gib", 99) <= T4_USABLE_GIB else "否 no"
                derived.append(f"| {shape['shape']} | {row['mode']} | {fits} | {t4[0]:.1f} | {t4[1]:.1f} |")
            if "lora_step" in shape:
                ls = shape["lora_step"]
                parts.append(
                    f"\nLoRA ({shape['shape']}, 4-bit base, r={ls['lora_r']}, seq {ls['seq_len']} × batch {ls['batch']}): "
                    f"{ls['step_s']} s/step, {ls['tokens_per_s']} tok/s, peak {ls.get('peak_gib')} GiB\n"
                )
        parts.append(
            "\n*T4 推算（derived, not measured）*：假设在 T4 上达到与上表相同的带宽利用率，T4 峰值带宽 "
            f"{T4_BANDWIDTH_GB_S:.0f} GB/s；显存按 {T4_USABLE_GIB:.1f} GiB 可用判断（估计，helpers.loading.T4_USABLE_GIB）。\n\n"
            "| shape | mode | fits a T4 | b1 tok/s (derived) | b8 tok/s (derived) |\n|---|---|---|---|---|\n"
            + "\n".join(derived)
        )
    parts.append("\n(%) = 实测速度占带宽上限的比例 / measured rate as a share of the bandwidth ceiling "
                 "(batch × copy bandwidth ÷ weight bytes read per step).")
    return "\n".join(parts)

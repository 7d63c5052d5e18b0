"""Loading Llama-2 on the device at hand, and what each mode costs.

Introduced in notebooks/02_loading_quantized.ipynb. The lesson shows the ``from_pretrained``
call with ``BitsAndBytesConfig`` inline; this module holds the plumbing around it:

* choosing the device, dtype and attention implementation (:func:`pick_device`,
  :func:`pick_dtype`, :func:`pick_attn_implementation`);
* the checks that run *before* any weight is read: the config is a Llama config
  (:func:`load_llama_config`), every weight shard is on disk (:func:`check_weights_complete`),
  bitsandbytes can run here (:func:`check_bitsandbytes`), and the mode fits in memory
  (:func:`estimate_memory`, :func:`check_fits`), all wrapped by :func:`preflight_check`;
* measuring a loaded model (:func:`linear_layer_types`, :func:`time_generation`) and freeing it
  (:func:`free_memory`);
* :func:`load_model_and_tokenizer`, which later lessons call to load the model the same way.

The memory estimate (see :func:`estimate_memory`)::

    weights     = linear weights in the decoder layers x bytes per weight of the mode
                  (fp16/bf16: 2, fp32: 4, 8-bit: 1, 4-bit nf4: 0.5 + 4/64 for the fp32 scale of
                  each block of 64) + embeddings, lm_head and norms x bytes of the dtype
                  (bitsandbytes leaves those unquantized)
    kv_cache    = 2 (K and V) x layers x kv_heads x head_dim x batch x context x bytes of dtype
    activations = batch x context x (4 x hidden + 3 x intermediate) x bytes of dtype
    total       = (weights + kv_cache + activations) x 1.05   (allocator and temporary buffers)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.config import TutorialError, bilingual

GIB = 1024**3

# Modes in the order the lesson compares them. "full" is the device's dtype (pick_dtype).
MODES = ("full", "8bit", "4bit")
# Bytes per weight of a quantized nn.Linear. 8-bit: one int8 per weight (the fp32 scale per
# output row is negligible). 4-bit nf4: half a byte, plus one fp32 absmax per block of 64.
QUANT_BYTES_PER_WEIGHT = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
# Tokens of context the fit check reserves KV cache for (a long chat turn with history).
DEFAULT_CONTEXT_TOKENS = 2048
SAFETY_MARGIN = 0.05

# Llama-2's published shapes (Meta's config.json files), for estimates and the benchmark.
LLAMA2_SHAPES: dict[str, dict] = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama2-13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama2-70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}


class NotLlamaError(TutorialError):
    """The folder's config.json is not a Llama config (notebooks/02_loading_quantized.ipynb)."""


class MissingWeightsError(TutorialError):
    """A weight file or shard is missing or cut short (notebooks/02_loading_quantized.ipynb)."""


class BitsAndBytesUnavailableError(TutorialError):
    """bitsandbytes is not installed or cannot run here (notebooks/02_loading_quantized.ipynb)."""


class ModelTooLargeError(TutorialError):
    """The chosen mode will not fit in the memory at hand (notebooks/02_loading_quantized.ipynb)."""


# --------------------------------------------------------------------------- device choice


def pick_device() -> str:
    """"cuda" when a CUDA GPU is present, else "cpu" (notebooks/02_loading_quantized.ipynb)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str | None = None) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs such as the T4, fp32 on the CPU.

    Introduced in notebooks/02_loading_quantized.ipynb.
    """
    device = device or pick_device()
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_attn_implementation(device: str | None = None) -> str:
    """"sdpa" (PyTorch's fused attention, on every device) unless FlashAttention-2 is installed
    and the GPU is Ampere or newer. Never hard-code FlashAttention-2: it breaks the T4.

    Introduced in notebooks/02_loading_quantized.ipynb.
    """
    device = device or pick_device()
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability(0)
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2" if major >= 8 else "sdpa"
    return "sdpa"


def dtype_name(dtype: torch.dtype) -> str:
    """"fp16", "bf16" or "fp32" (notebooks/02_loading_quantized.ipynb)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def mode_label(mode: str, dtype: torch.dtype) -> str:
    """Table label of a mode: the dtype's name for "full", "8-bit", "4-bit nf4"
    (notebooks/02_loading_quantized.ipynb)."""
    _check_mode(mode)
    return {"full": dtype_name(dtype), "8bit": "8-bit", "4bit": "4-bit nf4"}[mode]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TutorialError(
            bilingual(
                f"不认识的加载方式 {mode!r}，可选：{', '.join(MODES)}（full 表示不量化）。",
                f"Unknown loading mode {mode!r}; choose one of {', '.join(MODES)} (full = no quantization).",
            )
        )


def quiet_bitsandbytes() -> None:
    """Silence two harmless bitsandbytes log lines (notebooks/02_loading_quantized.ipynb).

    On the CPU, every 8-bit matmul on fp32 input logs "MatMul8bitLt: inputs will be cast from
    torch.float32 to float16" (hundreds of lines per generation), and on CPUs with AVX512-BF16 the
    import logs that the optional Hub kernel package ``kernels`` is absent. Errors still show.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- config and shards


def load_llama_config(path: str | os.PathLike):
    """Read ``config.json`` of a local folder or Hub repo id and return a ``LlamaConfig``.

    Only the config is read, no weights. Raises :class:`NotLlamaError` when ``model_type`` is
    not ``llama``. Introduced in notebooks/02_loading_quantized.ipynb.
    """
    from transformers import LlamaConfig, PretrainedConfig

    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise MissingWeightsError(
            bilingual(
                f"{folder} 里没有 config.json，它不是完整的模型文件夹。请重新运行第 01 课的下载。",
                f"{folder} has no config.json, so it is not a complete model folder. Run lesson 01's download again.",
            )
        )
    try:
        raw, _ = PretrainedConfig.get_config_dict(str(folder) if folder.is_dir() else str(path))
    except (OSError, ValueError) as err:
        raise TutorialError(
            bilingual(
                f"读不到 {path} 的 config.json：{err}。请检查路径或仓库名，离线时先用第 01 课下载。",
                f"Cannot read config.json of {path}: {err}. Check the path or repo id; offline, download it "
                "with lesson 01 first.",
            )
        ) from err
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise NotLlamaError(
            bilingual(
                f"{path} 的 config.json 写的是 model_type={model_type!r}，不是 'llama'。本课程的代码、"
                "显存估算和对话模板都按 Llama-2 架构编写。请换成 Llama-2 系列模型（例如 "
                "meta-llama/Llama-2-7b-chat-hf 或 FlagAlpha/Llama2-Chinese-7b-Chat），或设置 "
                "LLAMA_TUTORIAL_MODEL=tiny。",
                f"config.json of {path} says model_type={model_type!r}, not 'llama'. This course's code, "
                "memory estimate and chat template assume the Llama-2 architecture. Use a Llama-2 model "
                "(e.g. meta-llama/Llama-2-7b-chat-hf or FlagAlpha/Llama2-Chinese-7b-Chat) or set "
                "LLAMA_TUTORIAL_MODEL=tiny.",
            )
        )
    return LlamaConfig.from_dict(raw)


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is unreadable (cut short by an interrupted download), else None."""
    size = file.stat().st_size
    if size < 8:
        return "文件不足 8 字节 / shorter than 8 bytes"
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            return f"头部声明 {header_len} 字节，文件只有 {size} 字节 / header larger than the file"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "头部不是合法 JSON / header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"应有 {8 + header_len + end} 字节，实际 {size} 字节 / expected {8 + header_len + end} bytes, found {size}"
    return None


def check_weights_complete(path: str | os.PathLike) -> list[Path]:
    """Check that every weight file of a local model folder is present and whole.

    Reads ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) and checks each
    shard it names; checks each ``.safetensors`` header against the file size (a download that
    stopped half-way leaves a short file). Returns the weight files. A Hub repo id (not a local
    folder) is left to ``from_pretrained``. Raises :class:`MissingWeightsError`.
    Introduced in notebooks/02_loading_quantized.ipynb.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return []
    redo = (
        "第 01 课的下载支持断点续传：重新运行它的下载单元格即可补齐缺失的文件。",
        "Lesson 01's download resumes: run its download cell again to fetch the missing files.",
    )
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise MissingWeightsError(
                bilingual(f"{index} 已损坏（{err}）。{redo[0]}", f"{index} is damaged ({err}). {redo[1]}")
            ) from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" …（共 {len(missing)} 个）" if len(missing) > 5 else "")
            raise MissingWeightsError(
                bilingual(
                    f"{folder} 缺少 {len(missing)}/{len(shards)} 个权重分片：{shown}。{index_name} 列出了它们，"
                    f"但文件不在。{redo[0]}",
                    f"{folder} lacks {len(missing)} of {len(shards)} weight shards: {', '.join(missing[:5])}. "
                    f"{index_name} names them but the files are absent. {redo[1]}",
                )
            )
        files = [folder / s for s in shards]
        break
    else:
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (folder / single).is_file():
                files = [folder / single]
                break
    if not files:
        raise MissingWeightsError(
            bilingual(
                f"{folder} 里有 config.json，却没有权重文件（model.safetensors、分片索引 "
                f"model.safetensors.index.json 或 pytorch_model.bin）。{redo[0]}",
                f"{folder} has config.json but no weights (model.safetensors, a shard index "
                f"model.safetensors.index.json, or pytorch_model.bin). {redo[1]}",
            )
        )
    for file in files:
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
            if problem:
                raise MissingWeightsError(
                    bilingual(
                        f"权重文件 {file.name} 不完整（{problem}），多半是下载中断了。{redo[0]}",
                        f"Weight file {file.name} is incomplete ({problem}); the download was probably "
                        f"interrupted. {redo[1]}",
                    )
                )
    return files


# --------------------------------------------------------------------------- bitsandbytes


def check_bitsandbytes(device: str | None = None) -> str:
    """Check that bitsandbytes imports and really quantizes a small tensor on ``device``.

    Returns the backend name ("CUDA", "CPU", ...). Raises :class:`BitsAndBytesUnavailableError`
    naming the fix. Introduced in notebooks/02_loading_quantized.ipynb.
    """
    device = device or pick_device()
    quiet_bitsandbytes()
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        raise BitsAndBytesUnavailableError(
            bilingual(
                f"没有安装 bitsandbytes（{err}），8-bit/4-bit 加载需要它。请运行 "
                "`pip install -U bitsandbytes`（CPU 上也要较新的版本，本课程用 0.50 测试），然后重启内核；"
                "或者先不量化加载（去掉 quantization_config）。",
                f"bitsandbytes is not installed ({err}); 8-bit/4-bit loading needs it. Run "
                "`pip install -U bitsandbytes` (on a CPU too it must be recent; the course is tested with 0.50) and restart the kernel, "
                "or load without quantization (drop quantization_config).",
            )
        ) from err
    except Exception as err:  # a broken native library can raise anything at import
        raise BitsAndBytesUnavailableError(_bnb_unusable_message(device, "?", err)) from err
    backend = getattr(getattr(bitsandbytes, "cextension", None), "BNB_BACKEND", "?")
    try:
        probe = torch.randn(64, 64, device=device)
        bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.int8_vectorwise_quant(probe.half())
    except Exception as err:
        raise BitsAndBytesUnavailableError(_bnb_unusable_message(device, backend, err)) from err
    return backend


def _bnb_unusable_message(device: str, backend: str, err: Exception) -> str:
    version = _bnb_version()
    return bilingual(
        f"bitsandbytes {version} 已安装，但在 {device}（后端 {backend}）上不能量化：{err}。"
        "GPU 上请运行 `python -m bitsandbytes` 查看诊断，并确认 torch 的 CUDA 版本有对应的 bitsandbytes 库"
        "（通常 `pip install -U bitsandbytes` 即可）；CPU 上需要较新的版本（本课程用 0.50 测试）。"
        "也可以先不量化加载（去掉 quantization_config），前提是显存放得下。",
        f"bitsandbytes {version} is installed but cannot quantize on {device} (backend {backend}): {err}. "
        "On a GPU run `python -m bitsandbytes` for a diagnosis and make sure it has a library for your "
        "torch's CUDA version (usually `pip install -U bitsandbytes`); on a CPU it needs a recent release (the course is tested with 0.50). "
        "Or load without quantization (drop quantization_config) if the memory allows.",
    )


def _bnb_version() -> str:
    try:
        from importlib.metadata import version

        return version("bitsandbytes")
    except Exception:
        return "?"


# --------------------------------------------------------------------------- memory estimate


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a Llama config, split the way bitsandbytes treats them
    (notebooks/02_loading_quantized.ipynb)."""

    quantizable: int  # nn.Linear weights inside the decoder layers (q, k, v, o, gate, up, down)
    kept: int  # embeddings, lm_head, norms: bitsandbytes leaves these in the compute dtype

    @property
    def total(self) -> int:
        return self.quantizable + self.kept


def count_parameters(config) -> ParamCount:
    """Count a Llama config's parameters by arithmetic, without building the model.

    Per layer: q and o are hidden x (heads x head_dim), k and v hidden x (kv_heads x head_dim),
    the MLP 3 x hidden x intermediate, plus two norms; then the embeddings, the final norm and
    lm_head (unless tied). Introduced in notebooks/02_loading_quantized.ipynb.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    if getattr(config, "attention_bias", False):
        attn += 2 * heads * head_dim + 2 * kv_heads * head_dim
    mlp = 3 * h * inter + ((2 * inter + h) if getattr(config, "mlp_bias", False) else 0)
    embed = config.vocab_size * h
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * h
    return ParamCount(quantizable=layers * (attn + mlp), kept=embed + lm_head + layers * 2 * h + h)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a mode needs, in bytes (notebooks/02_loading_quantized.ipynb; formula in the module docstring)."""

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

    def row(self, unit: str = "GiB") -> dict:
        """One table row in ``unit`` ("GiB" or "MiB")."""
        scale = {"GiB": GIB, "MiB": 2**20}[unit]
        return {
            "方式 mode": self.label,
            f"权重 weights {unit}": round(self.weights / scale, 2),
            f"KV 缓存 {unit}": round(self.kv_cache / scale, 2),
            f"激活 activations {unit}": round(self.activations / scale, 2),
            f"合计 total {unit}": round(self.total / scale, 2),
        }


def estimate_memory(
    config,
    mode: str,
    dtype: torch.dtype | None = None,
    *,
    batch: int = 1,
    context_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate the memory ``mode`` ("full", "8bit", "4bit") needs for ``config``, before loading.

    ``dtype`` is the compute dtype (default :func:`pick_dtype`); ``context_tokens`` defaults to
    min(2048, max_position_embeddings). Introduced in notebooks/02_loading_quantized.ipynb.
    """
    _check_mode(mode)
    dtype = dtype or pick_dtype()
    nbytes = torch.tensor([], dtype=dtype).element_size()
    if context_tokens is None:
        context_tokens = min(DEFAULT_CONTEXT_TOKENS, getattr(config, "max_position_embeddings", DEFAULT_CONTEXT_TOKENS))
    count = count_parameters(config)
    per_weight = nbytes if mode == "full" else QUANT_BYTES_PER_WEIGHT[mode]
    weights = int(count.quantizable * per_weight + count.kept * nbytes)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * batch * context_tokens * nbytes
    act = batch * context_tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * nbytes
    return MemoryEstimate(mode, mode_label(mode, dtype), count.total, weights, kv, act, batch, context_tokens)


def available_memory(device: str | None = None) -> tuple[int, str]:
    """(bytes, description) of the memory a model can use now: free GPU memory on CUDA
    (``torch.cuda.mem_get_info``), available RAM on the CPU. Introduced in
    notebooks/02_loading_quantized.ipynb."""
    device = device or pick_device()
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.get_device_name(0)} 空闲显存 {free / GIB:.1f} / {total / GIB:.1f} GiB"
    import psutil  # a dependency of accelerate

    vm = psutil.virtual_memory()
    return vm.available, f"CPU 可用内存 {vm.available / GIB:.1f} / {vm.total / GIB:.1f} GiB"


def check_fits(
    config,
    mode: str,
    dtype: torch.dtype | None = None,
    *,
    budget_bytes: int | None = None,
    device: str | None = None,
    batch: int = 1,
    context_tokens: int | None = None,
) -> MemoryEstimate:
    """Refuse, before loading, a mode that will not fit; return its estimate when it does.

    ``budget_bytes`` defaults to :func:`available_memory` of ``device``; pass a number to ask
    "would it fit on a T4?" (or to test). Raises :class:`ModelTooLargeError` naming the options:
    4-bit, a smaller model, CPU offload with ``device_map``/``max_memory``, a shorter context.
    Introduced in notebooks/02_loading_quantized.ipynb.
    """
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    est = estimate_memory(config, mode, dtype, batch=batch, context_tokens=context_tokens)
    measured = budget_bytes is None
    where = ("给定的预算", "the given budget")
    if measured:
        budget_bytes, _ = available_memory(device)
        where = ("本机 GPU 的空闲显存", "free GPU memory here") if device == "cuda" else ("本机可用内存", "available RAM here")
    if est.total <= budget_bytes:
        return est
    raise ModelTooLargeError(_too_large_message(config, est, dtype, budget_bytes, where, device == "cpu" and measured))


def _too_large_message(config, est: MemoryEstimate, dtype, budget: int, where: tuple[str, str], on_cpu: bool) -> str:
    need, have = est.total / GIB, budget / GIB
    billions = est.params / 1e9
    zh = [f"按估算，{billions:.2f}B 参数的模型用 {est.label} 加载需要约 {need:.1f} GiB"
          f"（权重 {est.weights / GIB:.1f} + KV 缓存 {est.kv_cache / GIB:.1f} + 激活 {est.activations / GIB:.1f}，"
          f"再加 {SAFETY_MARGIN:.0%} 余量），而可用的只有 {have:.1f} GiB（{where[0]}）。为避免显存/内存溢出，这里先不加载。可以："]
    en = [f"By estimate, this {billions:.2f}B-parameter model needs about {need:.1f} GiB in {est.label} "
          f"(weights {est.weights / GIB:.1f} + KV cache {est.kv_cache / GIB:.1f} + activations "
          f"{est.activations / GIB:.1f}, plus {SAFETY_MARGIN:.0%} margin), but only {have:.1f} GiB is "
          f"available ({where[1]}). Not loading, to avoid an out-of-memory crash. Options:"]
    n = 1
    if est.mode != "4bit":
        four = estimate_memory(config, "4bit", dtype, batch=est.batch, context_tokens=est.context_tokens)
        verdict_zh = "放得下" if four.total <= budget else "也放不下"
        verdict_en = "fits" if four.total <= budget else "does not fit either"
        zh.append(f"{n}. 改用 4-bit：BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")，"
                  f"约需 {four.total / GIB:.1f} GiB（{verdict_zh}）；")
        en.append(f"{n}. Use 4-bit: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\"), "
                  f"about {four.total / GIB:.1f} GiB ({verdict_en});")
        n += 1
    zh.append(f"{n}. 换更小的模型：13B 换成 7B，或者设置 LLAMA_TUTORIAL_MODEL=tiny 先走通流程；")
    en.append(f"{n}. Use a smaller model: 7B instead of 13B, or LLAMA_TUTORIAL_MODEL=tiny to walk through the steps;")
    n += 1
    gpu_gib = max(int(have) - 1, 1)
    offload = f'device_map="auto", max_memory={{0: "{gpu_gib}GiB", "cpu": "48GiB"}}'
    zh.append(f"{n}. 把放不下的层卸载到 CPU 内存：from_pretrained(..., {offload})"
              "（8-bit 卸载还要 BitsAndBytesConfig(..., llm_int8_enable_fp32_cpu_offload=True)），能跑但慢得多；")
    en.append(f"{n}. Offload the layers that do not fit to CPU RAM: from_pretrained(..., {offload}) "
              "(8-bit offload also needs BitsAndBytesConfig(..., llm_int8_enable_fp32_cpu_offload=True)); it runs, much slower;")
    n += 1
    if est.kv_cache + est.activations > 0.1 * est.total:
        zh.append(f"{n}. 缩短上下文或减小 batch：现在按 batch={est.batch}、{est.context_tokens} 个 token 预留了 KV 缓存。")
        en.append(f"{n}. Use a shorter context or a smaller batch: the KV cache is reserved for batch={est.batch}, "
                  f"{est.context_tokens} tokens.")
    if on_cpu:  # measured against this machine's RAM
        zh.append("在 CPU 上，更省事的办法是用有 GPU 的机器（例如 Colab 的 T4）。")
        en.append("On a CPU, the simpler way is a machine with a GPU (e.g. Colab's T4).")
    return bilingual("\n".join(zh), "\n".join(en))


def preflight_check(
    path: str | os.PathLike,
    mode: str = "full",
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    budget_bytes: int | None = None,
    batch: int = 1,
    context_tokens: int | None = None,
) -> MemoryEstimate:
    """Every check that can fail before a weight is read, cheapest first: the config is Llama's,
    every weight shard is present and whole, bitsandbytes runs (for 8bit/4bit), the mode fits.

    Returns the :class:`MemoryEstimate`. Introduced in notebooks/02_loading_quantized.ipynb.
    """
    _check_mode(mode)
    device = device or pick_device()
    config = load_llama_config(path)
    check_weights_complete(path)
    if mode != "full":
        check_bitsandbytes(device)
    return check_fits(
        config, mode, dtype, budget_bytes=budget_bytes, device=device, batch=batch, context_tokens=context_tokens
    )


# --------------------------------------------------------------------------- measuring


def linear_layer_types(model) -> Counter:
    """How many linear layers of each class the model holds, e.g.
    ``{"bitsandbytes.nn.Linear8bitLt": 28, "torch.nn.Linear": 1}`` (the 1 is lm_head, which
    bitsandbytes keeps in full precision). Introduced in notebooks/02_loading_quantized.ipynb."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            cls = type(module)
            top = cls.__module__.split(".")[0]
            prefix = {"torch": "torch.nn", "bitsandbytes": "bitsandbytes.nn"}.get(top, cls.__module__)
            counts[f"{prefix}.{cls.__name__}"] += 1
    return counts


@dataclass
class GenerationTiming:
    """Result of :func:`time_generation` (notebooks/02_loading_quantized.ipynb)."""

    batch: int
    new_tokens: int
    seconds: float
    text: str = ""
    input_ids: list = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_generation(model, tokenizer=None, prompt: str | None = None, *, batch: int = 1, new_tokens: int = 32,
                    warmup: bool = True) -> GenerationTiming:
    """Greedy-generate exactly ``new_tokens`` tokens for ``batch`` copies of ``prompt`` and time it.

    The prompt is wrapped with the tokenizer's chat template. Without a tokenizer (a random-weight
    model in the benchmark) a fixed 16-token prompt of ids is used. ``min_new_tokens`` forces the
    full length, so tokens/s = batch x new_tokens / seconds. Introduced in
    notebooks/02_loading_quantized.ipynb.
    """
    device = model.device
    if tokenizer is not None:
        prompt = prompt or "请用中文介绍一下长城。"
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = enc["input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id or 0
    else:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=gen)
        pad_id = 0
    input_ids = input_ids.repeat(batch, 1).to(device)
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(do_sample=False, pad_token_id=pad_id, attention_mask=attention_mask)
    with torch.inference_mode():
        if warmup:
            model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
    produced = out.shape[1] - input_ids.shape[1]
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationTiming(batch, produced, seconds, text, out[0].tolist())


def free_memory() -> None:
    """Return freed memory to the device after ``del model`` (notebooks/02_loading_quantized.ipynb)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- loading for later lessons


def quantization_config(mode: str | None, dtype: torch.dtype, *, double_quant: bool = False):
    """The ``BitsAndBytesConfig`` for ``mode`` ("8bit", "4bit"; None or "full" gives None).

    The one place the series builds it outside the notebooks (lesson 02 writes the same call
    inline). 4-bit is nf4 computing in ``dtype``; ``double_quant`` also quantizes the
    quantization constants, as QLoRA does (lesson 05). Introduced in notebooks/02_loading_quantized.ipynb.
    """
    from transformers import BitsAndBytesConfig

    if mode in (None, "full"):
        return None
    _check_mode(mode)
    quiet_bitsandbytes()
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=double_quant)


def load_model_and_tokenizer(choice, quantization: str | None = None, *, check: bool = True,
                             budget_bytes: int | None = None):
    """Load ``choice`` (a :class:`helpers.config.ModelChoice`) for lessons 03-06.

    ``quantization``: None (fp16/bf16 on a GPU, fp32 on the CPU), "8bit" or "4bit".
    On a GPU without a choice, Llama-2-7b loads in 8-bit as the article does.
    With ``check`` (default), :func:`preflight_check` runs first, so a non-Llama config, a missing
    shard, an unusable bitsandbytes or a mode that will not fit is a clear error, not a crash.
    Introduced in notebooks/02_loading_quantized.ipynb.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device()
    if quantization is None and device == "cuda" and not choice.is_tiny:
        quantization = "8bit"
    dtype = pick_dtype(device)
    if check:
        preflight_check(choice.path, quantization or "full", dtype=dtype, device=device, budget_bytes=budget_bytes)
    kwargs = {"dtype": dtype, "attn_implementation": pick_attn_implementation(device),
              "quantization_config": quantization_config(quantization, dtype)}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    model = AutoModelForCausalLM.from_pretrained(choice.path, **kwargs)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- measured GPU figures

T4_BANDWIDTH_GB_S = 320.0  # NVIDIA's published peak memory bandwidth of the Tesla T4
T4_MEMORY_GIB = 15.0  # what a T4 leaves usable of its 16 GB


def gpu_results(results_dir: str | os.PathLike | None = None) -> list[dict]:
    """The JSON files ``python -m bench.gpu_check`` wrote on CUDA GPUs (bench/results/gpu-check-*.json)."""
    from helpers.config import REPO_ROOT

    folder = Path(results_dir) if results_dir else REPO_ROOT / "bench" / "results"
    return [json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("gpu-check-*.json"))]


def gpu_results_markdown(results_dir: str | os.PathLike | None = None) -> str:
    """Markdown tables of the measured GPU figures, plus the T4 figures derived from them.

    Shown in notebooks/02_loading_quantized.ipynb and written into README.md by
    ``python -m bench.report``. Decode rates carry their share of the bandwidth ceiling; the T4
    rows are *derived* (the same share of the T4's ceiling), never measured.
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
                fits = "是 yes" if row.get("peak_gib", 99) < T4_MEMORY_GIB else "否 no"
                derived.append(f"| {shape['shape']} | {row['mode']} | {fits} | {t4[0]:.1f} | {t4[1]:.1f} |")
            if "lora_step" in shape:
                ls = shape["lora_step"]
                parts.append(
                    f"\nLoRA ({shape['shape']}, 4-bit base, r={ls['lora_r']}, seq {ls['seq_len']} × batch {ls['batch']}): "
                    f"{ls['step_s']} s/step, {ls['tokens_per_s']} tok/s, peak {ls.get('peak_gib')} GiB\n"
                )
        parts.append(
            "\n*T4 推算（derived, not measured）*：假设在 T4 上达到与上表相同的带宽利用率，T4 峰值带宽 "
            f"{T4_BANDWIDTH_GB_S:.0f} GB/s；显存按 {T4_MEMORY_GIB:.0f} GiB 可用判断。\n\n"
            "| shape | mode | fits a T4 | b1 tok/s (derived) | b8 tok/s (derived) |\n|---|---|---|---|---|\n"
            + "\n".join(derived)
        )
    parts.append("\n(%) = 实测速度占带宽上限的比例 / measured rate as a share of the bandwidth ceiling "
                 "(batch × copy bandwidth ÷ weight bytes read per step).")
    return "\n".join(parts)

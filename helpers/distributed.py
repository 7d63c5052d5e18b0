"""What each GPU holds when LoRA training is spread over several GPUs (notebooks/08_multi_gpu_lora.ipynb).

:func:`per_gpu_memory` does the accounting for every table in lesson 08, which explains it. Sources:
the ZeRO paper (Rajbhandari et al., 2020, section 3: 2 + 2 + 12 bytes per trained parameter with
mixed-precision Adam; what DDP, ZeRO-1/2/3 shard) and, for activations, Korthikanti et al. (2022,
eq. 1 without the attention-matrix term, which SDPA does not store). LoRA matrices train in fp32
(peft upcasts adapters): 4 + 4 + 8 bytes per trainable parameter; the frozen base costs only its
storage, as :func:`helpers.loading.estimate_memory` counts it. All results are estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from helpers.loading import LLAMA2_SHAPES, estimate_memory

# Which of (weights, gradients, optimizer state) each strategy shards over the GPUs.
SHARDS = {
    "ddp": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "fsdp_grad_op": (False, True, True),
    "zero3": (True, True, True),
    "fsdp_full": (True, True, True),
}
STRATEGIES = tuple(SHARDS)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(name: str):
    """A ``LlamaConfig`` with Llama-2's published shape (``"llama2-7b"``, ``"llama2-13b"``, ``"llama2-70b"``)."""
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA2_SHAPES[name])


def lora_trainable(config, r: int = 8, targets=LORA_TARGETS) -> int:
    """Trainable LoRA parameters: r * (fan_in + fan_out) for each targeted projection of each layer.

    tests/test_distributed.py checks this count against peft's own (get_nb_trainable_parameters).
    """
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)


@lru_cache(maxsize=64)
def _estimate(config_json: str, mode: str):
    """estimate_memory for a config given as JSON (cached: the tables ask for the same shapes many times)."""
    from transformers import LlamaConfig

    return estimate_memory(LlamaConfig.from_dict(json.loads(config_json)), mode, torch.bfloat16)


@dataclass(frozen=True)
class GPUMemory:
    """Bytes one GPU holds, by kind (notebooks/08_multi_gpu_lora.ipynb)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def per_gpu_memory(config, method: str, strategy: str, gpus: int, *, r: int = 8, micro_batch: int = 1,
                   seq_len: int = 2048, checkpointing: bool = True, trainable: float | None = None) -> GPUMemory:
    """Memory per GPU for ``method`` ("full", "lora", "qlora") under ``strategy`` on ``gpus`` GPUs.

    ``trainable`` overrides the count of trained parameters (all of them for "full"; the LoRA
    matrices for "lora"/"qlora", computed by :func:`lora_trainable` when omitted).
    """
    if strategy not in SHARDS:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    shard_w, shard_g, shard_o = (gpus if s else 1 for s in SHARDS[strategy])
    if method == "full":
        params = _estimate(config.to_json_string(), "full").params if trainable is None else trainable
        weights, grads, optim = 2 * params, 2 * params, 12 * params
    elif method in ("lora", "qlora"):
        frozen = _estimate(config.to_json_string(), "4bit" if method == "qlora" else "full").weights
        t = lora_trainable(config, r) if trainable is None else trainable
        weights, grads, optim = frozen + 4 * t, 4 * t, 8 * t
    else:
        raise ValueError('method must be "full", "lora" or "qlora"')
    sbh = seq_len * micro_batch * config.hidden_size
    layers = config.num_hidden_layers
    acts = (2 * sbh * layers + 34 * sbh) if checkpointing else 34 * sbh * layers
    return GPUMemory(weights / shard_w, grads / shard_g, optim / shard_o, float(acts))


def smallest_gpu_count(config, method: str, strategy: str, gpu_bytes: float, *, max_gpus: int = 64, **kwargs) -> int | None:
    """The fewest GPUs (a power of two) on which every GPU's share fits ``gpu_bytes``, or None."""
    n = 1
    while n <= max_gpus:
        if per_gpu_memory(config, method, strategy, n, **kwargs).total <= gpu_bytes:
            return n
        n *= 2
    return None

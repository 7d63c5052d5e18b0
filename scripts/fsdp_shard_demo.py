"""FSDP on the CPU, with PyTorch's own `fully_shard` (lesson 08, notebooks/08_multi_gpu_lora.ipynb).

    torchrun --standalone --nproc_per_node 2 scripts/fsdp_shard_demo.py [--model tiny] [--json result.json] [--lora DIR]

Each rank wraps every LlamaDecoderLayer and then the whole model with `fully_shard` (FSDP2) on the
gloo backend, so each rank keeps only its shard of every parameter. It prints how many parameter
elements each rank holds, runs one forward and backward pass on the same batch on every rank, and
rank 0 writes the numbers (and the loss) to --json so the lesson can compare them with one
unsharded process. The Trainer does not use FSDP on a CPU-only machine (accelerate sets up a
MULTI_CPU state and trains with DDP): this script shows the sharding itself.

With ``--lora DIR`` the model carries lesson 05's LoRA (its settings' rank, alpha and targets), takes one
AdamW step, and the adapter is saved to DIR from a full state dict gathered on every rank with
``get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))``, the call accelerate's
``get_state_dict`` makes for FSDP2 (helpers.multigpu.adapter_state_dict); rank 0 alone holds only its shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers._compat import end_distributed_process  # noqa: E402
from helpers.models import resolve_model  # noqa: E402


def batch(tokenizer):
    text = ["长城是中国古代的军事防御工程。", "Human: 你好\nAssistant: 你好，有什么可以帮你？"]
    enc = tokenizer(text, return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lora", type=Path, help="train lesson 05's LoRA one step and save the adapter here")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    choice = resolve_model(args.model, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32)
    if args.lora:
        from peft import get_peft_model

        from helpers.finetune import lora_config, settings_for

        model = get_peft_model(model, lora_config(settings_for(choice)))  # lesson 05's rank, alpha and targets
    full = sum(p.numel() for p in model.parameters())
    inputs = batch(tokenizer)
    if not dist.is_initialized() and "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
    sharded = dist.is_initialized()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        base = model.get_base_model() if args.lora else model
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(model)

    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    held = sum(local(p).numel() for p in model.parameters())
    loss = model(**inputs).loss
    loss.backward()
    rank = dist.get_rank() if sharded else 0
    world = dist.get_world_size() if sharded else 1
    print(f"rank {rank}/{world}: holds {held:,} of {full:,} parameter elements, loss {loss.item():.6f}", flush=True)
    result = {"world_size": world, "full": full, "held": [held], "loss": loss.item()}
    if sharded:
        gathered = [None] * world
        dist.all_gather_object(gathered, held)
        result["held"] = gathered
    if args.lora:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.optim.AdamW(trained, lr=1e-2).step()
        state = None
        if sharded:  # every rank takes part: the shards are gathered into one full state dict on rank 0 (CPU)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(args.lora, state_dict=state)  # state None: the model's own (whole) weights
            result["lora"] = {"trained": sum(p.numel() for p in trained),
                              "rank0_holds": sum(local(p).numel() for p in trained),
                              "adapter_bytes": (args.lora / "adapter_model.safetensors").stat().st_size}
    if rank == 0 and args.json:
        args.json.write_text(json.dumps(result), encoding="utf-8")
    if sharded:  # while the sharded model still holds the process group: helpers._compat says why
        end_distributed_process(0)


if __name__ == "__main__":
    main()

"""Several processes, one adapter (notebooks/08_multi_gpu_lora.ipynb): whether this process holds only a shard of
the weights, and how the trained LoRA weights are gathered from the shards before rank 0 saves them.
helpers.finetune's recipe calls both, so lessons 05 and 06 run unchanged under ``accelerate launch``."""

from __future__ import annotations

import os


def sharded_training() -> bool:
    """Whether this process trains under FSDP or DeepSpeed ZeRO-3 (``accelerate launch`` with fsdp.yaml or a
    ZeRO-3 config; ZeRO-3 is known once the ``TrainingArguments`` exist): each rank then holds only a shard of
    the weights. Introduced in notebooks/08_multi_gpu_lora.ipynb."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") or is_deepspeed_zero3_enabled()


def adapter_state_dict(trainer):
    """The trained LoRA weights gathered from their shards, or None when every rank holds them whole (one
    process, DDP, ZeRO-1/2: save the model as it is). Every rank must call it (the gathering is collective);
    ranks other than 0 get None. FSDP: a full state dict, switched to ``FULL_STATE_DICT`` first as peft's FSDP
    guide does before ``trainer.save_model()`` (with ``SHARDED_STATE_DICT`` the Trainer saves no model at all);
    ZeRO-3: the trained parameters gathered with ``deepspeed.zero.GatheredParameters``, without which rank 0
    saves empty LoRA tensors (DeepSpeed #4295). Introduced in notebooks/08_multi_gpu_lora.ipynb."""
    rank0 = trainer.is_world_process_zero()
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        state = trainer.accelerator.get_state_dict(trainer.model)  # the call Trainer.save_model makes
        return state if rank0 else None
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        trained = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):
            # copied inside: leaving the block partitions the parameters again
            return {name: p.detach().cpu().clone() for name, p in trained} if rank0 else None
    return None

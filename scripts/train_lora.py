"""Lesson 05's LoRA recipe from a shell: the same code as the notebook (helpers.finetune.train_adapter).

    python scripts/train_lora.py [--model tiny] [--train-file data/train_sft.csv] [--dev-file data/dev_sft.csv]
                                 [--output outputs/lora-adapter] [--overwrite] [--max-steps N] [--on-bad stop|drop]
                                 [--ddp-backend gloo]
    torchrun --standalone --nproc_per_node 2 scripts/train_lora.py --ddp-backend gloo ...   # two CPU processes
    accelerate launch --config_file scripts/accelerate/ddp.yaml scripts/train_lora.py ...   # lesson 08

Lesson 08 (notebooks/08_multi_gpu_lora.ipynb) adds the knobs a multi-process run needs: the per-process
batch and gradient accumulation (global batch = processes x batch x accumulation), the row order
(``--sequential`` makes one-process and two-process runs see the same global batches), a simulated
interruption (``--stop-after``) and ``--metrics DIR``, where every rank writes ``rank<N>.json`` with the
training rows it really received (seen by a forward hook), its tokens, wall time and peak memory.

Without ``--output`` the adapter goes to ``outputs/lora-adapter`` (``-2``, ``-3`` ... if taken), where
lesson 06 finds it. Under torchrun/accelerate the ``Trainer`` runs DDP (or FSDP / DeepSpeed, as the accelerate
config says) and only rank 0 writes; under FSDP and ZeRO-3 every rank first helps gather the adapter from its
shards (helpers.multigpu.adapter_state_dict).
Introduced with notebooks/05_lora_finetune.ipynb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers._compat import end_distributed_process  # noqa: E402
from helpers.config import DATA_DIR, TutorialError
from helpers.models import resolve_model  # noqa: E402
from helpers.finetune import train_adapter  # noqa: E402


def _cpu_processes() -> bool:
    """Several processes on a machine without CUDA: the Trainer must be told to use the CPU (gloo)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class StopAfterSteps(TrainerCallback):
    """Saves a checkpoint at optimizer step ``steps`` and stops (a simulated interruption); the same
    callback notebooks/05_lora_finetune.ipynb writes out."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.steps:
            control.should_save = control.should_training_stop = True
        return control


class RankMetrics(TrainerCallback):
    """Writes <folder>/rank<N>.json at the end: the training rows this rank received (input_ids as the
    model saw them, padding removed), its token count, wall time and peak resident memory."""

    def __init__(self, folder: Path):
        self.folder, self.rows, self.tokens, self.hook = Path(folder), [], 0, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()

        def record(module, call_args, call_kwargs):
            if module.training and "input_ids" in call_kwargs:
                ids, mask = call_kwargs["input_ids"], call_kwargs.get("attention_mask")
                for i, row in enumerate(ids.tolist()):
                    keep = mask[i].tolist() if mask is not None else [1] * len(row)
                    self.rows.append([t for t, m in zip(row, keep) if m])
                self.tokens += int(mask.sum()) if mask is not None else ids.numel()

        self.hook = model.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()
        rank = int(os.environ.get("RANK", "0"))
        self.folder.mkdir(parents=True, exist_ok=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        losses = [[h["step"], h["loss"]] for h in state.log_history if "loss" in h]
        (self.folder / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "rows": self.rows,
            "tokens": self.tokens, "seconds": time.perf_counter() - self.start, "peak_rss_bytes": peak,
            "global_step": state.global_step, "losses": losses}), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="profile name or model folder (default: LLAMA_TUTORIAL_MODEL / auto)")
    parser.add_argument("--train-file", type=Path, default=DATA_DIR / "train_sft.csv")
    parser.add_argument("--dev-file", type=Path, default=DATA_DIR / "dev_sft.csv")
    parser.add_argument("--output", type=Path, help="adapter folder (default: outputs/lora-adapter or the next free name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--on-bad", choices=("stop", "drop"), default="stop", help="what to do with bad rows")
    parser.add_argument("--ddp-backend", help='torch.distributed backend, e.g. "gloo" for CPU processes')
    parser.add_argument("--ddp-timeout", type=int, help="seconds a collective waits for the other ranks (1800)")
    parser.add_argument("--batch-size", type=int, help="rows per process and step (per_device_train_batch_size)")
    parser.add_argument("--grad-accum", type=int, help="gradient_accumulation_steps")
    parser.add_argument("--limit-rows", type=int, help="train on the first N valid rows only")
    parser.add_argument("--sequential", action="store_true", help="rows in file order (no shuffling)")
    parser.add_argument("--no-eval", action="store_true", help="skip the dev-set evaluation")
    parser.add_argument("--save-steps", type=int, help="write a checkpoint every N steps")
    parser.add_argument("--stop-after", type=int, help="save a checkpoint at step N and stop (simulated interruption)")
    parser.add_argument("--logging-steps", type=int, help="log the training loss every N steps")
    parser.add_argument("--metrics", type=Path, help="folder for rank<N>.json: rows seen, tokens, seconds, peak memory")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {
        "ddp_backend": args.ddp_backend, "ddp_timeout": args.ddp_timeout,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum, "save_steps": args.save_steps,
        "logging_steps": args.logging_steps,
        "train_sampling_strategy": "sequential" if args.sequential else None,
        "eval_strategy": "no" if args.no_eval else None, "eval_on_start": False if args.no_eval else None,
        "use_cpu": True if _cpu_processes() else None}.items() if v is not None}
    callbacks = [StopAfterSteps(args.stop_after)] if args.stop_after else []
    if args.metrics:
        callbacks.append(RankMetrics(args.metrics))
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    code = 0
    try:
        trainer = train_adapter(resolve_model(args.model, verbose=False), args.output, train_file=args.train_file,
                                dev_file=args.dev_file, on_bad=args.on_bad, overwrite=args.overwrite,
                                max_steps=args.max_steps, limit_rows=args.limit_rows, callbacks=tuple(callbacks),
                                save=not args.stop_after, args_overrides=overrides)
        if trainer.is_world_process_zero():
            print(trainer.adapter_dir)
    except TutorialError as err:
        print(err, file=sys.stderr)
        code = 2
    except BaseException:
        if not several:
            raise
        traceback.print_exc()
        code = 1
    if several:  # while the trainer (and its DDP model) is still alive: helpers._compat says why
        end_distributed_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Lesson 05's LoRA recipe from a shell: the same code as the notebook (helpers.finetune.train_adapter).

    python scripts/train_lora.py [--model tiny] [--train-file data/train_sft.csv] [--dev-file data/dev_sft.csv]
                                 [--output outputs/lora-adapter] [--overwrite] [--max-steps N] [--on-bad stop|drop]
                                 [--ddp-backend gloo]
    torchrun --nproc_per_node 2 scripts/train_lora.py --ddp-backend gloo ...   # two CPU processes
    accelerate launch scripts/train_lora.py ...

Without ``--output`` the adapter goes to ``outputs/lora-adapter`` (``-2``, ``-3`` ... if taken), where
lesson 06 finds it. Under torchrun/accelerate the ``Trainer`` runs DDP and only rank 0 writes.
Introduced with notebooks/05_lora_finetune.ipynb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import DATA_DIR, TutorialError, resolve_model  # noqa: E402
from helpers.finetune import train_adapter  # noqa: E402


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
    args = parser.parse_args(argv)
    try:
        trainer = train_adapter(resolve_model(args.model, verbose=False), args.output, train_file=args.train_file,
                                dev_file=args.dev_file, on_bad=args.on_bad, overwrite=args.overwrite,
                                max_steps=args.max_steps,
                                args_overrides={"ddp_backend": args.ddp_backend} if args.ddp_backend else None)
    except TutorialError as err:
        print(err, file=sys.stderr)
        return 2
    if trainer.is_world_process_zero():
        print(trainer.adapter_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

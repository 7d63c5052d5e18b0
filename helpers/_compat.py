"""Workarounds for bugs in the libraries the course uses, each with the versions it bridges.

Plumbing, not a lesson: the lessons and helpers/finetune.py call these so a learner's run does not
fail or hang on a known upstream bug. Remove a shim when every supported version has the fix.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

_CPU_N_REGISTERED = False


def allow_indexed_cpu_locations() -> None:
    """Let ``torch.load`` read storages into ``"cpu:N"``.

    Bridges transformers 5.15-5.17 (Colab ships 5.15): they resume a multi-process CPU run with
    ``torch.load(optimizer.pt, map_location=args.device)``, i.e. ``cpu:0``, and torch has no restore rule for an
    indexed CPU device ("don't know how to restore data location of torch.storage.UntypedStorage (tagged with
    cpu:0)"); 5.18.0 maps to plain ``"cpu"``. The rule goes in through torch's public hook for storage locations
    (``torch.serialization.register_package``) and changes nothing for other locations. Idempotent.
    """
    global _CPU_N_REGISTERED
    if _CPU_N_REGISTERED:
        return
    import torch

    def restore(storage, location: str):
        return storage if location.startswith("cpu:") and location[4:].isdigit() else None

    torch.serialization.register_package(100, lambda obj: None, restore)
    _CPU_N_REGISTERED = True


def end_distributed_process(code: int) -> NoReturn:
    """End a torchrun / accelerate worker now: flush stdout and stderr, then ``os._exit(code)``.

    Bridges pytorch/pytorch#56297 (open in torch 2.13): when Python frees the last reference to a gloo process
    group (held by ``torch.distributed``'s registry, a DDP ``Reducer`` or an FSDP state), ``~ProcessGroupGloo``
    joins its worker threads while holding the GIL. A worker still freeing a finished collective's tensors needs
    the GIL to drop them, so the two wait for each other forever. Seen here under transformers 5.15 on a loaded
    2-core machine, about one two-process run in 18 (three loops at once): rank 0 printed the adapter folder, then hung in
    ``~ProcessGroupGloo`` (py-spy), and the launcher waited for it. ``destroy_process_group`` can run that
    destructor too, so it is skipped along with the interpreter's teardown. Call this only after every file
    the process writes is written and closed, and after the last collective.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

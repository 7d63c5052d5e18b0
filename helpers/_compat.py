"""Version shims, private-API access and workarounds for upstream bugs, each with the versions it bridges.

Plumbing, not a lesson: the helpers call these so one code path runs under the course's pinned versions and
Colab's older ones, and a learner's run does not fail or hang on a known upstream bug. Every use of a library's
private module goes through here. Remove a shim when every supported version has what it bridges.
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
    the GIL to drop them, so the two wait for each other forever. It shows as a hang at the end of lesson 08's
    two-process run: rank 0 has printed the adapter folder and waits in ``~ProcessGroupGloo``, and the launcher waits
    for it. ``destroy_process_group`` can run that
    destructor too, so it is skipped along with the interpreter's teardown. Call this only after every file
    the process writes is written and closed, and after the last collective.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def hub_httpx():
    """The HTTP library huggingface_hub builds on: ``httpx`` up to 1.x (Colab ships 1.27), ``httpx2`` from 2.0
    (the course pins 2.4). Both keep it in the private module ``huggingface_hub.utils._http``."""
    from huggingface_hub.utils import _http

    return getattr(_http, "httpx2", None) or _http.httpx


def hub_client_factory():
    """The HTTP client factory huggingface_hub uses now, to put back after ``huggingface_hub.set_client_factory``.

    huggingface_hub 1.27 to 2.4 have no public getter: the factory is the private ``_http._GLOBAL_CLIENT_FACTORY``,
    which starts as ``default_client_factory``."""
    from huggingface_hub.utils import _http

    return getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory


def render_chat_template(messages: list[dict], template: str, add_generation_prompt: bool, **tokens) -> str:
    """One conversation rendered with a Jinja chat template by transformers' own renderer, without a tokenizer.

    ``transformers.utils.chat_template_utils.render_jinja_template`` is what ``apply_chat_template`` calls; it is
    not in transformers' documented API. 5.15 (Colab) to 5.25 (the course) take the same arguments."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **tokens)
    return rendered[0]


def checkpointing_argument() -> str:
    """The ``TrainingArguments`` field that turns activation (gradient) checkpointing on.

    transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name stays as a
    deprecated alias that warns); Colab ships 5.15, which knows only ``gradient_checkpointing``."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"

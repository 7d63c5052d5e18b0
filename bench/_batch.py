"""The set-up bench/evaluation.py and bench/serve.py share: lesson 06's model, tokenizer and questions."""

from __future__ import annotations

import os


def lesson06_batch_setup():
    """``(choice, model, tokenizer, questions)`` for batched generation as lesson 06 does it: the model of
    LLAMA_TUTORIAL_MODEL (the tiny model unless it says otherwise) loaded by
    ``helpers.loading.load_model_and_tokenizer``, its tokenizer padding on the left with ``<unk>``, and the
    95 evaluation questions. Sets ``OMP_WAIT_POLICY=PASSIVE`` first, so idle OpenMP threads do not spin on a
    shared machine: call it before anything imports torch."""
    os.environ.setdefault("LLAMA_TUTORIAL_MODEL", "tiny")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from helpers.evaluation import load_questions
    from helpers.loading import load_model_and_tokenizer
    from helpers.models import resolve_model

    choice = resolve_model(verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.unk_token  # as lesson 06 batches
    return choice, model, tokenizer, load_questions()

"""Fixtures shared by the test files.

The markers that sort tests into tiers (``slow``, ``serve_env``, ``vocab``, ``gguf``, ``smollm2``, ``server``, ``browser``)
are registered in pyproject.toml; ``make check`` runs the tests that carry none of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny model's folder, built on the first request of a session (when cached, only a hash check).

    Only the tests that load it ask for it, so a run of the hygiene or stamper tests never builds a model.
    The build holds a file lock: two xdist workers that ask at once build it once, the second waits for it.
    """
    from helpers.tiny import ensure_tiny_model

    return ensure_tiny_model(verbose=False)

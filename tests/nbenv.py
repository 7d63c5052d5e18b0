"""pytest plugin loaded before anything else (``-p tests.nbenv`` in pyproject.toml).

It sets the offline and test variables *before* any notebook kernel starts: kernels inherit the
environment of the pytest process, and HF_HUB_OFFLINE / TQDM_DISABLE are read at import time.
"""

from __future__ import annotations

import os
import tempfile

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "LLAMA_TUTORIAL_MODEL": "tiny",
    "LLAMA_TUTORIAL_TEST": "1",
    # Lessons show their figures in the notebook, as for a learner (Agg would draw nothing there).
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    # The test process and a notebook kernel share 2 cores: idle OpenMP threads must sleep, not spin.
    "OMP_WAIT_POLICY": "PASSIVE",
}

for key, value in OFFLINE_ENV.items():
    os.environ[key] = value
# What the lessons make (adapters, answers, reports) goes to a fresh folder per test session,
# so tests never touch a learner's outputs/ and lesson 06 can reuse lesson 05's adapter.
os.environ.setdefault("LLAMA_TUTORIAL_OUTPUT", tempfile.mkdtemp(prefix="llama-tutorial-test-"))


def pytest_configure(config):
    # Build (or find in the cache) the tiny model once, before any test or kernel needs it.
    from helpers.tiny import ensure_tiny_model

    ensure_tiny_model(verbose=False)
    # bitsandbytes probes the device when first imported: import it here, on the real (CPU-only)
    # machine, so a test that fakes a CUDA GPU never becomes its first importer.
    import bitsandbytes  # noqa: F401


# `make test` runs on two workers (pytest-xdist, --dist loadgroup). Each test file and each lesson is
# one group, so a module's fixtures are built once and a notebook's cells run in order in one kernel.
# Lessons 05, 06 and 07 share a group: 06 and 07 reuse the adapter 05 trained (same output folder).
# The longest groups are handed out first, so neither worker is left with a long one at the end.
SHARED_GROUPS = {"05_lora_finetune.ipynb": "lessons-05-06-07", "06_evaluation.ipynb": "lessons-05-06-07",
                 "07_serving_vllm.ipynb": "lessons-05-06-07"}
LONGEST_FIRST = ["lessons-05-06-07", "08_multi_gpu_lora.ipynb", "test_serve.py", "test_evaluation.py",
                 "test_distributed.py", "test_finetune.py"]  # measured: --durations=0, tiny model, 2 cores


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    import pytest

    def group(item):
        name = item.path.name
        return SHARED_GROUPS.get(name, name)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: each group keeps its order

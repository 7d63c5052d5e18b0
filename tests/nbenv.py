"""pytest plugin loaded before anything else (``-p tests.nbenv`` in pyproject.toml).

It sets the offline and test variables *before* any notebook kernel starts: kernels inherit the
environment of the pytest process, and HF_HUB_OFFLINE / TQDM_DISABLE are read at import time.
"""

from __future__ import annotations

import hashlib
import os
import sys
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
    # and one torch thread per process: two workers (and their kernels, and torchrun's ranks) already keep
    # both cores busy, and more threads than cores only make them wait on each other.
    "OMP_NUM_THREADS": "1",
}

for key, value in OFFLINE_ENV.items():
    os.environ[key] = value
# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm) into torch's extension folder the first time
# lesson 08 runs it, keyed by name only: the course's env and the Colab check's env would each rebuild the other's
# copy. One folder per Python environment keeps both.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "torch_extensions", hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))
# What the lessons make (adapters, answers, reports) goes to a fresh folder per test session,
# so tests never touch a learner's outputs/ and lesson 06 can reuse lesson 05's adapter.
os.environ.setdefault("LLAMA_TUTORIAL_OUTPUT", tempfile.mkdtemp(prefix="llama-tutorial-test-"))


def pytest_configure(config):
    # bitsandbytes probes the device when first imported: import it here, on the real (CPU-only)
    # machine, so a test that fakes a CUDA GPU never becomes its first importer.
    import bitsandbytes  # noqa: F401


_tiny_ready = False


def pytest_runtest_setup(item):
    # A lesson under nbval loads the tiny model in its kernel, where no fixture reaches: build it before the
    # first notebook cell runs. Unit tests ask for it with the tiny_model fixture (tests/conftest.py).
    global _tiny_ready
    if item.path.suffix == ".ipynb" and not _tiny_ready:
        from helpers.tiny import ensure_tiny_model

        ensure_tiny_model(verbose=False)  # under a file lock: a second xdist worker waits, then finds it built
        _tiny_ready = True


# `make test` runs on two workers (pytest-xdist, --dist loadfile): each test file and each lesson goes
# to one worker, so a module's fixtures are built once and a notebook's cells run in order in one kernel.
# The longest files are handed out first (--no-loadscope-reorder keeps this order: by default xdist sorts
# files by their number of tests, which would put the 2-test real-model tier, the longest by far, last). xdist gives
# a worker its next file when two or fewer of its tests are pending: tests/test_real_model.py keeps more than
# two tests, so no file waits behind its fixture while the other worker runs out of work.
# (--dist loadgroup would keep lessons 05-07 on one worker, but with pytest 9.2 and xdist 3.8 the group suffix
# does not reach the node ids.)
# The order is by worker-seconds from `pytest --durations=0` on two cores, longest first. Lesson 09 is left to the
# end of the queue: by then lesson 05 has saved the adapter it converts (run first, it would train its own copy).
LONGEST_FIRST = ["test_real_model", "08_multi_gpu_lora", "test_distributed", "07_serving_vllm", "test_gguf",
                 "test_serve", "test_evaluation", "05_lora_finetune", "test_finetune", "test_browser", "test_download",
                 "06_evaluation"]


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):
        rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file keeps its order

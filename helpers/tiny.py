"""The tiny offline Llama-2 the course runs on a CPU (profile ``tiny``; notebooks/00_overview.ipynb): built by
scripts/build_tiny_model.py once per version of that script and of its corpus in data/, then cached."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from helpers.config import DATA_DIR, REPO_ROOT, TutorialError, bilingual, home_dir

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_tiny_model.py"
CORPUS_FILES = ("pretrain_en.jsonl", "pretrain_zh.txt", "train_sft.csv")  # what the build script trains on


def build_hash() -> str:
    """The cache key: a hash of the build script and its corpus (any change to either builds anew)."""
    h = hashlib.sha256()
    for path in (BUILD_SCRIPT, *(DATA_DIR / name for name in CORPUS_FILES)):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def ensure_tiny_model(verbose: bool = True) -> Path:
    """Return the tiny model's folder, running the build script first (about 1-2 minutes on a CPU, in its own
    process) if this version has no cached build; the folder appears complete or not at all."""
    target = home_dir() / "tiny" / build_hash()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
            try:
                if verbose:
                    print("第一次使用：正在构建 tiny 模型（CPU 上约 1–2 分钟，只做一次）…", flush=True)
                done = subprocess.run([sys.executable, str(BUILD_SCRIPT), str(tmp)], capture_output=True, text=True)
                if done.returncode != 0:
                    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                    raise TutorialError(bilingual(
                        f"构建 tiny 模型失败（{BUILD_SCRIPT.name} 的退出码 {done.returncode}），什么也没有缓存。运行 python {BUILD_SCRIPT} "
                        "/tmp/tiny 可以看到完整的输出。最后几行：",
                        f"Building the tiny model failed ({BUILD_SCRIPT.name} exited with {done.returncode}); nothing "
                        f"was cached. Run python {BUILD_SCRIPT} /tmp/tiny to see it whole. Last lines:") + "\n" + tail)
                if verbose:
                    print(*done.stdout.strip().splitlines()[-1:])  # the script's summary: size, loss, seconds
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(f"tiny model ready: {ensure_tiny_model()}")

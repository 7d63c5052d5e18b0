"""Conventions every lesson notebook follows (notebooks/00_overview.ipynb shows them).

The hygiene tests check notebooks against these, and authors copy the install cell from here so
every lesson has the same one.
"""

from __future__ import annotations

GITHUB_REPO = "llama2-chinese-course/llama2-chinese-course"
COLAB_PREFIX = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def colab_badge(path: str) -> str:
    """Markdown for the Open-in-Colab badge of the notebook at ``path`` (e.g. notebooks/00_overview.ipynb)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({COLAB_PREFIX}{path})"


# The first code cell of every lesson. It installs only inside Colab, and never reinstalls torch:
# the package asks for torch>=2.1, which Colab's preinstalled torch satisfies, so pip keeps it.
INSTALL_CELL = '''# 仅在 Google Colab 中运行安装；本地请用 `make lab`（它已完成全部安装）。
# Install only inside Colab; Colab's own torch is kept (never reinstalled).
import os, subprocess, sys

IN_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
if IN_COLAB:
    source = os.environ.get("LLAMA_TUTORIAL_SOURCE", "https://github.com/llama2-chinese-course/llama2-chinese-course.git")
    if not os.path.isdir(source):
        if not os.path.isdir("llama2-chinese-course"):
            subprocess.run(["git", "clone", "--depth", "1", source, "llama2-chinese-course"], check=True)
        source = "llama2-chinese-course"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", source], check=True)
    sys.path.insert(0, os.path.abspath(source))
    import torch
    print("Colab 环境已就绪，torch", torch.__version__)'''

COLAB_METADATA = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "gpuType": "T4"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}

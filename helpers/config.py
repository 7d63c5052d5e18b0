"""Where the series keeps its files, and how its errors are written: the leaf every helpers module imports
(it imports no other helpers module). Which model runs is helpers/models.py (notebooks/00_overview.ipynb)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
# Lesson 01's record of a verified download, in the model folder: {"files": {path: {"size": ...}}}.
DOWNLOAD_MARKER = Path(".cache") / "llama2-tutorial" / "verified.json"


class TutorialError(RuntimeError):
    """An error a learner can fix; its message is in Chinese and English and names the next step."""


def bilingual(zh: str, en: str) -> str:
    """Join a Chinese and an English message the way every error in the series is written."""
    return f"{zh}\n{en}"


def home_dir() -> Path:
    """Where the series caches what it builds or downloads (``LLAMA_TUTORIAL_HOME``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2-chinese-tutorial"
    return Path(os.environ.get("LLAMA_TUTORIAL_HOME", default)).expanduser()


def models_dir() -> Path:
    """Where lesson 01 puts downloaded weights: ``<home>/models/<profile>``."""
    return home_dir() / "models"


def output_dir() -> Path:
    """Where lessons write what the learner makes (``LLAMA_TUTORIAL_OUTPUT``, default ``outputs/``)."""
    return Path(os.environ.get("LLAMA_TUTORIAL_OUTPUT", REPO_ROOT / "outputs")).expanduser()


HUGGINGFACE_CO = "https://huggingface.co"


def keep_token_from_mirrors() -> bool:
    """Stop huggingface_hub from sending the stored token (``hf auth login``, ``HF_TOKEN``, Colab's secret) when
    ``HF_ENDPOINT`` names another server (a mirror such as hf-mirror.com, a company proxy): a token meant for
    huggingface.co is not handed to a third party. Sets ``HF_HUB_DISABLE_IMPLICIT_TOKEN=1`` for this process
    and every process it starts (the vLLM server, training launches), and for huggingface_hub if it is already
    imported. A token passed explicitly (``token=...``) is still sent. Runs when ``helpers`` is imported;
    returns True when it turned the stored token off."""
    import sys

    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if not endpoint or endpoint == HUGGINGFACE_CO:
        return False
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    return True

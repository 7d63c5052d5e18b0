"""Where the series keeps its files, and how its errors are written: the leaf every helpers module imports
(it imports no other helpers module). Which model runs is helpers/models.py (notebooks/00_overview.ipynb)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


LANGUAGE_ENV = "LLAMA_TUTORIAL_LANG"  # "zh" (default) or "en": the language errors and notices are shown in


def language() -> str:
    """The language the series shows its errors in: ``en`` when ``LLAMA_TUTORIAL_LANG=en``, otherwise ``zh``."""
    return "en" if os.environ.get(LANGUAGE_ENV, "").strip().lower() == "en" else "zh"


def localized(zh: str, en: str, lang: str | None = None) -> str:
    """The one of two texts (a notice, a warning) in the language :func:`language` picks."""
    return en if (lang or language()) == "en" else zh


class TutorialError(RuntimeError):
    """An error a learner can fix (notebooks/00_overview.ipynb): a short dotted ``code`` named for the problem
    (``data.empty_file``), the message in Chinese (``zh``) and in English (``en``), each already written out and
    naming the next step, and the values it is about (``fields``). ``str(err)`` is the Chinese message, or the
    English one with ``LLAMA_TUTORIAL_LANG=en``. Code that reacts to an error reads ``code``, never the text."""

    def __init__(self, code: str, zh: str, en: str, **fields):
        super().__init__(code)  # one argument: OSError and FileExistsError subclasses take it as the message
        self.code, self.zh, self.en, self.fields = code, zh, en, fields

    def message(self, lang: str | None = None) -> str:
        """The message in ``lang`` (``zh`` or ``en``), by default in the language :func:`language` picks."""
        return localized(self.zh, self.en, lang)

    def __str__(self) -> str:
        return self.message()

    def __reduce__(self):  # pickling (worker processes) rebuilds the same error, whatever a subclass's __init__ takes
        return _rebuild, (type(self), self.code, self.zh, self.en, self.fields, self.__dict__)


def _rebuild(cls, code, zh, en, fields, state):
    err = (OSError if issubclass(cls, OSError) else cls).__new__(cls)  # OSError's layout needs its own __new__
    TutorialError.__init__(err, code, zh, en, **fields)
    err.__dict__.update(state)
    return err


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

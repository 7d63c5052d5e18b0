"""Which model the lessons run, and where the series keeps its files.

Introduced in notebooks/00_overview.ipynb. Every lesson calls :func:`resolve_model` once and
then loads ``choice.path`` with the ordinary ``AutoTokenizer`` / ``AutoModelForCausalLM`` code,
so the same cells run the real Llama-2 on a GPU and the tiny offline model on a CPU.

``LLAMA_TUTORIAL_MODEL`` takes:

* ``auto`` (default): the real Llama-2-7b-chat when a CUDA GPU with enough free memory is present
  and its weights are reachable, else ``tiny``;
* a profile name from :data:`PROFILES`;
* a Hub repo id such as ``meta-llama/Llama-2-7b-chat-hf``;
* a local folder holding ``config.json`` (for instance what lesson 01 downloaded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
ENV_MODEL = "LLAMA_TUTORIAL_MODEL"
# Written by lesson 01's download into the model folder once every file is verified; a folder
# without it is an unfinished download, not local weights.
DOWNLOAD_MARKER = Path(".cache") / "llama2-tutorial" / "verified.json"


class TutorialError(RuntimeError):
    """An error a learner can fix; its message is in Chinese and English and names the next step."""


def bilingual(zh: str, en: str) -> str:
    """Join a Chinese and an English message the way every error in the series is written."""
    return f"{zh}\n{en}"


@dataclass(frozen=True)
class Profile:
    """A model the series knows by a short name (see notebooks/00_overview.ipynb)."""

    name: str
    repo_id: str | None
    description: str
    params_billion: float
    # Chat format the model was tuned on: "llama2" ([INST] ...) or "human_assistant" (FlagAlpha).
    chat_format: str = "llama2"
    modelscope_id: str | None = None
    extra: dict = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        "tiny", None, "离线小模型（本地构建，CPU 可跑）/ tiny offline Llama built locally", 0.004
    ),
    "llama2-7b-chat": Profile(
        "llama2-7b-chat",
        "meta-llama/Llama-2-7b-chat-hf",
        "Meta Llama-2-7b-chat",
        6.74,
        modelscope_id="modelscope/Llama-2-7b-chat-ms",
    ),
    "llama2-13b-chat": Profile(
        "llama2-13b-chat",
        "meta-llama/Llama-2-13b-chat-hf",
        "Meta Llama-2-13b-chat",
        13.0,
        modelscope_id="modelscope/Llama-2-13b-chat-ms",
    ),
    "chinese-7b-chat": Profile(
        "chinese-7b-chat",
        "FlagAlpha/Llama2-Chinese-7b-Chat",
        "FlagAlpha Llama2-Chinese-7b-Chat",
        6.74,
        chat_format="human_assistant",
    ),
    "chinese-13b-chat": Profile(
        "chinese-13b-chat",
        "FlagAlpha/Llama2-Chinese-13b-Chat",
        "FlagAlpha Llama2-Chinese-13b-Chat",
        13.0,
        chat_format="human_assistant",
    ),
}

# 8-bit Llama-2-7b needs about 7 GB for weights plus room for activations and the KV cache.
AUTO_MIN_FREE_GPU_GB = 8.0


def home_dir() -> Path:
    """Where the series caches what it builds or downloads (``LLAMA_TUTORIAL_HOME``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2-chinese-tutorial"
    return Path(os.environ.get("LLAMA_TUTORIAL_HOME", default)).expanduser()


def models_dir() -> Path:
    """Where lesson 01 puts downloaded weights: ``<home>/models/<profile>``."""
    return home_dir() / "models"


def output_dir() -> Path:
    """Where lessons write what the learner makes (adapters, answers, reports).

    ``LLAMA_TUTORIAL_OUTPUT``, default ``outputs/`` at the top of the checkout, so the learner
    sees the files in JupyterLab's file browser.
    """
    return Path(os.environ.get("LLAMA_TUTORIAL_OUTPUT", REPO_ROOT / "outputs")).expanduser()


@dataclass(frozen=True)
class ModelChoice:
    """The resolved answer to "which model runs?" (see notebooks/00_overview.ipynb)."""

    name: str  # profile name, or the repo id / folder the learner gave
    path: str  # what from_pretrained takes: a local folder or a Hub repo id
    reason: str  # one line in Chinese
    profile: Profile | None = None

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def chat_format(self) -> str:
        return self.profile.chat_format if self.profile else "llama2"

    def __str__(self) -> str:
        return f"模型 / model: {self.name} ({self.path}) — {self.reason}"


def _unknown_message(spec: str) -> str:
    names = ", ".join(PROFILES)
    return bilingual(
        f"不认识 {ENV_MODEL}={spec!r}：它既不是已知的配置名，也不是 Hub 仓库名（形如 组织/名称），"
        f"也不是本地文件夹。可用的配置名：auto, {names}；或者给出含 config.json 的本地文件夹路径。",
        f"Unknown {ENV_MODEL}={spec!r}: not a profile name, not a Hub repo id (owner/name) and not "
        f"a local folder. Profiles: auto, {names}; or give the path of a local folder with config.json.",
    )


def _cuda_free_gb() -> tuple[str, float] | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return torch.cuda.get_device_name(0), free / 1024**3


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _local_weights(profile: Profile) -> Path | None:
    """A complete local copy of the profile's weights: lesson 01's folder or the Hub cache."""
    folder = models_dir() / profile.name
    if (folder / "config.json").exists():
        return folder
    if profile.repo_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(profile.repo_id, "config.json")
        except Exception:
            hit = None
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def _hub_reachable(repo_id: str) -> bool:
    if _offline():
        return False
    try:
        from huggingface_hub import auth_check

        auth_check(repo_id)
        return True
    except Exception:
        return False


def resolve_model(spec: str | None = None, *, verbose: bool = True) -> ModelChoice:
    """Turn ``spec`` (default: ``$LLAMA_TUTORIAL_MODEL`` or ``auto``) into a :class:`ModelChoice`.

    Prints one line in Chinese saying which model runs and why (``verbose=False`` silences it).
    Raises :class:`TutorialError` for an unknown name or a folder without ``config.json``.
    """
    spec = (spec if spec is not None else os.environ.get(ENV_MODEL, "auto")).strip() or "auto"
    choice = _resolve(spec)
    if verbose:
        print(f"将运行的模型：{choice.name}（{choice.reason}）")
    return choice


def _resolve(spec: str) -> ModelChoice:
    if spec == "auto":
        gpu = _cuda_free_gb()
        if gpu is None:
            return _tiny("auto：没有检测到 CUDA GPU，使用离线小模型 tiny")
        name, free_gb = gpu
        if free_gb < AUTO_MIN_FREE_GPU_GB:
            return _tiny(
                f"auto：GPU {name} 只有 {free_gb:.1f} GB 空闲显存，不足 {AUTO_MIN_FREE_GPU_GB:.0f} GB，使用 tiny"
            )
        profile = PROFILES["llama2-7b-chat"]
        local = _local_weights(profile)
        if local is not None:
            return ModelChoice(profile.name, str(local), f"auto：GPU {name} 显存足够，使用本地权重 {local}", profile)
        if _hub_reachable(profile.repo_id):
            return ModelChoice(
                profile.name, profile.repo_id, f"auto：GPU {name} 显存足够，可从 Hub 获取 {profile.repo_id}", profile
            )
        return _tiny(f"auto：GPU {name} 可用，但拿不到 Llama-2 权重（先做第 01 课下载），暂用 tiny")

    if spec in PROFILES:
        profile = PROFILES[spec]
        if profile.name == "tiny":
            return _tiny(f"{ENV_MODEL}=tiny")
        local = _local_weights(profile)
        if local is not None:
            return ModelChoice(profile.name, str(local), f"{ENV_MODEL}={spec}，使用本地权重 {local}", profile)
        return ModelChoice(profile.name, profile.repo_id, f"{ENV_MODEL}={spec}，从 Hub 加载 {profile.repo_id}", profile)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TutorialError(
                bilingual(
                    f"文件夹 {path} 里没有 config.json，所以它不是一个模型文件夹。"
                    "请指向下载完成的模型目录（第 01 课会告诉你路径），或者重新下载。",
                    f"The folder {path} has no config.json, so it is not a model folder. Point "
                    f"{ENV_MODEL} at a complete model folder (lesson 01 prints its path) or download it again.",
                )
            )
        return ModelChoice(str(path), str(path), f"{ENV_MODEL} 指向本地文件夹 {path}")

    if _looks_like_repo_id(spec):
        return ModelChoice(spec, spec, f"{ENV_MODEL}={spec}，按 Hub 仓库名加载")

    raise TutorialError(_unknown_message(spec))


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    if len(parts) != 2 or not all(parts):
        return False
    if spec.startswith((".", "/", "~")):
        return False
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return all(set(p) <= allowed for p in parts)


def _tiny(reason: str) -> ModelChoice:
    from helpers.tiny import ensure_tiny_model

    return ModelChoice("tiny", str(ensure_tiny_model()), reason, PROFILES["tiny"])


def bitsandbytes_backend() -> str:
    """Which backend bitsandbytes runs on here ("CUDA", "CPU", ...), or why it cannot run."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
    except ImportError:
        return "未安装 / not installed"
    except Exception as err:  # a broken native library raises at import
        return f"不可用 / unusable: {err}"
    backend = getattr(cextension, "BNB_BACKEND", "?")
    lib = getattr(cextension, "lib", None)
    if lib is None or type(lib).__name__.startswith("ErrorHandler"):
        return f"{backend}（原生库未加载 / native library missing）"
    return backend


def environment_report() -> dict:
    """Facts about this machine that decide how the lessons run (see notebooks/00_overview.ipynb)."""
    import platform
    import shutil

    import torch
    import transformers

    report = {
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "CUDA": torch.version.cuda or "无（CPU 版 torch）",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        report["GPU"] = props.name
        report["显存 GPU memory"] = f"{free / 1024**3:.1f} GB 空闲 / {total / 1024**3:.1f} GB"
        report["bf16"] = "支持" if torch.cuda.is_bf16_supported() else "不支持（用 fp16）"
    else:
        report["GPU"] = "无 / none"
    report["bitsandbytes"] = bitsandbytes_backend()
    home = home_dir()
    home.mkdir(parents=True, exist_ok=True)
    report["空闲磁盘 free disk"] = f"{shutil.disk_usage(home).free / 1024**3:.1f} GB（{home}）"
    report["CPU 线程 threads"] = str(torch.get_num_threads())
    return report

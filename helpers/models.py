"""Which model the lessons run (notebooks/00_overview.ipynb): the profiles the series knows by name, and
``resolve_model``, which turns ``LLAMA_TUTORIAL_MODEL`` (or ``auto``) into a :class:`ModelChoice`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from helpers.config import REPO_ROOT, TutorialError, models_dir, output_dir
from helpers._local_hub import LOCAL_BIN_REPO, LOCAL_REPO
from helpers.download import missing_weights
from helpers.tiny import ensure_smollm2_model, ensure_tiny_model

ENV_MODEL = "LLAMA_TUTORIAL_MODEL"
AUTO_MIN_FREE_GPU_GB = 8.1  # 8-bit Llama-2-7b with a 2048-token KV cache, by helpers.loading.estimate_memory


@dataclass(frozen=True)
class Profile:
    """A model the series knows by a short name, and the chat format it was tuned on: "llama2"
    ([INST] ...), "human_assistant" (FlagAlpha's) or "model" (the tokenizer's own ``chat_template``).
    See notebooks/00_overview.ipynb."""

    name: str
    repo_id: str | None
    chat_format: str = "llama2"


PROFILES: dict[str, Profile] = {
    "tiny": Profile("tiny", None),
    # The CPU learner's real chat model (helpers.tiny.ensure_smollm2_model): ChatML, its own template.
    "smollm2-135m": Profile("smollm2-135m", None, "model"),
    "llama2-7b-chat": Profile("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf"),
    "llama2-13b-chat": Profile("llama2-13b-chat", "meta-llama/Llama-2-13b-chat-hf"),
    "chinese-7b-chat": Profile("chinese-7b-chat", "FlagAlpha/Llama2-Chinese-7b-Chat", "human_assistant"),
    "chinese-13b-chat": Profile("chinese-13b-chat", "FlagAlpha/Llama2-Chinese-13b-Chat", "human_assistant"),
}


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
    def is_local_build(self) -> bool:
        """A model the course builds on this machine (``tiny``, ``smollm2-135m``), not downloaded weights."""
        return self.profile is not None and self.profile.repo_id is None

    @property
    def chat_format(self) -> str:
        """The profile's format; for any other model its own chat template ("model"), except a local
        folder whose tokenizer has none, which is prompted in Llama-2's format."""
        if self.profile:
            return self.profile.chat_format
        folder = Path(self.path)
        if folder.is_dir() and not (folder / "chat_template.jinja").is_file():
            config = folder / "tokenizer_config.json"
            if not (config.is_file() and "chat_template" in config.read_text("utf-8")):
                return "llama2"
        return "model"


def _local_weights(profile: Profile) -> tuple[Path | None, list]:
    """A complete copy of the profile's weights (lesson 01's folder, the Hub cache), or what it lacks."""
    from huggingface_hub import try_to_load_from_cache

    folder = models_dir() / profile.name
    if folder.is_dir():
        missing = missing_weights(folder)
        return (None, missing) if missing else (folder, [])
    hit = try_to_load_from_cache(profile.repo_id, "config.json")  # a path, None, or "known absent"
    if isinstance(hit, str) and not missing_weights(Path(hit).parent):
        return Path(hit).parent, []
    return None, []


def _cuda_free_gb() -> tuple[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return torch.cuda.get_device_name(0), free / 1024**3


def _hub_reachable(repo_id: str) -> bool:
    from huggingface_hub import auth_check

    try:
        auth_check(repo_id)  # gated repos need a token and Meta's approval; HF_HUB_OFFLINE=1 raises at once
    except Exception:
        return False
    return True


def resolve_model(spec: str | None = None, *, verbose: bool = True) -> ModelChoice:
    """Turn ``spec`` (default: ``$LLAMA_TUTORIAL_MODEL`` or ``auto``) into a :class:`ModelChoice` and print
    which model runs and why. ``auto`` takes Llama-2-7b-chat when a CUDA GPU with enough free memory is
    present and the weights are reachable, else the CPU model SmolLM2-135M-Instruct (``smollm2-135m``); a profile name, a Hub repo id (``owner/name``)
    or a local model folder name one. Raises :class:`TutorialError` for anything else."""
    choice = _resolve((spec if spec is not None else os.environ.get(ENV_MODEL, "auto")).strip() or "auto")
    if verbose:
        print(f"将运行的模型：{choice.name}（{choice.reason}）")
    return choice


def _tiny(reason: str) -> ModelChoice:
    return ModelChoice("tiny", str(ensure_tiny_model()), reason, PROFILES["tiny"])


def _cpu_model(reason: str) -> ModelChoice:
    """The CPU learner's real chat model, SmolLM2-135M-Instruct (converted once by helpers.tiny)."""
    return ModelChoice("smollm2-135m", str(ensure_smollm2_model()), reason, PROFILES["smollm2-135m"])


def _resolve(spec: str) -> ModelChoice:
    if spec in ("auto", *PROFILES):
        if spec == "tiny":
            return _tiny(f"{ENV_MODEL}=tiny")
        if spec == "smollm2-135m":
            return _cpu_model(f"{ENV_MODEL}={spec}")
        gpu = _cuda_free_gb() if spec == "auto" else None
        if spec == "auto" and gpu is None:
            return _cpu_model("auto：没有检测到 CUDA GPU，使用 CPU 上的真实对话模型 SmolLM2-135M-Instruct")
        if gpu is not None and gpu[1] < AUTO_MIN_FREE_GPU_GB:
            return _cpu_model(f"auto：GPU {gpu[0]} 只有 {gpu[1]:.1f} GB 空闲显存，不足 {AUTO_MIN_FREE_GPU_GB:.0f} GB，"
                              "使用 SmolLM2-135M-Instruct")
        profile = PROFILES["llama2-7b-chat" if spec == "auto" else spec]
        how = f"auto：GPU {gpu[0]} 显存足够" if gpu else f"{ENV_MODEL}={spec}"
        local, missing = _local_weights(profile)
        if local is not None:
            return ModelChoice(profile.name, str(local), f"{how}，使用本地权重 {local}", profile)
        # An unfinished lesson-01 download is not the model; say what it lacks (lesson 01 resumes it).
        unfinished = f"（{models_dir() / profile.name} 下载未完成，缺 {'; '.join(m.name for m in missing[:3])}）" if missing else ""
        if spec != "auto" or _hub_reachable(profile.repo_id):
            return ModelChoice(profile.name, profile.repo_id, f"{how}{unfinished}，从 Hub 加载 {profile.repo_id}", profile)
        return _cpu_model(f"auto：GPU {gpu[0]} 可用，但拿不到完整的 Llama-2 权重{unfinished}（先做第 01 课下载），"
                          "暂用 SmolLM2-135M-Instruct")

    folder = _local_folder(spec)
    if folder is not None:
        return ModelChoice(str(folder), str(folder), f"{ENV_MODEL} 指向本地文件夹 {folder}")
    parts = spec.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if len(parts) == 2 and all(parts) and all(set(p) <= allowed for p in parts):
        return ModelChoice(spec, spec, f"{ENV_MODEL}={spec}，按 Hub 仓库名加载")
    names = ", ".join(PROFILES)
    raise TutorialError("model.unknown",
        f"不认识 {ENV_MODEL}={spec!r}：它既不是已知的配置名，也不是 Hub 仓库名（形如 组织/名称），"
        f"也不是本地文件夹。可用的配置名：auto, {names}；或者给出含 config.json 的本地文件夹路径。",
        f"Unknown {ENV_MODEL}={spec!r}: not a profile name, not a Hub repo id (owner/name) and not "
        f"a local folder. Profiles: auto, {names}; or give the path of a local folder with config.json.",
        spec=spec)


def _local_folder(spec: str) -> Path | None:
    """The model folder ``spec`` names (relative: from the repository root, then the current directory);
    None when it does not look like a path. A path without config.json is refused, never sent to the Hub."""
    path = Path(spec).expanduser()
    candidates = list(dict.fromkeys([path] if path.is_absolute() else [REPO_ROOT / path, Path.cwd() / path]))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    nested = len(path.parts) > 1
    # "outputs/lora-merged" before lesson 05 has made outputs/: still a path (no Hub owner is named like the
    # course's own folders), so it is refused here instead of being sent to the Hub as a repo id.
    course_folders = {"outputs", output_dir().name, "models", "data", "notebooks"}
    looks_like_path = (spec.startswith((".", "~", os.sep)) or "\\" in spec or spec.count("/") > 1
                       or (nested and path.parts[0] in course_folders))
    if not (looks_like_path or any(c.exists() or (nested and c.parent.is_dir()) for c in candidates)):
        return None
    where = ", ".join(str(c) for c in candidates)
    found = any(c.is_dir() for c in candidates)
    raise TutorialError("model.no_folder",
        f"{ENV_MODEL}={spec!r} 看起来是路径，但那里没有含 config.json 的模型文件夹（{'文件夹里没有 config.json' if found else '不是本地文件夹'}；"
        f"找过：{where}）。请给出模型文件夹（第 01 课会打印它的路径）；路径不会被当作 Hub 仓库名。",
        f"{ENV_MODEL}={spec!r} looks like a path, but there is no model folder with config.json (it "
        f"{'has no config.json' if found else 'is not a local folder'}; looked at: {where}). Point it at a model "
        "folder (lesson 01 prints its path); a path is never taken as a Hub repo id.",
        spec=spec)


def default_target(repo_id: str) -> Path:
    """Where a download goes (notebooks/01_download_weights.ipynb): ``models_dir()/<profile>`` for a profile's
    repo, where :func:`resolve_model` looks; ``output_dir()/downloads/`` for the practice repos; else ``models_dir()/<owner>--<name>``."""
    if repo_id in (LOCAL_REPO, LOCAL_BIN_REPO):
        return output_dir() / "downloads" / repo_id.replace("/", "--")
    profile = next((p.name for p in PROFILES.values() if p.repo_id == repo_id), None)
    return models_dir() / (profile or repo_id.replace("/", "--"))

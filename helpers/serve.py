"""A vLLM OpenAI-compatible server as a subprocess, for notebooks/07_serving_vllm.ipynb (``make serve``:
scripts/serve.py): the vLLM command line and environment, checks before starting (the python with vLLM, the
port, the adapters), and the :class:`Server` a lesson talks to. Starting, waiting for ``/health`` and stopping
the whole process group (also when the kernel is interrupted or killed) are helpers/_process.py's plumbing."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from helpers._process import HOST, ServerProcess, claim_port, launch, new_workdir, running
# Lesson 07 checks with these that stop() left nothing running and freed the port.
from helpers._process import group_members, port_is_free  # noqa: F401
from helpers.config import REPO_ROOT, TutorialError
from helpers.models import resolve_model
from helpers.prompts import TEMPLATES

SERVE_PYTHON_ENV = "LLAMA_TUTORIAL_SERVE_PYTHON"
SERVE_VENV = REPO_ROOT / ".venv-serve"
GUARD = "helpers._vllm_guard.RequireKey"  # the API key on every path but /health
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def serve_python() -> str:
    """The python that runs vLLM: $LLAMA_TUTORIAL_SERVE_PYTHON, ``.venv-serve`` or this one (Colab)."""
    if os.environ.get(SERVE_PYTHON_ENV):
        return os.environ[SERVE_PYTHON_ENV]
    if (SERVE_VENV / "bin" / "python").exists():
        return str(SERVE_VENV / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise TutorialError("serve.no_vllm",
        f"找不到 vLLM 环境：没有 {SERVE_VENV}，当前 Python 里也没有 vllm。在仓库根目录运行 `make serve-env`，"
        f"或在 Colab/GPU 上 `pip install vllm`，或用 {SERVE_PYTHON_ENV} 指向装好 vllm 的 python。",
        f"No vLLM environment: no {SERVE_VENV} and no vllm in this python. Run `make serve-env` at the repository "
        f"root, or `pip install vllm` on Colab/a GPU, or point {SERVE_PYTHON_ENV} at a python that has vllm.")


def check_adapter(adapter_dir: str | Path, choice) -> Path:
    """Make sure a LoRA adapter folder fits the served base model (lesson 05 wrote both files read here)."""
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise TutorialError("adapter.missing",
            f"{adapter_dir} 里没有 adapter_config.json，不是 LoRA 适配器：先运行第 05 课，或调用 ensure_adapter()。",
            f"{adapter_dir} holds no adapter_config.json, so it is not a LoRA adapter: run lesson 05 or ensure_adapter().", adapter_dir=str(adapter_dir))
    base = json.loads(config.read_text("utf-8")).get("base_model_name_or_path") or ""
    info = adapter_dir / "training_info.json"  # written by lesson 05 (helpers.finetune.train_adapter)
    trained_on = json.loads(info.read_text("utf-8")).get("model_name") if info.is_file() else None
    same_folder = base and Path(base).expanduser().exists() and Path(base).resolve() == Path(choice.path).resolve()
    if not (base == choice.path or same_folder or (trained_on == choice.name and not choice.is_tiny)):
        raise TutorialError("serve.adapter_base_mismatch",
            f"适配器 {adapter_dir} 是在 {base or trained_on} 上训练的，而服务的基座是 {choice.path}。适配器只能配合"
            "训练它的基座：换成那个基座，或者用第 05 课在这个基座上重新训练。",
            f"The adapter {adapter_dir} was trained on {base or trained_on}, but the base served is {choice.path}. An "
            "adapter only fits the base it was trained on: serve that base, or train one on this base (lesson 05).",
            adapter_dir=str(adapter_dir), trained_on=base or trained_on, base=str(choice.path))
    return adapter_dir


class Server(ServerProcess):
    """A running vLLM server (notebooks/07_serving_vllm.ipynb; lesson 09's llama.cpp server too): ``base_url``,
    ``api_key``, ``models``, ``process``, ``alive()``, and ``stop()``, which ends its whole process group
    (helpers/_process.py)."""

    def command(self) -> str:
        """The command this server runs, as a shell line, with its API key masked (lesson 07 prints it)."""
        return format_command(self.process.args, self.env, hide=self.api_key)

    def client(self, timeout: float = 60.0):
        """An ``openai.OpenAI`` client for this server (no retries: errors reach the caller at once)."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=0)


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in an adapter's ``adapter_config.json`` (``r``, and any per-module ``rank_pattern``)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text("utf-8"))
    return max([int(config.get("r") or 8), *map(int, (config.get("rank_pattern") or {}).values())])


def server_command(choice, *, adapters: dict[str, str | Path] | None = None, port: int = 8000,
                   quantization: str | None = None, extra_args=(),
                   chat_template: str | Path | None = None, cuda: bool | None = None,
                   python: str = "python") -> list[str]:
    """The vLLM command line :func:`start_server` runs (notebooks/07_serving_vllm.ipynb prints it).

    The API key is not on it (``ps`` shows command lines to every user of the machine): :func:`server_env` puts it
    in ``VLLM_API_KEY``, and ``--middleware`` (helpers/_vllm_guard.py) makes vLLM ask for it on every path but
    /health. ``--max-lora-rank`` follows the adapters' own rank (their ``adapter_config.json``); ``quantization`` becomes
    ``--quantization``; ``extra_args`` (any other vLLM options) come last and replace a default option of the
    same name (``["--max-model-len", "2048"]``). ``cuda`` None asks torch whether a CUDA GPU is present."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    options = [("--model", choice.path), ("--served-model-name", choice.name), ("--host", HOST), ("--port", str(port)),
               ("--middleware", GUARD), ("--max-model-len", "1024")]
    if not cuda:
        options += [("--dtype", "float32"), ("--enforce-eager",)]
    if quantization:
        options.append(("--quantization", quantization))
    if chat_template:
        options.append(("--chat-template", str(chat_template)))
    if adapters:
        rank = max(adapter_rank(path) for path in adapters.values())
        if rank > LORA_RANKS[-1]:
            raise TutorialError("serve.rank_too_large",
                f"适配器的秩 r={rank} 超过了 vLLM 的 --max-lora-rank 上限 {LORA_RANKS[-1]}。",
                f"The adapter's rank r={rank} exceeds vLLM's --max-lora-rank limit of {LORA_RANKS[-1]}.", rank=rank, max_rank=LORA_RANKS[-1])
        # vLLM's CPU LoRA ops (lora/ops/torch_ops) give tokens without an adapter the slot index -1, which
        # Python indexing reads as the last adapter: a base request batched with an adapter request is then
        # answered with that adapter's weights. One spare slot, never filled, makes -1 an empty adapter
        # (scripts/upstream/vllm-cpu-lora-index.md).
        slots = len(adapters) + (0 if cuda else 1)
        options += [("--enable-lora",), ("--max-loras", str(slots)),
                    ("--max-lora-rank", str(min(r for r in LORA_RANKS if r >= rank))),
                    ("--lora-modules", *[f"{name}={path}" for name, path in adapters.items()])]
    extra = [str(a) for a in extra_args]
    replaced = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    kept = [words for words in options if words[0].split("=", 1)[0] not in replaced]
    return [python, "-m", "vllm.entrypoints.openai.api_server", *(w for words in kept for w in words), *extra]


def server_env(cuda: bool | None = None) -> dict[str, str]:
    """The environment variables :func:`start_server` sets for vLLM (those already set in the environment win).
    It also always sets ``VLLM_API_KEY`` (the key clients must send; vLLM reads it when ``--api-key`` is not
    given) and puts the course's folder first on ``PYTHONPATH`` (so that vLLM imports ``--middleware``'s guard).

    Everywhere: idle HTTP connections stay open 10 minutes instead of vLLM's 5 s (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``).
    A client that reuses a pooled connection just as the server closes it gets "Server disconnected without
    sending a response", and a notebook's pauses between cells are often about 5 s (tiny model, this machine:
    1 failed request in 12 rounds of 95 concurrent ones sent after 4.8-5.4 s idle; 0 in 20 rounds with 600 s).
    On a CPU also: a 1 GiB KV cache, and the model runs inside the engine process (no third process to start; on 2
    cores bench.serve measured a start of 41 s instead of 63 s and more throughput)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    env = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "600"}
    return env if cuda else {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _forced_env(api_key: str | None, tmpdir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # TMPDIR: vLLM leaves socket and vllm_dist_* files in its temporary folder; this one goes with the server.
    return {"PYTHONPATH": path, "TMPDIR": str(tmpdir), **({"VLLM_API_KEY": api_key} if api_key else {})}


def format_command(args: list[str], env: dict[str, str] | None = None, *, hide: str | None = None) -> str:
    """A command as a learner would type it in a shell: ``env`` first, one option per line, ``hide`` masked."""
    import shlex

    words = [a.replace(hide, "***") if hide and hide in a else shlex.quote(a) for a in args]  # *** stays bare
    lines, i = [" ".join(words[:3])], 3  # python -m module
    while i < len(words):
        n = 1
        while i + n < len(words) and not args[i + n].startswith("--"):
            n += 1
        lines.append("    " + " ".join(words[i:i + n]))
        i += n
    prefix = " ".join(f"{k}=***" if hide and hide in v else f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " \\\n" if prefix else "") + " \\\n".join(lines)


def start_server(model=None, *, adapters: dict[str, str | Path] | None = None, port: int | None = None,
                 quantization: str | None = None, extra_args=(), timeout: float = 300.0) -> Server:
    """Start (or reuse) a vLLM server for ``model`` (a ModelChoice or a ``resolve_model`` spec) on 127.0.0.1
    and wait for it (notebooks/07_serving_vllm.ipynb). ``adapters`` maps a model name to a LoRA adapter
    folder; the base model's name is its profile name (``tiny``); ``port`` None takes a free one.
    ``quantization`` (``--quantization``, e.g. "awq" for AWQ weights) and ``extra_args`` (other vLLM options,
    e.g. ``["--gpu-memory-utilization", "0.85"]``) go to vLLM as :func:`server_command` shows."""
    choice = model if hasattr(model, "path") else resolve_model(model, verbose=False)
    adapters = {name: check_adapter(path, choice) for name, path in (adapters or {}).items()}
    extra_args = tuple(str(a) for a in extra_args)
    key = (choice.path, tuple(sorted((n, str(p.resolve())) for n, p in adapters.items())), quantization, extra_args)
    if (server := running(key)) is not None:
        return server
    python = serve_python()
    port = claim_port(port)
    api_key = secrets.token_urlsafe(16)
    workdir = new_workdir(f"vllm-{port}-")  # log, chat template, vLLM's TMPDIR; stop() deletes it
    (workdir / "tmp").mkdir()
    template = None
    if AutoTokenizer.from_pretrained(choice.path).chat_template is None:  # FlagAlpha's ship none; chat needs one
        template = workdir / "chat_template.jinja"
        text = TEMPLATES[choice.chat_format].replace("{% generation %}", "").replace("{% endgeneration %}", "")
        template.write_text(text, "utf-8")  # the course's template (lesson 03), without the training-mask tags
    args = server_command(choice, adapters=adapters, port=port, quantization=quantization,
                          extra_args=extra_args, chat_template=template, python=python)
    env_set = server_env()
    forced = _forced_env(api_key, workdir / "tmp")
    return launch(key, args, {**env_set, **os.environ, **forced}, [*env_set, *forced], workdir, port, api_key,
                  [choice.name, *adapters], engine="vLLM", ready_path="/health", timeout=timeout, server_class=Server)

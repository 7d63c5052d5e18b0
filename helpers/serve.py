"""A vLLM OpenAI-compatible server as a subprocess, for notebooks/07_serving_vllm.ipynb (``make serve``:
scripts/serve.py). Checks before starting, a wait for ``/health`` that shows the log's tail on failure, and a
stop of the whole process group, also when the kernel is interrupted or killed (atexit, PR_SET_PDEATHSIG)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoTokenizer

from helpers.config import REPO_ROOT, TutorialError, bilingual, resolve_model
from helpers.prompts import TEMPLATES

SERVE_PYTHON_ENV = "LLAMA_TUTORIAL_SERVE_PYTHON"
SERVE_VENV = REPO_ROOT / ".venv-serve"
HOST = "127.0.0.1"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
_SERVERS: dict[tuple, "Server"] = {}  # one server per (model, adapters) in this process


def serve_python() -> str:
    """The python that runs vLLM: $LLAMA_TUTORIAL_SERVE_PYTHON, ``.venv-serve`` or this one (Colab)."""
    if os.environ.get(SERVE_PYTHON_ENV):
        return os.environ[SERVE_PYTHON_ENV]
    if (SERVE_VENV / "bin" / "python").exists():
        return str(SERVE_VENV / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise TutorialError(bilingual(
        f"找不到 vLLM 环境：没有 {SERVE_VENV}，当前 Python 里也没有 vllm。在仓库根目录运行 `make serve-env`，"
        f"或在 Colab/GPU 上 `pip install vllm`，或用 {SERVE_PYTHON_ENV} 指向装好 vllm 的 python。",
        f"No vLLM environment: no {SERVE_VENV} and no vllm in this python. Run `make serve-env` at the repository "
        f"root, or `pip install vllm` on Colab/a GPU, or point {SERVE_PYTHON_ENV} at a python that has vllm."))


def free_port() -> int:
    """A TCP port nobody listens on right now: where start_server puts a server by default (lesson 07)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (SO_REUSEADDR, as servers bind: TIME_WAIT is free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def check_adapter(adapter_dir: str | Path, choice) -> Path:
    """Make sure a LoRA adapter folder fits the served base model (lesson 05 wrote both files read here)."""
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise TutorialError(bilingual(
            f"{adapter_dir} 里没有 adapter_config.json，不是 LoRA 适配器：先运行第 05 课，或调用 ensure_adapter()。",
            f"{adapter_dir} holds no adapter_config.json, so it is not a LoRA adapter: run lesson 05 or ensure_adapter()."))
    base = json.loads(config.read_text("utf-8")).get("base_model_name_or_path") or ""
    info = adapter_dir / "training_info.json"  # written by lesson 05 (helpers.finetune.train_adapter)
    trained_on = json.loads(info.read_text("utf-8")).get("model_name") if info.is_file() else None
    same_folder = base and Path(base).expanduser().exists() and Path(base).resolve() == Path(choice.path).resolve()
    if not (base == choice.path or same_folder or (trained_on == choice.name and not choice.is_tiny)):
        raise TutorialError(bilingual(
            f"适配器 {adapter_dir} 是在 {base or trained_on} 上训练的，而服务的基座是 {choice.path}。适配器只能配合"
            "训练它的基座：换成那个基座，或者用第 05 课在这个基座上重新训练。",
            f"The adapter {adapter_dir} was trained on {base or trained_on}, but the base served is {choice.path}. An "
            "adapter only fits the base it was trained on: serve that base, or train one on this base (lesson 05)."))
    return adapter_dir


def group_members(pgid: int) -> list[int]:
    """Running processes of the process group ``pgid`` (zombies left for init to reap do not count; Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                members.append(int(stat.parent.name))
    return members


def _die_with_parent(parent: int) -> None:
    """preexec_fn: the kernel's death (even SIGKILL) sends SIGTERM to the server (Linux, as vLLM)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Server:
    """A running vLLM server (notebooks/07_serving_vllm.ipynb); stop() ends it."""

    def __init__(self, key, process, base_url, api_key, models, log_path):
        self.key, self.process, self.base_url, self.api_key = key, process, base_url, api_key
        self.models, self.log_path = models, log_path  # models: the base's name first, then each adapter's

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self, timeout: float = 60.0):
        """An ``openai.OpenAI`` client for this server (no retries: errors reach the caller at once)."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=0)

    def stop(self, timeout: float = 20.0, *, keep_log: bool = False) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after ``timeout`` s; idempotent.
        Returns once no process of the group runs (the engine core too, even if the API server was killed),
        then deletes the server's temporary folder (log, chat template) unless ``keep_log``."""
        _SERVERS.pop(self.key, None)
        # A dead API server cannot shut its children (the engine core) down: then SIGKILL at once.
        for sig, wait in ((signal.SIGTERM, timeout if self.alive() else 0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            deadline = time.monotonic() + wait
            while (self.alive() or group_members(self.process.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.process.wait()
        if not keep_log:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


def start_server(model=None, *, adapters: dict[str, str | Path] | None = None, port: int | None = None,
                 timeout: float = 300.0) -> Server:
    """Start (or reuse) a vLLM server for ``model`` (a ModelChoice or a ``resolve_model`` spec) on 127.0.0.1
    and wait for it (notebooks/07_serving_vllm.ipynb). ``adapters`` maps a model name to a LoRA adapter
    folder; the base model's name is its profile name (``tiny``); ``port`` None takes a free one."""
    choice = model if hasattr(model, "path") else resolve_model(model, verbose=False)
    adapters = {name: check_adapter(path, choice) for name, path in (adapters or {}).items()}
    key = (choice.path, tuple(sorted((n, str(p.resolve())) for n, p in adapters.items())))
    if key in _SERVERS and _SERVERS[key].alive():
        return _SERVERS[key]
    python = serve_python()
    if port is None:
        port = free_port()
    elif not port_is_free(port):
        raise TutorialError(bilingual(
            f"端口 {port} 已被占用（也许是还没停掉的服务器，`lsof -i :{port}` 可查）。换一个端口，或不传 port 自动挑选。",
            f"Port {port} is already in use (perhaps a server still running; `lsof -i :{port}` tells). Pick another "
            "port, or pass none to get a free one."))
    api_key = secrets.token_urlsafe(16)  # one in 64 starts with "-": hence --api-key=KEY, never two arguments
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", choice.path,
            "--served-model-name", choice.name, "--host", HOST, "--port", str(port), f"--api-key={api_key}",
            "--max-model-len", "1024"]
    if not torch.cuda.is_available():
        args += ["--dtype", "float32", "--enforce-eager"]
    workdir = Path(tempfile.mkdtemp(prefix=f"vllm-{port}-"))  # the log and the chat template; stop() deletes it
    if AutoTokenizer.from_pretrained(choice.path).chat_template is None:  # FlagAlpha's ship none; chat needs one
        template = workdir / "chat_template.jinja"
        text = TEMPLATES[choice.chat_format].replace("{% generation %}", "").replace("{% endgeneration %}", "")
        template.write_text(text, "utf-8")  # the course's template (lesson 03), without the training-mask tags
        args += ["--chat-template", str(template)]
    if adapters:
        ranks = [json.loads((p / "adapter_config.json").read_text("utf-8")).get("r", 8) for p in adapters.values()]
        rank = min(r for r in LORA_RANKS if r >= max(ranks))
        # vLLM's CPU LoRA ops (lora/ops/torch_ops) give tokens without an adapter the slot index -1, which
        # Python indexing reads as the last adapter: a base request batched with an adapter request is then
        # answered with that adapter's weights. One spare slot, never filled, makes -1 an empty adapter.
        slots = len(adapters) + (0 if torch.cuda.is_available() else 1)
        args += ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", str(rank),
                 "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    # On a CPU: a 1 GiB KV cache, and the model runs inside the engine process (no third process to start; on
    # 2 cores bench.serve measured a start of 41 s instead of 63 s and more throughput). Either can be overridden.
    cpu = {} if torch.cuda.is_available() else {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env = {**cpu, **os.environ}
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True,
                                   preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    server = Server(key, process, f"http://{HOST}:{port}/v1", api_key, [choice.name, *adapters], log_path)
    _SERVERS[key] = server
    try:
        _wait_healthy(server, port, timeout)
    except BaseException:  # a failed start or Ctrl-C while waiting: never leave the process behind
        server.stop(keep_log=True)  # the error names the log
        raise
    return server


def _wait_healthy(server: Server, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.alive() and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    code = server.process.poll()
    zh, en = ((f"vLLM 服务器启动失败（退出码 {code}）", f"The vLLM server failed to start (exit code {code})")
              if code is not None else (f"vLLM 服务器 {timeout:.0f} 秒内没有就绪（/health 无响应），已停止它",
                                        f"The vLLM server was not ready within {timeout:.0f} s; it was stopped"))
    tail = "\n".join(server.log_path.read_text("utf-8", errors="replace").splitlines()[-25:])
    raise TutorialError(bilingual(f"{zh}。日志 {server.log_path} 的最后几行：", f"{en}. Last lines of {server.log_path}:")
                        + "\n" + tail)


@atexit.register
def stop_all() -> None:
    """Stop every server this process started (also runs at exit)."""
    for server in list(_SERVERS.values()):
        server.stop()

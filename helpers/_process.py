"""Process supervision for the course's servers (plumbing for helpers/serve.py and helpers/gguf.py; lessons need
not read it): a server command started in its own process group that dies with the kernel (PR_SET_PDEATHSIG),
a wait for its ready URL that shows the log's tail on failure, a stop of the whole group (also at exit), and
the port and temporary-folder helpers around them. Linux only, as vLLM."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers.config import TutorialError

HOST = "127.0.0.1"
OWNER_FILE = "owner.pid"  # in a server's temporary folder: the pid of the process that started it
_SERVERS: dict[tuple, "ServerProcess"] = {}  # one server per key (model, adapters, ...) in this process


def free_port() -> int:
    """A TCP port nobody listens on right now: where start_server puts a server by default (lessons 07 and 09)."""
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


def claim_port(port: int | None) -> int:
    """The port a new server listens on: ``port`` if nothing listens there, a free one when it is None
    (``start_server`` in lessons 07 and 09)."""
    if port is None:
        return free_port()
    if not port_is_free(port):
        raise TutorialError("serve.port_in_use",
            f"端口 {port} 已被占用（也许是还没停掉的服务器，`lsof -i :{port}` 可查）。换一个端口，或不传 port 自动挑选。",
            f"Port {port} is already in use (perhaps a server still running; `lsof -i :{port}` tells). Pick another "
            "port, or pass none to get a free one.", port=port)
    return port


def group_members(pgid: int) -> list[int]:
    """Running processes of the process group ``pgid`` (zombies left for init to reap do not count; Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                members.append(int(stat.parent.name))
    return members


_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-spawner")  # its thread lives as long as we do


def _die_with_parent(parent: int) -> None:
    """preexec_fn: the kernel's death (even SIGKILL) sends SIGTERM to the server (Linux, as vLLM)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class ServerProcess:
    """A server process this process started with :func:`launch`; stop() ends it and its whole process group.
    helpers.serve.Server adds what lessons 07 and 09 call on it (``command()``, ``client()``)."""

    def __init__(self, key, process, base_url, api_key, models, log_path):
        self.key, self.process, self.base_url, self.api_key = key, process, base_url, api_key
        self.models, self.log_path = models, log_path  # models: the base's name first, then each adapter's
        self.env: dict[str, str] = {}  # the variables the caller set for this server (shown by command())

    def alive(self) -> bool:
        return self.process.poll() is None

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
        if keep_log:  # the error names the log: no later start may sweep it away
            (self.log_path.parent / OWNER_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


def running(key) -> ServerProcess | None:
    """The live server this process started under ``key``, if any (start_server reuses it)."""
    server = _SERVERS.get(key)
    return server if server is not None and server.alive() else None


def _remove_stale_workdirs() -> None:
    """Delete the temporary folders of servers whose notebook kernel is gone (a SIGKILLed kernel cannot clean up)."""
    for folder in [*Path(tempfile.gettempdir()).glob("vllm-*-*"), *Path(tempfile.gettempdir()).glob("llama-cpp-*-*")]:
        try:
            owner = int((folder / OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):  # not ours, no owner recorded (a failed start's kept log), or alive
            continue


def new_workdir(prefix: str) -> Path:
    """A server's temporary folder (its log and whatever else it writes), owned by this process: stop() deletes
    it, and a later start deletes those whose owner died (a SIGKILLed kernel cannot clean up)."""
    _remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    return workdir


def launch(key, args: list[str], env: dict[str, str], shown_env: list[str], workdir: Path, port: int, api_key: str,
           models: list[str], *, engine: str, ready_path: str, timeout: float,
           server_class: type[ServerProcess] = ServerProcess) -> ServerProcess:
    """Start ``args`` in its own process group with its log in ``workdir``, tied to this process (it dies with
    the kernel), and wait until ``ready_path`` answers 200 (lessons 07 and 09); a failed start stops it.
    Returns a ``server_class`` (helpers.serve.Server for both lessons), registered under ``key``."""
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        # Forked from the module's one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked
        # the server ends, so a server started from a short-lived thread (a widget callback) would die with it.
        process = _SPAWNER.submit(subprocess.Popen, args, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                  preexec_fn=functools.partial(_die_with_parent, os.getpid())).result()
    server = server_class(key, process, f"http://{HOST}:{port}/v1", api_key, models, log_path)
    server.env = {k: env[k] for k in shown_env}
    _SERVERS[key] = server
    try:
        _wait_ready(server, f"http://{HOST}:{port}{ready_path}", engine, timeout)
    except BaseException:  # a failed start or Ctrl-C while waiting: never leave the process behind
        server.stop(keep_log=True)  # the error names the log
        raise
    return server


def _wait_ready(server: ServerProcess, url: str, engine: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {server.api_key}"})
    while server.alive() and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    code = server.process.poll()
    error, zh, en = (("serve.start_failed", f"{engine} 服务器启动失败（退出码 {code}）", f"The {engine} server failed to start (exit code {code})")
                     if code is not None else ("serve.not_ready", f"{engine} 服务器 {timeout:.0f} 秒内没有就绪（{url} 无响应），已停止它",
                                               f"The {engine} server was not ready within {timeout:.0f} s ({url} did not answer); it was stopped"))
    tail = "\n".join(server.log_path.read_text("utf-8", errors="replace").splitlines()[-25:])
    raise TutorialError(error, f"{zh}。日志 {server.log_path} 的最后几行：\n{tail}", f"{en}. Last lines of {server.log_path}:\n{tail}",
                        engine=engine, returncode=code, log_path=str(server.log_path), log=tail)


@atexit.register
def stop_all() -> None:
    """Stop every server this process started (also runs at exit)."""
    for server in list(_SERVERS.values()):
        server.stop()

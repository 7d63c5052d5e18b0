"""A small Hugging Face Hub on 127.0.0.1 that serves the tiny model, so lesson 01 runs offline.

Introduced in notebooks/01_download_weights.ipynb. The lesson's download code is the real
``huggingface_hub.snapshot_download``; without the Hub (no network, or the tests) it talks to this
server instead, through ``HF_ENDPOINT`` / ``endpoint=``. It speaks the part of the Hub protocol that
``snapshot_download``, ``hf_hub_download`` and ``HfApi.model_info`` use, as huggingface_hub 2.x
expects it:

* ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, git blob ids and the
  LFS sha256 of every file), ``GET /api/models/{repo}/tree/{rev}`` and ``/auth-check``;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: small files answer directly (``ETag`` = git blob
  id, ``X-Repo-Commit``, ``Content-Length``, ``Range``); LFS files (weights) answer ``302`` to a
  second origin playing the CDN, with ``X-Linked-Etag`` (their sha256) and ``X-Linked-Size``, as
  the Hub does;
* a gated repo answers ``401``/``403`` with ``X-Error-Code: GatedRepo`` (no token / a token without
  access), an unknown repo ``RepoNotFound``, a malformed token ``Invalid credentials``.

It also injects the faults the lesson demonstrates (a connection dropped mid-file, an outage, a
corrupted file) and counts every byte it serves, so tests can prove that a resumed download does
not fetch completed files again.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEMO_REPO = "demo/tiny-llama2-chat"
DEMO_GATED_REPO = "demo/tiny-llama2-chat-gated"
# A token the demo hub has approved for the gated repo, and one it knows but has not approved.
# Any other token that starts with "hf_" counts as a valid user without access; anything else is
# rejected as invalid credentials, like a mistyped token on the real Hub.
DEMO_TOKEN = "hf_demo_token_with_access"
DEMO_TOKEN_NO_ACCESS = "hf_demo_token_without_access"

# Files the Hub stores with Git LFS (weights, sentencepiece models) or that are larger than 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 64 * 1024
_DEMO_URLS: set[str] = set()  # every demo hub address started in this process


def is_demo_url(url: str | None) -> bool:
    """Whether ``url`` is (or was) the address of a demo hub started in this process (notebooks/01_download_weights.ipynb)."""
    return bool(url) and url.rstrip("/") in _DEMO_URLS


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as ``oid`` / ``blobId``) (notebooks/01_download_weights.ipynb)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    """One file of a repo, with the ids the Hub reports for it (notebooks/01_download_weights.ipynb)."""

    path: str
    data: bytes
    lfs: bool | None = None

    def __post_init__(self):
        if self.lfs is None:
            self.lfs = self.path.endswith(LFS_SUFFIXES) or len(self.data) > LFS_MIN_SIZE
        self.size = len(self.data)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        )
        # For an LFS file git stores the pointer, so its blob id is the pointer's.
        self.blob_id = git_blob_id(self.pointer if self.lfs else self.data)

    def sibling(self, blobs: bool) -> dict:
        entry: dict = {"rfilename": self.path}
        if blobs:
            entry.update(size=self.size, blobId=self.blob_id)
            if self.lfs:
                entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class HubRepo:
    """A model repo on the demo hub. ``gated`` is ``False`` or ``"manual"`` like on the Hub (notebooks/01_download_weights.ipynb)."""

    repo_id: str
    files: dict[str, HubFile]
    gated: str | bool = False
    granted_tokens: set[str] = field(default_factory=set)

    @property
    def commit(self) -> str:
        h = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            h.update(f"{path}\0{self.files[path].blob_id}\n".encode())
        return h.hexdigest()

    def info(self, blobs: bool) -> dict:
        owner = self.repo_id.split("/")[0]
        return {
            "_id": hashlib.md5(self.repo_id.encode()).hexdigest()[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": owner,
            "sha": self.commit,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": False,
            "gated": self.gated,
            "disabled": False,
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["transformers", "safetensors", "llama", "text-generation", "demo"],
            "siblings": [self.files[p].sibling(blobs) for p in sorted(self.files)],
            "usedStorage": sum(f.size for f in self.files.values()),
        }


@dataclass
class Request:
    """One request the demo hub answered (``bytes`` counts body bytes actually sent) (notebooks/01_download_weights.ipynb)."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str
    repo_id: str | None
    file: str | None
    status: int
    range: str | None
    bytes: int
    token: bool


_DEMO_README = """---
license: other
tags: [demo, llama]
---
# tiny-llama2-chat (demo)

The tiny offline Llama-2 of the llama2-chinese course, served by the course's local demo hub so that
lesson 01 can practise a real `snapshot_download` without the Internet. Like Meta's
`meta-llama/Llama-2-7b-chat-hf` it holds the same weights twice: `model.safetensors` and the older
PyTorch format `pytorch_model.bin`. Download only one of them.
"""

_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


@lru_cache(maxsize=2)
def _tiny_repo_files(folder: str) -> tuple[HubFile, ...]:
    import torch
    from safetensors.torch import load_file

    root = Path(folder)
    files = [
        HubFile(p.name, p.read_bytes())
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != "tiny_build.json" and not p.name.startswith(".")
    ]
    # The same weights in PyTorch's pickle format, as Meta's repos also carry them.
    buffer = io.BytesIO()
    torch.save(load_file(root / "model.safetensors"), buffer)
    files.append(HubFile("pytorch_model.bin", buffer.getvalue()))
    files.append(HubFile("README.md", _DEMO_README.encode()))
    files.append(HubFile(".gitattributes", _GITATTRIBUTES.encode()))
    return tuple(files)


def tiny_demo_repos() -> list[HubRepo]:
    """The two repos the demo hub serves: the tiny model, public and gated (notebooks/01_download_weights.ipynb)."""
    from helpers.tiny import ensure_tiny_model

    files = _tiny_repo_files(str(ensure_tiny_model(verbose=False)))
    public = HubRepo(DEMO_REPO, {f.path: f for f in files})
    gated = HubRepo(DEMO_GATED_REPO, {f.path: f for f in files}, gated="manual", granted_tokens={DEMO_TOKEN})
    return [public, gated]


class DemoHub:
    """The loopback Hub of notebooks/01_download_weights.ipynb: start, point ``HF_ENDPOINT`` at ``url``.

    ``drop_connection``, ``fail``, ``corrupt`` and ``heal`` inject and clear faults; ``requests``,
    ``bytes_served`` and ``gets`` tell what was served.
    """

    def __init__(self, repos: list[HubRepo] | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.repos: dict[str, HubRepo] = {r.repo_id: r for r in (repos if repos is not None else tiny_demo_repos())}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._drops: dict[str, list[int]] = {}
        self._fail: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""

    # ------------------------------------------------------------------ life cycle
    def start(self) -> DemoHub:
        if self._servers:
            return self
        for role in ("hub", "cdn"):
            server = _Server((self.host, 0), _Handler)
            server.hub, server.role = self, role
            thread = threading.Thread(target=server.serve_forever, name=f"demo-hub-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
        self.url = f"http://{self.host}:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://{self.host}:{self._servers[1].server_address[1]}"
        _DEMO_URLS.add(self.url)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    @property
    def running(self) -> bool:
        return bool(self._servers)

    def __enter__(self) -> DemoHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self.running else "stopped"
        return f"DemoHub({state}, repos={sorted(self.repos)})"

    # ------------------------------------------------------------------ content
    def put_file(self, repo_id: str, path: str, data: bytes) -> str:
        """Add or replace a file (a new commit, as a push would make); returns the new commit id."""
        repo = self.repos[repo_id]
        files = dict(repo.files)
        files[path] = HubFile(path, data)
        self.repos[repo_id] = HubRepo(repo.repo_id, files, repo.gated, set(repo.granted_tokens))
        return self.repos[repo_id].commit

    # ------------------------------------------------------------------ faults
    def drop_connection(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` downloads of ``path`` are cut after ``after_bytes`` bytes of body."""
        with self._lock:
            self._drops.setdefault(path, []).extend([after_bytes] * times)

    def fail(self, path: str, status: int = 503) -> None:
        """Answer every download of ``path`` with ``status`` (after pending drops) until ``heal``."""
        with self._lock:
            self._fail[path] = status

    def corrupt(self, path: str) -> None:
        """Serve ``path`` with one byte changed (same size), until ``heal``."""
        with self._lock:
            self._corrupt.add(path)

    def heal(self) -> None:
        """Clear every fault."""
        with self._lock:
            self._drops.clear()
            self._fail.clear()
            self._corrupt.clear()

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        with self._lock:
            self.requests = []

    def bytes_served(self, file: str | None = None) -> int:
        """Body bytes sent, for one file or in all."""
        with self._lock:
            return sum(r.bytes for r in self.requests if file is None or r.file == file)

    def gets(self, file: str | None = None) -> list[Request]:
        """The GET requests that carried file content (``/resolve`` or the CDN)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "GET" and r.file is not None and (file is None or r.file == file)
            ]

    # ------------------------------------------------------------------ used by the handler
    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_fault(self, path: str) -> tuple[int | None, int | None, bool]:
        with self._lock:
            drops = self._drops.get(path)
            drop = drops.pop(0) if drops else None
            status = None if drop is not None else self._fail.get(path)
            return drop, status, path in self._corrupt


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: DemoHub
    role: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep the notebook quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, repo=None, file=None):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            sent = len(body)
        self._log(status, sent, repo, file)

    def _log(self, status, sent, repo, file):
        self.server.hub._record(
            Request(
                origin=self.server.role,
                method=self.command,
                path=self.path,
                repo_id=repo.repo_id if repo else None,
                file=file,
                status=status,
                range=self.headers.get("Range"),
                bytes=sent,
                token=self._token() is not None,
            )
        )

    def _error(self, status: int, code: str | None, message: str, repo=None, file=None, commit=None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, repo=repo, file=file)

    def _json(self, payload, repo=None):
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, repo=repo)

    # ------------------------------------------------------------------ routing
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        try:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query)
            if self.server.role == "cdn":
                return self._cdn(parts, query)
            token = self._token()
            if token is not None and not token.startswith("hf_"):
                return self._error(401, None, "Invalid credentials in Authorization header")
            if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
                return self._api(parts[2:], query, token)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token)
            return self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True

    def _repo(self, repo_id: str, token: str | None) -> HubRepo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            # The Hub answers 401 without a token (it cannot tell a missing repo from a private one).
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _revision_ok(self, repo: HubRepo, revision: str) -> bool:
        if revision in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", repo=repo)
        return False

    def _gate(self, repo: HubRepo, token: str | None, file: str | None = None) -> bool:
        if not repo.gated or token in repo.granted_tokens:
            return True
        kind = f"Access to model {repo.repo_id} is restricted"
        if token is None:
            message = f"{kind}. You must have access to it and be authenticated to access it. Please log in."
            self._error(401, "GatedRepo", message, repo=repo, file=file)
        else:
            message = (
                f"{kind} and you are not in the authorized list. "
                f"Visit {self.server.hub.url}/{repo.repo_id} to ask for access."
            )
            self._error(403, "GatedRepo", message, repo=repo, file=file)
        return False

    def _api(self, parts: list[str], query: dict, token: str | None):
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        repo = self._repo(repo_id, token)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        if not rest:
            return self._json(repo.info(blobs), repo)
        if rest[0] == "revision" and len(rest) == 2:
            if self._revision_ok(repo, rest[1]):
                self._json(repo.info(blobs), repo)
            return
        if rest[0] == "tree" and len(rest) >= 2:
            if self._revision_ok(repo, rest[1]):
                prefix = "/".join(rest[2:])
                entries = [f.tree_entry() for p, f in sorted(repo.files.items()) if p.startswith(prefix)]
                self._json(entries, repo)
            return
        if rest == ["auth-check"]:
            if self._gate(repo, token):
                self._json({"ok": True}, repo)
            return
        self._error(404, None, "Not found", repo=repo)

    def _resolve(self, repo_id: str, revision: str, path: str, token: str | None):
        repo = self._repo(repo_id, token)
        if repo is None or not self._revision_ok(repo, revision) or not self._gate(repo, token, path):
            return
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", repo=repo, commit=repo.commit)
        if f.lfs:
            hub = self.server.hub
            location = f"{hub.cdn_url}/{quote(repo.repo_id)}/blobs/{f.sha256}?file={quote(path)}"
            headers = {
                "Location": location,
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "ETag": f'"{f.blob_id}"',
            }
            return self._send(302, b"", headers, repo=repo, file=path if self.command == "GET" else None)
        self._content(repo, f, {"ETag": f'"{f.blob_id}"', "X-Repo-Commit": repo.commit})

    def _cdn(self, parts: list[str], query: dict):
        if len(parts) != 4 or parts[2] != "blobs":
            return self._error(404, None, "Not found")
        repo = self.server.hub.repos.get(f"{parts[0]}/{parts[1]}")
        path = query.get("file", [""])[0]
        f = repo.files.get(path) if repo else None
        if f is None or f.sha256 != parts[3]:
            return self._error(404, None, "No such blob")
        self._content(repo, f, {"ETag": f'"{f.sha256}"'})

    # ------------------------------------------------------------------ file content
    def _content(self, repo: HubRepo, f: HubFile, headers: dict):
        drop, status, corrupt = self.server.hub._take_fault(f.path) if self.command == "GET" else (None, None, False)
        if status is not None:
            return self._error(status, None, "Service temporarily unavailable", repo=repo, file=f.path)
        data = f.data
        if corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        start, end, status = 0, len(data), 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].split(",")[0].partition("-")
            start = int(first) if first else 0
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                return self._error(416, None, "Range not satisfiable", repo=repo, file=f.path)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        headers.update({"Content-Length": str(len(body)), "Accept-Ranges": "bytes"})
        headers.setdefault("Content-Type", "application/octet-stream")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return self._log(status, 0, repo, None)
        limit = len(body) if drop is None else min(drop, len(body))
        sent = 0
        try:
            while sent < limit:
                n = min(CHUNK, limit - sent)
                self.wfile.write(body[sent : sent + n])
                sent += n
            if drop is not None and limit < len(body):
                # Cut the connection mid-file, as a flaky network does.
                self.wfile.flush()
                time.sleep(0.05)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            self._log(status, sent, repo, f.path)


def unused_local_url() -> str:
    """An http://127.0.0.1 address where nothing listens (to show an unreachable endpoint) (notebooks/01_download_weights.ipynb)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def start_demo_hub() -> DemoHub:
    """Start a demo hub serving :data:`DEMO_REPO` and :data:`DEMO_GATED_REPO` (notebooks/01_download_weights.ipynb)."""
    return DemoHub().start()

"""A Hugging Face Hub on 127.0.0.1 serving the tiny model (on no Hub), so notebooks/01_download_weights.ipynb
runs offline. Infrastructure: lesson 01 reaches it through helpers.download. Enough for ``snapshot_download``,
``model_info`` and ``verify_repo_checksums``; tests/hub_fixture.py adds resume and faults. One server per
process, stopped at exit; ``HF_ENDPOINT`` untouched."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOCAL_REPO = "local/tiny-llama2-chat"
# The same model with PyTorch .bin weights only, as FlagAlpha's LoRA adapter repos (adapter_model.bin) hold them.
LOCAL_BIN_REPO = "local/tiny-llama2-chat-bin-only"
LFS_SUFFIXES = (".safetensors", ".bin", ".model")  # what the Hub stores with Git LFS
_HUB: ThreadingHTTPServer | None = None


class HubFile:
    """One file of a repo with the ids the Hub reports: size, git blob id and, for LFS files, sha256."""

    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.size = path, data, len(data)
        self.lfs = path.endswith(LFS_SUFFIXES)
        self.sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        stored = pointer.encode() if self.lfs else data  # for an LFS file git stores the pointer
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()
        self.entry = {"type": "file", "path": path, "size": self.size, "oid": self.blob_id}
        if self.lfs:
            self.entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}


def tiny_repo_files(folder) -> dict[str, HubFile]:
    """The tiny model's files, plus its weights in PyTorch's format as Meta's repos carry both."""
    import torch
    from safetensors.torch import load_file

    names = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != "tiny_build.json"]
    files = {p.name: HubFile(p.name, p.read_bytes()) for p in names if not p.name.startswith(".")}
    buffer = io.BytesIO()
    torch.save(load_file(Path(folder) / "model.safetensors"), buffer)
    files["pytorch_model.bin"] = HubFile("pytorch_model.bin", buffer.getvalue())
    return files


class Handler(BaseHTTPRequestHandler):
    """Serves ``self.server.repos`` (repo id -> {path: HubFile}); tests/hub_fixture.py adds faults."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the notebook quiet
        pass

    def do_GET(self):
        self.route([unquote(p) for p in urlsplit(self.path).path.split("/") if p])

    do_HEAD = do_GET

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, file: HubFile | None = None):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def error(self, status: int, code: str, message: str):
        self.send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message})

    def route(self, parts: list[str]):
        api = parts[:2] == ["api", "models"]  # /api/models/<repo>[/tree/...], else /<repo>/resolve/<rev>/<path>
        repo_id = "/".join(parts[2:4] if api else parts[:2])
        files = self.server.repos.get(repo_id)
        if files is None:
            self.error(401, "RepoNotFound", "Repository not found")  # the Hub's answer without a token
        elif api and parts[4:5] == ["tree"]:
            self.json([files[p].entry for p in sorted(files)])
        elif api:
            siblings = [{"rfilename": p, "size": f.size, "blobId": f.blob_id,
                         "lfs": f.lfs and {**f.entry["lfs"], "sha256": f.sha256}} for p, f in files.items()]
            self.json({"id": repo_id, "sha": commit(repo_id, files), "gated": False, "siblings": siblings})
        elif parts[2:3] == ["resolve"] and "/".join(parts[4:]) in files:
            self.send_file(files["/".join(parts[4:])], commit(repo_id, files))
        else:
            self.error(404, "EntryNotFound", "Entry not found")

    def json(self, payload):
        self.send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def send_file(self, f: HubFile, repo_commit: str):
        """The whole file; a ``Range`` (a resumed download) is ignored, which huggingface_hub handles."""
        headers = {"X-Repo-Commit": repo_commit, "ETag": f'"{f.sha256 if f.lfs else f.blob_id}"'}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        self.send(200, f.data, headers, f)


def commit(repo_id: str, files: dict[str, HubFile]) -> str:
    """A stable commit id for a repo's content: another file list gives another commit."""
    listing = "".join(f"{path}\0{files[path].blob_id}\n" for path in sorted(files))
    return hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()


def start(repos: dict, handler=Handler) -> ThreadingHTTPServer:
    """Serve ``repos`` on a free 127.0.0.1 port (``server.url``) in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads, server.repos = True, repos
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="local-hub", daemon=True).start()
    return server


def bin_only(files: dict[str, HubFile]) -> dict[str, HubFile]:
    """A repo's files without its safetensors copy: PyTorch ``.bin`` weights only."""
    return {path: f for path, f in files.items() if not path.endswith(".safetensors")}


def start_local_hub() -> ThreadingHTTPServer:
    """The one loopback Hub of this process, serving the tiny model as :data:`LOCAL_REPO` and, with .bin weights
    only, as :data:`LOCAL_BIN_REPO` (notebooks/01_download_weights.ipynb)."""
    global _HUB
    if _HUB is None:
        from helpers.tiny import ensure_tiny_model

        files = tiny_repo_files(ensure_tiny_model(verbose=False))
        _HUB = start({LOCAL_REPO: files, LOCAL_BIN_REPO: bin_only(files)})
    return _HUB


@atexit.register
def stop_local_hub() -> None:
    """Stop the loopback Hub if it runs (lesson 01's last cell, and at exit)."""
    global _HUB
    if _HUB is not None:
        _HUB.shutdown()
        _HUB.server_close()
        _HUB = None

"""A loopback Hub with fault injection for tests/test_download.py (lesson 01's error cases).

Extends helpers._local_hub's Handler with what the real Hub and a bad network do: gated repos
(401 without a token, 403 for a token without access), invalid tokens, resumed downloads (``Range``,
416 for a bad one), outages (5xx), connections cut mid-file, corrupted bytes, and a log of every
request (Range, bytes sent, Authorization header).
"""

from __future__ import annotations

import re
import socket
import threading
import time

from helpers import _local_hub as local_hub
from helpers._local_hub import Handler, HubFile

GATED_REPO = "local/tiny-llama2-chat-gated"
TOKEN = "hf_token_with_access"
TOKEN_NO_ACCESS = "hf_token_without_access"


class FaultyHandler(Handler):
    def route(self, parts):
        server, auth = self.server, self.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        self.file, self.sent = None, 0
        try:
            if token is not None and not token.startswith("hf_"):
                return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
            repo_id = "/".join(parts[2:4]) if parts[:2] == ["api", "models"] else "/".join(parts[:2])
            protected = parts[-1:] == ["auth-check"] or (len(parts) >= 5 and parts[2] == "resolve")
            if repo_id in server.gated and protected and token != TOKEN:
                status = 401 if token is None else 403
                return self.error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
            if parts[-1:] == ["auth-check"]:
                return self.json({"ok": True})
            if parts[:2] == ["api", "models"] and parts[4:5] == ["tree"] and server.tree_only:
                files = server.repos.get(repo_id) or {}
                extra = [{"type": "file", "path": name, "size": 2, "oid": "0" * 40} for name in server.tree_only]
                return self.json([files[p].entry for p in sorted(files)] + extra)
            super().route(parts)
        finally:
            server.requests.append({"method": self.command, "path": self.path, "file": self.file, "sent": self.sent,
                                    "range": self.headers.get("Range"), "auth": auth or None})

    def json(self, payload):
        if isinstance(payload, dict) and payload.get("id") in self.server.gated:
            payload["gated"] = "manual"
        super().json(payload)

    def send_file(self, f: HubFile, repo_commit: str):
        server = self.server
        with server.lock:
            drops = server.drops.get(f.path)
            drop = drops.pop(0) if drops and self.command == "GET" else None
            status = None if drop is not None or self.command != "GET" else server.fails.get(f.path)
        if status is not None:
            return self.error(status, "ServerError", "Service temporarily unavailable")
        self.file, self.drop = f.path, drop
        super().send_file(f, repo_commit)

    def send(self, status, body=b"", headers=None, file=None):
        if file is not None and file.path in self.server.short and self.command == "GET":
            body = body[:-self.server.short[file.path]]
        if file is not None and file.path in self.server.corrupt:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        if file is not None and "Range" in self.headers:  # a resumed download: only the part asked for
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"].strip())
            if match is None or int(match[1]) >= max(len(body), 1) or (match[2] and int(match[2]) < int(match[1])):
                return super().send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
            start, end = int(match[1]), min(int(match[2] or len(body) - 1), len(body) - 1)
            status, body = 206, body[start:end + 1]
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{file.size}"}
        drop = getattr(self, "drop", None) if file is not None else None
        if drop is None or self.command != "GET":
            super().send(status, body, headers, file)
            self.sent = len(body) if self.command == "GET" else 0
            return
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:drop])  # then cut the connection mid-file, as a flaky network does
        self.wfile.flush()
        self.sent = min(drop, len(body))
        time.sleep(0.05)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FaultyHub:
    """Start with ``FaultyHub(repos)``; ``url``, fault setters, ``gets()`` and ``stop()``."""

    def __init__(self, repos: dict, gated=(GATED_REPO,)):
        self.server = local_hub.start(repos, FaultyHandler)
        s = self.server
        s.gated, s.requests, s.lock, s.drops, s.fails, s.corrupt = set(gated), [], threading.Lock(), {}, {}, set()
        s.short, s.tree_only = {}, []
        self.url, self.repos = s.url, repos

    def drop_connection(self, path, after_bytes):
        self.server.drops.setdefault(path, []).append(after_bytes)

    def fail(self, path, status=503):
        self.server.fails[path] = status

    def corrupt(self, path):
        self.server.corrupt.add(path)

    def shorten(self, path, missing_bytes):
        """Serve ``path`` ``missing_bytes`` short, with a Content-Length to match, while the listing keeps
        its full size: a server that sends fewer bytes than it lists."""
        self.server.short[path] = missing_bytes

    def list_in_tree_only(self, *names):
        """Add ``names`` to the tree listing (what snapshot_download fetches) but not to model_info's."""
        self.server.tree_only.extend(names)

    def heal(self):
        self.server.short.clear(), self.server.tree_only.clear()
        self.server.drops.clear(), self.server.fails.clear(), self.server.corrupt.clear()
        self.server.requests.clear()

    def gets(self, file=None):
        """The GET requests that carried file content."""
        return [r for r in self.server.requests if r["method"] == "GET" and r["file"] and file in (None, r["file"])]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

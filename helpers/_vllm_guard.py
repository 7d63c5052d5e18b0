"""ASGI middleware that vLLM loads with ``--middleware helpers._vllm_guard.RequireKey`` (helpers/serve.py).

vLLM's own ``--api-key`` / ``VLLM_API_KEY`` check guards only paths under /v1, /v2, /inference and /cohere
(vllm 0.32, ``entrypoints/serve/middleware/authenticate.py``); /metrics (model names and traffic), /invocations
(full generation), /tokenize and others answer anyone. This guard asks for the same key on every path but
/health, which start_server polls before it has a client.
"""

from __future__ import annotations

import hashlib
import hmac
import os

OPEN_PATHS = ("/health",)


class RequireKey:
    """Answers 401 to any request without ``Authorization: Bearer <VLLM_API_KEY>``, except OPTIONS and /health."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def allowed(self, scope) -> bool:
        if self.digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return True
        if scope["path"].removeprefix(scope.get("root_path", "")) in OPEN_PATHS:
            return True
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = hashlib.sha256(token.encode("latin-1")).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.digest)

    async def __call__(self, scope, receive, send):
        if self.allowed(scope):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)

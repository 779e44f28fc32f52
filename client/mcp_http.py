"""The streamable-HTTP transport of ``apcm mcp``, behind a bearer token.

Whoever reaches the HTTP port acts with the ApCM key the MCP server holds, so
every request must carry ``Authorization: Bearer <token>``; a missing or wrong
token gets 401 before the MCP app sees the request. The token is compared as a
SHA-256 digest with ``hmac.compare_digest`` (constant time, whatever its length).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "APCM_MCP_TOKEN"


def read_token(env_value: str | None, path: str | None) -> str | None:
    """The token from ``--http-token-file`` (first line) or ``APCM_MCP_TOKEN``; None if
    neither gives a non-empty one."""
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines and lines[0].strip() else None
    return env_value.strip() if env_value and env_value.strip() else None


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


class BearerTokenMiddleware:
    """ASGI middleware: HTTP requests without ``Authorization: Bearer <token>`` get 401."""

    def __init__(self, app: App, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenMiddleware needs a token")
        self.app = app
        self._digest = _digest(token)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, token = bytes(value).strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    _digest(token.strip()), self._digest)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)  # lifespan events pass through
            return
        body = json.dumps({"error": "missing or invalid bearer token: send "
                           "'Authorization: Bearer <token>'"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"www-authenticate", b'Bearer realm="apcm-mcp"'),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve_http(mcp: Any, host: str, port: int, token: str) -> None:
    """Serve ``mcp`` (an ``MCPServer``) over streamable HTTP at ``/mcp`` behind ``token``."""
    import uvicorn

    app = BearerTokenMiddleware(mcp.streamable_http_app(host=host), token)
    uvicorn.run(app, host=host, port=port, log_level="info")

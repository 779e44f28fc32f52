"""The memory browser's HTTP server: the page, and a JSON API over ``MemoryService``.

Behind the same API keys as gRPC: with keys configured, every ``/api/`` call needs
``Authorization: Bearer <key>`` (the page asks for one and keeps it in the tab's
session storage), and deleting needs a read-write key. The page itself carries no
data, so it is served to anyone.

Without keys, any page the user's browser opens could call a loopback port, so
state changes take only ``Content-Type: application/json`` POSTs (which a
cross-site page cannot send without a CORS preflight, never answered here), and a
request whose ``Host`` is not the address the browser bound is refused (DNS
rebinding).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..domain.params import ReadParams
from ..domain.service import MemoryService
from ..errors import (
    ApcmError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from . import views

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409,
               "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504}
MAX_BODY = 64 * 1024
SEARCH_TOP_K = 20
# "rw", "ro" or None (unknown key) for a bearer token; None when no keys are configured
Authorize = Callable[[str | None], str | None] | None


class BrowserApi:
    """The JSON endpoints, free of HTTP plumbing (one method per route)."""

    def __init__(self, service: MemoryService, keys: bool) -> None:
        self.service = service
        self.keys = keys

    def info(self) -> dict[str, Any]:
        return views.model(self.service.model_info(), self.service.ready, self.keys)

    def banks(self) -> list[dict[str, Any]]:
        return [views.bank(b) for b in self.service.list_banks()]

    def memories(self, bank: str, query: dict[str, str]) -> dict[str, Any]:
        offset, limit = _int(query, "offset", 0), _int(query, "limit", 50)
        total, rows = self.service.list_memories(bank, offset, limit)
        return views.memories(total, offset, rows)

    def search(self, bank: str, query: dict[str, str]) -> dict[str, Any]:
        text = query.get("q", "").strip()
        if not text:
            raise InvalidArgument("type something to search for", field="q")
        mode = query.get("mode") or None
        params = ReadParams(top_k=_int(query, "top_k", SEARCH_TOP_K), mode=mode,
                            count_access=False)
        [result] = self.service.read(bank, params, texts=[text], include_payloads=True)
        return {"query": text, "mode": mode or "auto", "hits": views.hits(result)}

    def delete(self, bank: str, body: dict[str, Any]) -> dict[str, Any]:
        """Deletes one memory by (slot, sequence): never one written since it was shown."""
        slot, sequence = _memory(body, "delete")
        deleted, _ = self.service.delete_slots(bank, [slot], [], sequences=[sequence])
        return {"deleted": deleted}

    def set_metadata(self, bank: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replaces one memory's metadata, by (slot, sequence) as ``delete``."""
        slot, sequence = _memory(body, "edit")
        metadata = body.get("metadata")
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InvalidArgument("metadata must be an object of string labels")
        return {"updated": self.service.set_metadata(bank, slot, sequence, metadata)}


def _memory(body: dict[str, Any], what: str) -> tuple[int, int]:
    try:
        return int(body["slot"]), int(body["sequence"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"send the slot and sequence of the memory to {what}: "
                              '{"slot": N, "sequence": N, ...}') from e


def _int(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise InvalidArgument(f"{name} must be a whole number, got {raw[:20]!r}") from e


class _Handler(BaseHTTPRequestHandler):
    server: BrowserHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("browser %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        if not self.server.host_allowed(self.headers.get("Host", "")):
            self._json(403, {"error": "this Host is not the memory browser's address"})
            return
        if method == "GET" and url.path in FILES:
            name, kind = FILES[url.path]
            self._send(200, (STATIC / name).read_bytes(), kind)
            return
        if not url.path.startswith("/api/"):
            self._json(404, {"error": f"no page {url.path[:80]}"})
            return
        try:
            self._json(200, self._api(method, url.path[5:].split("/"),
                                      {k: v[0] for k, v in parse_qs(url.query).items()}))
        except ApcmError as e:
            self._json(HTTP_STATUS.get(e.code, 500), {"error": e.message})
        except Exception:
            log.exception("memory browser: %s %s failed", method, url.path)
            self._json(500, {"error": "internal error; the server log has the details"})

    def _api(self, method: str, parts: list[str], query: dict[str, str]) -> Any:
        role = self._role()
        api = self.server.api
        parts = [unquote(p) for p in parts]
        if method == "GET" and parts == ["info"]:
            return api.info()
        if not api.service.ready:  # as gRPC's readiness check: no half-restored banks
            raise FailedPrecondition("the server is not serving (starting, restoring a "
                                     "snapshot or stopping); try again in a moment")
        if method == "GET" and parts == ["banks"]:
            return api.banks()
        if len(parts) == 3 and parts[0] == "banks":
            bank, action = parts[1], parts[2]
            if method == "GET" and action == "memories":
                return api.memories(bank, query)
            if method == "GET" and action == "search":
                return api.search(bank, query)
            if method == "POST" and action in ("delete", "metadata"):
                if role == "ro":
                    raise PermissionDenied("a read-only API key cannot change memories")
                change = api.delete if action == "delete" else api.set_metadata
                return change(bank, self._body())
        raise InvalidArgument(f"no API call {method} /api/{'/'.join(parts)[:80]}")

    def _role(self) -> str | None:
        authorize = self.server.authorize
        if authorize is None:
            return None
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        role = authorize(token.strip() if scheme.lower() == "bearer" else None)
        if role is None:
            raise Unauthenticated("this server needs an API key: enter one above")
        return role

    def _body(self) -> dict[str, Any]:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise InvalidArgument("send the body as application/json")
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_BODY:
            raise InvalidArgument(f"the body must be 1-{MAX_BODY} bytes of JSON")
        try:
            body = json.loads(self.rfile.read(size))
        except ValueError as e:
            raise InvalidArgument("the body is not JSON") from e
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object")
        return body

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="apcm"')
        self.end_headers()
        self.wfile.write(body)


class BrowserHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: BrowserApi, authorize: Authorize,
                 loopback: bool) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.api = api
        self.authorize = authorize
        self.loopback = loopback

    def host_allowed(self, host: str) -> bool:
        """On loopback, only loopback names; elsewhere an operator chose the address."""
        if not self.loopback:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]") in ("localhost", "127.0.0.1", "::1")


class MemoryBrowser:
    """Serves the browser on a thread; ``start`` returns the bound port."""

    def __init__(self, service: MemoryService, authorize: Authorize) -> None:
        self.service = service
        self.authorize = authorize
        self._http: BrowserHTTPServer | None = None

    def start(self, host: str, port: int, loopback: bool) -> int:
        api = BrowserApi(self.service, keys=self.authorize is not None)
        self._http = BrowserHTTPServer((host.strip("[]"), port), api, self.authorize, loopback)
        threading.Thread(target=self._http.serve_forever, name="apcm-browser",
                         daemon=True).start()
        return int(self._http.server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

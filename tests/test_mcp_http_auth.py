"""``apcm mcp --transport http`` needs a bearer token: a real ``apcm mcp`` process in
front of a real ApCM server, reached over HTTP with no, a wrong and the right token."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apcm.server.api.app import ApcmServer

pytest.importorskip("mcp")
TOKEN = "mcp-token-0123456789abcdef0123456789abcdef"
APCM = str(Path(sys.executable).with_name("apcm"))
INITIALIZE = json.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test", "version": "0"}},
}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mcp(target: str, *flags: str, token: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "APCM_MCP_TOKEN"}
    if token is not None:
        env["APCM_MCP_TOKEN"] = token
    return subprocess.Popen([APCM, "mcp", "--target", target, "--transport", "http", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture
def mcp_http(make_server: Callable[..., ApcmServer]) -> Iterator[str]:
    """The URL of a running ``apcm mcp --transport http`` holding TOKEN."""
    server = make_server()
    port = _free_port()
    proc = _mcp(f"127.0.0.1:{server.port}", "--port", str(port), token=TOKEN)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


def _post(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=INITIALIZE, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        assert e.headers.get("WWW-Authenticate", "").startswith("Bearer"), e.headers
        return int(e.code)


def test_http_transport_refuses_calls_without_the_token(mcp_http: str) -> None:
    assert _post(mcp_http, {}) == 401
    assert _post(mcp_http, {"Authorization": "Bearer wrong"}) == 401
    assert _post(mcp_http, {"Authorization": f"Basic {TOKEN}"}) == 401
    assert _post(mcp_http, {"Authorization": f"Bearer {TOKEN}"}) == 200


def test_http_transport_serves_tools_with_the_token(mcp_http: str) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def go() -> Any:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        async with http, Client(streamable_http_client(mcp_http, http_client=http)) as c:
            return await c.call_tool("list_banks", {})

    result = asyncio.run(go())
    assert not result.is_error, result.content
    assert "default" in json.dumps(result.structured_content)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_http_transport_will_not_start_without_a_token(host: str) -> None:
    proc = _mcp("127.0.0.1:1", "--host", host, "--port", str(_free_port()), token=None)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"apcm mcp served HTTP on {host} without a token") from None
    assert proc.returncode == 2, out
    assert "apcm mcp: error: --transport http needs a bearer token" in out, out
    assert "APCM_MCP_TOKEN" in out

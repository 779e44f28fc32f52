"""``apcm mcp``: an MCP server that gives an agent a memory on a running ApCM server.

It is a client of ApCM (through :class:`MemoryClient`, so TLS and API keys work
as in the SDK), built on the official ``mcp`` SDK (``pip install 'apcm[agent]'``,
imported only when the command runs). Tools: ``remember``, ``recall``,
``forget``, ``create_bank`` and ``list_banks`` (``mcp_tools``; their logic and
safety rules in ``agent_memory``). Failures come back as tool errors whose text
tells the model what to do next; an unreachable server fails within the
``--timeout`` deadline instead of hanging.

Serves stdio by default (for agent hosts that spawn it), or streamable HTTP
with ``--transport http --port N``, which needs a bearer token (``mcp_http``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .agent_memory import AgentMemory, ToolFailure, explain
from .mcp_http import TOKEN_ENV, read_token, serve_http
from .sync import MemoryClient

__all__ = ["AgentMemory", "ToolFailure", "explain", "register", "run"]

MISSING_MCP = ("apcm mcp: the MCP server needs the agent extra, which this install lacks: "
               "run `pip install 'apcm[agent]'` (in a checkout: `make install`, or "
               "`.venv/bin/pip install -e '.[agent]'`).")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mcp", help="serve an MCP server that gives an agent memory on an ApCM server",
        description="An MCP server (tools remember, recall, forget, create_bank, list_banks) "
        "backed by a running ApCM server. Needs the agent extra: pip install 'apcm[agent]'.",
    )
    parser.add_argument("--target", default=os.environ.get("APCM_TARGET", "127.0.0.1:50051"),
                        help="ApCM server address HOST:PORT (env APCM_TARGET)")
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                        help="stdio (default, for hosts that spawn the server) or "
                        "streamable HTTP")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="deadline of each ApCM call in seconds (an unreachable server "
                        "fails within it)")
    parser.add_argument("--api-key", default=os.environ.get("APCM_API_KEY"),
                        help="ApCM API key (env APCM_API_KEY)")
    parser.add_argument("--http-token-file", default=None,
                        help="file whose first line is the bearer token HTTP clients must "
                        f"send (else env {TOKEN_ENV}); required with --transport http")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle of the server (enables TLS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from .mcp_tools import build_mcp
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("mcp", "pydantic", "uvicorn", "starlette"):
            raise
        print(MISSING_MCP, file=sys.stderr)
        return 2
    from .channel import TLSConfig

    token = None
    if args.transport == "http":
        try:
            token = read_token(os.environ.get(TOKEN_ENV), args.http_token_file)
        except OSError as e:
            print(f"apcm mcp: error: cannot read --http-token-file: {e}", file=sys.stderr)
            return 2
        if token is None:
            # whoever reaches the port would act with this server's ApCM key
            print(f"apcm mcp: error: --transport http needs a bearer token: set {TOKEN_ENV} "
                  "or --http-token-file (clients send 'Authorization: Bearer <token>'), "
                  f"e.g. {TOKEN_ENV}=$(openssl rand -hex 32)", file=sys.stderr)
            return 2
    tls: bool | TLSConfig = TLSConfig.from_files(args.tls_ca) if args.tls_ca else args.tls
    client = MemoryClient(args.target, timeout=args.timeout, api_key=args.api_key, tls=tls,
                          retries=1)
    mcp = build_mcp(AgentMemory(client, args.target))
    try:
        if token is not None:
            serve_http(mcp, args.host, args.port, token)
        else:
            mcp.run("stdio")
    finally:
        client.close()
    return 0

"""``apcm mcp``: an MCP server that gives an agent a memory on a running ApCM server.

It is a client of ApCM (through :class:`MemoryClient`, so TLS and API keys work
as in the SDK), built on the official ``mcp`` SDK (``pip install 'apcm[agent]'``,
imported only when the command runs). Tools: ``remember``, ``recall``,
``forget`` and ``list_banks``. Failures come back as tool errors whose text
tells the model what to do next; an unreachable server fails within the
``--timeout`` deadline instead of hanging.

Serves stdio by default (for agent hosts that spawn it), or streamable HTTP
with ``--transport http --port N``, which needs a bearer token (``mcp_http``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Literal

from .errors import (
    ApcmError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from .mcp_http import TOKEN_ENV, read_token, serve_http
from .sync import MemoryClient

INSTRUCTIONS = (
    "A long-term memory. Call `remember` to store a fact, preference or event worth "
    "keeping (one self-contained sentence per memory, with metadata such as user or "
    "session when known). Call `recall` with a natural-language question before "
    "answering anything that may depend on earlier conversations. `forget` removes a "
    "memory by key or by the best match to a query."
)


class ToolFailure(Exception):
    """A failed call, with a sentence telling the model what to do (made a tool error)."""


def explain(error: ApcmError, target: str) -> str:
    """An ApCM client error as advice for a language model."""
    msg = str(error)
    if isinstance(error, (UnavailableError, DeadlineExceededError)):
        return (f"The memory server at {target} is unreachable ({type(error).__name__}). "
                "Memory is unavailable right now: continue without it, and tell the user "
                "that memory could not be reached if it matters.")
    if isinstance(error, NotFoundError):
        return (f"Not found: {msg}. Call list_banks to see the banks that exist, or leave "
                "`bank` out to use the default bank.")
    if isinstance(error, InvalidArgumentError):
        return f"The arguments were rejected: {msg}. Fix them and call the tool again."
    if isinstance(error, FailedPreconditionError):
        return f"The memory server cannot do this: {msg}. Do not retry this call."
    return f"The memory server refused the call: {msg}."


class AgentMemory:
    """The tools' logic over one ``MemoryClient`` (no MCP types; easy to test)."""

    def __init__(self, client: MemoryClient, target: str) -> None:
        self.client = client
        self.target = target

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApcmError as e:
            raise ToolFailure(explain(e, self.target)) from e

    def remember(self, text: str, bank: str | None = None, key: str | None = None,
                 metadata: dict[str, str] | None = None) -> dict[str, Any]:
        written = self._call(self.client.remember, text, bank=bank,
                             keys=[key] if key else None, metadata=metadata)[0]
        return {"stored": True, "key": written.key, "slot": written.slot,
                "replaced": written.replaced,
                "evicted_key": written.evicted_key if written.evicted else None}

    def recall(self, query: str, bank: str | None = None, top_k: int = 5,
               filter: dict[str, str] | None = None,  # noqa: A002
               mode: str | None = None, context: int | None = None) -> list[dict[str, Any]]:
        hits = self._call(self.client.recall, query, bank=bank, top_k=top_k, filter=filter,
                          mode=mode, context=context)
        out = []
        for h in hits:
            hit: dict[str, Any] = {"text": h.text, "key": h.key,
                                   "similarity": round(h.score, 4), "metadata": h.metadata}
            if h.context:
                hit["before"] = [c.text for c in h.context if c.offset < 0]
                hit["after"] = [c.text for c in h.context if c.offset > 0]
            out.append(hit)
        return out

    def forget(self, key: str | None = None, query: str | None = None,
               bank: str | None = None) -> dict[str, Any]:
        if bool(key) == bool(query):
            raise ToolFailure("Give exactly one of `key` (the memory's key) or `query` (the "
                              "best match to this text is forgotten).")
        if key:
            result = self._call(self.client.delete_slots, bank or "", keys=[key])
            if result.deleted == 0:
                raise ToolFailure(f"No memory has the key {key!r}. Use recall to find the "
                                  "memory, then forget it by query.")
            return {"forgotten": 1, "key": key}
        hits = self._call(self.client.recall, query, bank=bank, top_k=1)
        if not hits:
            raise ToolFailure("No memory matches that query; there is nothing to forget.")
        h = hits[0]
        if h.key:
            self._call(self.client.delete_slots, bank or "", keys=[h.key])
        else:
            self._call(self.client.delete_slots, bank or "", slots=[h.slot])
        return {"forgotten": 1, "key": h.key, "text": h.text}

    def list_banks(self) -> list[dict[str, Any]]:
        banks = self._call(self.client.list_banks)
        return [{"name": b.name, "memories": b.occupied, "capacity": b.capacity}
                for b in banks]


def build_mcp(memory: AgentMemory, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """The MCP server (``mcp.server.mcpserver.MCPServer``) exposing ``memory``'s tools."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    mcp = MCPServer("apcm-memory", instructions=INSTRUCTIONS)

    def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ToolFailure as e:
            raise ToolError(str(e)) from e

    @mcp.tool()
    def remember(text: str, bank: str | None = None, key: str | None = None,
                 metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Store one memory: a self-contained sentence (fact, preference, event, decision).

        Args:
            text: the memory, written so it makes sense without the conversation.
            bank: memory bank to use; leave out for the default bank.
            key: optional stable id; remembering with an existing key replaces that memory.
            metadata: optional string labels such as {"user": "u1", "kind": "preference"};
                recall can filter on them.
        """
        return guarded(memory.remember, text, bank, key, metadata)  # type: ignore[no-any-return]

    @mcp.tool()
    def recall(query: str, bank: str | None = None, top_k: int = 5,
               filter: dict[str, str] | None = None,  # noqa: A002
               mode: Literal["hybrid", "dense", "lexical"] | None = None,
               context: int | None = None,
               ) -> list[dict[str, Any]]:
        """Find the stored memories that best answer a question or topic, best first.

        Args:
            query: what you want to know, in natural language.
            bank: memory bank to search; leave out for the default bank.
            top_k: how many memories to return (1-50).
            filter: only memories whose metadata has all these labels, e.g. {"user": "u1"}.
            mode: leave out (hybrid: matches words and meaning); "lexical" for exact
                names, ids or rare words only; "dense" for meaning only.
            context: set 1 or 2 when the bank holds a conversation stored one turn per
                memory and you ask what someone said, answered or did: the answer is
                often the turn next to the one your question matches, so each hit comes
                with the turns just before and after it ("before", "after") and turns
                next to a good match rank higher. Leave out for banks of separate facts
                (0 turns it off; left out, the bank's own setting applies).
        """
        return guarded(memory.recall, query, bank, top_k,  # type: ignore[no-any-return]
                       filter, mode, context)

    @mcp.tool()
    def forget(key: str | None = None, query: str | None = None,
               bank: str | None = None) -> dict[str, Any]:
        """Delete one memory: by its key, or the single best match to a query.

        Args:
            key: the key of the memory to delete.
            query: delete the memory that best matches this text (use when no key is known).
            bank: memory bank; leave out for the default bank.
        """
        return guarded(memory.forget, key, query, bank)  # type: ignore[no-any-return]

    @mcp.tool()
    def list_banks() -> list[dict[str, Any]]:
        """List the memory banks with how many memories each holds."""
        return guarded(memory.list_banks)  # type: ignore[no-any-return]

    return mcp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mcp", help="serve an MCP server that gives an agent memory on an ApCM server",
        description="An MCP server (tools remember, recall, forget, list_banks) backed by a "
        "running ApCM server. Needs the agent extra: pip install 'apcm[agent]'.",
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

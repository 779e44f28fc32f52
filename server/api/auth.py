"""API-key authentication: ``authorization: Bearer <key>`` metadata, read-write or read-only.

Keys come from ``settings.api_keys`` (read-write), ``settings.read_only_api_keys``
and ``settings.api_keys_file`` (lines ``rw:KEY`` / ``ro:KEY``). With no key
configured, :func:`build_auth_interceptor` returns ``None`` and the server is open.

Only health ``Check`` answers without a key, so that probes (Docker
``HEALTHCHECK``, Kubernetes gRPC probes) work: health ``Watch`` and server
reflection need a key like every other call (reflection can be opened with
``settings.reflection_without_key``). Keys are never logged and never appear in
an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc

from ..config import Settings
from ..errors import ApcmError, PermissionDenied, Unauthenticated
from ..rpc.status import abort_with_error

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/apcm.v1.MemoryService/"
# RPCs that neither change a bank nor touch snapshots on disk.
READ_ONLY_METHODS = frozenset(
    SERVICE_PREFIX + name
    for name in (
        "GetModelInfo",
        "Compress",
        "Decompress",
        "Read",
        "ListBanks",
        "DescribeBank",
        "ListSnapshots",
    )
) | {"/apcm.v1.ClusterService/GetClusterInfo"}  # the shard map: what SDK routing needs
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
REFLECTION_PREFIX = "/grpc.reflection."
# At most one "rejected" log line per this many seconds: a misconfigured client or a
# scanner would otherwise write one line per call.
REJECTION_LOG_INTERVAL_S = 10.0


class _RateLimitedLog:
    """Logs the first rejection, then at most one per interval with a count of the
    ones not logged since."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def rejected(self, method: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self.interval_s
        more = f" ({suppressed} more rejected calls not logged)" if suppressed else ""
        log.info("rejected %s: %s%s", method, message, more)


class Role(Enum):
    READ_ONLY = "ro"
    READ_WRITE = "rw"


@dataclass(frozen=True)
class KeyRing:
    """SHA-256 digests of the accepted keys, with their roles.

    Only digests are kept: every comparison is between two 32-byte strings, so
    ``hmac.compare_digest`` takes the same time whatever the key's length.
    """

    digests: tuple[tuple[bytes, Role], ...]

    @classmethod
    def from_keys(cls, read_write: Iterable[str], read_only: Iterable[str]) -> KeyRing:
        rw = {k for k in read_write if k}
        ro = {k for k in read_only if k}
        if rw & ro:
            raise ValueError("an API key is configured both read-write and read-only")
        entries = [(_digest(k), Role.READ_WRITE) for k in sorted(rw)]
        entries += [(_digest(k), Role.READ_ONLY) for k in sorted(ro)]
        return cls(tuple(entries))

    def __len__(self) -> int:
        return len(self.digests)

    def role_of(self, key: str) -> Role | None:
        """The role of ``key``, or ``None`` when it matches no configured key.

        Compares against every key without stopping at a match, so the time
        taken does not reveal which key (or which role) matched.
        """
        candidate = _digest(key)
        found: Role | None = None
        for digest, role in self.digests:
            if hmac.compare_digest(candidate, digest):
                found = role
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _split_keys(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def read_keys_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Parses a keys file into ``(read_write, read_only)`` key lists.

    Args:
        path: text file, one ``rw:KEY`` or ``ro:KEY`` per line; blank lines and
            lines starting with ``#`` are skipped.

    Raises:
        ValueError: a line has no known role prefix (the message names the line
            number, never its content, which may be a key).
    """
    read_write: list[str] = []
    read_only: list[str] = []
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, key = line.partition(":")
        key = key.strip()
        if not sep or not key or role.strip() not in ("rw", "ro"):
            raise ValueError(f"{path}:{number}: expected 'rw:KEY' or 'ro:KEY'")
        (read_write if role.strip() == "rw" else read_only).append(key)
    return read_write, read_only


def keyring_from_settings(settings: Settings) -> KeyRing:
    """All keys from ``api_keys``, ``read_only_api_keys`` and ``api_keys_file``."""
    read_write = _split_keys(settings.api_keys)
    read_only = _split_keys(settings.read_only_api_keys)
    if settings.api_keys_file:
        file_rw, file_ro = read_keys_file(settings.api_keys_file)
        read_write += file_rw
        read_only += file_ro
    return KeyRing.from_keys(read_write, read_only)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry, if any."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, error: ApcmError) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that only aborts."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        abort_with_error(context, error)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    factory: Callable[..., grpc.RpcMethodHandler]
    if handler.request_streaming and handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(abort, **kwargs)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Admits an RPC when its bearer key's role allows the method.

    No or unknown key -> ``UNAUTHENTICATED``; a read-only key on a method that
    writes -> ``PERMISSION_DENIED``. Health ``Check`` needs no key, nor reflection
    when ``open_reflection``.
    """

    def __init__(self, keys: KeyRing, open_reflection: bool = False) -> None:
        if not len(keys):
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._keys = keys
        self._open_reflection = open_reflection
        self._log = _RateLimitedLog(REJECTION_LOG_INTERVAL_S)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in OPEN_METHODS or (self._open_reflection
                                      and method.startswith(REFLECTION_PREFIX)):
            return continuation(handler_call_details)
        denial = self._denial(method, handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if denial is None or handler is None:
            # An unknown method stays UNIMPLEMENTED, as grpc reports it.
            return handler
        self._log.rejected(method, denial.message)
        # it answers before ErrorInterceptor sees the call, so it aborts itself
        return _abort_handler(handler, denial)

    def _denial(
        self, method: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> ApcmError | None:
        token = bearer_token(metadata)
        if token is None:
            return Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        role = self._keys.role_of(token)
        if role is None:
            return Unauthenticated("invalid API key")
        if role is Role.READ_ONLY and method not in READ_ONLY_METHODS:
            rpc = method.rsplit("/", 1)[-1]
            return PermissionDenied(f"{rpc} needs a read-write API key; this key is read-only")
        return None


def build_auth_interceptor(settings: Settings) -> grpc.ServerInterceptor | None:
    """The API-key interceptor for ``settings``, or ``None`` when no key is configured.

    Raises:
        ValueError: the keys file is malformed, or a key is both read-write and read-only.
        OSError: the keys file cannot be read.
    """
    keys = keyring_from_settings(settings)
    if not len(keys):
        return None
    log.info("API-key authentication on: %d key(s) configured", len(keys))
    return ApiKeyInterceptor(keys, open_reflection=settings.reflection_without_key)

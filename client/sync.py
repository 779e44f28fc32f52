"""``MemoryClient``: the blocking Python client of the ApCM memory service.

Its methods come from the definitions it shares with the asyncio client
(:mod:`._api`); this module opens the channels and runs the attempts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _api, _calls
from .channel import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelOptions,
    TLSConfig,
    auth_metadata,
    channel_options,
    open_channel,
    resolve_tls,
)
from .errors import ApcmError, ClientClosedError, status_code
from .retry import Attempts, RetryPolicy
from .routing import ROUTING_MODES, DirectRouter

T = TypeVar("T")


class MemoryClient(_api.Blocking):
    """Blocking client: numpy in and out, one channel, a deadline on every call.

    Args:
        address: ``host:port`` of the server (any gRPC target, e.g. ``unix:/path``).
        timeout: default deadline of each call in seconds, retries included
            (None: no deadline). Every method takes ``timeout=`` to override it.
        api_key: sent as ``authorization: Bearer <key>`` with every call.
        tls: False for plaintext, True for TLS with the system roots, or a
            :class:`TLSConfig` (custom CA, client certificate for mTLS,
            server-name override).
        max_message_bytes: send/receive limit; the default matches the server's.
        retries: retries after UNAVAILABLE (a count or a :class:`RetryPolicy`);
            no other status is retried.
        options: extra gRPC channel options, overriding the client's.
        interceptors: ``grpc.UnaryUnaryClientInterceptor`` objects (tracing, logging).
        routing: ``"proxy"`` (default): every call goes to ``address``, which forwards
            it to the bank's owner in a cluster. ``"direct"``: bank-scoped calls go
            straight to the owner (one hop less), falling back to ``address`` when
            the owner cannot be reached or the bank is moving (see docs/cluster.md).
        consistency: in a cluster, where reads (``read``, ``recall``, ``describe_bank``)
            are served: ``"strong"`` (default) by the shard's owner, which has every
            acknowledged write; ``"eventual"`` by any pod that holds the shard, which
            may lag the owner by the writes in flight (see docs/cluster.md).

    Raises:
        ApcmError subclasses from every method, e.g. ``InvalidArgumentError``
        (with the server's message), ``NotFoundError``, ``Overloaded``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        api_key: str | None = None,
        tls: bool | TLSConfig = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retries: int | RetryPolicy = 3,
        options: ChannelOptions = (),
        interceptors: Sequence[Any] = (),
        routing: str = "proxy",
        consistency: str = "strong",
    ) -> None:
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
        self.address = address
        self.timeout = timeout
        self._retry = RetryPolicy.coerce(retries)
        self._metadata = auth_metadata(api_key, consistency)
        tls_config = resolve_tls(tls)
        opts = channel_options(max_message_bytes, self._retry, tls_config, options)
        self._channel = open_channel(address, opts, tls_config, interceptors)
        self._methods = _calls.bind_methods(self._channel)
        self._router = DirectRouter(
            self._channel, lambda peer: open_channel(peer, opts, tls_config, interceptors),
            _calls.bind_methods, list(self._metadata)) if routing == "direct" else None
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (e.g. for server reflection or custom stubs)."""
        return self._channel

    @_api.doc(_api.CLOSE)
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._router is not None:
                self._router.close()
            self._channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"MemoryClient({self.address!r}, {state})"

    def _invoke(self, call: _calls.Call[T]) -> T:
        if self._closed:
            raise ClientClosedError("MemoryClient is closed")
        timeout = self.timeout if call.timeout is None else call.timeout
        attempts = Attempts(self._retry, timeout, call.retryable)
        table = self._router.methods_for(call.method, call.request) if self._router else None
        method = (table or self._methods)[call.method]
        while True:
            try:
                response = method(
                    call.request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                if table is not None and status_code(err) == grpc.StatusCode.UNAVAILABLE:
                    # the owner is unreachable or handing the bank over: from now on
                    # this call goes through the server we were given, which forwards it
                    assert self._router is not None
                    self._router.forget()
                    table, method = None, self._methods[call.method]
                    if call.retryable or _not_sent(err):
                        continue
                time.sleep(attempts.pause_after(err))
                continue
            return call.parse(response)

    # ------------------------------------------------------------ health

    @_api.doc(_api.WAIT_UNTIL_SERVING)
    def wait_until_serving(self, timeout: float = 30.0, poll_s: float = 0.1) -> None:
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                last = self.health(timeout=max(end - time.monotonic(), 0.01))
            except ApcmError as err:
                last = str(err)
            if last == "SERVING":
                return
            time.sleep(poll_s)
        raise TimeoutError(f"{self.address} not SERVING after {timeout} s (last: {last})")


def _not_sent(err: grpc.RpcError) -> bool:
    """Whether an UNAVAILABLE means the owner never ran the call: it could not be
    reached, or refused the bank as moving (safe to send again elsewhere)."""
    details = (err.details() or "").lower()
    return "moving" in details or "moved" in details or "connect" in details

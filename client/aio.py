"""``AsyncMemoryClient``: the asyncio twin of :class:`~apcm.client.MemoryClient`.

Same methods, results and exceptions (every method is ``async``), and the same
arguments but ``routing``. Each method comes from the same definition as the
blocking client's (:mod:`._api`); this module only opens the channel and runs
the attempts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from . import _api, _calls
from .channel import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelOptions,
    TLSConfig,
    auth_metadata,
    channel_options,
    open_aio_channel,
    resolve_tls,
)
from .errors import ApcmError, ClientClosedError
from .retry import Attempts, RetryPolicy

T = TypeVar("T")


class AsyncMemoryClient(_api.Asynchronous):
    """Asyncio client; see :class:`~apcm.client.MemoryClient` for every argument
    but ``routing`` (direct routing is the blocking client's only).

    ``interceptors`` are ``grpc.aio.ClientInterceptor`` objects. Use as
    ``async with AsyncMemoryClient(...) as client:`` or ``await client.close()``.
    The channel opens on first use, because a ``grpc.aio`` channel belongs to
    the event loop it was created in: the client may be constructed anywhere
    but must then be used from one loop.
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
        consistency: str = "strong",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._retry = RetryPolicy.coerce(retries)
        self._metadata = auth_metadata(api_key, consistency)
        self._tls = resolve_tls(tls)
        self._options = channel_options(max_message_bytes, self._retry, self._tls, options)
        self._interceptors = list(interceptors)
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[str, Any] = {}
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying asyncio channel (opened in the current event loop if need be)."""
        return self._open()

    def _open(self) -> grpc.aio.Channel:
        """The channel, opened on first use; ``ClientClosedError`` after ``close()``."""
        if self._closed:
            raise ClientClosedError("AsyncMemoryClient is closed")
        if self._channel is None:
            self._channel = open_aio_channel(
                self.address, self._options, self._tls, self._interceptors
            )
            self._methods = _calls.bind_methods(self._channel)
        return self._channel

    @_api.doc(_api.CLOSE)
    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._channel is not None:
                await self._channel.close()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"AsyncMemoryClient({self.address!r}, {state})"

    async def _invoke(self, call: _calls.Call[T]) -> T:
        self._open()
        method = self._methods[call.method]
        timeout = self.timeout if call.timeout is None else call.timeout
        attempts = Attempts(self._retry, timeout, call.retryable)
        while True:
            try:
                response = await method(
                    call.request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                await asyncio.sleep(attempts.pause_after(err))
                continue
            return call.parse(response)

    # ------------------------------------------------------------ health

    @_api.doc(_api.WAIT_UNTIL_SERVING)
    async def wait_until_serving(self, timeout: float = 30.0, poll_s: float = 0.1) -> None:
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                last = await self.health(timeout=max(end - time.monotonic(), 0.01))
            except ApcmError as err:
                last = str(err)
            if last == "SERVING":
                return
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"{self.address} not SERVING after {timeout} s (last: {last})")

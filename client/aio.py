"""``AsyncMemoryClient``: the asyncio twin of :class:`~apcm.client.MemoryClient`.

Same arguments, methods, results and exceptions; every method is ``async``.
Requests are built and responses parsed by the same code as the blocking client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from . import _calls
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
from .types import (
    BankInfo,
    DeleteResult,
    ItemCheck,
    ModelInfo,
    QueryResult,
    RestoreResult,
    SnapshotInfo,
    WrittenSlots,
)

T = TypeVar("T")


class AsyncMemoryClient:
    """Asyncio client; see :class:`~apcm.client.MemoryClient` for every argument.

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
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._retry = RetryPolicy.coerce(retries)
        self._metadata = auth_metadata(api_key)
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

    async def close(self) -> None:
        """Close the channel; further calls raise ``ClientClosedError``. Idempotent."""
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

    async def _invoke(self, call: _calls.Call[T], timeout: float | None) -> T:
        self._open()
        method = self._methods[call.method]
        attempts = Attempts(
            self._retry, self.timeout if timeout is None else timeout, call.retryable)
        while True:
            try:
                response = await method(
                    call.request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                await asyncio.sleep(attempts.pause_after(err))
                continue
            return call.parse(response)

    # ------------------------------------------------------------ health

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        return await self._invoke(_calls.health(service), timeout)

    async def wait_until_serving(self, timeout: float = 30.0, poll_s: float = 0.1) -> None:
        """Wait until the health check says SERVING; TimeoutError after ``timeout`` seconds."""
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

    # ------------------------------------------------------------ model

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return await self._invoke(_calls.model_info(), timeout)

    async def compress(self, x: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Inputs [B, L, D] -> codes [B, m]."""
        return await self._invoke(_calls.compress(x), timeout)

    async def compress_checked(
        self, x: np.ndarray, *, timeout: float | None = None
    ) -> tuple[np.ndarray, list[ItemCheck]]:
        """See :meth:`MemoryClient.compress_checked`."""
        return await self._invoke(_calls.compress_checked(x), timeout)

    async def decompress(self, codes: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Codes [B, m] -> reconstructions [B, L, D] float32."""
        return await self._invoke(_calls.decompress(codes), timeout)

    # ------------------------------------------------------------ write / read

    async def write(
        self,
        x: np.ndarray | None = None,
        *,
        codes: np.ndarray | None = None,
        bank: str = "",
        mode: str = "mean",
        payloads: Iterable[bytes | str] | bytes | str | None = None,
        keys: Iterable[str] | str | None = None,
        timeout: float | None = None,
    ) -> WrittenSlots:
        """See :meth:`MemoryClient.write`."""
        return await self._invoke(_calls.write(x, codes, bank, mode, payloads, keys), timeout)

    async def read(
        self,
        x: np.ndarray | None = None,
        *,
        codes: np.ndarray | None = None,
        bank: str = "",
        top_k: int = 1,
        temperature: float | None = None,
        min_score: float | None = None,
        reconstruct: bool = False,
        payloads: bool = False,
        soft: bool = False,
        count_access: bool = True,
        nprobe: int = 0,
        exhaustive: bool = False,
        timeout: float | None = None,
    ) -> list[QueryResult]:
        """See :meth:`MemoryClient.read`."""
        call = _calls.read(
            x, codes, bank, top_k, temperature, min_score, reconstruct, payloads, soft,
            count_access, nprobe, exhaustive,
        )
        return await self._invoke(call, timeout)

    # ------------------------------------------------------------ text memories

    async def remember(
        self,
        texts: str | Iterable[str],
        bank: str | None = None,
        keys: str | Iterable[str] | None = None,
        metadata: dict[str, str] | Iterable[dict[str, str]] | None = None,
        *,
        timeout: float | None = None,
    ) -> WrittenSlots:
        """See :meth:`MemoryClient.remember`.

        Args:
            texts: one text or a list of texts.
            bank: target bank (None = the server's default bank).
            keys: none, or one per text; an existing key is overwritten in place.
            metadata: none, one string map for every text, or one per text (e.g.
                ``{"user": "u1", "kind": "fact"}``); usable as ``recall``'s filter.

        Returns:
            one written slot per text. Writes without keys are not retried.
        """
        return await self._invoke(_calls.remember(texts, bank or "", keys, metadata), timeout)

    async def recall(
        self,
        query: str | Iterable[str],
        bank: str | None = None,
        top_k: int = 5,
        filter: dict[str, str] | None = None,  # noqa: A002 - the documented name
        min_score: float | None = None,
        mode: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """See :meth:`MemoryClient.recall`.

        Args:
            query: one text (returns a list of hits) or a list (a list of hit lists).
            top_k: hits per query, best first.
            filter: metadata equality filter, applied before top-k (and before fusion).
            min_score: drop hits whose cosine is below this (in every mode).
            mode: "hybrid" (words and meaning: reciprocal-rank fusion of BM25 over the
                bank's texts and the dense codes), "dense" (meaning only: cosine of
                codes) or "lexical" (words only: BM25); None lets the server choose
                (hybrid when the bank holds texts).

        Returns:
            ``Memory`` hits with ``.text``, ``.key``, ``.score`` (cosine in dense mode,
            fused RRF score in hybrid, BM25 in lexical), ``.cosine`` (in every mode),
            ``.metadata``.
        """
        call = _calls.recall(query, bank or "", top_k, filter, min_score, mode)
        return await self._invoke(call, timeout)

    # ------------------------------------------------------------ banks

    async def create_bank(
        self,
        name: str,
        capacity: int,
        *,
        policy: str | None = None,
        half_life: float | None = None,
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> BankInfo:
        """See :meth:`MemoryClient.create_bank`."""
        return await self._invoke(
            _calls.create_bank(name, capacity, policy, half_life, exist_ok), timeout
        )

    async def list_banks(self, *, timeout: float | None = None) -> list[BankInfo]:
        return await self._invoke(_calls.list_banks(), timeout)

    async def describe_bank(self, name: str, *, timeout: float | None = None) -> BankInfo:
        return await self._invoke(_calls.describe_bank(name), timeout)

    async def delete_slots(
        self,
        bank: str,
        *,
        slots: Iterable[int] = (),
        keys: Iterable[str] = (),
        timeout: float | None = None,
    ) -> DeleteResult:
        return await self._invoke(_calls.delete_slots(bank, slots, keys), timeout)

    async def clear_bank(self, name: str, *, timeout: float | None = None) -> BankInfo:
        return await self._invoke(_calls.clear_bank(name), timeout)

    async def drop_bank(self, name: str, *, timeout: float | None = None) -> None:
        await self._invoke(_calls.drop_bank(name), timeout)

    # ------------------------------------------------------------ snapshots

    async def create_snapshot(
        self, name: str | None = None, *, timeout: float | None = None
    ) -> SnapshotInfo:
        return await self._invoke(_calls.create_snapshot(name), timeout)

    async def list_snapshots(self, *, timeout: float | None = None) -> list[SnapshotInfo]:
        return await self._invoke(_calls.list_snapshots(), timeout)

    async def restore_snapshot(
        self, name: str, *, timeout: float | None = None
    ) -> RestoreResult:
        return await self._invoke(_calls.restore_snapshot(name), timeout)

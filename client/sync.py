"""``MemoryClient``: the blocking Python client of the ApCM memory service."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from . import _calls
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


class MemoryClient:
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
    ) -> None:
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
        self.address = address
        self.timeout = timeout
        self._retry = RetryPolicy.coerce(retries)
        self._metadata = auth_metadata(api_key)
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

    def close(self) -> None:
        """Close the channel; further calls raise ``ClientClosedError``. Idempotent."""
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

    def _invoke(self, call: _calls.Call[T], timeout: float | None) -> T:
        if self._closed:
            raise ClientClosedError("MemoryClient is closed")
        attempts = Attempts(
            self._retry, self.timeout if timeout is None else timeout, call.retryable)
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

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        return self._invoke(_calls.health(service), timeout)

    def wait_until_serving(self, timeout: float = 30.0, poll_s: float = 0.1) -> None:
        """Block until the health check says SERVING.

        Raises:
            TimeoutError: not SERVING within ``timeout`` seconds.
        """
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

    # ------------------------------------------------------------ model

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the served codec (input shape, code size and dtype, ratio, hash)."""
        return self._invoke(_calls.model_info(), timeout)

    def compress(self, x: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Encode inputs.

        Args:
            x: inputs [B, L, D]; any real dtype, sent as float32.

        Returns:
            codes [B, m] in the model's code dtype.
        """
        return self._invoke(_calls.compress(x), timeout)

    def compress_checked(
        self, x: np.ndarray, *, timeout: float | None = None
    ) -> tuple[np.ndarray, list[ItemCheck]]:
        """Encode inputs and say what the model thinks of each.

        Returns:
            codes [B, m] and one :class:`ItemCheck` per item (in-domain percentile,
            out-of-domain flag, norm flag, reconstruction error); the list is empty
            when the server's model has no density (PCA, IDRP v1).
        """
        return self._invoke(_calls.compress_checked(x), timeout)

    def decompress(self, codes: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Decode codes.

        Args:
            codes: [B, m]; float32/float16/int8/uint8 are sent as they are.

        Returns:
            reconstructions [B, L, D] float32.
        """
        return self._invoke(_calls.decompress(codes), timeout)

    # ------------------------------------------------------------ write / read

    def write(
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
        """Store memories: inputs ``x`` [B, L, D] or ready ``codes`` [B, m] (exactly one).

        Args:
            bank: target bank ("" = the server's default bank).
            mode: "mean" stores the batch mean as one memory (the paper's write);
                "per_item" stores each item in its own slot.
            payloads: none, or one per written slot (1 in mean mode, B per item);
                str is encoded as UTF-8. A single bytes/str counts as one.
            keys: none, or one per written slot; an existing key is overwritten in place.

        Returns:
            one entry per written slot. Writes without keys are not retried,
            since a repeat could store the memory twice.
        """
        return self._invoke(_calls.write(x, codes, bank, mode, payloads, keys), timeout)

    def read(
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
        """Recall memories by cosine similarity: queries ``x`` [Q, L, D] or ``codes`` [Q, m].

        Args:
            top_k: hits per query, best first.
            temperature: softmax temperature of the weights (server default 1.0).
            min_score: drop hits whose cosine score is below this.
            reconstruct: decode each hit to [L, D].
            payloads: return each hit's payload.
            soft: also return the softmax-weighted soft read [L, D].
            count_access: count this read in the slots' access counters
                (False to inspect without affecting eviction).
            nprobe: search effort of an indexed bank (``BankInfo.index``): inverted
                lists probed per query; 0 = the server's default. Higher is slower and
                closer to the exact scan.
            exhaustive: scan every slot even if the bank is indexed (exact top-k).

        Returns:
            one result per query, in order.
        """
        call = _calls.read(
            x, codes, bank, top_k, temperature, min_score, reconstruct, payloads, soft,
            count_access, nprobe, exhaustive,
        )
        return self._invoke(call, timeout)

    # ------------------------------------------------------------ text memories

    def remember(
        self,
        texts: str | Iterable[str],
        bank: str | None = None,
        keys: str | Iterable[str] | None = None,
        metadata: dict[str, str] | Iterable[dict[str, str]] | None = None,
        *,
        timeout: float | None = None,
    ) -> WrittenSlots:
        """Store texts as memories, one each; the server embeds them with its model's
        embedder and keeps each text with its memory.

        Args:
            texts: one text or a list of texts.
            bank: target bank (None = the server's default bank).
            keys: none, or one per text; an existing key is overwritten in place.
            metadata: none, one string map for every text, or one per text (e.g.
                ``{"user": "u1", "kind": "fact"}``); usable as ``recall``'s filter.

        Returns:
            one written slot per text. Writes without keys are not retried.
        """
        return self._invoke(_calls.remember(texts, bank or "", keys, metadata), timeout)

    def recall(
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
        """Find the memories that best answer a text query, by words and meaning.

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
        return self._invoke(_calls.recall(query, bank or "", top_k, filter, min_score, mode),
                            timeout)

    # ------------------------------------------------------------ banks

    def create_bank(
        self,
        name: str,
        capacity: int,
        *,
        policy: str | None = None,
        half_life: float | None = None,
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> BankInfo:
        """Create a bank of ``capacity`` slots.

        Args:
            policy: "lfu" (the paper's), "lfu_decay", or None for the server default.
            half_life: half-life of access counts under lfu_decay, in writes
                (None: server default).
            exist_ok: succeed without change if the bank exists.
        """
        return self._invoke(
            _calls.create_bank(name, capacity, policy, half_life, exist_ok), timeout
        )

    def list_banks(self, *, timeout: float | None = None) -> list[BankInfo]:
        return self._invoke(_calls.list_banks(), timeout)

    def describe_bank(self, name: str, *, timeout: float | None = None) -> BankInfo:
        return self._invoke(_calls.describe_bank(name), timeout)

    def delete_slots(
        self,
        bank: str,
        *,
        slots: Iterable[int] = (),
        keys: Iterable[str] = (),
        timeout: float | None = None,
    ) -> DeleteResult:
        """Free slots by index and/or key; returns ``(deleted, missing_keys)``."""
        return self._invoke(_calls.delete_slots(bank, slots, keys), timeout)

    def clear_bank(self, name: str, *, timeout: float | None = None) -> BankInfo:
        """Free every slot; the bank remains."""
        return self._invoke(_calls.clear_bank(name), timeout)

    def drop_bank(self, name: str, *, timeout: float | None = None) -> None:
        """Remove a bank entirely."""
        self._invoke(_calls.drop_bank(name), timeout)

    # ------------------------------------------------------------ snapshots

    def create_snapshot(
        self, name: str | None = None, *, timeout: float | None = None
    ) -> SnapshotInfo:
        """Write every bank to disk on the server (name: optional, default timestamped)."""
        return self._invoke(_calls.create_snapshot(name), timeout)

    def list_snapshots(self, *, timeout: float | None = None) -> list[SnapshotInfo]:
        """Snapshots on the server's disk, newest first."""
        return self._invoke(_calls.list_snapshots(), timeout)

    def restore_snapshot(self, name: str, *, timeout: float | None = None) -> RestoreResult:
        """Replace every bank with the snapshot's contents."""
        return self._invoke(_calls.restore_snapshot(name), timeout)


def _not_sent(err: grpc.RpcError) -> bool:
    """Whether an UNAVAILABLE means the owner never ran the call: it could not be
    reached, or refused the bank as moving (safe to send again elsewhere)."""
    details = (err.details() or "").lower()
    return "moving" in details or "moved" in details or "connect" in details

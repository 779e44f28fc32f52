"""The cluster's gRPC edge: any pod takes any call and sends it where it can be served.

``ClusterRouter`` is the outermost server interceptor. For a bank-scoped method
(any unary MemoryService method whose request has a string field ``bank``, or
``name`` for the bank-management ones) it reads only that field from the raw
request bytes and picks the pod by the bank's shard:

- writes, and reads with ``apcm-consistency: strong`` (the default), go to the
  shard's owner (the lease holder);
- reads with ``apcm-consistency: eventual`` go to any pod that has caught up on
  the shard, picked at random, so reads spread over the replicas.

The request bytes go there unchanged over a cached channel, with the caller's
metadata and remaining deadline; the answer (message or status, with details)
comes back verbatim. A forwarded call carries ``apcm-forwarded-by`` and is served
where it lands, so calls cannot loop. A refusal from a live pod that no longer
owns the shard (a hand-over or failover in progress: nothing was changed) is sent
again to the new owner until the call's deadline, so a hand-over is a pause for
the client, not an error.

``ListBanks`` and ``CreateSnapshot`` go to every live pod and the answers are merged.

The router answers before ``ErrorInterceptor`` sees a call, so it raises domain
errors (``cluster.errors``) and aborts with them itself (``_aborting``).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from apcm.v1 import memory_pb2
from apcm.wire.placement import bank_fields as wire_bank_fields

from ..errors import ApcmError, InvalidArgument
from ..rpc.status import abort_with_error
from .errors import SHARD_HEADER, PeerError, ShardUnavailable
from .shardmap import shard_of
from .wire import string_field

log = logging.getLogger(__name__)

FORWARDED_HEADER = "apcm-forwarded-by"
CONSISTENCY_HEADER = "apcm-consistency"
CONSISTENCIES = ("strong", "eventual")
SERVICE = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]
PREFIX = f"/{SERVICE.full_name}/"
# Calls that leave a bank unchanged; any other bank-scoped method (including ones
# added later) counts as a write and goes to the owner.
READ_METHODS = frozenset({"Read", "DescribeBank", "Recall"})
FAN_OUT = frozenset({"ListBanks", "CreateSnapshot"})
# Hop-by-hop or transport metadata that must not be copied onto a forwarded call.
_DROPPED = frozenset({FORWARDED_HEADER, "user-agent", ":authority", "content-type", "te"})
NO_DEADLINE_S = 365 * 24 * 3600.0
RETRY_PAUSE_S = 0.02


class Placement(Protocol):
    """What the router asks of ``node.ClusterNode``."""

    node: str
    address: str
    shards: int

    def owner_address(self, shard: int) -> str | None: ...

    def is_owner(self, shard: int) -> bool: ...

    def holds_ready(self, shard: int) -> bool: ...

    def replica_addresses(self, shard: int) -> list[str]: ...

    def member_addresses(self) -> list[str]: ...


def bank_fields(service: Any = SERVICE) -> dict[str, int]:
    """Method name -> field number of the bank name in its request."""
    return {m: number for m, (_, number) in wire_bank_fields(service).items()}


def _response_types(service: Any = SERVICE) -> dict[str, Any]:
    return {m.name: getattr(memory_pb2, m.output_type.name) for m in service.methods}


def header(metadata: Sequence[tuple[str, Any]] | None, key: str) -> Any:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


class PeerChannels:
    """One cached channel per pod address; raw (bytes in, bytes out) callables."""

    def __init__(self, max_message_bytes: int) -> None:
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # a restarted pod is found again within a second
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = grpc.insecure_channel(address, options=self._options)
                self._channels[address] = ch
            return ch

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one PeerChannels per server)
    def raw(self, address: str, method: str) -> grpc.UnaryUnaryMultiCallable:
        return self.channel(address).unary_unary(method)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


def remaining_timeout(context: grpc.ServicerContext, default_s: float) -> float:
    left = context.time_remaining()
    if left is None or left > NO_DEADLINE_S:
        return default_s
    return max(left, 0.001)


def forward_metadata(context: grpc.ServicerContext, node: str) -> list[tuple[str, Any]]:
    """The caller's metadata, plus this pod appended to the forwarding path."""
    md = [(k, v) for k, v in context.invocation_metadata()
          if k not in _DROPPED and not k.startswith("grpc-")]
    path = header(context.invocation_metadata(), FORWARDED_HEADER)
    md.append((FORWARDED_HEADER, f"{path},{node}" if path else node))
    return md


def _aborting(behavior: Callable[[Any, grpc.ServicerContext], Any]
              ) -> Callable[[Any, grpc.ServicerContext], Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except ApcmError as e:
            abort_with_error(context, e)

    return call


class ClusterRouter(grpc.ServerInterceptor):
    """Routes MemoryService calls (see the module docstring).

    Args:
        placement: who owns and who holds each shard (the ``ClusterNode``).
        default_bank: the bank an empty name means.
        peers: channels to the other pods.
        forward_timeout_s: deadline of a forwarded call whose caller set none.
    """

    def __init__(self, placement: Placement, default_bank: str, peers: PeerChannels,
                 forward_timeout_s: float) -> None:
        self.placement = placement
        self.default_bank = default_bank
        self.peers = peers
        self.forward_timeout_s = forward_timeout_s
        self.fields = bank_fields()
        self.responses = _response_types()
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="apcm-fanout")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(PREFIX):
            return handler
        name = method[len(PREFIX):]
        forwarded = header(handler_call_details.invocation_metadata, FORWARDED_HEADER) is not None
        if name in self.fields:
            return grpc.unary_unary_rpc_method_handler(
                _aborting(functools.partial(self._bank_call, handler, method, name)))
        if name in FAN_OUT and not forwarded:
            return grpc.unary_unary_rpc_method_handler(
                _aborting(functools.partial(self._fan_out, handler, method, name)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    # -- one bank --------------------------------------------------------------------
    def _bank_call(self, handler: grpc.RpcMethodHandler, method: str, name: str,
                   raw: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = context.invocation_metadata()
        if header(metadata, FORWARDED_HEADER) is None:
            consistency = header(metadata, CONSISTENCY_HEADER) or "strong"
            if consistency not in CONSISTENCIES:
                raise InvalidArgument(f"{CONSISTENCY_HEADER} must be one of "
                                      f"{', '.join(CONSISTENCIES)}, got {consistency!r}")
            bank = string_field(raw, self.fields[name]) or self.default_bank
            shard = shard_of(bank, self.placement.shards)
            eventual = name in READ_METHODS and consistency == "eventual"
            deadline = time.monotonic() + remaining_timeout(context, self.forward_timeout_s)
            while True:
                targets = self._targets(shard, eventual)
                if targets[0] is None:
                    break  # this pod serves it
                answer = self._try_targets(targets, method, raw, context, deadline)
                if answer is not None:
                    return answer
        try:
            request = handler.request_deserializer(raw)
        except DecodeError:
            raise InvalidArgument("malformed request message") from None
        response = handler.unary_unary(request, context)
        return handler.response_serializer(response)

    def _try_targets(self, targets: list[str | None], method: str, raw: bytes,
                     context: grpc.ServicerContext, deadline: float) -> bytes | None:
        """The first answer of ``targets`` (an unreachable one is skipped while others
        remain); None, after a pause, when a live pod refused because the shard moved
        or this pod is next in line (the caller then looks the targets up again)."""
        for i, target in enumerate(targets):
            if target is None:
                return None
            try:
                return self._call(target, method, raw, context)
            except grpc.RpcError as e:
                if i + 1 < len(targets) and _unreachable(e):
                    continue  # another replica may answer the read
                if not _refused_by_live_pod(e) or time.monotonic() >= deadline:
                    raise self.peer_error(target, e) from e
                time.sleep(RETRY_PAUSE_S)  # a hand-over or failover: ask again
                return None
        return None

    def _targets(self, shard: int, eventual: bool) -> list[str | None]:
        """Where to send a call on ``shard``, in order: addresses, or None to serve here."""
        p = self.placement
        if eventual:
            holders: list[str | None] = list(p.replica_addresses(shard))
            random.shuffle(holders)
            if holders:
                return [None if a == p.address and p.holds_ready(shard) else a
                        for a in holders]
        if p.is_owner(shard):
            return [None]
        owner = p.owner_address(shard)
        if owner is None or owner == p.address:
            # no owner yet, or this pod is taking over: its store answers UNAVAILABLE
            # ("moved; retry") until it can serve, which the SDK retries
            return [None]
        return [owner]

    def _call(self, address: str, method: str, raw: bytes,
              context: grpc.ServicerContext) -> bytes:
        return self.peers.raw(address, method)(
            raw, timeout=remaining_timeout(context, self.forward_timeout_s),
            metadata=forward_metadata(context, self.placement.node))

    def peer_error(self, address: str, e: grpc.RpcError, prefix: str = "") -> ApcmError:
        """What to answer for the peer's failed call: its status verbatim, or, if the
        peer could not be reached, UNAVAILABLE naming it."""
        code, details = e.code(), e.details() or ""
        trailing = tuple((k, v) for k, v in (e.trailing_metadata() or ())
                         if not k.startswith("grpc-") or k == "grpc-status-details-bin")
        if code == grpc.StatusCode.UNAVAILABLE and header(trailing, SHARD_HEADER) is None:
            return ShardUnavailable(f"pod {address} is unavailable: {details}; retry",
                                    shard=-1)
        return PeerError(code.name, prefix + details, trailing)

    # -- every pod -------------------------------------------------------------------
    def _fan_out(self, handler: grpc.RpcMethodHandler, method: str, name: str,
                 request: Any, context: grpc.ServicerContext) -> Any:
        raw = request.SerializeToString()
        parse = self.responses[name].FromString
        others = [a for a in self.placement.member_addresses() if a != self.placement.address]
        pending = {a: self._pool.submit(self._call, a, method, raw, context) for a in others}
        answers = {self.placement.address: handler.unary_unary(request, context)}
        for address, fut in pending.items():
            try:
                answers[address] = parse(fut.result())
            except grpc.RpcError as e:
                for f in pending.values():
                    f.cancel()
                raise self.peer_error(address, e, prefix=f"pod {address}: ") from e
        return getattr(self, f"_merge_{name}")(answers)

    def _merge_ListBanks(self, answers: dict[str, Any]) -> Any:  # noqa: N802
        """One BankInfo per name: the owner's copy where the owner answered."""
        best: dict[str, tuple[int, Any]] = {}
        for address, answer in sorted(answers.items()):
            for info in answer.banks:
                owner = self.placement.owner_address(shard_of(info.name, self.placement.shards))
                rank = 0 if address == owner else 1
                if info.name not in best or rank < best[info.name][0]:
                    best[info.name] = (rank, info)
        return memory_pb2.ListBanksResponse(banks=[best[n][1] for n in sorted(best)])

    def _merge_CreateSnapshot(self, answers: dict[str, Any]) -> Any:  # noqa: N802
        infos = list(answers.values())
        return memory_pb2.SnapshotInfo(
            name=f"{len([i for i in infos if i.name])} shards",
            created_at=max(i.created_at for i in infos),
            size_bytes=sum(i.size_bytes for i in infos),
            wal_sequence=max(i.wal_sequence for i in infos),
            model_hash=infos[0].model_hash,
            banks=sorted({b for i in infos for b in i.banks}), valid=True)


def _unreachable(e: grpc.RpcError) -> bool:
    """The pod could not be reached (no live pod refused the call)."""
    trailing = e.trailing_metadata() or ()
    return e.code() == grpc.StatusCode.UNAVAILABLE and header(trailing, SHARD_HEADER) is None


def _refused_by_live_pod(e: grpc.RpcError) -> bool:
    """A live pod refused the call before changing anything (it does not own the shard)."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailing = e.trailing_metadata() or ()
    return header(trailing, SHARD_HEADER) is not None and "moved" in (e.details() or "")

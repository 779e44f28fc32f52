"""The cluster's gRPC edge: forwards bank-scoped calls to the owner, fans out the rest.

``ClusterRouter`` is the outermost server interceptor. For a bank-scoped method
(any unary MemoryService method whose request has a string field ``bank``, or
``name`` for the bank-management ones) it reads only that field from the raw
request bytes; if another shard owns the bank, the bytes go to it unchanged over
a cached channel, with the caller's metadata (auth included) and remaining
deadline, and its answer (message or status, with details) comes back verbatim.
A forwarded call carries ``apcm-forwarded-by`` (the shards it passed) and is
served where it lands, except that during a resize the owner may pass a call
for a bank not yet moved to it on to the previous owner, once: a wrong peer list
cannot make calls loop.

ListBanks and the snapshot RPCs go to every shard and their answers are merged.
A shard that cannot be reached fails only the calls that need it, with
UNAVAILABLE naming the shard (id and address).

The router answers before ``ErrorInterceptor`` sees a call, so it raises domain
errors (``cluster.errors``) and aborts with them itself (``_aborting``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from apcm.v1 import memory_pb2
from apcm.wire.placement import bank_fields as wire_bank_fields

from ..errors import ApcmError, InvalidArgument
from ..rpc.status import abort_with_error
from .errors import SHARD_HEADER, PeerError, ShardUnavailable
from .gates import BankGates
from .placement import ClusterConfig
from .wire import string_field

log = logging.getLogger(__name__)

FORWARDED_HEADER = "apcm-forwarded-by"
SERVICE = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]
PREFIX = f"/{SERVICE.full_name}/"
# Calls that leave a bank unchanged and may go on while it moves; any other
# bank-scoped method (including ones added later) counts as a write.
READ_METHODS = frozenset({"Read", "DescribeBank", "Recall"})
FAN_OUT = frozenset({"ListBanks", "CreateSnapshot", "ListSnapshots", "RestoreSnapshot"})
# Hop-by-hop or transport metadata that must not be copied onto a forwarded call.
_DROPPED = frozenset({FORWARDED_HEADER, "user-agent", ":authority", "content-type", "te"})
NO_DEADLINE_S = 365 * 24 * 3600.0


def bank_fields(service: Any = SERVICE) -> dict[str, int]:
    """Method name -> field number of the bank name in its request, for every unary
    method of ``service`` that addresses one bank."""
    return {m: number for m, (_, number) in wire_bank_fields(service).items()}


def _response_types(service: Any = SERVICE) -> dict[str, Any]:
    return {m.name: getattr(memory_pb2, m.output_type.name) for m in service.methods}


def header(metadata: Sequence[tuple[str, Any]] | None, key: str) -> Any:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


class PeerChannels:
    """One cached channel per peer; raw (bytes in, bytes out) callables per method."""

    def __init__(self, cluster: ClusterConfig, max_message_bytes: int) -> None:
        self.cluster = cluster
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # a restarted shard is found again within a second
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}

    def channel(self, shard: int) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(shard)
            if ch is None:
                ch = grpc.insecure_channel(self.cluster.peers[shard], options=self._options)
                self._channels[shard] = ch
            return ch

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one PeerChannels per server)
    def raw(self, shard: int, method: str) -> grpc.UnaryUnaryMultiCallable:
        return self.channel(shard).unary_unary(method)

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


def forward_metadata(context: grpc.ServicerContext, shard_id: int) -> list[tuple[str, Any]]:
    """The caller's metadata, plus this shard appended to the forwarding path."""
    md = [(k, v) for k, v in context.invocation_metadata()
          if k not in _DROPPED and not k.startswith("grpc-")]
    path = header(context.invocation_metadata(), FORWARDED_HEADER)
    md.append((FORWARDED_HEADER, f"{path},{shard_id}" if path else str(shard_id)))
    return md


def _aborting(behavior: Callable[[Any, grpc.ServicerContext], Any]
              ) -> Callable[[Any, grpc.ServicerContext], Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except ApcmError as e:
            abort_with_error(context, e)

    return call


def may_fall_back(path: str) -> bool:
    """Whether a call forwarded along ``path`` may take one more hop, to the bank's
    previous owner: only a call one shard forwarded (tools mark calls with a
    non-numeric path to have them served where they land)."""
    return path.isdigit()


class ClusterRouter(grpc.ServerInterceptor):
    """Routes MemoryService calls to the owner shard (see the module docstring).

    Args:
        cluster: this server's shard map.
        has_bank: whether this server holds a bank now.
        default_bank: the bank an empty name means.
        gates: per-bank admission (moves, imports).
        peers: channels to the other shards.
        forward_timeout_s: deadline of a forwarded call whose caller set none.
    """

    def __init__(self, cluster: ClusterConfig, has_bank: Callable[[str], bool],
                 default_bank: str, gates: BankGates, peers: PeerChannels,
                 forward_timeout_s: float) -> None:
        self.cluster = cluster
        self.has_bank = has_bank
        self.default_bank = default_bank
        self.gates = gates
        self.peers = peers
        self.forward_timeout_s = forward_timeout_s
        self.fields = bank_fields()
        self.responses = _response_types()
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max(2, 2 * cluster.pods), thread_name_prefix="apcm-fanout")

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
        bank = string_field(raw, self.fields[name]) or self.default_bank
        path = header(context.invocation_metadata(), FORWARDED_HEADER)
        target = None
        if path is None:
            target = self._route(name, bank, context)
        elif may_fall_back(path) and self.cluster.owner(bank) == self.cluster.shard_id:
            target = self._fall_back(name, bank, context)
        if target is not None:
            return self._forward(target, method, raw, context)
        with self.gates.admit(bank, mutating=name not in READ_METHODS):  # BankBusy
            try:
                request = handler.request_deserializer(raw)
            except DecodeError:
                raise InvalidArgument("malformed request message") from None
            response = handler.unary_unary(request, context)
            return handler.response_serializer(response)

    def _route(self, name: str, bank: str, context: grpc.ServicerContext) -> int | None:
        """The shard to forward to, or None to serve here."""
        c = self.cluster
        owner = c.owner(bank)
        if owner != c.shard_id:
            return owner
        return self._fall_back(name, bank, context)

    def _fall_back(self, name: str, bank: str, context: grpc.ServicerContext) -> int | None:
        """On the owner: the previous owner while a resize has not moved the bank here."""
        prev = self.cluster.previous_owner(bank)
        if prev is None or self.has_bank(bank):
            return None
        if name != "CreateBank":
            return prev  # not moved here yet: its previous owner still serves it
        # a new bank is created on its owner, unless the previous owner already has it
        describe = memory_pb2.DescribeBankRequest(name=bank).SerializeToString()
        try:
            self._call(prev, PREFIX + "DescribeBank", describe, context)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self.peer_error(prev, e) from e
        return prev

    def _call(self, shard: int, method: str, raw: bytes,
              context: grpc.ServicerContext) -> bytes:
        return self.peers.raw(shard, method)(
            raw, timeout=remaining_timeout(context, self.forward_timeout_s),
            metadata=forward_metadata(context, self.cluster.shard_id))

    def _forward(self, shard: int, method: str, raw: bytes,
                 context: grpc.ServicerContext) -> bytes:
        try:
            return self._call(shard, method, raw, context)
        except grpc.RpcError as e:
            raise self.peer_error(shard, e) from e

    def peer_error(self, shard: int, e: grpc.RpcError, prefix: str = "") -> ApcmError:
        """What to answer for the peer's failed call: its status verbatim, or, if the
        peer could not be reached, UNAVAILABLE naming it."""
        code, details = e.code(), e.details() or ""
        trailing = tuple((k, v) for k, v in (e.trailing_metadata() or ())
                         if not k.startswith("grpc-") or k == "grpc-status-details-bin")
        if code == grpc.StatusCode.UNAVAILABLE and header(trailing, SHARD_HEADER) is None:
            return ShardUnavailable(f"{self.cluster.describe(shard)} is unavailable: "
                                    f"{details}", shard=self.cluster.shard_id)
        return PeerError(code.name, prefix + details, trailing)

    # -- every shard -----------------------------------------------------------------
    def _fan_out(self, handler: grpc.RpcMethodHandler, method: str, name: str,
                 request: Any, context: grpc.ServicerContext) -> Any:
        if name == "CreateSnapshot" and not request.name:
            # one name on every shard, so the cluster's snapshot can be listed and restored
            now = time.time()
            request = memory_pb2.CreateSnapshotRequest(
                name=time.strftime("cluster-%Y%m%dT%H%M%S", time.gmtime(now))
                + f".{int(now % 1 * 1000):03d}Z")
        raw = request.SerializeToString()
        parse = self.responses[name].FromString
        others = [s for s in range(self.cluster.pods) if s != self.cluster.shard_id]
        pending = {s: self._pool.submit(self._call, s, method, raw, context) for s in others}
        answers = {self.cluster.shard_id: handler.unary_unary(request, context)}
        for shard, fut in pending.items():
            try:
                answers[shard] = parse(fut.result())
            except grpc.RpcError as e:
                for f in pending.values():
                    f.cancel()
                raise self.peer_error(shard, e, prefix=f"{self.cluster.describe(shard)}: ") \
                    from e
        return getattr(self, f"_merge_{name}")(answers)

    def _merge_banks(self, answers: dict[int, Sequence[Any]]) -> list[Any]:
        """One BankInfo per name: the owner's copy if it has one (a copy elsewhere is
        the leftover of an interrupted move or an unused default bank)."""
        best: dict[str, tuple[int, Any]] = {}
        for shard, banks in sorted(answers.items()):
            for info in banks:
                rank = 0 if shard == self.cluster.owner(info.name) else 1
                if info.name not in best or rank < best[info.name][0]:
                    best[info.name] = (rank, info)
        return [best[n][1] for n in sorted(best)]

    def _merge_ListBanks(self, answers: dict[int, Any]) -> Any:  # noqa: N802
        return memory_pb2.ListBanksResponse(
            banks=self._merge_banks({s: a.banks for s, a in answers.items()}))

    @staticmethod
    def _merge_snapshot(infos: Sequence[Any], shards: int) -> Any:
        hashes = {i.model_hash for i in infos}
        return memory_pb2.SnapshotInfo(
            name=infos[0].name, created_at=max(i.created_at for i in infos),
            size_bytes=sum(i.size_bytes for i in infos),
            wal_sequence=max(i.wal_sequence for i in infos),
            model_hash=hashes.pop() if len(hashes) == 1 else "",
            banks=sorted({b for i in infos for b in i.banks}),
            valid=len(infos) == shards and all(i.valid for i in infos))

    def _merge_CreateSnapshot(self, answers: dict[int, Any]) -> Any:  # noqa: N802
        return self._merge_snapshot(list(answers.values()), self.cluster.pods)

    def _merge_ListSnapshots(self, answers: dict[int, Any]) -> Any:  # noqa: N802
        by_name: dict[str, list[Any]] = {}
        for answer in answers.values():
            for info in answer.snapshots:
                by_name.setdefault(info.name, []).append(info)
        merged = [self._merge_snapshot(v, self.cluster.pods) for v in by_name.values()]
        merged.sort(key=lambda i: (i.created_at, i.name), reverse=True)
        return memory_pb2.ListSnapshotsResponse(snapshots=merged)

    def _merge_RestoreSnapshot(self, answers: dict[int, Any]) -> Any:  # noqa: N802
        return memory_pb2.RestoreSnapshotResponse(
            snapshot=self._merge_snapshot([a.snapshot for a in answers.values()],
                                          self.cluster.pods),
            banks=self._merge_banks({s: a.banks for s, a in answers.items()}))

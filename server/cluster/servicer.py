"""``apcm.v1.ClusterService``: the shard map, and banks exported, imported and moved.

Works on the server's ``MemoryService``; readiness and domain errors -> statuses are
the server's interceptors' (``api.interceptors``), streaming handlers included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import grpc

from apcm.v1 import cluster_pb2

from ..domain.service import BankStats, MemoryService
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument
from ..rpc.convert import bank_info
from .gates import BankGates
from .placement import PLACEMENT, ClusterConfig
from .router import ClusterRouter, PeerChannels, forward_metadata, remaining_timeout
from .transfer import ChunkReader, decode_bank, encode_views, serialized_chunks


class ClusterNode(Protocol):
    """What the servicer uses of ``node.ClusterNode`` (which imports this module)."""

    service: MemoryService
    config: ClusterConfig | None
    gates: BankGates
    router: ClusterRouter | None
    peers: PeerChannels | None

    def has_bank(self, name: str) -> bool: ...

    def describe_self(self) -> str: ...

SERVICE_NAME = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name
IMPORT_METHOD = f"/{SERVICE_NAME}/ImportBank"

log = logging.getLogger(__name__)
MOVE_TIMEOUT_S = 3600.0  # a move's deadline when its caller set none
DRAIN_TIMEOUT_S = 30.0  # how long a move waits for a bank's writes in flight


class ClusterServicer:
    """Implements ``apcm.v1.ClusterService`` for one server (``node``: its ``ClusterNode``)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.service = node.service

    def GetClusterInfo(  # noqa: N802
        self, request: cluster_pb2.GetClusterInfoRequest, context: grpc.ServicerContext
    ) -> cluster_pb2.ClusterInfo:
        c = self.node.config
        if c is None:
            return cluster_pb2.ClusterInfo(shard_id=0, shard_count=1, placement=PLACEMENT)
        return cluster_pb2.ClusterInfo(
            shard_id=c.shard_id, shard_count=c.shard_count, peers=list(c.peers),
            previous_shard_count=c.previous_shard_count, placement=PLACEMENT)

    def _views(self, name: str, frozen: bool = False) -> list[memoryview]:
        """The bank's encoding as buffers; ``frozen``: its mutations are paused until
        the buffers have been sent, so they may be views of its own tensors."""
        return encode_views(*self.service.export_bank(name, frozen=frozen))

    def ExportBank(  # noqa: N802
        self, request: cluster_pb2.ExportBankRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Yields serialized ``BankChunk`` messages (registered without a serializer)."""
        views = self._views(request.name)
        yield from serialized_chunks(request.name, views)

    def ImportBank(  # noqa: N802
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext
    ) -> cluster_pb2.ImportBankResponse:
        """Takes serialized ``BankChunk`` messages (registered without a deserializer)."""
        reader = ChunkReader()
        incoming = None
        try:
            for raw in request_iterator:
                data = reader.next_data(raw)
                if incoming is None:
                    if reader.total < 0:
                        raise InvalidArgument("the first chunk must give the bank's size",
                                              field="total_bytes")
                    incoming = self.service.receive_bank(reader.bank, reader.total)
                try:
                    incoming.write(data)
                except ValueError as e:
                    raise InvalidArgument(f"bank {reader.bank!r}: {e}") from e
            if incoming is None:
                raise InvalidArgument("no chunks", field="bank")
            received = time.perf_counter()
            incoming.finish()
            reader.check(incoming.written, incoming.crc32, incoming.buffer)
            synced = time.perf_counter()
            stats = self._install(reader.bank, incoming)
        except BaseException:
            if incoming is not None:
                incoming.discard()
            raise
        log.info("bank %s imported (%d bytes): fsync %.3f s, rebuild and log %.3f s",
                 reader.bank, incoming.written, synced - received,
                 time.perf_counter() - synced)
        return cluster_pb2.ImportBankResponse(bank=bank_info(stats))

    def _install(self, name: str, incoming: Any) -> BankStats:
        """Rebuilds the bank from the received bytes and installs it (``install_bank``),
        hidden from calls until it is durable."""
        config, arrays = decode_bank(incoming.buffer)
        if config.get("name") != name:
            raise FailedPrecondition(f"the chunks name bank {name!r}, the data "
                                     f"{config.get('name')!r}")
        if self.node.has_bank(name):
            raise AlreadyExists(f"bank {name!r} already exists on "
                                f"{self.node.describe_self()}", field="name")
        bank = self.service.bank_from_export(config, arrays)
        gates = self.node.gates
        gates.hide(name, f"bank {name!r} is being moved here; retry")
        try:
            stats = self.service.install_bank(bank, incoming, arrays.get("text_flags"))
        finally:
            gates.resume(name)
        gates.moved_to.pop(name, None)
        return stats

    def MoveBank(  # noqa: N802
        self, request: cluster_pb2.MoveBankRequest, context: grpc.ServicerContext
    ) -> cluster_pb2.MoveBankResponse:
        node = self.node
        c, router, peers = node.config, node.router, node.peers
        if c is None or router is None or peers is None:  # the three come with peers
            raise FailedPrecondition("this server is not part of a cluster (no peers)")
        name = request.name
        self.service.require_bank(name)
        owner = c.owner(name)
        if request.HasField("target_shard") and request.target_shard != owner:
            raise FailedPrecondition(
                f"bank {name!r} belongs to shard {owner} by this server's map of "
                f"{c.shard_count} shards, not {request.target_shard}: the maps differ")
        if owner == c.shard_id:
            raise FailedPrecondition(f"bank {name!r} is already on its owner, "
                                     f"{node.describe_self()}")
        t0 = time.perf_counter()
        node.gates.pause(name, f"bank {name!r} is moving to {c.describe(owner)}; retry",
                         DRAIN_TIMEOUT_S)
        paused = time.perf_counter()
        try:
            views = self._views(name, frozen=True)  # paused until dropped or resumed
            size = sum(len(v) for v in views)
            send = peers.channel(owner).stream_unary(
                IMPORT_METHOD, request_serializer=None,
                response_deserializer=cluster_pb2.ImportBankResponse.FromString)
            try:
                answer = send(
                    serialized_chunks(name, views),
                    timeout=remaining_timeout(context, MOVE_TIMEOUT_S),
                    metadata=forward_metadata(context, c.shard_id))
            except grpc.RpcError as e:
                raise router.peer_error(owner, e, prefix=f"{c.describe(owner)}: ") from e
            sent = time.perf_counter()
            # the owner holds it durably: only now does it go from here, once no call
            # is using it (later ones hear "moved, retry" and reach the owner)
            node.gates.seal(name, f"bank {name!r} is moving to {c.describe(owner)}; retry",
                            DRAIN_TIMEOUT_S)
            node.gates.moved_to[name] = owner
            self.service.drop_bank(name)
        finally:
            node.gates.resume(name)
        log.info("bank %s moved to %s (%d bytes) in %.3f s: drain %.3f s, stream and "
                 "durable import %.3f s, hand-over %.3f s", name, c.describe(owner), size,
                 time.perf_counter() - t0, paused - t0, sent - paused,
                 time.perf_counter() - sent)
        return cluster_pb2.MoveBankResponse(bank=answer.bank, from_shard=c.shard_id,
                                            to_shard=owner, bytes=size)


def add_to_server(servicer: ClusterServicer, server: grpc.Server) -> None:
    """Registers ``servicer``; ExportBank and ImportBank carry serialized ``BankChunk``
    messages as bytes (no protobuf objects: the data is never copied into one)."""
    unary = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(cluster_pb2, request).FromString,
            response_serializer=getattr(cluster_pb2, response).SerializeToString)
        for name, request, response in (
            ("GetClusterInfo", "GetClusterInfoRequest", "ClusterInfo"),
            ("MoveBank", "MoveBankRequest", "MoveBankResponse"))}
    handlers = {
        **unary,
        "ExportBank": grpc.unary_stream_rpc_method_handler(
            servicer.ExportBank,
            request_deserializer=cluster_pb2.ExportBankRequest.FromString),
        "ImportBank": grpc.stream_unary_rpc_method_handler(
            servicer.ImportBank,
            response_serializer=cluster_pb2.ImportBankResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

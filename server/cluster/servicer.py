"""``apcm.v1.ClusterService``: the shard map, and banks exported, imported and moved.

Streaming handlers are not wrapped by the unary interceptors, so domain errors
are mapped to statuses here (``_mapped``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from apcm.server.api.interceptors import abort_with_error
from apcm.server.api.servicer import bank_info
from apcm.server.cluster.gates import BankBusy
from apcm.server.cluster.placement import PLACEMENT
from apcm.server.cluster.router import SHARD_HEADER, forward_metadata, remaining_timeout
from apcm.server.cluster.transfer import assemble, chunks, decode_bank, encode_bank
from apcm.server.errors import AlreadyExists, ApcmError, FailedPrecondition
from apcm.server.memory.bank import MemoryBank
from apcm.v1 import cluster_pb2, cluster_pb2_grpc

log = logging.getLogger(__name__)
MOVE_TIMEOUT_S = 3600.0  # a move's deadline when its caller set none
DRAIN_TIMEOUT_S = 30.0  # how long a move waits for a bank's writes in flight


def _mapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except ApcmError as e:
            abort_with_error(context, e)
        except BankBusy as e:
            context.set_trailing_metadata(((SHARD_HEADER, str(self.node.shard_id)),))
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    return wrapper


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    """Implements ``apcm.v1.ClusterService`` for one server (``node``: its ``ClusterNode``)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.service = node.service
        self.store = node.service.store

    def _ready(self) -> None:
        if not self.service.ready:
            raise FailedPrecondition("the server is not ready (starting, restoring or stopping)")

    def GetClusterInfo(self, request, context):  # noqa: N802
        c = self.node.config
        if c is None:
            return cluster_pb2.ClusterInfo(shard_id=0, shard_count=1, placement=PLACEMENT)
        return cluster_pb2.ClusterInfo(
            shard_id=c.shard_id, shard_count=c.shard_count, peers=list(c.peers),
            previous_shard_count=c.previous_shard_count, placement=PLACEMENT)

    def _encoded(self, name: str) -> bytes:
        bank = self.store.get(name)
        with bank.lock:  # quick copies under the lock; packing and encoding outside it
            copy = bank.export_copy()
        return encode_bank(*copy.pack())

    def ExportBank(self, request, context) -> Iterator[Any]:  # noqa: N802
        try:
            self._ready()
            data = self._encoded(request.name)
        except ApcmError as e:
            abort_with_error(context, e)
        yield from chunks(request.name, data)

    @_mapped
    def ImportBank(self, request_iterator, context):  # noqa: N802
        self._ready()
        name, data = assemble(request_iterator)
        config, arrays = decode_bank(data)
        if config.get("name") != name:
            raise FailedPrecondition(f"the chunks name bank {name!r}, the data "
                                     f"{config.get('name')!r}")
        store = self.store
        if int(config["code_dim"]) != store.code_dim or config["code_dtype"] != store.code_dtype:
            raise FailedPrecondition(
                f"bank {name!r} holds {config['code_dtype']} codes of dim {config['code_dim']}; "
                f"this server's codec uses {store.code_dtype} of dim {store.code_dim}")
        if self.node.has_bank(name):
            raise AlreadyExists(f"bank {name!r} already exists on "
                                f"{self.node.describe_self()}", field="name")
        bank = MemoryBank.from_export(
            config, arrays, scale=store.scale, device=store.device,
            max_payload_bytes=store.max_payload_bytes, max_key_length=store.max_key_length,
            metric=store.metric)
        gates = self.node.gates
        gates.hide(name, f"bank {name!r} is being moved here; retry")
        try:
            store.adopt_bank(bank)
            try:
                self.service.persistence.snapshot()  # durable before anyone sees it
            except BaseException:
                store.abandon_bank(bank)
                raise
        finally:
            gates.resume(name)
        gates.moved_to.pop(name, None)
        log.info("bank %s imported (%d bytes)", name, len(data))
        return cluster_pb2.ImportBankResponse(bank=bank_info(self.store.describe(name)))

    @_mapped
    def MoveBank(self, request, context):  # noqa: N802
        self._ready()
        node = self.node
        c = node.config
        if c is None:
            raise FailedPrecondition("this server is not part of a cluster (no peers)")
        name = request.name
        self.store.get(name)  # NOT_FOUND
        owner = c.owner(name)
        if request.HasField("target_shard") and request.target_shard != owner:
            raise FailedPrecondition(
                f"bank {name!r} belongs to shard {owner} by this server's map of "
                f"{c.shard_count} shards, not {request.target_shard}: the maps differ")
        if owner == c.shard_id:
            raise FailedPrecondition(f"bank {name!r} is already on its owner, "
                                     f"{node.describe_self()}")
        node.gates.pause(name, f"bank {name!r} is moving to {c.describe(owner)}; retry",
                         DRAIN_TIMEOUT_S)
        try:
            data = self._encoded(name)
            stub = cluster_pb2_grpc.ClusterServiceStub(node.peers.channel(owner))
            try:
                answer = stub.ImportBank(
                    chunks(name, data), timeout=remaining_timeout(context, MOVE_TIMEOUT_S),
                    metadata=forward_metadata(context, c.shard_id))
            except grpc.RpcError as e:
                node.router._relay(owner, e, context, prefix=f"{c.describe(owner)}: ")
                raise  # unreachable
            # the owner holds it durably: only now does it go from here, once no call
            # is using it (later ones hear "moved, retry" and reach the owner)
            node.gates.seal(name, f"bank {name!r} is moving to {c.describe(owner)}; retry",
                            DRAIN_TIMEOUT_S)
            node.gates.moved_to[name] = owner
            self.service.drop_bank(name)
        finally:
            node.gates.resume(name)
        log.info("bank %s moved to %s (%d bytes)", name, c.describe(owner), len(data))
        return cluster_pb2.MoveBankResponse(bank=answer.bank, from_shard=c.shard_id,
                                            to_shard=owner, bytes=len(data))

"""Direct routing: bank-scoped calls go straight to the bank's owner in a cluster.

Opt-in (``MemoryClient(..., routing="direct")``). The client asks the pod it
was given for the shard map (``GetClusterInfo``: shard count and each shard's
owner address, from the leases every pod watches), computes a bank's shard with
the server's own placement function (``apcm.wire.placement``) and sends the call
to that shard's owner over a channel per pod, which saves the forwarding hop. Any
doubt sends the call to the pod it was given, which forwards it as usual: an
UNAVAILABLE from an owner (unreachable, or "moved; retry" after a hand-over or
failover) makes the next attempt go there and the map be asked for again. Calls
without a bank, and calls on the default bank (an empty name),
always go there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from apcm.v1 import cluster_pb2, cluster_pb2_grpc
from apcm.wire.placement import bank_fields, owner_of

ROUTING_MODES = ("proxy", "direct")


class DirectRouter:
    """Picks the method table (entry server's or an owner's) for each call.

    Args:
        entry: channel to the server the client was given.
        open_peer: opens a channel to ``host:port`` with the client's settings.
        bind: channel -> method table (``_calls.bind_methods``).
        metadata: sent with ``GetClusterInfo`` (auth).
    """

    def __init__(self, entry: grpc.Channel, open_peer: Callable[[str], grpc.Channel],
                 bind: Callable[[grpc.Channel], dict[str, Any]],
                 metadata: list[tuple[str, str]]) -> None:
        self._entry = entry
        self._open_peer = open_peer
        self._bind = bind
        self._metadata = metadata
        self._fields = {m: name for m, (name, _) in bank_fields().items()}
        self._lock = threading.Lock()
        self._map: tuple[int, tuple[str, ...]] | None = None  # (shard count, peers)
        self._peers: dict[str, tuple[grpc.Channel, dict[str, Any]]] = {}

    def methods_for(self, method: str, request: Any) -> dict[str, Any] | None:
        """The owner's method table for this call, or None: use the entry server."""
        field = self._fields.get(method)
        bank = getattr(request, field, "") if field else ""
        if not bank:
            return None
        shard_map = self._shard_map()
        if shard_map is None:
            return None
        count, peers = shard_map
        address = peers[owner_of(bank, count)]
        if not address:
            return None  # the shard has no owner at the moment: the entry pod waits for one
        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                channel = self._open_peer(address)
                peer = self._peers[address] = (channel, self._bind(channel))
        return peer[1]

    def forget(self) -> None:
        """After an UNAVAILABLE from an owner: ask for the map again next time."""
        with self._lock:
            self._map = None

    def _shard_map(self) -> tuple[int, tuple[str, ...]] | None:
        with self._lock:
            if self._map is not None:
                return self._map if self._map[1] else None
        try:
            info = cluster_pb2_grpc.ClusterServiceStub(self._entry).GetClusterInfo(
                cluster_pb2.GetClusterInfoRequest(), timeout=10, metadata=self._metadata)
            shard_map = (info.shard_count, tuple(info.peers))
        except grpc.RpcError:
            return None  # e.g. an older server: proxy through the entry server
        with self._lock:
            self._map = shard_map  # no peers: a single server, nothing to route
        return shard_map if shard_map[1] else None

    def close(self) -> None:
        with self._lock:
            peers, self._peers = self._peers, {}
        for channel, _ in peers.values():
            channel.close()

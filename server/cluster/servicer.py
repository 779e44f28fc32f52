"""``apcm.v1.ClusterService``: the shard map one pod sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from apcm.v1 import cluster_pb2, cluster_pb2_grpc
from apcm.wire.placement import PLACEMENT

if TYPE_CHECKING:  # the node needs nats-py (the cluster extra); this module does not
    from .node import ClusterNode

SERVICE_NAME = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name


def cluster_info(node: ClusterNode | None) -> cluster_pb2.ClusterInfo:
    if node is None:
        return cluster_pb2.ClusterInfo(shard_count=1, placement=PLACEMENT)
    shards = []
    for shard in range(node.shards):
        lease = node.view.owner(shard)
        shards.append(cluster_pb2.ShardState(
            shard=shard, owner_node=lease.node if lease else "",
            owner_address=lease.address if lease else "", term=lease.term if lease else 0,
            replicas=node.replica_addresses(shard)))
    return cluster_pb2.ClusterInfo(
        shard_count=node.shards, peers=node.view.owners(), placement=PLACEMENT,
        node=node.node, members=node.member_addresses(), shards=shards)


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, node: ClusterNode | None) -> None:
        self.node = node

    def GetClusterInfo(  # noqa: N802
        self, request: cluster_pb2.GetClusterInfoRequest, context: grpc.ServicerContext
    ) -> cluster_pb2.ClusterInfo:
        return cluster_info(self.node)


def add_to_server(node: ClusterNode | None, server: grpc.Server) -> None:
    cluster_pb2_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(node), server)

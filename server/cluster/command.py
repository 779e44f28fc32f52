"""``apcm cluster info``: the shard map one pod of a cluster sees."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cluster", help="inspect a cluster",
        description="Commands for a cluster of ApCM pods on NATS JetStream (docs/cluster.md).")
    cmds = parser.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("info", help="print the shard map a pod sees",
                        description="print the shard map a pod sees: each shard's owner, "
                        "term and caught-up replicas")
    p.add_argument("--address", default=os.environ.get("APCM_ADDRESS", "localhost:50051"),
                   help="any pod of the cluster [env APCM_ADDRESS; default localhost:50051]")
    p.add_argument("--api-key-env", default="APCM_API_KEY",
                   help="environment variable holding an API key, if the pods need one "
                   "(default APCM_API_KEY)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from apcm.v1 import cluster_pb2, cluster_pb2_grpc

    api_key = os.environ.get(args.api_key_env) or None
    auth = [("authorization", f"Bearer {api_key}")] if api_key else []
    try:
        with grpc.insecure_channel(args.address) as ch:
            info = cluster_pb2_grpc.ClusterServiceStub(ch).GetClusterInfo(
                cluster_pb2.GetClusterInfoRequest(), timeout=30, metadata=auth)
    except grpc.RpcError as e:
        print(f"apcm cluster info: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if not info.node:
        print("a single server (not in cluster mode)")
        return 0
    print(f"pod {info.node}; {info.shard_count} shards ({info.placement}); "
          f"members: {', '.join(info.members)}")
    for s in info.shards:
        owner = f"{s.owner_node} ({s.owner_address}) term {s.term}" if s.owner_node else "none"
        print(f"  shard {s.shard}: owner {owner}; replicas {', '.join(s.replicas) or 'none'}")
    return 0

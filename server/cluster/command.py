"""``apcm cluster``: look at and rebalance a sharded deployment."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cluster", help="inspect or rebalance a sharded cluster",
        description="Commands for a cluster of ApCM servers (see docs/cluster.md).")
    cmds = parser.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    for name, text in (("info", "print the shard map a server sees"),
                       ("rebalance", "move every bank to its owner after a shard-count change")):
        p = cmds.add_parser(name, help=text, description=text)
        p.add_argument("--address", default=os.environ.get("APCM_ADDRESS", "localhost:50051"),
                       help="any server of the cluster [env APCM_ADDRESS; "
                       "default localhost:50051]")
        p.add_argument("--api-key-env", default="APCM_API_KEY",
                       help="environment variable holding a read-write API key, if the "
                       "servers need one (default APCM_API_KEY)")
        if name == "rebalance":
            p.add_argument("--dry-run", action="store_true",
                           help="only print what would move")
            p.add_argument("--timeout-s", type=float, default=3600.0,
                           help="deadline of one bank's move (default 3600)")
            p.add_argument("--shard-count", type=int, default=None,
                           help="the shard count every pod must already run with (a check: "
                           "nothing moves if any pod's map differs); when shrinking, the "
                           "pods from this ordinal on hand their banks over")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from apcm.v1 import cluster_pb2, cluster_pb2_grpc

    api_key = os.environ.get(args.api_key_env) or None
    try:
        if args.cluster_command == "info":
            auth = [("authorization", f"Bearer {api_key}")] if api_key else []
            with grpc.insecure_channel(args.address) as ch:
                info = cluster_pb2_grpc.ClusterServiceStub(ch).GetClusterInfo(
                    cluster_pb2.GetClusterInfoRequest(), timeout=30, metadata=auth)
            print(f"shard {info.shard_id} of {info.shard_count} ({info.placement})")
            for i, peer in enumerate(info.peers):
                print(f"  {i}: {peer}{'  (draining)' if i >= info.shard_count else ''}")
            if info.previous_shard_count:
                print(f"resize under way from {info.previous_shard_count} shards")
            return 0
        from .rebalance import MapMismatch, rebalance

        try:
            report = rebalance(args.address, api_key=api_key, timeout_s=args.timeout_s,
                               dry_run=args.dry_run, shard_count=args.shard_count)
        except MapMismatch as e:
            print(f"apcm cluster rebalance: {e}", file=sys.stderr)
            return 1
        return 1 if report.skipped else 0
    except grpc.RpcError as e:
        print(f"apcm cluster {args.cluster_command}: {e.code().name}: {e.details()}",
              file=sys.stderr)
        return 1

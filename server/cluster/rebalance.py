"""``apcm cluster rebalance``: move every bank that is not on its owner to its owner.

Asks any server for the shard map, lists each shard's own banks (calls marked as
forwarded are served where they land), and for each misplaced bank asks the shard
holding it to ``MoveBank`` it to its owner. Safe to rerun after a crash: a bank on
both shards is the leftover of a move whose import was acknowledged before the
source dropped its copy; the owner's copy is the live one and the leftover is
dropped (unless the leftover holds writes the owner's copy lacks: then it is
reported and left alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from apcm.v1 import cluster_pb2, cluster_pb2_grpc, memory_pb2, memory_pb2_grpc

from .placement import owner_of
from .router import FORWARDED_HEADER

BUSY_RETRIES = 20


@dataclass
class RebalanceReport:
    shard_count: int = 0
    moved: list[tuple[str, int, int]] = field(default_factory=list)  # (bank, from, to)
    dropped_leftovers: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bank, why)
    bytes_moved: int = 0


class MapMismatch(Exception):
    """The pods do not share one shard map (a restart with new settings is not done)."""


def rebalance(address: str, *, api_key: str | None = None, timeout_s: float = 3600.0,
              dry_run: bool = False, say: Callable[[str], None] = print,
              max_message_bytes: int = 64 * 1024 * 1024,
              shard_count: int | None = None) -> RebalanceReport:
    """Move every misplaced bank of the cluster ``address`` belongs to. See the module doc.

    Every pod the map lists is asked for its map first; they must agree (and own
    ``shard_count`` shards, if given), so no bank is moved by a stale map. While
    shrinking, the pods from ``shard_count`` on are listed and emptied too.

    Raises:
        grpc.RpcError: a shard could not be listed, or a move failed for good.
        MapMismatch: the pods' maps differ, or differ from ``shard_count``.
    """
    auth = [("authorization", f"Bearer {api_key}")] if api_key else []
    here = [*auth, (FORWARDED_HEADER, "rebalance")]
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    with grpc.insecure_channel(address, options=options) as ch:
        info = cluster_pb2_grpc.ClusterServiceStub(ch).GetClusterInfo(
            cluster_pb2.GetClusterInfoRequest(), timeout=30, metadata=auth)
    peers = list(info.peers)
    report = RebalanceReport(shard_count=info.shard_count)
    if shard_count is not None and info.shard_count != shard_count:
        raise MapMismatch(f"{address} has {info.shard_count} shards, not {shard_count}: "
                          "restart the pods with the new shard count first")
    if not peers:
        say("single server: nothing to rebalance")
        return report
    channels = [grpc.insecure_channel(p, options=options) for p in peers]
    try:
        memory = [memory_pb2_grpc.MemoryServiceStub(c) for c in channels]
        cluster = [cluster_pb2_grpc.ClusterServiceStub(c) for c in channels]
        for shard, pod in enumerate(cluster):
            theirs = pod.GetClusterInfo(cluster_pb2.GetClusterInfoRequest(), timeout=30,
                                         metadata=auth)
            if (theirs.shard_count, list(theirs.peers)) != (info.shard_count, peers):
                raise MapMismatch(
                    f"shard {shard} ({peers[shard]}) sees {theirs.shard_count} shards and "
                    f"{len(theirs.peers)} pods, {address} {info.shard_count} and {len(peers)}: "
                    "finish restarting every pod with the same settings first")
        banks: list[dict[str, Any]] = []
        for stub in memory:
            listed = stub.ListBanks(memory_pb2.ListBanksRequest(), timeout=60, metadata=here)
            banks.append({b.name: b for b in listed.banks})
        n = info.shard_count
        for shard in range(len(peers)):
            for name in sorted(banks[shard]):
                owner = owner_of(name, n)
                if owner == shard:
                    continue
                mine, theirs = banks[shard][name], banks[owner].get(name)
                if theirs is not None and theirs.writes_total >= mine.writes_total:
                    say(f"{name}: leftover copy on shard {shard} (shard {owner} has it): drop")
                    if not dry_run:
                        memory[shard].DropBank(memory_pb2.DropBankRequest(name=name),
                                               timeout=60, metadata=here)
                    report.dropped_leftovers.append((name, shard))
                    continue
                if theirs is not None and theirs.writes_total > 0:
                    why = (f"on shard {shard} ({mine.writes_total} writes) and on its owner "
                           f"shard {owner} ({theirs.writes_total} writes): resolve by hand")
                    say(f"{name}: SKIPPED, {why}")
                    report.skipped.append((name, why))
                    continue
                say(f"{name}: shard {shard} -> shard {owner} ({mine.occupied} memories)")
                if dry_run:
                    report.moved.append((name, shard, owner))
                    continue
                if theirs is not None:  # never written: an unused default bank
                    memory[owner].DropBank(memory_pb2.DropBankRequest(name=name),
                                           timeout=60, metadata=here)
                answer = _move(cluster[shard], name, owner, timeout_s, here)
                report.moved.append((name, shard, owner))
                report.bytes_moved += answer.bytes
    finally:
        for c in channels:
            c.close()
    say(f"{len(report.moved)} moved, {len(report.dropped_leftovers)} leftovers dropped, "
        f"{len(report.skipped)} skipped")
    return report


def _move(stub: Any, name: str, owner: int, timeout_s: float, metadata: list) -> Any:
    request = cluster_pb2.MoveBankRequest(name=name, target_shard=owner)
    for attempt in range(BUSY_RETRIES):
        try:
            return stub.MoveBank(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == BUSY_RETRIES - 1:
                raise
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")

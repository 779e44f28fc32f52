"""What every pod knows of the cluster: members, shard leases, and who should hold what.

Pure values and functions; ``ClusterView`` is the thread-safe copy a pod keeps,
fed by its watchers of the two KV buckets (``members``, ``leases``).

- A bank lives in shard ``owner_of(bank, shards)`` (``apcm.wire.placement``): a
  fixed shard count, many more shards than pods, so placement never changes.
- The pods that hold a shard (its replicas) are chosen by rendezvous hashing of
  (shard, node) with bounded loads (``assignment``): every pod holds and owns about
  as many shards as the others, and adding or removing a pod moves few shards.
- The owner is whoever holds the shard's lease; it should be the best-ranked
  replica that is caught up, and the owner hands the lease over when it is not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field

from apcm.wire.placement import owner_of

__all__ = ["ClusterView", "Lease", "Member", "assignment", "rank", "shard_of"]


def shard_of(bank: str, shards: int) -> int:
    return owner_of(bank, shards)


def _weight(shard: int, node: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(shard: int, nodes: list[str]) -> list[str]:
    """Nodes in the order they are preferred to hold ``shard`` (best first)."""
    return sorted(nodes, key=lambda n: _weight(shard, n), reverse=True)


@functools.lru_cache(maxsize=64)
def assignment(shards: int, nodes: tuple[str, ...], replicas: int) -> tuple[tuple[str, ...], ...]:
    """The holders of every shard, owner first: rendezvous ranking with bounded loads.

    Pure rendezvous leaves some pods with many more shards than others (and so a
    larger share of the reads and writes); here each position (owner, first standby,
    ...) is filled shard by shard with the best-ranked node that holds fewer than
    ``ceil(shards / len(nodes))`` shards at that position, so every pod owns and
    holds about the same number. It stays a function of the member set alone (every
    pod computes the same), and a joining or leaving pod still moves few shards.
    """
    if not nodes:
        return tuple(() for _ in range(shards))
    r = min(replicas, len(nodes))
    cap = -(-shards // len(nodes))
    ranked = [rank(s, list(nodes)) for s in range(shards)]
    picks: list[list[str]] = [[] for _ in range(shards)]
    for _ in range(r):
        load: dict[str, int] = dict.fromkeys(nodes, 0)
        for s in range(shards):
            free = [n for n in ranked[s] if n not in picks[s]]
            node = next((n for n in free if load[n] < cap), free[0])
            load[node] += 1
            picks[s].append(node)
    return tuple(tuple(p) for p in picks)


@dataclass(frozen=True)
class Member:
    """One pod's heartbeat: where to reach it, and the shards it has caught up on."""

    node: str
    address: str
    ready: tuple[int, ...] = ()
    leaving: bool = False

    def encode(self) -> bytes:
        return json.dumps({**asdict(self), "ready": list(self.ready)}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Member:
        d = json.loads(raw)
        return cls(str(d["node"]), str(d["address"]), tuple(int(s) for s in d["ready"]),
                   bool(d.get("leaving", False)))


@dataclass(frozen=True)
class Lease:
    """A shard's owner: ``term`` grows with every change of hands; ``revision`` is the
    KV revision the value was read at (what a compare-and-set names)."""

    node: str
    address: str
    term: int
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "address": self.address,
                           "term": self.term}).encode()

    @classmethod
    def decode(cls, raw: bytes, revision: int) -> Lease:
        d = json.loads(raw)
        return cls(str(d["node"]), str(d["address"]), int(d["term"]), revision)


def lease_key(shard: int) -> str:
    return f"shard.{shard}"


def member_key(node: str) -> str:
    return "node." + "".join(c if c.isalnum() or c in "-_" else "_" for c in node)


@dataclass
class ClusterView:
    """Members and leases as this pod last saw them (updated by the KV watchers)."""

    shards: int
    replicas: int
    member_ttl_s: float
    members: dict[str, Member] = field(default_factory=dict)
    member_seen: dict[str, tuple[int, float]] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    # monotonic time each lease's revision was first seen: a lease whose revision
    # has not changed for the lease period is expired, by this pod's own clock
    seen_at: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def live_nodes(self) -> list[str]:
        """Members whose heartbeat changed within the member TTL, not leaving."""
        now = time.monotonic()
        with self.lock:
            return sorted(n for n, m in self.members.items() if not m.leaving
                          and now - self.member_seen[n][1] < self.member_ttl_s)

    def heard_within(self, node: str, seconds: float) -> bool:
        """Whether ``node``'s heartbeat changed in the last ``seconds`` (a stricter test
        than liveness: a pod killed a moment ago is still live for the member TTL)."""
        with self.lock:
            seen = self.member_seen.get(node)
        return seen is not None and time.monotonic() - seen[1] < seconds

    def replicas_of(self, shard: int) -> list[str]:
        """The nodes that should hold ``shard``, the one that should own it first."""
        return list(assignment(self.shards, tuple(self.live_nodes()), self.replicas)[shard])

    def ready_replicas(self, shard: int) -> list[Member]:
        """Live members that have caught up on ``shard``, whether assigned or not."""
        live = set(self.live_nodes())
        with self.lock:
            return [m for n, m in self.members.items() if shard in m.ready and n in live]

    def owner(self, shard: int) -> Lease | None:
        with self.lock:
            return self.leases.get(shard)

    def member(self, node: str) -> Member | None:
        with self.lock:
            return self.members.get(node)

    def set_member(self, node: str, member: Member | None, revision: int = 0) -> None:
        with self.lock:
            if member is None:
                self.members.pop(node, None)
                self.member_seen.pop(node, None)
            else:
                self.members[node] = member
                if self.member_seen.get(node, (None, 0.0))[0] != revision:
                    self.member_seen[node] = (revision, time.monotonic())

    def set_lease(self, shard: int, lease: Lease | None, now: float) -> None:
        with self.lock:
            old = self.leases.get(shard)
            if lease is None:
                self.leases.pop(shard, None)
                self.seen_at.pop(shard, None)
            elif old is None or old.revision != lease.revision:
                self.leases[shard] = lease
                self.seen_at[shard] = now

    def lease_age(self, shard: int, now: float) -> float:
        with self.lock:
            return now - self.seen_at.get(shard, now)

    def owners(self) -> list[str]:
        """Owner address per shard ("" where none), as ``GetClusterInfo`` reports it."""
        with self.lock:
            return [self.leases[s].address if s in self.leases else ""
                    for s in range(self.shards)]

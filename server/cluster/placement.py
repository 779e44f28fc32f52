"""Placement: the shard map from settings; the owner of a bank comes from
``apcm.wire.placement`` (rendezvous hashing), which the SDK's direct routing shares."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from apcm.wire.placement import PLACEMENT, owner_of

from ..config import Settings

__all__ = ["PLACEMENT", "ClusterConfig", "ordinal_of", "owner_of"]
_ORDINAL = re.compile(r"-(\d+)$")


def ordinal_of(hostname: str) -> int | None:
    """The StatefulSet ordinal of a pod's host name: ``apcm-2`` -> 2; None if it has none."""
    m = _ORDINAL.search(hostname.split(".")[0])
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ClusterConfig:
    """This server's place in the cluster.

    Attributes:
        shard_id: this server's shard (its pod ordinal).
        peers: ``host:port`` of every pod, indexed by shard id (this one included).
        previous_shard_count: the shard count before a resize still being
            rebalanced, else 0.
        owners: how many shards own banks (0: every peer). Fewer than the peers only
            while the cluster shrinks: the peers from ``owners`` on are draining (they
            own nothing and hand their banks over), and there must be
            ``previous_shard_count`` peers.
    """

    shard_id: int
    peers: tuple[str, ...]
    previous_shard_count: int = 0
    owners: int = 0

    def __post_init__(self) -> None:
        if not self.peers:
            raise ValueError("a cluster needs at least one peer")
        if not 0 <= self.shard_id < len(self.peers):
            raise ValueError(f"shard id {self.shard_id} is outside the {len(self.peers)} peers")
        if self.previous_shard_count < 0:
            raise ValueError("previous_shard_count must be >= 0")
        if self.owners and not 1 <= self.owners <= len(self.peers):
            raise ValueError(f"shard_count {self.owners} is outside 1..{len(self.peers)} peers")
        if 0 < self.owners < len(self.peers) and self.previous_shard_count != len(self.peers):
            raise ValueError(
                f"{len(self.peers)} peers but shard_count {self.owners}: extra peers are only "
                f"allowed while shrinking from previous_shard_count = {len(self.peers)}")

    @property
    def shard_count(self) -> int:
        """Shards that own banks (ids 0..shard_count-1)."""
        return self.owners or len(self.peers)

    @property
    def pods(self) -> int:
        """Servers in the cluster (every peer; more than ``shard_count`` while shrinking)."""
        return len(self.peers)

    @property
    def draining(self) -> bool:
        """Whether this pod is being removed: it owns no bank (a shrink is under way)."""
        return self.shard_id >= self.shard_count

    def owner(self, name: str) -> int:
        return owner_of(name, self.shard_count)

    def previous_owner(self, name: str) -> int | None:
        """The owner before the resize, if a resize is under way and it differs."""
        if not self.previous_shard_count or self.previous_shard_count == self.shard_count:
            return None
        prev = owner_of(name, self.previous_shard_count)
        return None if prev == self.owner(name) else prev

    def describe(self, shard: int) -> str:
        """How messages name a shard: ``shard 2 (apcm-2.apcm-headless:50051)``."""
        return f"shard {shard} ({self.peers[shard]})"

    @classmethod
    def from_settings(cls, settings: Settings,
                      env: Mapping[str, str] | None = None) -> ClusterConfig | None:
        """The cluster ``settings`` describe, or None for a single server.

        Raises:
            ValueError: contradictory settings, or no shard id and no ordinal in $HOSTNAME.
        """
        env = os.environ if env is None else env
        s = settings
        if s.peers and s.peer_pattern:
            raise ValueError("set either peers or shard_count + peer_pattern, not both")
        owners = 0
        if s.peers:
            peers = tuple(p.strip() for p in s.peers.split(",") if p.strip())
            if s.shard_count and s.shard_count != len(peers):
                owners = s.shard_count  # a shrink: __post_init__ checks the rest
        elif s.peer_pattern or s.shard_count:
            if not (s.peer_pattern and s.shard_count > 0) or "{i}" not in s.peer_pattern:
                raise ValueError("peer_pattern (with '{i}') and shard_count > 0 go together")
            # while shrinking, the pods being removed are still peers
            pods = max(s.shard_count, s.previous_shard_count)
            peers = tuple(s.peer_pattern.replace("{i}", str(i)) for i in range(pods))
            owners = s.shard_count if pods > s.shard_count else 0
        else:
            return None
        shard_id = s.shard_id
        if shard_id < 0:
            hostname = env.get("HOSTNAME", "")
            found = ordinal_of(hostname)
            if found is None:
                raise ValueError(f"no shard_id given and HOSTNAME {hostname!r} has no "
                                 "ordinal suffix (like apcm-2)")
            shard_id = found
        return cls(shard_id, peers, s.previous_shard_count, owners)

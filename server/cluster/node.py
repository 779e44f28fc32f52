"""``ClusterNode``: what one server needs to be a shard, wired into ``build_server``."""

from __future__ import annotations

import logging

import grpc

from ..config import Settings
from ..domain.service import MemoryService
from .gates import BankGates
from .placement import ClusterConfig
from .router import ClusterRouter, PeerChannels
from .servicer import SERVICE_NAME, ClusterServicer, add_to_server

log = logging.getLogger(__name__)
CLUSTER_SERVICE_NAME = SERVICE_NAME


class ClusterNode:
    """Shard map, router and ClusterService of one server; inert without peers.

    Raises:
        ValueError: contradictory cluster settings.
    """

    @staticmethod
    def check_settings(settings: Settings) -> None:
        """Raises ``ValueError`` for cluster settings this server cannot run with."""
        if ClusterConfig.from_settings(settings) is not None and settings.tls_cert:
            raise ValueError("a cluster with TLS is not supported yet: peers talk plaintext")

    def __init__(self, settings: Settings, service: MemoryService) -> None:
        self.check_settings(settings)
        self.settings = settings
        self.service = service
        self.config = ClusterConfig.from_settings(settings)
        self.has_bank = service.has_bank
        self.gates = BankGates(self.has_bank, self._describe, self.shard_id)
        self.peers: PeerChannels | None = None
        self.router: ClusterRouter | None = None
        if self.config is None:
            return
        self.peers = PeerChannels(self.config, settings.max_message_bytes)
        self.router = ClusterRouter(self.config, self.has_bank, settings.default_bank,
                                    self.gates, self.peers, settings.forward_timeout_s)
        log.info("cluster: %s of %d shards", self.describe_self(), self.config.shard_count)

    @property
    def shard_id(self) -> int:
        return self.config.shard_id if self.config else 0

    def _describe(self, shard: int) -> str:
        return self.config.describe(shard) if self.config else f"shard {shard}"

    def describe_self(self) -> str:
        return self.config.describe(self.config.shard_id) if self.config else "this server"

    @property
    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """Outermost first: the router forwards before anything decodes the request."""
        return [self.router] if self.router else []

    def add_to_server(self, server: grpc.Server) -> None:
        add_to_server(ClusterServicer(self), server)

    def started(self) -> None:
        """Every server creates the default bank at start; a shard that is not its
        owner (nor, during a resize, its previous owner) drops its copy while it is
        unused, so the bank has one home (during a resize its owner's empty copy
        goes too, so calls reach the previous owner's until it is moved)."""
        c = self.config
        if c is None:
            return
        name = self.settings.default_bank
        previous = c.previous_owner(name)
        if c.shard_id == previous or (c.shard_id == c.owner(name) and previous is None):
            return
        stats = self.service.describe_bank(name)
        if stats.occupied == 0 and stats.writes_total == 0:
            self.service.drop_bank(name)

    def close(self) -> None:
        if self.router is not None:
            self.router.close()
        if self.peers is not None:
            self.peers.close()

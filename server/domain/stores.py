"""Where a service keeps its banks: one local store, or the shards of a cluster.

``new_store`` builds the store of one server (embedded mode) or of one shard
(cluster mode) from the settings and the served codec. ``Replication`` is what
the service needs of a cluster node (``cluster.node.ClusterNode``, which the gRPC
edge builds and hands in, so the domain never imports the cluster): its store of
every shard the pod holds, and the persistence calls the embedded mode's
``PersistenceManager`` answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..codecs.base import Codec
from ..config import Settings
from ..memory.ivf import IndexConfig
from ..memory.lexical import Bm25Params
from ..memory.store import MemoryStore


def new_store(settings: Settings, codec: Codec) -> MemoryStore:
    return MemoryStore(
        code_dim=codec.code_dim,
        code_dtype=codec.code_dtype,
        scale=codec.quantizer.scale,
        device=codec.device,
        max_capacity=settings.max_bank_capacity,
        max_payload_bytes=settings.max_payload_bytes,
        max_key_length=settings.max_key_length,
        default_policy=settings.default_policy,
        default_half_life=settings.default_half_life,
        metric=codec.similarity_weights,
        scorer=codec.scorer,
        memory_limit_bytes=settings.effective_memory_limit_bytes,
        max_banks=settings.max_banks,
        index_config=IndexConfig(threshold=settings.index_threshold,
                                 nprobe=settings.index_nprobe),
        bm25=Bm25Params(k1=settings.bm25_k1, b=settings.bm25_b),
    )


class Replication(Protocol):
    """A cluster node, as the service uses it."""

    store: Any
    wal_healthy: bool

    def add_wal_listener(self, callback: Callable[[bool], None]) -> None: ...

    def recover(self) -> None: ...

    def start(self) -> None: ...

    def close(self, final_snapshot: bool = True) -> None: ...

    def snapshot(self, name: str | None = None) -> Any: ...

    def list_snapshots(self) -> list[Any]: ...

    def restore(self, name: str) -> Any: ...

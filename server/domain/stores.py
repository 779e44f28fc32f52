"""Where a service keeps its banks: one local store, or the shards of a cluster.

``new_store`` builds the store of one server (embedded mode) or of one shard
(cluster mode) from the settings and the served codec. ``Replication`` is what
the service needs of a cluster node (``cluster.node.ClusterNode``, which the gRPC
edge builds and hands in, so the domain never imports the cluster): its store of
every shard the pod holds, and the persistence calls the embedded mode's
``PersistenceManager`` answers. ``BankStore`` is what the service calls on either
store, so the type checker holds the cluster's facade to the local store's signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..codecs.base import Codec
from ..config import Settings
from ..memory.bank import DEFAULT_READ, MemoryBank
from ..memory.hybrid import DEFAULT_FUSION, Fusion
from ..memory.ivf import IndexConfig
from ..memory.lexical import Bm25Params
from ..memory.listing import ListedMemory
from ..memory.options import ReadOptions
from ..memory.results import BankStats, ReadResult, SlotWrite
from ..memory.store import MemoryStore
from .bankcodecs import BankCodecFitter

if TYPE_CHECKING:
    import numpy as np
    import torch


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
        # banks store packed codes in their scorer's byte-aligned layout (scanned
        # a table read per byte); they convert at their edges
        scorer=codec.scorer.stored() if codec.scorer is not None else None,
        memory_limit_bytes=settings.effective_memory_limit_bytes,
        max_banks=settings.max_banks,
        index_config=IndexConfig(threshold=settings.index_threshold,
                                 nprobe=settings.index_nprobe),
        bm25=Bm25Params(k1=settings.bm25_k1, b=settings.bm25_b),
        fitter=BankCodecFitter.for_codec(codec, settings.bank_codec_threshold,
                                         settings.max_batch_size),
    )


class BankStore(Protocol):
    """The store methods the service calls (``MemoryStore``, ``cluster.ShardedStore``)."""

    memory_limit_bytes: int | None

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> MemoryBank: ...

    def has_texts(self, bank: str) -> bool: ...

    def create_bank(self, name: str, capacity: int, policy: str | None = None,
                    half_life: float | None = None, exist_ok: bool = False,
                    context: int = 0) -> BankStats: ...

    def drop_bank(self, name: str) -> None: ...

    def describe(self, name: str) -> BankStats: ...

    def write(self, bank: str, codes: torch.Tensor, keys: list[str | None],
              payloads: list[bytes | None],
              metadata: list[dict[str, str] | None] | None = None,
              text: list[bool] | None = None, items: np.ndarray | None = None,
              generation: int | None = None) -> list[SlotWrite]: ...

    def read(self, bank: str, latents: torch.Tensor,
             options: ReadOptions = DEFAULT_READ,
             generation: int | None = None) -> ReadResult: ...

    def read_fused(self, bank: str, latents: torch.Tensor, queries: list[str], mode: str,
                   options: ReadOptions = DEFAULT_READ, fusion: Fusion = DEFAULT_FUSION,
                   generation: int | None = None) -> ReadResult: ...

    def fit_pending(self) -> None: ...

    def delete(self, bank: str, slots: list[int], keys: list[str], *,
               sequences: list[int] | None = None,
               dry_run: bool = False) -> tuple[int, list[str]]: ...

    def page(self, bank: str, offset: int, limit: int) -> tuple[int, list[ListedMemory]]: ...

    def set_metadata(self, bank: str, slot: int, sequence: int,
                     metadata: dict[str, str] | None) -> bool: ...

    def clear(self, bank: str) -> BankStats: ...

    def list(self) -> list[BankStats]: ...

    def usage_bytes(self) -> int: ...


class Replication(Protocol):
    """A cluster node, as the service uses it."""

    @property
    def store(self) -> BankStore: ...
    wal_healthy: bool

    def add_wal_listener(self, callback: Callable[[bool], None]) -> None: ...

    def set_serving(self, serving: bool) -> None: ...

    def recover(self) -> None: ...

    def start(self) -> None: ...

    def close(self, final_snapshot: bool = True) -> None: ...

    def snapshot(self, name: str | None = None) -> Any: ...

    def list_snapshots(self) -> list[Any]: ...

    def restore(self, name: str) -> Any: ...

"""The memory store of a cluster pod: one ``MemoryStore`` per shard it holds.

``ShardedStore`` offers the service the store methods it uses and sends each call
to the store of the bank's shard. A shard this pod does not hold, or has not
caught up on, answers ``UNAVAILABLE`` (the router normally sends such calls
elsewhere before they get here; a call that raced a hand-over is retried).
Mutations on a shard this pod holds but does not own are refused by that store's
log (``replica.StandbyLog``), so they never change a standby.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..memory.bank import DEFAULT_READ, MemoryBank
from ..memory.hybrid import DEFAULT_FUSION, Fusion
from ..memory.listing import ListedMemory
from ..memory.options import ReadOptions
from ..memory.results import BankStats, ReadResult, SlotWrite
from ..memory.store import MemoryStore
from .errors import ShardMoved
from .replica import ShardReplica
from .shardmap import shard_of


class ShardedStore:
    """Args:
        shards: the cluster's shard count.
        replicas: shard -> this pod's replica of it (a live dict, changed by the node).
        memory_limit_bytes: the pod's limit, reported by ``GetModelInfo``.
        describe: how a refusal names the pod that holds a shard.
    """

    def __init__(self, shards: int, replicas: dict[int, ShardReplica],
                 memory_limit_bytes: int | None, describe: Callable[[int], str]) -> None:
        self.shards = shards
        self.replicas = replicas
        self.memory_limit_bytes = memory_limit_bytes
        self.describe_shard = describe

    def shard_of(self, bank: str) -> int:
        return shard_of(bank, self.shards)

    def _store(self, bank: str) -> MemoryStore:
        shard = self.shard_of(bank)
        replica = self.replicas.get(shard)
        if replica is None or not replica.ready:
            raise ShardMoved(
                f"shard {shard} (bank {bank!r}) moved: it is not held here but by "
                f"{self.describe_shard(shard)}; retry", shard=shard)
        return replica.store

    def usage_bytes(self) -> int:
        return sum(r.store.usage_bytes() for r in list(self.replicas.values()))

    # -- what MemoryService uses ----------------------------------------------------------
    def has(self, name: str) -> bool:
        return self._store(name).has(name)

    def get(self, name: str) -> MemoryBank:
        return self._store(name).get(name)

    def has_texts(self, bank: str) -> bool:
        return self._store(bank).has_texts(bank)

    def create_bank(self, name: str, capacity: int, policy: str | None = None,
                    half_life: float | None = None, exist_ok: bool = False,
                    context: int = 0) -> BankStats:
        return self._store(name).create_bank(name, capacity, policy, half_life, exist_ok,
                                             context)

    def drop_bank(self, name: str) -> None:
        self._store(name).drop_bank(name)

    def describe(self, name: str) -> BankStats:
        return self._store(name).describe(name)

    def write(self, bank: str, codes: torch.Tensor, keys: list[str | None],
              payloads: list[bytes | None],
              metadata: list[dict[str, str] | None] | None = None,
              text: list[bool] | None = None, items: np.ndarray | None = None,
              generation: int | None = None) -> list[SlotWrite]:
        return self._store(bank).write(bank, codes, keys, payloads, metadata, text, items,
                                       generation)

    def read(self, bank: str, latents: torch.Tensor,
             options: ReadOptions = DEFAULT_READ,
             generation: int | None = None) -> ReadResult:
        return self._store(bank).read(bank, latents, options, generation)

    def read_fused(self, bank: str, latents: torch.Tensor, queries: list[str], mode: str,
                   options: ReadOptions = DEFAULT_READ, fusion: Fusion = DEFAULT_FUSION,
                   generation: int | None = None) -> ReadResult:
        return self._store(bank).read_fused(bank, latents, queries, mode, options, fusion,
                                            generation)

    def fit_pending(self) -> None:
        for replica in list(self.replicas.values()):
            if replica.ready:
                replica.store.fit_pending()

    def delete(self, bank: str, slots: list[int], keys: list[str], *,
               sequences: list[int] | None = None,
               dry_run: bool = False) -> tuple[int, list[str]]:
        return self._store(bank).delete(bank, slots, keys, sequences=sequences,
                                        dry_run=dry_run)

    def page(self, bank: str, offset: int, limit: int) -> tuple[int, list[ListedMemory]]:
        return self._store(bank).page(bank, offset, limit)

    def set_metadata(self, bank: str, slot: int, sequence: int,
                     metadata: dict[str, str] | None) -> bool:
        return self._store(bank).set_metadata(bank, slot, sequence, metadata)

    def clear(self, bank: str) -> BankStats:
        return self._store(bank).clear(bank)

    def list(self) -> list[BankStats]:
        """Banks of the shards this pod has caught up on (the router merges pods')."""
        out: list[BankStats] = []
        for replica in list(self.replicas.values()):
            if replica.ready:
                out.extend(replica.store.list())
        return sorted(out, key=lambda s: s.name)

"""A bank's memories page by page, newest first: what the memory browser lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .slots import BankSlots


@dataclass(frozen=True)
class ListedMemory:
    """One memory as a listing shows it.

    Attributes:
        accesses: its access count at the current write clock (decayed under
            ``lfu_decay``), what eviction ranks by.
    """

    slot: int
    key: str | None
    payload: bytes | None
    metadata: dict[str, str] | None
    sequence: int
    accesses: float


def page(bank: BankSlots, offset: int, limit: int) -> tuple[int, list[ListedMemory]]:
    """``(occupied slots, up to limit memories from the offset-th newest)``; the
    caller holds the bank lock shared and its ``counter_lock``."""
    occupied = torch.nonzero(bank.occupied[:bank.rows]).flatten()
    newest_first = occupied[torch.argsort(bank.sequences[occupied], descending=True)]
    chosen = newest_first[offset:offset + limit]
    sequences = bank.sequences[chosen].tolist()
    counts = bank.effective_counts()[chosen].tolist()
    rows = [ListedMemory(slot=s, key=bank.key_of(s), payload=bank.payload_of(s),
                         metadata=bank.metadata_of(s), sequence=q, accesses=c)
            for s, q, c in zip(chosen.tolist(), sequences, counts, strict=True)]
    return int(occupied.numel()), rows

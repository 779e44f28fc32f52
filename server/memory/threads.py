"""A memory's thread: the memories around it in the conversation it came from.

The thread of a memory is the set of memories that share its ``thread`` metadata
value or, without one, its ``session`` value; memories with neither key form
one thread, the bank's. Within a thread memories are ordered by write sequence,
so an agent that writes one memory per turn gets the conversation back in order.
Only the memories a read may return (occupied and passing its filter) count, so
context never leaks past a filter.
"""

from __future__ import annotations

import numpy as np

from .slots import BankSlots

THREAD_KEYS = ("thread", "session")


class Threads:
    """The threads of one read, built lazily (one argsort per thread touched).

    Args:
        bank: the bank, its lock held (shared) for the object's life.
        allowed: bool [capacity]: the slots the read may return.
    """

    def __init__(self, bank: BankSlots, allowed: np.ndarray) -> None:
        self._bank = bank
        self._allowed = allowed
        self._sequences = bank.sequences.cpu().numpy()
        self._order: dict[tuple[str, str] | None, tuple[np.ndarray, np.ndarray]] = {}

    def thread_of(self, slot: int) -> tuple[str, str] | None:
        meta = self._bank.metadata_of(slot) or {}
        for key in THREAD_KEYS:
            if key in meta:
                return key, meta[key]
        return None

    def _members(self, thread: tuple[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
        """(slots, their sequences) of a thread, in write order."""
        got = self._order.get(thread)
        if got is not None:
            return got
        mask = self._allowed.copy()
        if thread is None:
            for key in THREAD_KEYS:
                keyed = self._bank.slots_with_key(key)
                if keyed:
                    mask[np.fromiter(keyed, dtype=np.int64, count=len(keyed))] = False
        else:
            key, value = thread
            inside = np.zeros_like(mask)
            matched = self._bank.slots_matching({key: value})
            if matched:
                inside[np.fromiter(matched, dtype=np.int64, count=len(matched))] = True
            if key == "session":  # a memory with a thread key belongs to that thread
                keyed = self._bank.slots_with_key("thread")
                if keyed:
                    inside[np.fromiter(keyed, dtype=np.int64, count=len(keyed))] = False
            mask &= inside
        slots = np.flatnonzero(mask)
        seqs = self._sequences[slots]
        order = np.argsort(seqs, kind="stable")
        got = (slots[order], seqs[order])
        self._order[thread] = got
        return got

    def neighbours(self, slot: int, window: int) -> list[tuple[int, int]]:
        """(offset, slot) of up to ``window`` memories before and after ``slot`` in its
        thread, nearest first within each side (offsets -1, -2, ... and 1, 2, ...)."""
        slots, seqs = self._members(self.thread_of(slot))
        at = int(np.searchsorted(seqs, self._sequences[slot]))
        if at >= len(slots) or slots[at] != slot:
            return []  # not a memory the read may return
        before = [(-d, int(slots[at - d])) for d in range(1, window + 1) if at - d >= 0]
        after = [(d, int(slots[at + d])) for d in range(1, window + 1) if at + d < len(slots)]
        return before + after

"""Each bank's lexical (BM25) index of its text memories, kept in step with its slots.

A memory is a text memory when its payload is its text (``write(texts=...)``);
older data without text marks is classified by ``lexical.is_text``. The indexes
are keyed weakly by bank, so a dropped or replaced bank's index goes with it.
"""

from __future__ import annotations

import weakref

import numpy as np

from .bank import MemoryBank
from .lexical import Bm25Params, LexicalIndex, is_text


class TextIndexes:
    """The lexical index of every bank of a store (changed under the bank's lock)."""

    def __init__(self, params: Bm25Params | None = None) -> None:
        self.params = params or Bm25Params()
        self._indexes: weakref.WeakKeyDictionary[MemoryBank, LexicalIndex] = \
            weakref.WeakKeyDictionary()

    def of(self, bank: MemoryBank) -> LexicalIndex:
        """The lexical index of a bank (empty until it holds text memories)."""
        index = self._indexes.get(bank)
        if index is None:
            index = self._indexes.setdefault(bank, LexicalIndex(self.params))
        return index

    def written(self, b: MemoryBank, slots: list[int], payloads: list[bytes | None],
                     text: list[bool] | None) -> None:
        """After a write: slot j holds a text memory iff ``text[j]`` (None: data without
        text marks, see ``lexical.is_text``)."""
        index = self.of(b)
        for j, slot in enumerate(slots):
            flag = text[j] if text is not None else is_text(payloads[j])
            index.set(slot, payloads[j] if flag else None)

    def load(self, b: MemoryBank, flags: np.ndarray | None) -> None:
        """A bank's index from its text marks [capacity] (None: derived from payloads).

        Reads the payload column's arrays directly: ``payload_of`` per slot costs
        ~4 us, 0.4 s for a bank of 100k memories moved in or recovered.
        """
        occupied = np.flatnonzero(b.occupied.cpu().numpy())
        if flags is not None:
            flags = np.asarray(flags)
            occupied = occupied[occupied < len(flags)]
            occupied = occupied[flags[occupied] != 0]
        col = b.payloads
        occupied = occupied[occupied < col.length.shape[0]]
        lengths = col.length[occupied]
        slots = occupied[lengths > 0]
        raw = col.data[:col.used].tobytes()
        docs = {s: raw[a:a + n] for s, a, n in zip(
            slots.tolist(), col.start[slots].tolist(), col.length[slots].tolist(), strict=True)}
        if flags is None:
            docs = {s: p for s, p in docs.items() if is_text(p)}
        self.of(b).load(docs)

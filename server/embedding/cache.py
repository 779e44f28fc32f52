"""A bounded LRU of recent texts' embeddings: agents ask the same question again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np


class EmbeddingCache:
    """Embeddings [d] by exact text, the ``size`` most recently used kept.

    Args:
        size: entries kept (0: nothing is cached).
        observe: called with (hits, misses) of every lookup: misses are the texts
            computed, hits the rest (a text twice in one call is computed once).
    """

    def __init__(self, size: int,
                 observe: Callable[[int, int], None] = lambda hits, misses: None) -> None:
        self.size = size
        self._observe = observe
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str],
              compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Embeddings [n, d] of ``texts``: cached rows as they are, the rest from
        ``compute(missing texts) -> [m, d]`` (one call, none if all are cached)."""
        if self.size <= 0:
            return np.asarray(compute(list(texts)), dtype=np.float32)
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for t in texts:
                row = self._entries.get(t)
                if row is not None:
                    self._entries.move_to_end(t)
                    found[t] = row
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        self._observe(len(texts) - len(missing), len(missing))
        if missing:
            computed = np.asarray(compute(missing), dtype=np.float32)
            with self._lock:
                for t, row in zip(missing, computed, strict=True):
                    row = row.copy()
                    row.flags.writeable = False  # shared by every later caller that hits it
                    self._entries[t] = found[t] = row
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return np.stack([found[t] for t in texts])

"""What a bank holds toward a codec of its own and, once fitted, of it (the process is
``bankcodec``): the protocols the domain's codecs meet, the fitted codec with its
provenance, and the staged float items of the bank's first memories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .scoring import CodeScorer

_INITIAL_ROWS = 256


class FittedCodec(Protocol):
    """A codec fitted to one bank, as banks use it."""

    scorer: CodeScorer  # scores the bank's stored codes
    model_hash: str

    def encode(self, items: np.ndarray) -> torch.Tensor:
        """Items [n, d] float32 -> codes [n, m] in the wire layout."""
        ...

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Codes [n, m] in the wire layout -> items [n, d] float32."""
        ...

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON config, arrays): what ``CodecFitter.load`` rebuilds it from."""
        ...


class CodecFitter(Protocol):
    """How banks of one store get codecs of their own (the domain provides it).

    Attributes:
        threshold: staged memories at which a bank fits (0: banks never do).
        input_dim: d of the items.
        variants: the ways to fit that a bank tries; the one coding held-out items
            best is kept.
    """

    threshold: int
    input_dim: int
    variants: tuple[str, ...]

    def fit(self, items: np.ndarray, variant: str) -> FittedCodec:
        """A codec fitted on items [n, d] float32 one of ``variants``' way."""
        ...

    def load(self, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> FittedCodec:
        """A codec from ``FittedCodec.state()``; raises ``FailedPrecondition`` if bad."""
        ...

    def base_items(self, codes: torch.Tensor) -> np.ndarray:
        """Codes [n, m] of the served model (wire layout) -> its decoded items [n, d]."""
        ...

    def round_trip(self, codec: FittedCodec | None, items: np.ndarray) -> np.ndarray:
        """Items [n, d] encoded and decoded by ``codec`` (None: the served model)."""
        ...


class CodecChanged(Exception):
    """The bank swapped codecs after the caller encoded for it: encode again."""


@dataclass(frozen=True)
class OwnCodec:
    """A bank's fitted codec: fitted on ``fitted_on`` items at ``fitted_at`` (Unix
    time), with the squared error per item it had on held-out staged items and the
    one the codec it replaced had there."""

    codec: FittedCodec
    fitted_on: int
    fitted_at: float
    held_out_mse: float = 0.0
    replaced_mse: float = 0.0


class Staging:
    """Float items of a bank's memories, by slot and write sequence, before its fit.

    Rows grow geometrically up to ``limit``; later items are not staged (their
    memories are re-encoded from the served model's decode instead).
    """

    def __init__(self, dim: int, limit: int) -> None:
        self.dim, self.limit = int(dim), int(limit)
        self.items = np.zeros((0, self.dim), dtype=np.float32)
        self.slots = np.zeros(0, dtype=np.int64)
        self.sequences = np.zeros(0, dtype=np.int64)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.items.nbytes + self.slots.nbytes + self.sequences.nbytes

    def room(self, n: int) -> int:
        """How many of ``n`` new items would be staged."""
        return max(0, min(n, self.limit - self.count))

    def added_bytes(self, n: int) -> int:
        """Bytes staging ``n`` more items would add (for the memory limit)."""
        need = self.count + self.room(n)
        if need <= len(self.slots):
            return 0
        return (self._rows_for(need) - len(self.slots)) * (4 * self.dim + 16)

    def _rows_for(self, need: int) -> int:
        rows = max(len(self.slots), _INITIAL_ROWS)
        while rows < need:
            rows *= 2
        return min(rows, self.limit)

    def add(self, slots: list[int], sequences: list[int], items: np.ndarray) -> None:
        k = self.room(len(slots))
        if k == 0:
            return
        need = self.count + k
        if need > len(self.slots):
            rows = self._rows_for(need)
            for name in ("items", "slots", "sequences"):
                old = getattr(self, name)
                new = np.zeros((rows, *old.shape[1:]), dtype=old.dtype)
                new[:self.count] = old[:self.count]
                setattr(self, name, new)
        at = slice(self.count, need)
        self.items[at] = items[:k]
        self.slots[at] = slots[:k]
        self.sequences[at] = sequences[:k]
        self.count = need

    def live(self, occupied: torch.Tensor, sequences: torch.Tensor) -> np.ndarray:
        """Indices of staged rows whose slot still holds that write, given a bank's
        ``occupied`` and ``sequences`` (its lock held)."""
        n = self.count
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        slots = torch.from_numpy(self.slots[:n]).to(occupied.device)
        ok = occupied[slots] & (sequences[slots] == torch.from_numpy(
            self.sequences[:n]).to(occupied.device))
        # a slot written twice while staged: only its latest row is live
        rows = np.flatnonzero(ok.cpu().numpy())
        _, last = np.unique(self.slots[rows][::-1], return_index=True)
        return np.sort(rows[::-1][last])

    def keep(self, rows: np.ndarray) -> None:
        """Keeps only ``rows`` (compaction after deletes and overwrites)."""
        for name in ("items", "slots", "sequences"):
            arr = getattr(self, name)
            setattr(self, name, np.ascontiguousarray(arr[rows]))
        self.count = len(rows)

    def export(self, occupied: torch.Tensor, sequences: torch.Tensor
               ) -> dict[str, np.ndarray]:
        rows = self.live(occupied, sequences)
        return {"staged_items": self.items[rows].copy(), "staged_slots": self.slots[rows].copy(),
                "staged_sequences": self.sequences[rows].copy()}

    @classmethod
    def restore(cls, dim: int, limit: int, arrays: dict[str, np.ndarray]) -> Staging:
        staging = cls(dim, limit)
        items = arrays.get("staged_items")
        if items is not None and items.ndim == 2 and items.shape[1] == dim:
            staging.add(arrays["staged_slots"].tolist(), arrays["staged_sequences"].tolist(),
                        np.asarray(items, dtype=np.float32))
        return staging

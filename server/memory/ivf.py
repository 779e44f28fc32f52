"""An inverted-file (IVF) index over a bank's slots: coarse centroids and lists.

The index holds no vectors. ``K`` centroids live in the bank's *search space*
(the unit vectors a read's scan multiplies the query by: dequantised, or decoded
by the codec's scorer, times the similarity weights, times the slot's inverse
norm), and every occupied slot belongs to exactly one list, that of its nearest
centroid by cosine. A read probes the lists of the query's ``nprobe`` nearest
centroids and scores only their slots, from the stored codes, exactly as the scan
would; the codes stay the bank's only copy of the memories.

Lists are exact at all times: a slot joins its list when written and leaves it
when freed or overwritten (swap-with-last removal through a per-slot position),
so there are no tombstones to skip or compact. Per slot the index costs 12 bytes
(list, position, and the list entry), plus ``K x d`` float32 centroids.

Centroids come from FAISS k-means (spherical: centroids are renormalised each
iteration, which is k-means for cosine) on a sample of the bank's rows. See
``indexing`` for when a bank trains one and how it is swapped in under writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# FAISS's k-means needs about this many training points per centroid to be stable
# (it warns below 39); more only slows training down.
POINTS_PER_CENTROID = 40
KMEANS_ITERATIONS = 12
_ASSIGN_CHUNK_ROWS = 16384
_SMALL_ROWS = 256


@dataclass(frozen=True)
class IndexConfig:
    """When banks get an index and how hard reads search it.

    Attributes:
        threshold: occupied slots from which a bank is indexed (0: never).
        nprobe: lists a read probes when it asks for the server default.
        retrain_growth: retrain once the bank holds this many times the slots its
            centroids were trained on.
        background: train in a background thread (False: callers train explicitly,
            e.g. tests that need to know when the index changes).
    """

    threshold: int = 0
    nprobe: int = 64
    retrain_growth: float = 2.0
    background: bool = True


def list_count(n: int) -> int:
    """Lists for a bank of ``n`` slots: 4 sqrt(n) (FAISS's usual range is 4-16 sqrt(n);
    the low end keeps training and each write's assignment cheap), and at most one
    per 39 slots, the fewest training points per centroid k-means is stable with
    (FAISS warns below), which only binds below ~95k slots."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def train_centroids(rows: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means of unit rows [s, d] float32 -> unit centroids [k, d] float32."""
    import faiss  # imported here: only servers with large banks need it

    km = faiss.Kmeans(rows.shape[1], k, niter=KMEANS_ITERATIONS, spherical=True, seed=seed,
                      max_points_per_centroid=POINTS_PER_CENTROID * 4, verbose=False)
    km.train(np.ascontiguousarray(rows, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, rows.shape[1])


def nearest(rows: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """List of each row [n, d] (float32): its most similar centroid [K, d] -> int32 [n]."""
    if rows.shape[0] <= _SMALL_ROWS:
        # A write's few rows: einsum's own single-threaded loop, not a BLAS call. On a
        # loaded machine torch's or OpenBLAS's worker threads take milliseconds to be
        # scheduled for a product of microseconds (measured 19 ms per write at 1,265
        # centroids, while the product itself is ~0.3 ms).
        scores = np.einsum("nd,kd->nk", rows.numpy(), centroids.numpy())
        return scores.argmax(axis=1).astype(np.int32)
    out = np.empty(rows.shape[0], dtype=np.int32)
    for i in range(0, rows.shape[0], _ASSIGN_CHUNK_ROWS):
        scores = rows[i:i + _ASSIGN_CHUNK_ROWS] @ centroids.T
        out[i:i + scores.shape[0]] = scores.argmax(dim=1).numpy()
    return out


class InvertedLists:
    """Slot ids per list, with each slot's list and position for O(1) removal.

    Attributes:
        assign: int32 [rows], the list of each slot (-1: in none).
        pos: int32 [rows], the slot's index inside its list.
        sizes: int64 [K], live entries per list; ``lists[l][:sizes[l]]`` are its slots.
    """

    def __init__(self, k: int, rows: int) -> None:
        self.assign = np.full(rows, -1, dtype=np.int32)
        self.pos = np.zeros(rows, dtype=np.int32)
        self.sizes = np.zeros(k, dtype=np.int64)
        self.lists = [np.empty(0, dtype=np.int32) for _ in range(k)]
        # bytes of the lists' buffers, kept as they change: the memory limit asks on
        # every write, and summing K buffers each time cost O(K) per write
        self.list_bytes = 0

    @classmethod
    def from_assignment(cls, assign: np.ndarray, k: int, rows: int) -> InvertedLists:
        """Lists from a per-slot assignment int32 [n <= rows] (-1: no list)."""
        out = cls(k, rows)
        n = assign.shape[0]
        out.assign[:n] = assign
        slots = np.flatnonzero(assign >= 0).astype(np.int32)
        order = np.argsort(assign[slots], kind="stable")
        slots, owners = slots[order], assign[slots[order]]
        counts = np.bincount(owners, minlength=k)
        starts = np.concatenate(([0], np.cumsum(counts)))
        for lst in range(k):
            members = slots[starts[lst]:starts[lst + 1]]
            buf = np.empty(max(8, 2 * members.size), dtype=np.int32)  # room to grow
            buf[:members.size] = members
            out.lists[lst] = buf
            out.list_bytes += buf.nbytes
            out.pos[members] = np.arange(members.size, dtype=np.int32)
        out.sizes[:] = counts
        return out

    @property
    def k(self) -> int:
        return int(self.sizes.shape[0])

    def grow(self, rows: int) -> None:
        """Per-slot arrays cover ``rows`` slots (new ones in no list)."""
        old = self.assign.shape[0]
        if rows <= old:
            return
        self.assign = np.concatenate((self.assign, np.full(rows - old, -1, dtype=np.int32)))
        self.pos = np.concatenate((self.pos, np.zeros(rows - old, dtype=np.int32)))

    def add(self, slot: int, lst: int) -> None:
        """Puts a slot that is in no list into list ``lst``."""
        n = int(self.sizes[lst])
        buf = self.lists[lst]
        if n == buf.shape[0]:  # amortised doubling
            self.list_bytes -= buf.nbytes
            buf = np.concatenate((buf, np.empty(max(8, n), dtype=np.int32)))
            self.lists[lst] = buf
            self.list_bytes += buf.nbytes
        buf[n] = slot
        self.pos[slot] = n
        self.assign[slot] = lst
        self.sizes[lst] = n + 1

    def remove(self, slot: int) -> None:
        """Takes a slot out of its list (no-op if it is in none)."""
        if slot >= self.assign.shape[0]:
            return
        lst = int(self.assign[slot])
        if lst < 0:
            return
        n, p = int(self.sizes[lst]) - 1, int(self.pos[slot])
        buf = self.lists[lst]
        last = int(buf[n])
        buf[p] = last
        self.pos[last] = p
        self.sizes[lst] = n
        self.assign[slot] = -1
        if buf.shape[0] > 64 and n < buf.shape[0] // 4:  # give back a list's spare room
            self.lists[lst] = buf[: max(8, 2 * n)].copy()
            self.list_bytes += self.lists[lst].nbytes - buf.nbytes

    def place(self, slots: np.ndarray, lists: np.ndarray) -> None:
        """Moves each slot [n] to its list [n] (from any list or none)."""
        for slot, lst in zip(slots.tolist(), lists.tolist(), strict=True):
            if self.assign[slot] == lst:
                continue
            self.remove(slot)
            self.add(slot, lst)

    def members(self, probe: np.ndarray) -> np.ndarray:
        """Slots of the given lists, concatenated, int64 [c]."""
        parts = [self.lists[lst][: self.sizes[lst]] for lst in probe.tolist()]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def nbytes(self) -> int:
        return self.assign.nbytes + self.pos.nbytes + self.sizes.nbytes + self.list_bytes


class IvfIndex:
    """Centroids [K, d] float32 (unit rows, search space) and their lists.

    Args:
        centroids: [K, d] float32.
        lists: every occupied slot of the bank in exactly one list.
        trained_at: occupied slots when the centroids were trained.
    """

    def __init__(self, centroids: torch.Tensor, lists: InvertedLists, trained_at: int) -> None:
        self.centroids = centroids.float().contiguous()
        self.lists = lists
        self.trained_at = int(trained_at)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def place(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        """Written slots [n] with their search rows [n, d]: each to its nearest list."""
        self.lists.place(slots, nearest(rows, self.centroids))

    def probe(self, query: torch.Tensor, nprobe: int) -> np.ndarray:
        """Slots of the ``nprobe`` lists nearest to one unit query [d], int64 [c]."""
        scores = np.einsum("kd,d->k", self.centroids.numpy(), query.numpy())  # see nearest
        take = min(nprobe, self.k)
        probe = np.argpartition(-scores, take - 1)[:take] if take < self.k \
            else np.arange(self.k)
        return self.lists.members(probe)

    def nbytes(self) -> int:
        return self.centroids.numel() * 4 + self.lists.nbytes()

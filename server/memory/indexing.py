"""When a bank gets an approximate index, and how one is built without stalling it.

A bank is (re)indexed when it holds at least ``threshold`` memories and either has
no index or has grown to ``retrain_growth`` times the size its centroids were
trained on. A build (``build``) works in three steps, so the bank's writers wait
only for memory copies and the final swap:

1. Under the bank lock held *shared* (reads go on; writers wait for a copy): copy
   the codes and inverse norms of slots ``[0, high)`` and a random sample of
   occupied slots, and start the bank's ``index_journal``, where every later write
   or free records its slots.
2. With no lock: k-means (FAISS) on the sample's unit search rows, then every
   copied occupied slot assigned to its nearest centroid, and the lists built.
3. Under the bank lock held *exclusively*: the journal's slots are re-placed from
   the bank's current codes (or dropped if freed), and the new index swapped in.
   A clear or restore since step 1 (``index_epoch`` changed, or the bank retired)
   abandons the build.

Until the swap, reads use the old index (kept exact by writes) or scan.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ivf import (
    POINTS_PER_CENTROID,
    InvertedLists,
    IvfIndex,
    list_count,
    nearest,
    train_centroids,
)

if TYPE_CHECKING:
    from .bank import MemoryBank

log = logging.getLogger(__name__)
# How many slots' search rows are decoded at once while assigning a copy.
_DECODE_CHUNK_ROWS = 16384


def wanted(bank: MemoryBank) -> bool:
    """Whether the bank should start a build now (caller holds its lock)."""
    cfg = bank.index_config
    n = bank.occupied_count
    if cfg.threshold <= 0 or n < cfg.threshold or bank.index_training or bank.retired:
        return False
    return bank.index is None or n >= cfg.retrain_growth * bank.index.trained_at


def maybe_start(bank: MemoryBank, on_built: Callable[[str], None] | None = None) -> None:
    """Starts a background build if the bank wants one and its config builds in the
    background (caller holds the bank lock exclusively); ``on_built(bank name)`` is
    called from the build's thread once its index is swapped in, with no lock held."""
    if not bank.index_config.background or not wanted(bank):
        return
    bank.index_training = True
    threading.Thread(target=_build_logged, args=(bank, on_built),
                     name=f"index-{bank.name[:32]}", daemon=True).start()


def _build_logged(bank: MemoryBank, on_built: Callable[[str], None] | None) -> None:
    try:
        if build(bank, claimed=True) and on_built is not None:
            on_built(bank.name)
    except Exception:  # a failed build leaves the old index (or the scan) serving
        log.exception("building the index of bank %r failed", bank.name)


def build(bank: MemoryBank, *, claimed: bool = False, seed: int = 0) -> bool:
    """Builds and swaps in a fresh index for the bank (see the module docstring).

    Args:
        bank: the bank; its lock must not be held by the caller.
        claimed: the caller already set ``bank.index_training`` (``maybe_start``).
        seed: k-means and sampling seed.

    Returns:
        Whether an index was swapped in (False: too few memories, another build
        running, or the bank cleared, dropped or restored meanwhile).
    """
    try:
        with bank.lock.shared():
            if bank.retired or (not claimed and bank.index_training):
                return False
            n = bank.occupied_count
            if n < 1:
                return False
            bank.index_training = True
            claimed = True
            copy = _copy(bank, seed)
        centroids, assign = _train(bank, *copy)
        k = centroids.shape[0]
        lists = InvertedLists.from_assignment(assign, k, len(assign))
        with bank.lock:
            if bank.retired or bank.index_epoch != copy[0]:
                bank.index_journal = None
                return False
            journal, bank.index_journal = bank.index_journal or set(), None
            lists.grow(bank.rows)
            index = IvfIndex(torch.from_numpy(centroids), lists, trained_at=n)
            _replace(bank, index, np.fromiter(journal, dtype=np.int64, count=len(journal)))
            bank.index = index
            bank.version += 1  # the index is part of the bank's snapshot
            return True
    finally:
        if claimed:
            with bank.lock:  # writers read both fields under the bank lock
                bank.index_journal = None  # already None after a swap; a failed build's goes
                bank.index_training = False


def _copy(bank: MemoryBank, seed: int) -> tuple[int, torch.Tensor, torch.Tensor, np.ndarray,
                                                torch.Tensor, int]:
    """Step 1 (bank lock held shared): (epoch, codes [h, m], inverse norms [h], occupied
    slot ids, sample search rows [s, d], lists to train)."""
    high = bank.high
    occupied = torch.nonzero(bank.occupied[:high]).flatten().cpu().numpy()
    k = list_count(occupied.size)
    rng = np.random.default_rng(seed)
    take = min(occupied.size, POINTS_PER_CENTROID * k)
    sample = np.sort(rng.choice(occupied, size=take, replace=False))
    idx = torch.from_numpy(sample).to(bank.device)
    rows = bank.search_rows(bank.codes.index_select(0, idx),
                            bank.inv_norms.index_select(0, idx)).cpu()
    codes = bank.codes[:high].clone()
    inv = bank.inv_norms[:high].clone()
    bank.index_journal = set()
    return bank.index_epoch, codes, inv, occupied, rows, k


def _train(bank: MemoryBank, epoch: int, codes: torch.Tensor, inv: torch.Tensor,
           occupied: np.ndarray, sample: torch.Tensor, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 (no lock): centroids [k, d] float32 and the copy's assignment int32 [h]."""
    del epoch
    centroids = train_centroids(sample.numpy(), k)
    return centroids, assign_slots(bank, codes, inv, occupied, torch.from_numpy(centroids))


def assign_slots(bank: MemoryBank, codes: torch.Tensor, inv: torch.Tensor,
                 occupied: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    """The list of each slot of ``occupied`` (ids into codes [h, m] and inverse norms
    [h]): its nearest centroid [K, d]; int32 [h], -1 for the other slots."""
    assign = np.full(codes.shape[0], -1, dtype=np.int32)
    for i in range(0, occupied.size, _DECODE_CHUNK_ROWS):
        at = torch.from_numpy(occupied[i:i + _DECODE_CHUNK_ROWS]).to(codes.device)
        rows = bank.search_rows(codes.index_select(0, at), inv.index_select(0, at)).cpu()
        assign[at.cpu().numpy()] = nearest(rows, centroids)
    return assign


def _replace(bank: MemoryBank, index: IvfIndex, touched: np.ndarray) -> None:
    """Step 3 (bank lock held exclusively): slots written or freed since the copy take
    their place from the bank's current state."""
    if touched.size == 0:
        return
    for s in touched.tolist():
        index.lists.remove(s)
    at = torch.from_numpy(touched).to(bank.device)
    live = at[bank.occupied.index_select(0, at)]
    if live.numel():
        rows = bank.search_rows(bank.codes.index_select(0, live),
                                bank.inv_norms.index_select(0, live)).cpu()
        index.place(live.cpu().numpy(), rows)

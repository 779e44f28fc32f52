"""A bank's own codec: fitted on the bank's first memories, as an IVF or PQ index
trains on the data it indexes.

A bank starts on the served model. While it has none of its own it *stages* the
float items of the memories it is written (``Staging``: bounded, counted in the
memory limit, logged with their write records and kept in snapshots, so a restart
loses none). Once ``threshold`` are staged, a background fit (``fit_in_background``)
works in three steps, like an index build:

1. Under the bank lock held *shared*: copy the staged items of the slots that still
   hold them.
2. With no lock: the ``CodecFitter`` (the domain's, which knows codecs) fits a codec
   on them.
3. Under the bank lock held *exclusively* (the store's ``swap_codec``): every
   occupied slot is re-encoded with the new codec, from its staged item where it has
   one (exact), else from the served model's decode of its code; one ``codec`` log
   record carries the codec and every new code, so replay, replicas and restores
   install exactly the same codes; the bank's index is retrained in its new space.

A write or read encodes with the codec of one ``generation`` of the bank and hands
that number to the store; if the bank swapped codecs meanwhile the store raises
``CodecChanged`` and the caller encodes again. The memory layer never imports a
codec: it sees the fitted codec through ``FittedCodec``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .codecstage import CodecFitter, FittedCodec, OwnCodec

if TYPE_CHECKING:
    from .bank import MemoryBank

log = logging.getLogger(__name__)
# Staged items a bank keeps at most, as a multiple of the threshold: writes that
# arrive while a fit runs are staged too, so they are re-encoded exactly.
STAGING_SLACK = 1.25
# A fit needs at least this share of the threshold still live (deletes and
# overwrites remove staged items); below it the bank compacts and stages on.
MIN_LIVE_SHARE = 0.5


def wants_fit(bank: MemoryBank, threshold: int) -> bool:
    """Whether the bank should start a fit now (caller holds its lock)."""
    s = bank.staging
    return (threshold > 0 and s is not None and not bank.codec_fitting and not bank.retired
            and s.count >= threshold)


def fit_in_background(bank: MemoryBank, fitter: CodecFitter,
                      swap: Callable[[MemoryBank, OwnCodec, np.ndarray, int], bool]) -> None:
    """Starts a fit of the bank's own codec if it wants one (caller holds its lock
    exclusively); ``swap(bank, own, staged rows fitted on, generation)`` installs it."""
    if not wants_fit(bank, fitter.threshold):
        return
    bank.codec_fitting = True
    threading.Thread(target=_fit_logged, args=(bank, fitter, swap),
                     name=f"codec-{bank.name[:32]}", daemon=True).start()


def _fit_logged(bank: MemoryBank, fitter: CodecFitter,
                swap: Callable[[MemoryBank, OwnCodec, np.ndarray, int], bool]) -> None:
    try:
        fit_now(bank, fitter, swap)
    except Exception:  # the bank keeps the served model and stages on
        log.exception("fitting the codec of bank %r failed", bank.name)
    finally:
        bank.codec_fitting = False


def fit_now(bank: MemoryBank, fitter: CodecFitter,
            swap: Callable[[MemoryBank, OwnCodec, np.ndarray, int], bool]) -> bool:
    """Fits and swaps in the bank's own codec (see the module docstring); False when
    too few staged memories are still live or the bank changed codec meanwhile."""
    with bank.lock.shared():
        staging, generation = bank.staging, bank.codec_generation
        if staging is None or bank.retired:
            return False
        rows = staging.live(bank.occupied, bank.sequences)
        items = staging.items[rows].copy()
    if len(rows) < MIN_LIVE_SHARE * fitter.threshold:
        with bank.lock:
            if bank.staging is staging and bank.codec_generation == generation:
                staging.keep(staging.live(bank.occupied, bank.sequences))
        return False
    started = time.monotonic()
    own = OwnCodec(fitter.fit(items), fitted_on=len(rows), fitted_at=time.time())
    log.info("bank %r: fitted its own codec on %d memories in %.1f s", bank.name, len(rows),
             time.monotonic() - started)
    return swap(bank, own, rows, generation)


def recode(bank: MemoryBank, codec: FittedCodec, fitter: CodecFitter
           ) -> tuple[np.ndarray, torch.Tensor]:
    """(occupied slots, their codes in ``codec``'s wire layout): from each slot's staged
    item where it has one, else from the served model's decode of its code (bank lock
    held; its codes are still the served model's)."""
    high = bank.high
    slots = np.flatnonzero(bank.occupied[:high].cpu().numpy())
    items = np.zeros((len(slots), fitter.input_dim), dtype=np.float32)
    staged = np.zeros(len(slots), dtype=bool)
    staging = bank.staging
    if staging is not None and staging.count:
        rows = staging.live(bank.occupied, bank.sequences)
        where = np.searchsorted(slots, staging.slots[rows])
        items[where] = staging.items[rows]
        staged[where] = True
    rest = np.flatnonzero(~staged)
    if rest.size:
        wire = bank.wire_codes(bank.codes[torch.from_numpy(slots[rest]).to(bank.device)])
        items[rest] = fitter.base_items(wire)
    return slots, codec.encode(items)


def install(bank: MemoryBank, own: OwnCodec, slots: np.ndarray, wire: torch.Tensor) -> None:
    """Makes ``own`` the bank's codec with ``wire`` [n, m] the codes of ``slots``
    (every occupied slot), dropping staging and the index (lock held exclusively)."""
    occupied = np.flatnonzero(bank.occupied[:bank.high].cpu().numpy())
    if not np.array_equal(np.sort(np.asarray(slots)), occupied):
        raise ValueError("a codec swap must re-encode exactly the occupied slots")
    bank.set_scorer(own.codec.scorer)
    at = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(bank.device)
    stored = bank.stored_codes(wire.to(bank.device, bank.torch_dtype))
    bank.codes[at] = stored
    norms = bank.search_vectors(stored).norm(dim=1)
    bank.inv_norms[at] = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    bank.own_codec = own
    bank.codec_generation += 1
    bank.staging = None
    bank.version += 1
    bank._index_cleared()

"""A bank's own codec: fitted on the bank's memories, as an IVF or PQ index trains on
the data it indexes, and refitted when they drift.

A bank stages the float items of the memories it is written (``codecstage.Staging``:
bounded, counted in the memory limit, logged with their write records and kept in
snapshots, so a restart loses none). Once ``threshold`` are staged, a background fit
(``fit_in_background``) works in three steps, like an index build:

1. Under the bank lock held *shared*: copy the staged items of the slots that still
   hold them (and, for a bank with a codec of its own, as many of its other
   memories, decoded: a refit must keep coding what the bank already holds).
2. With no lock: the ``CodecFitter`` (the domain's, which knows codecs) fits a codec
   on all but a held-out tenth of the staged items, and both it and the bank's
   codec now code the held-out ones (one fit per ``CodecFitter.variants``, the best
   kept). Unless the new one's error there is clearly lower (``ADOPT_BELOW``), the
   fit is declined: the staging empties and the bank keeps its codec. Else the
   winning variant is fitted again on every staged item. A first fit on too few
   items, or on a mix the served model already codes well, is declined so; a refit
   is adopted only if the bank's memories drifted away from what its codec was
   fitted on.
3. Under the bank lock held *exclusively* (the store's ``swap_codec``): every
   occupied slot is re-encoded with the new codec, from its staged item where it has
   one (exact), else from its current decode; one ``codec`` log record carries the
   codec and every new code, so replay, replicas and restores install exactly the
   same codes; the bank's index is retrained in its new space, and staging starts
   over toward the next refit.

A write or read encodes with the codec of one ``generation`` of the bank and hands
that number to the store; if the bank swapped codecs meanwhile the store raises
``CodecChanged`` and the caller encodes again. The memory layer never imports a
codec: it sees fitted codecs through ``codecstage.FittedCodec``.
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
# Share of the staged items a fit holds out to judge itself on, and how much lower
# its error there must be than the bank's codec's now for the bank to swap: a fit
# that is not clearly better (too few items for the dims, a broad mix the served
# model already codes well, or a refit without drift) is declined.
HELD_OUT_SHARE = 0.1
ADOPT_BELOW = 0.9


Swap = Callable[["MemoryBank", OwnCodec, int], bool]


def wants_fit(bank: MemoryBank, threshold: int) -> bool:
    """Whether the bank should start a fit now (caller holds its lock)."""
    s = bank.staging
    return (threshold > 0 and s is not None and not bank.codec_fitting and not bank.retired
            and s.count >= threshold)


def fit_in_background(bank: MemoryBank, fitter: CodecFitter, swap: Swap) -> None:
    """Starts a fit of the bank's own codec if it wants one (caller holds its lock
    exclusively); ``swap(bank, own, generation)`` installs it."""
    if not wants_fit(bank, fitter.threshold):
        return
    bank.codec_fitting = True
    threading.Thread(target=_fit_logged, args=(bank, fitter, swap),
                     name=f"codec-{bank.name[:32]}", daemon=True).start()


def _fit_logged(bank: MemoryBank, fitter: CodecFitter, swap: Swap) -> None:
    try:
        fit_now(bank, fitter, swap)
    except Exception:  # the bank keeps its codec and stages on
        log.exception("fitting the codec of bank %r failed", bank.name)
    finally:
        bank.codec_fitting = False


def fit_now(bank: MemoryBank, fitter: CodecFitter, swap: Swap) -> bool:
    """Fits a codec on the bank's staged items and swaps it in if it codes held-out
    staged items clearly better than the bank's codec now (see the module docstring).

    A bank that already has its own codec refits on its staged (newer) items plus as
    many of its other memories, decoded: if its memories drifted away from what the
    codec was fitted on, the new codec covers both; if not, it is no better and is
    declined. A declined fit empties the staging, so the next try sees new items.

    Returns:
        whether a new codec was swapped in.
    """
    with bank.lock.shared():
        staging, generation, current = bank.staging, bank.codec_generation, bank.own_codec
        if staging is None or bank.retired:
            return False
        rows = staging.live(bank.occupied, bank.sequences)
        items = staging.items[rows].copy()
        older = _decoded_sample(bank, staging.slots[rows], len(rows), fitter, generation) \
            if current is not None else None
    if len(rows) < MIN_LIVE_SHARE * fitter.threshold:
        with bank.lock:
            if bank.staging is staging and bank.codec_generation == generation:
                staging.keep(staging.live(bank.occupied, bank.sequences))
        return False
    rng = np.random.default_rng(generation)
    order = rng.permutation(len(items))
    n_held = max(1, int(HELD_OUT_SHARE * len(items)))
    held, train = items[order[:n_held]], items[order[n_held:]]
    if older is not None:
        train = np.concatenate([train, older])
    started = time.monotonic()
    now = _mse(fitter.round_trip(current.codec if current else None, held), held)
    tried = {v: _mse(fitter.round_trip(fitter.fit(train, v), held), held)
             for v in fitter.variants}
    variant = min(tried, key=tried.__getitem__)
    new = tried[variant]
    log.info("bank %r: fitted codecs on %d items in %.1f s; held-out MSE %s against "
             "%.3g now", bank.name, len(train), time.monotonic() - started,
             ", ".join(f"{v} {m:.3g}" for v, m in tried.items()), now)
    if not new < ADOPT_BELOW * now:
        with bank.lock:
            if bank.staging is staging and bank.codec_generation == generation:
                staging.keep(np.zeros(0, dtype=np.int64))
                bank.codec_declined += 1
        return False
    # judged, it is fitted again on every item: the held-out tenth only decided
    everything = items if older is None else np.concatenate([items, older])
    return swap(bank, OwnCodec(fitter.fit(everything, variant), fitted_on=len(everything),
                               fitted_at=time.time(), held_out_mse=new, replaced_mse=now),
                generation)


def _mse(out: np.ndarray, items: np.ndarray) -> float:
    return float(((out - items) ** 2).sum(axis=1).mean())


def _decoded_sample(bank: MemoryBank, staged_slots: np.ndarray, n: int,
                    fitter: CodecFitter, generation: int) -> np.ndarray:
    """Up to ``n`` of the bank's memories that are not staged, decoded by its codec
    (lock held shared): a refit's picture of what the bank already holds."""
    occupied = np.flatnonzero(bank.occupied[:bank.high].cpu().numpy())
    others = np.setdiff1d(occupied, staged_slots)
    pick = np.random.default_rng(generation).permutation(others)[:n]
    if pick.size == 0:
        return np.zeros((0, fitter.input_dim), dtype=np.float32)
    return _decode(bank, np.sort(pick), fitter)


def _decode(bank: MemoryBank, slots: np.ndarray, fitter: CodecFitter) -> np.ndarray:
    """Items [n, d] the bank's codec decodes the codes of ``slots`` to."""
    wire = bank.wire_codes(bank.codes[torch.from_numpy(slots).to(bank.device)])
    own = bank.own_codec
    return own.codec.decode(wire) if own is not None else fitter.base_items(wire)


def recode(bank: MemoryBank, codec: FittedCodec, fitter: CodecFitter
           ) -> tuple[np.ndarray, torch.Tensor]:
    """(occupied slots, their codes in ``codec``'s wire layout): from each slot's staged
    item where it has one, else from what the bank's codec now decodes its code to
    (bank lock held)."""
    slots = np.flatnonzero(bank.occupied[:bank.high].cpu().numpy())
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
        items[rest] = _decode(bank, slots[rest], fitter)
    return slots, codec.encode(items)


def install(bank: MemoryBank, own: OwnCodec, slots: np.ndarray, wire: torch.Tensor) -> None:
    """Makes ``own`` the bank's codec with ``wire`` [n, m] the codes of ``slots``
    (every occupied slot), dropping its staged items and its index (lock held
    exclusively; the store starts staging again, toward a refit)."""
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

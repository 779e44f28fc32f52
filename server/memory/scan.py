"""A read's pass over a bank: the exhaustive scan, the IVF probe and scoring given slots.

All three score through the kernel ``scorers.kernel_for`` picks, times the slot's
inverse norm, so a memory's cosine is the same whichever path reads it. The caller
holds the bank's lock (shared is enough: nothing here mutates the bank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ivf import IvfIndex
from .scorers import READ_CHUNK_ROWS, Kernel, kernel_for
from .slots import BankSlots
from .spanops import exp_sum_, gather, mask_, scale_

_SCORE_SPAN_FLOATS = 1 << 18  # scores post-processed at once on CPU (1 MB)
_DEVICE_SPAN_ROWS = 1 << 18  # rows per step off the CPU (no cache to fit)


@dataclass
class Scan:
    """What one pass over the bank found for queries [Q, m]."""

    top_scores: torch.Tensor  # [Q, k] cosine, best first
    top_slots: torch.Tensor  # [Q, k] int64
    exp_sum: torch.Tensor  # [Q] sum over occupied slots of exp((score - shift) / T)
    shift: torch.Tensor | float  # [Q, 1], or one shift for all queries
    soft_sum: torch.Tensor | None  # [Q, m] sum of exp(...) * code (before the int8 scale)


def unit_queries(bank: BankSlots, q: torch.Tensor) -> torch.Tensor:
    """Queries [Q, query_dim] -> unit vectors [Q, d] of the search space."""
    if bank.scorer is not None:
        q = bank.scorer.queries(q)
    if bank.metric is not None:
        q = q * bank.metric
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)


def fold(bank: BankSlots, q: torch.Tensor) -> torch.Tensor:
    """Unit queries [Q, d] -> what raw (int8 / weighted) codes are multiplied by."""
    return q * bank.query_fold if bank.query_fold is not None else q


def kernel(bank: BankSlots, folded: torch.Tensor, soft: bool) -> Kernel:
    return kernel_for(folded, bank.codes, int8_scaled=bank.scale is not None,
                      scorer=bank.scorer, soft=soft)


def scan(bank: BankSlots, q: torch.Tensor, k: int, temperature: float, soft: bool,
         shift: torch.Tensor | None, allowed: torch.Tensor | None = None) -> Scan:
    """One pass over slots ``[0, high)``: scores, top-k and softmax sums, fused per span.

    Cosine of query q and slot i is ``(q/|q| * scale) . code_i * inv_norm_i`` (the
    int8 scale folds into the query). Scores of a span of rows (about 1 MB) are
    post-processed at once, which keeps the number of small tensor ops per read low.
    Softmax sums use ``exp((s - shift) / T)`` with shift 1 (the largest possible
    cosine) unless a per-query ``shift`` [Q, 1] is given, so no separate max pass is
    needed.

    Args:
        q: queries [Q, query_dim] float32.
        k: hits per query, 1 <= k <= occupied.
        soft: also accumulate the softmax-weighted sum of codes (one chunk per span,
            because it needs the converted chunk again).
        allowed: bool mask [capacity] of the (occupied) slots to consider, or None
            for every occupied slot.
    """
    q = fold(bank, unit_queries(bank, q))
    n_q, rows, m = q.shape[0], bank.high, q.shape[1]
    kern = kernel(bank, q, soft)
    if bank.device.type != "cpu":
        chunk = span = _DEVICE_SPAN_ROWS
    else:
        span = max(READ_CHUNK_ROWS, _SCORE_SPAN_FLOATS // n_q // READ_CHUNK_ROWS
                   * READ_CHUNK_ROWS)
        chunk = kern.chunk_rows or span
    if soft or n_q > 1:
        # one chunk per span: soft needs the converted chunk again, and a [Q, c]
        # product is only a contiguous slice of the [Q, span] scores when c == span
        span = chunk
    span, chunk = min(span, rows), min(chunk, rows)
    full = bank.occupied_count == rows and allowed is None  # no hole to mask
    live = bank.occupied if allowed is None else allowed
    shift_t: torch.Tensor | float = 1.0 if shift is None else shift
    score_buf = torch.empty(span * n_q, device=bank.device)
    exp_sum = torch.zeros(n_q, dtype=torch.float32, device=bank.device)
    soft_sum = torch.zeros(n_q, m, device=bank.device) if soft else None
    cand_scores, cand_slots = [], []
    block = bank.codes[:0]
    for s0 in range(0, rows, span):
        width = min(span, rows - s0)
        scores = score_buf[: n_q * width].view(n_q, width)
        for i in range(s0, s0 + width, chunk):
            c = min(chunk, s0 + width - i)
            out = scores[:, i - s0:i - s0 + c]
            if soft_sum is not None:  # span == chunk: the rows are the whole span
                block = kern.rows(bank.codes[i:i + c])
                torch.mm(q, block.T, out=out)
            else:
                kern.dots(q, bank.codes[i:i + c], out)
        scale_(scores, bank.inv_norms[s0:s0 + width])
        if not full:
            mask_(scores, live[s0:s0 + width])
        top = torch.topk(scores, min(k, width), dim=1)
        cand_scores.append(top.values)
        cand_slots.append(top.indices + s0)
        exp_sum += exp_sum_(scores, shift_t, temperature)  # scores are not reused
        weights = scores
        if soft_sum is not None:
            soft_sum.addmm_(weights, block)
    values, slots = torch.cat(cand_scores, dim=1), torch.cat(cand_slots, dim=1)
    top = torch.topk(values, k, dim=1)
    return Scan(top.values, torch.gather(slots, 1, top.indices), exp_sum, shift_t, soft_sum)


def probe(bank: BankSlots, index: IvfIndex, q: torch.Tensor, k: int, temperature: float,
          nprobe: int, allowed: torch.Tensor | None, n_allowed: int) -> Scan:
    """Top-k and softmax sums of queries [Q, query_dim] over each query's candidates:
    the slots of its ``nprobe`` nearest lists (or, under a filter matching no more
    slots than a probe would gather, every allowed slot: exact and cheaper).
    A query with fewer than k candidates is scanned instead."""
    unit = unit_queries(bank, q)
    folded = fold(bank, unit)
    mask = allowed.cpu().numpy() if allowed is not None else None
    expected = nprobe * max(1, len(index.lists)) // max(1, index.k)
    scores_out, slots_out, sums, shifts = [], [], [], []
    for i in range(q.shape[0]):
        if mask is not None and n_allowed <= expected:
            cand = np.flatnonzero(mask)
        else:
            cand = index.probe(unit[i].cpu(), nprobe)
            if mask is not None:
                cand = cand[mask[cand]]
        if cand.size < k:
            exhaustive = scan(bank, q[i:i + 1], k, temperature, False, shift=None,
                              allowed=allowed)
            scores_out.append(exhaustive.top_scores[0])
            slots_out.append(exhaustive.top_slots[0])
            sums.append(exhaustive.exp_sum[0])
            shifts.append(torch.ones((), device=bank.device))  # the scan's shift
            continue
        idx = torch.from_numpy(cand).to(bank.device)
        scores = score_slots(bank, folded[i:i + 1], idx)[0]
        top = torch.topk(scores, k)
        best = top.values[0]
        scores_out.append(top.values)
        slots_out.append(idx[top.indices])
        sums.append(exp_sum_(scores[None], best, temperature)[0])
        shifts.append(best)  # so the sum has a term equal to 1: it cannot underflow
    return Scan(torch.stack(scores_out), torch.stack(slots_out), torch.stack(sums),
                torch.stack(shifts)[:, None], None)


def score_slots(bank: BankSlots, folded: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Cosines [Q, c] of folded unit queries [Q, m] with the slots ``idx`` [c], as the
    scan computes them (same kernel, times the slot's inverse norm)."""
    kern = kernel(bank, folded, soft=False)
    out = torch.empty(folded.shape[0], idx.shape[0], device=bank.device)
    step = kern.chunk_rows or max(1, idx.shape[0])
    for i in range(0, idx.shape[0], step):
        at = idx[i:i + step]
        kern.dots_at(folded, bank.codes, at, out[:, i:i + at.shape[0]])
    scale_(out, gather(bank.inv_norms, idx))
    return out


def cosines(bank: BankSlots, latent: torch.Tensor, slots: list[int]) -> list[float]:
    """Cosine, exactly as a read scores it, of one query latent [query_dim] with the
    given occupied slots (hybrid recall scores memories the dense cut missed)."""
    if not slots:
        return []
    q = fold(bank, unit_queries(bank, latent.to(bank.device, torch.float32)[None]))
    idx = torch.tensor(slots, dtype=torch.int64, device=bank.device)
    return score_slots(bank, q, idx)[0].tolist()

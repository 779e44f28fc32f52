"""The one read-out of every read mode (dense, lexical, hybrid): counting the best
hit's access and building hits from ranked slots.

A read holds its bank's lock shared, so many run at once; the access counters are
the only state a read changes, under ``bank.counter_lock``, and each change bumps
``bank.counter_version`` so the next incremental snapshot copies the counters.
"""

from __future__ import annotations

import torch

from .results import FusedHit, Hit, QueryResult
from .slots import BankSlots


def count_best(bank: BankSlots, best: list[int] | torch.Tensor) -> None:
    """Counts one access of each query's best returned slot (the paper's
    ``AFF_ctrl[i*] += 1``; the other hits are not counted)."""
    slots = torch.as_tensor(best, dtype=torch.int64).to(bank.device)
    if not slots.numel():
        return
    with bank.counter_lock:
        bank.policy.add_access(bank.counts, bank.count_clock, slots, bank.write_clock)
        bank.reads_total += int(slots.numel())
        bank.counter_version += 1


def build_hits(bank: BankSlots, slots: list[list[int]], scores: list[list[float]],
               weights: list[list[float]], *, payloads: bool,
               ranks: list[list[tuple[float, float]]] | None = None) -> list[QueryResult]:
    """Hits of each query from its kept slots (best first) with their cosine scores
    and weights; payloads copied only when asked for.

    Args:
        ranks: for fused reads, per hit (BM25 score, rank score): the hits are
            ``FusedHit``.
    """
    flat = [s for per_query in slots for s in per_query]
    at = torch.tensor(flat, dtype=torch.int64, device=bank.device)
    codes = bank.codes[at].cpu().unbind(0) if flat else ()  # one copy, not one per hit
    sequences = bank.sequences[at].tolist() if flat else []
    results, cursor = [], 0
    for i, per_query in enumerate(slots):
        hits: list[Hit] = []
        for j, s in enumerate(per_query):
            args = (s, bank.key_of(s), scores[i][j], weights[i][j], sequences[cursor],
                    bank.payload_of(s) if payloads else None, codes[cursor],
                    bank.metadata_of(s))
            if ranks is None:
                hits.append(Hit(*args))
            else:
                lexical, rank_score = ranks[i][j]
                hits.append(FusedHit(*args, cosine=scores[i][j], lexical=lexical,
                                     rank_score=rank_score))
            cursor += 1
        results.append(QueryResult(hits))
    return results

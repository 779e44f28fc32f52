"""Recall that ranks a bank's memories by words as well as by meaning.

Modes (``RecallMode``):

- ``dense``: the paper's read, cosine of codes (``MemoryBank.read``).
- ``lexical``: BM25 of the query's words over the bank's text memories
  (``lexical.LexicalIndex``); memories sharing no word with the query are not
  returned.
- ``hybrid``: reciprocal-rank fusion (Cormack et al., SIGIR 2009) of the dense
  and the lexical ranking, each cut to ``depth`` candidates:
  ``rank_score = sum over rankings of 1 / (rrf_k + rank)`` (rank from 1), ties
  broken by cosine. A memory found by one ranking only gets that ranking's term.

In every mode hits come in the order of the mode's ``rank_score`` (BM25 in
lexical mode), while ``score`` stays the cosine (computed for memories the dense
cut missed), so a caller reads one similarity scale whatever the mode and
``min_score`` means the same thing. The read's metadata filter restricts *both*
rankings before they are cut and fused, ``weight`` is the hit's share of the
returned hits' rank scores (dense mode keeps the softmax weight), and the best
hit's access counter is incremented as in a dense read.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import readout
from .bank import MemoryBank
from .lexical import LexicalIndex
from .options import EXHAUSTIVE, ReadOptions
from .results import FusedHit, ReadResult
from .scan import cosines

__all__ = ["FUSION_DEPTH", "MODES", "RRF_K", "FusedHit", "fused_read"]

MODES = ("dense", "hybrid", "lexical")
RRF_K = 60  # the constant of the RRF paper; robust across collections
FUSION_DEPTH = 100  # candidates taken from each ranking (at least top_k)


def _allowed(bank: MemoryBank, where: dict[str, str] | None) -> np.ndarray:
    """Bool [capacity]: occupied slots that pass the metadata filter."""
    if where:
        mask, _ = bank.filter_mask(where)
    else:
        mask = bank.occupied
    return mask.cpu().numpy()


def fused_read(
    bank: MemoryBank,
    index: LexicalIndex,
    latents: torch.Tensor,
    queries: list[str],
    *,
    mode: str,
    options: ReadOptions,
    rrf_k: int = RRF_K,
    depth: int = FUSION_DEPTH,
) -> ReadResult:
    """A ``lexical`` or ``hybrid`` read of Q text queries (``bank.lock`` held shared).

    Args:
        latents: the queries' latents [Q, m] float32.
        queries: the Q query texts.
        mode: "lexical" or "hybrid".
        options: as ``MemoryBank.read`` (``temperature``, ``soft`` and ``nprobe``
            concern the dense ranking only, which is exact).
    """
    if mode not in ("lexical", "hybrid"):
        raise ValueError(f"fused_read: mode {mode!r}")
    o = options
    o.check()
    allowed = _allowed(bank, o.where)
    depth = max(depth, o.top_k)
    lexical = index.search(queries, allowed, depth)
    dense: ReadResult | None = None
    if mode == "hybrid":
        # exact dense ranking: fusion ranks dense and lexical candidates together, and
        # its depth (not top_k) decides what an approximate probe would have to cover
        dense = bank.read(latents, replace(o, top_k=depth, min_score=None, count_access=False,
                                           nprobe=EXHAUSTIVE, payloads=False))
    slots, scores, weights, ranks = [], [], [], []
    for qi in range(len(queries)):
        lex_slots, lex_scores = lexical[qi]
        bm25 = dict(zip(lex_slots.tolist(), lex_scores.tolist(), strict=True))
        dense_cos = {h.slot: h.score for h in dense.results[qi].hits} if dense else {}
        if mode == "lexical":
            order = list(bm25)[:o.top_k]
            score = {s: bm25[s] for s in order}
        else:
            fused: dict[int, float] = {}
            for ranking in (list(dense_cos), list(bm25)):
                for rank, slot in enumerate(ranking, start=1):
                    fused[slot] = fused.get(slot, 0.0) + 1.0 / (rrf_k + rank)
            order = sorted(fused, key=lambda s: (-fused[s], -dense_cos.get(s, -2.0)))[:o.top_k]
            score = {s: fused[s] for s in order}
        missing = [s for s in order if s not in dense_cos]
        cos = dict(zip(missing, cosines(bank, latents[qi], missing), strict=True))
        cos.update(dense_cos)
        if o.min_score is not None:
            order = [s for s in order if cos[s] >= o.min_score]
        total = sum(score[s] for s in order) or 1.0
        slots.append(order)
        scores.append([cos[s] for s in order])
        weights.append([score[s] / total for s in order])
        ranks.append([(bm25.get(s, 0.0), score[s]) for s in order])
    if o.count_access:
        readout.count_best(bank, [order[0] for order in slots if order])
    results = readout.build_hits(bank, slots, scores, weights, payloads=o.payloads, ranks=ranks)
    return ReadResult(results, dense.soft if dense is not None else None)

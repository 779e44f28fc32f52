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

from dataclasses import dataclass

import numpy as np
import torch

from .bank import EXHAUSTIVE, Hit, MemoryBank, QueryResult, ReadResult
from .lexical import LexicalIndex

MODES = ("dense", "hybrid", "lexical")
RRF_K = 60  # the constant of the RRF paper; robust across collections
FUSION_DEPTH = 100  # candidates taken from each ranking (at least top_k)


@dataclass
class FusedHit(Hit):
    """A hit of a hybrid or lexical read: ``score`` is the cosine, ``rank_score`` the
    fused (or BM25) score that ordered it."""

    cosine: float = 0.0
    lexical: float = 0.0  # BM25 score, 0 if no word matched
    rank_score: float = 0.0


def _allowed(bank: MemoryBank, where: dict[str, str] | None) -> np.ndarray:
    """Bool [capacity]: occupied slots that pass the metadata filter."""
    if where:
        mask, _ = bank._filter_mask(where)
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
    top_k: int,
    temperature: float = 1.0,
    min_score: float | None = None,
    soft: bool = False,
    count_access: bool = True,
    where: dict[str, str] | None = None,
    rrf_k: int = RRF_K,
    depth: int = FUSION_DEPTH,
) -> ReadResult:
    """A ``lexical`` or ``hybrid`` read of Q text queries (``bank.lock`` held).

    Args:
        latents: the queries' latents [Q, m] float32.
        queries: the Q query texts.
        mode: "lexical" or "hybrid".
        top_k, temperature, min_score, soft, count_access, where: as ``MemoryBank.read``
            (``temperature`` and ``soft`` concern the dense ranking only).
    """
    if mode not in ("lexical", "hybrid"):
        raise ValueError(f"fused_read: mode {mode!r}")
    allowed = _allowed(bank, where)
    depth = max(depth, top_k)
    lexical = index.search(queries, allowed, depth)
    dense: ReadResult | None = None
    if mode == "hybrid":
        # exact dense ranking: fusion ranks dense and lexical candidates together, and
        # its depth (not top_k) decides what an approximate probe would have to cover
        dense = bank.read(latents, top_k=depth, temperature=temperature, soft=soft,
                          count_access=False, where=where, nprobe=EXHAUSTIVE)
    results = []
    best: list[int] = []
    for qi in range(len(queries)):
        lex_slots, lex_scores = lexical[qi]
        bm25 = dict(zip(lex_slots.tolist(), lex_scores.tolist(), strict=True))
        dense_hits = {h.slot: h for h in dense.results[qi].hits} if dense else {}
        if mode == "lexical":
            order = list(bm25)[:top_k]
            score = {s: bm25[s] for s in order}
        else:
            fused: dict[int, float] = {}
            for ranking in (list(dense_hits), list(bm25)):
                for rank, slot in enumerate(ranking, start=1):
                    fused[slot] = fused.get(slot, 0.0) + 1.0 / (rrf_k + rank)
            cos_of = {s: h.score for s, h in dense_hits.items()}
            order = sorted(fused, key=lambda s: (-fused[s], -cos_of.get(s, -2.0)))[:top_k]
            score = {s: fused[s] for s in order}
        missing = [s for s in order if s not in dense_hits]
        cos = dict(zip(missing, bank.cosines_of(latents[qi], missing), strict=True))
        cos.update({s: h.score for s, h in dense_hits.items()})
        if min_score is not None:
            order = [s for s in order if cos[s] >= min_score]
        total = sum(score[s] for s in order) or 1.0
        hits: list[Hit] = []
        codes = bank.codes[torch.tensor(order, dtype=torch.int64, device=bank.device)].cpu() \
            if order else None
        for j, s in enumerate(order):
            assert codes is not None
            hits.append(FusedHit(
                slot=s, key=bank.key_of(s), score=cos[s], weight=score[s] / total,
                sequence=int(bank.sequences[s]), payload=bank.payload_of(s), code=codes[j],
                metadata=bank.metadata_of(s), cosine=cos[s], lexical=bm25.get(s, 0.0),
                rank_score=score[s]))
        if hits:
            best.append(hits[0].slot)
        results.append(QueryResult(hits))
    if count_access and best:
        t = torch.tensor(best, dtype=torch.int64, device=bank.device)
        bank.policy.add_access(bank.counts, bank.count_clock, t, bank.write_clock)
        bank.reads_total += len(best)
    return ReadResult(results, dense.soft if dense is not None else None)

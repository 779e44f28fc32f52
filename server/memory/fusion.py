"""How a text recall combines its rankings into one score per memory.

``convex`` (the default): per query, each ranking's scores are min-max normalised
over the candidates (the union of the dense and the lexical top ``depth``), then
mixed, ``dense_weight * cos' + (1 - dense_weight) * bm25'``. It keeps the
magnitudes: a memory that clearly leads one ranking keeps its lead, and an exact
copy of a stored text (cosine 1, every query word matched) comes first. This is
the "convex combination" that Bruch et al. (ACM TOIS 2023, "An analysis of fusion
functions for hybrid retrieval") found better than RRF wherever a little tuning
data exists.

``rrf``: reciprocal-rank fusion (Cormack et al., SIGIR 2009), ``sum 1 / (rrf_k +
rank)``: robust when score scales mean nothing, but rank 1 (1/61) barely beats
rank 10 (1/70) at k = 60, so it throws away how far ahead a memory is.

Context (``context`` > 0, off by default): a memory's ``context`` nearest
neighbours each side in its thread (``memory.threads``) lift its score,
``score + lift * max_d decay^(|d|-1) * score(neighbour at d)`` (lift 0.4, decay 1:
the best neighbour within the window counts, however far): in a
conversation the turn that answers a question is often next to the turn the
question paraphrases. Banks of unrelated facts have no such order, so it is opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FUSION_METHODS", "Fusion", "minmax", "rrf"]

FUSION_METHODS = ("convex", "rrf")
MAX_CONTEXT = 8


@dataclass(frozen=True)
class Fusion:
    """Parameters of a text recall (defaults chosen on ``apcm bench hybrid``'s dialog,
    facts and FAQ sets together; see docs/agent-memory.md).

    Attributes:
        method: "convex" or "rrf".
        dense_weight: convex: the cosine's share of the mix (the rest is BM25's).
        rrf_k: rrf: the rank offset.
        depth: candidates taken from each ranking (at least top_k).
        context: neighbours each side that lift a memory's score and come back with
            each hit (0: off).
        lift: a neighbour's share of its score added to a memory's.
        decay: the lift of the neighbour two turns away relative to the adjacent one.
    """

    method: str = "convex"
    dense_weight: float = 0.8
    rrf_k: int = 60
    depth: int = 100
    context: int = 0
    lift: float = 0.4
    decay: float = 1.0

    def check(self) -> None:
        """Asserts what the domain layer validated."""
        assert self.method in FUSION_METHODS, self.method
        assert 0.0 <= self.dense_weight <= 1.0, self.dense_weight
        assert 0 <= self.context <= MAX_CONTEXT, self.context


@dataclass(frozen=True)
class Normaliser:
    """Min-max normalisation of one ranking's scores, fitted on a query's candidates;
    values outside the fitted range are clipped to [0, 1]."""

    lo: float
    hi: float

    @staticmethod
    def fit(values: np.ndarray) -> Normaliser:
        if not len(values):
            return Normaliser(0.0, 0.0)
        return Normaliser(float(values.min()), float(values.max()))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        span = self.hi - self.lo
        if span <= 1e-12:  # one value among the candidates: it keeps full credit, unless
            # it is BM25's 0 (no candidate shares a word with the query)
            return np.where((values >= self.hi) & (self.hi != 0), 1.0, 0.0)
        return np.clip((values - self.lo) / span, 0.0, 1.0)


def minmax(values: np.ndarray) -> np.ndarray:
    """Values [n] min-max normalised to [0, 1] among themselves."""
    return Normaliser.fit(values)(values)


def rrf(rankings: list[list[int]], k: int) -> dict[int, float]:
    """Reciprocal-rank fusion of rankings (slots, best first): slot -> fused score."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, slot in enumerate(ranking, start=1):
            fused[slot] = fused.get(slot, 0.0) + 1.0 / (k + rank)
    return fused

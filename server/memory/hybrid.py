"""Recall that ranks a bank's memories by words as well as by meaning.

Modes (``RecallMode``):

- ``dense``: the paper's read, cosine of codes (``MemoryBank.read``).
- ``lexical``: BM25 of the query's words over the bank's text memories
  (``lexical.LexicalIndex``); memories sharing no word with the query are not
  returned.
- ``hybrid``: the dense and the lexical ranking, each cut to ``depth``
  candidates, fused (``fusion.Fusion``: by default a convex mix of their min-max
  normalised scores, or reciprocal-rank fusion). Every candidate of either
  ranking is scored exactly by both (its cosine over the stored code, its BM25),
  so the fusion is exact with an approximate index too: the dense ranking is an
  exact scan.

With ``context`` (``fusion.Fusion.context``), a memory's neighbours in its thread
(``threads.Threads``) lift its score and come back with each hit
(``ContextMemory``); a dense read with context goes through here too, ranked by
its cosine alone.

In every mode hits come in the order of the mode's ``rank_score`` (BM25 in
lexical mode without context), while ``score`` stays the cosine (computed for
memories the dense cut missed), so a caller reads one similarity scale whatever
the mode and ``min_score`` means the same thing. The read's metadata filter
restricts *both* rankings (and the neighbours) before they are cut and fused,
``weight`` is the hit's share of the returned hits' rank scores, and the best
hit's access counter is incremented as in a dense read.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import readout
from .bank import MemoryBank
from .fusion import Fusion, Normaliser, rrf
from .lexical import LexicalIndex, Scores, top
from .options import EXHAUSTIVE, ReadOptions
from .results import ContextMemory, FusedHit, ReadResult
from .scan import cosines
from .threads import Threads

__all__ = ["DEFAULT_FUSION", "MODES", "FusedHit", "Fusion", "fused_read"]

MODES = ("dense", "hybrid", "lexical")
DEFAULT_FUSION = Fusion()


def _allowed(bank: MemoryBank, where: dict[str, str] | None) -> np.ndarray:
    """Bool [capacity]: occupied slots that pass the metadata filter."""
    if where:
        mask, _ = bank.filter_mask(where)
    else:
        mask = bank.occupied
    return mask.cpu().numpy()


class _Scorer:
    """One query's exact scores of any allowed slot, cached: cosine, BM25 and the
    fused base score (normalisers fitted on the candidates)."""

    def __init__(self, bank: MemoryBank, latent: torch.Tensor, bm25: Scores, q: int,
                 mode: str, fusion: Fusion) -> None:
        self.bank, self.latent, self.bm25, self.q = bank, latent, bm25, q
        self.mode, self.fusion = mode, fusion
        self.cos: dict[int, float] = {}
        self.lex: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self._norms: tuple[Normaliser, Normaliser] | None = None
        self._rrf: dict[int, float] = {}

    def measure(self, slots: list[int]) -> None:
        """Cosine and BM25 of slots not yet measured."""
        new = [s for s in dict.fromkeys(slots) if s not in self.lex]
        if not new:
            return
        no_cos = [s for s in new if s not in self.cos]
        self.cos.update(zip(no_cos, cosines(self.bank, self.latent, no_cos), strict=True))
        lex = self.bm25.of(self.q, np.asarray(new, dtype=np.int64))
        self.lex.update(zip(new, lex.tolist(), strict=True))

    def fit(self, candidates: list[int], dense: list[int], lexical: list[int]) -> None:
        """Fits the normalisers (or RRF) on the candidates and scores them."""
        f = self.fusion
        if f.method == "rrf" and self.mode == "hybrid":
            self._rrf = rrf([dense, lexical], f.rrf_k)
        cos = np.array([self.cos[s] for s in candidates], dtype=np.float64)
        lex = np.array([self.lex[s] for s in candidates], dtype=np.float64)
        self._norms = (Normaliser.fit(cos), Normaliser.fit(lex))
        self.score(candidates)

    def score(self, slots: list[int]) -> None:
        """Base scores of measured slots."""
        assert self._norms is not None
        todo = [s for s in slots if s not in self.base]
        if not todo:
            return
        if self.mode == "hybrid" and self.fusion.method == "rrf":
            self.base.update((s, self._rrf.get(s, 0.0)) for s in todo)
            return
        cos_n, lex_n = self._norms
        if self.mode == "lexical" and not self.fusion.context:
            values = np.array([self.lex[s] for s in todo])  # BM25 itself, as ever
        else:
            w = {"dense": 1.0, "lexical": 0.0}.get(self.mode, self.fusion.dense_weight)
            values = (w * cos_n(np.array([self.cos[s] for s in todo]))
                      + (1 - w) * lex_n(np.array([self.lex[s] for s in todo])))
        self.base.update(zip(todo, values.tolist(), strict=True))


def _rank_one(scorer: _Scorer, dense: list[int], lexical: list[int], threads: Threads | None,
              fusion: Fusion, top_k: int) -> tuple[list[int], dict[int, float],
                                                   dict[int, list[tuple[int, int]]]]:
    """One query's ranked slots, their rank scores and (with context) neighbours."""
    candidates = list(dict.fromkeys(dense + lexical))
    scorer.measure(candidates)
    scorer.fit(candidates, dense, lexical)
    final = dict(scorer.base)
    around: dict[int, list[tuple[int, int]]] = {}
    if threads is not None and candidates:
        window = fusion.context
        around = {s: threads.neighbours(s, window) for s in candidates}
        extra = [n for near in around.values() for _, n in near if n not in scorer.base]
        scorer.measure(extra)
        scorer.score(extra)
        for s in dict.fromkeys(extra):
            around[s] = threads.neighbours(s, window)
        base = scorer.base
        final = {}
        for s, near in around.items():
            lift = max((fusion.decay ** (abs(d) - 1) * base.get(n, 0.0) for d, n in near),
                       default=0.0)
            final[s] = base[s] + fusion.lift * lift
    cos = scorer.cos
    order = sorted(final, key=lambda s: (-final[s], -cos[s]))[:top_k]
    return order, final, around


def fused_read(
    bank: MemoryBank,
    index: LexicalIndex,
    latents: torch.Tensor,
    queries: list[str],
    *,
    mode: str,
    options: ReadOptions,
    fusion: Fusion = DEFAULT_FUSION,
) -> ReadResult:
    """A text read of Q queries (``bank.lock`` held shared): ``lexical`` or ``hybrid``,
    or ``dense`` with context.

    Args:
        latents: the queries' latents [Q, m] float32.
        queries: the Q query texts.
        mode: "lexical", "hybrid" or (with ``fusion.context``) "dense".
        options: as ``MemoryBank.read`` (``temperature``, ``soft`` and ``nprobe``
            concern the dense ranking only, which is exact).
        fusion: how the rankings are fused; its ``context`` adds neighbours.
    """
    if mode not in MODES or (mode == "dense" and not fusion.context):
        raise ValueError(f"fused_read: mode {mode!r}")
    o = options
    o.check()
    fusion.check()
    allowed = _allowed(bank, o.where)
    depth = max(fusion.depth, o.top_k)
    bm25 = index.scores(queries, allowed) if mode != "dense" else \
        Scores(np.zeros(0, dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32))
    dense: ReadResult | None = None
    if mode != "lexical":
        # exact dense ranking: fusion ranks dense and lexical candidates together, and
        # its depth (not top_k) decides what an approximate probe would have to cover
        dense = bank.read(latents, replace(o, top_k=depth, min_score=None, count_access=False,
                                           nprobe=EXHAUSTIVE, payloads=False))
    threads = Threads(bank, allowed) if fusion.context else None
    slots, scores, weights, ranks, contexts = [], [], [], [], []
    for qi in range(len(queries)):
        lex_slots = top(bm25.slots, bm25.values[qi], depth)[0].tolist() if len(bm25.slots) \
            else []
        scorer = _Scorer(bank, latents[qi], bm25, qi, mode, fusion)
        dense_slots: list[int] = []
        if dense is not None:
            hits = dense.results[qi].hits
            dense_slots = [h.slot for h in hits]
            scorer.cos.update((h.slot, h.score) for h in hits)
        scorer.measure(dense_slots + lex_slots)
        order, score, around = _rank_one(scorer, dense_slots, lex_slots, threads, fusion,
                                         o.top_k)
        cos = scorer.cos
        if o.min_score is not None:
            order = [s for s in order if cos[s] >= o.min_score]
        total = sum(score[s] for s in order) or 1.0
        slots.append(order)
        scores.append([cos[s] for s in order])
        weights.append([score[s] / total for s in order])
        ranks.append([(scorer.lex.get(s, 0.0), score[s]) for s in order])
        contexts.append([around.get(s, []) for s in order] if threads is not None else None)
    if o.count_access:
        readout.count_best(bank, [order[0] for order in slots if order])
    results = readout.build_hits(bank, slots, scores, weights, payloads=o.payloads, ranks=ranks)
    for result, near in zip(results, contexts, strict=True):
        if near is None:
            continue
        for hit, neighbours in zip(result.hits, near, strict=True):
            assert isinstance(hit, FusedHit)
            hit.context = [ContextMemory(offset=d, slot=n, key=bank.key_of(n),
                                         text=bank.payload_of(n) or b"",
                                         sequence=int(bank.sequences[n]))
                           for d, n in sorted(neighbours)]
    return ReadResult(results, dense.soft if dense is not None else None)

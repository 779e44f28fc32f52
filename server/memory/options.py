"""A read's parameters as the memory layer receives them: validated already.

The domain layer (``domain.params.ReadParams``) checks what a client sends and
builds these; the memory layer only asserts the invariants, so a bad request is
refused once, with one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXHAUSTIVE = -1  # a read's ``nprobe`` that scans every slot even when the bank is indexed


@dataclass(frozen=True)
class ReadOptions:
    """Attributes:
        top_k: hits per query (clamped to the occupied count), >= 1.
        temperature: softmax temperature over cosine scores, > 0.
        min_score: drop hits with a lower cosine score.
        soft: also return the softmax-weighted mix of codes.
        count_access: count an access of each query's returned best hit.
        where: metadata equality filter, applied before top-k: only memories whose
            metadata holds every (key, value) are scored, ranked and weighted.
        nprobe: lists an indexed read probes (0: the bank's default, ``EXHAUSTIVE``:
            scan every slot, as an unindexed bank does).
        payloads: copy the hits' payloads (skipped when the caller drops them).
    """

    top_k: int = 1
    temperature: float = 1.0
    min_score: float | None = None
    soft: bool = False
    count_access: bool = True
    where: dict[str, str] | None = None
    nprobe: int = 0
    payloads: bool = True

    def check(self) -> None:
        """Asserts what the domain layer validated (a failure is a bug, not bad input)."""
        assert self.top_k >= 1, f"top_k {self.top_k}"
        assert self.temperature > 0 and math.isfinite(self.temperature), \
            f"temperature {self.temperature}"
        assert self.min_score is None or not math.isnan(self.min_score), "min_score NaN"
        assert self.nprobe >= EXHAUSTIVE, f"nprobe {self.nprobe}"

"""Domain values as the JSON the memory browser's page reads."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..domain.params import ModelInfo, QueryHits
from ..memory.listing import ListedMemory
from ..memory.results import BankStats, FusedHit


def _text(payload: bytes | None) -> str:
    return (payload or b"").decode("utf-8", errors="replace")


def model(info: ModelInfo, serving: bool, keys: bool) -> dict[str, Any]:
    return {"model": asdict(info), "health": "SERVING" if serving else "NOT_SERVING",
            "keys": keys}


def bank(stats: BankStats) -> dict[str, Any]:
    return {"name": stats.name, "capacity": stats.capacity, "memories": stats.occupied,
            "policy": stats.policy, "writes": stats.writes_total,
            "evictions": stats.evictions_total, "reads": stats.reads_total,
            "memory_bytes": stats.memory_bytes, "payload_bytes": stats.payload_bytes}


def memories(total: int, offset: int, rows: list[ListedMemory]) -> dict[str, Any]:
    return {"total": total, "offset": offset, "memories": [
        {"slot": r.slot, "sequence": r.sequence, "key": r.key or "", "text": _text(r.payload),
         "metadata": r.metadata or {}, "accesses": round(r.accesses, 3)} for r in rows]}


def hits(result: QueryHits) -> list[dict[str, Any]]:
    """Each hit with its dense (cosine), lexical (BM25) and fused (ranking) scores; a
    dense read's hits are ranked by their cosine and have no lexical score."""
    out = []
    for h in result.hits:
        lexical, ranked = (h.lexical, h.rank_score) if isinstance(h, FusedHit) else (0.0, h.score)
        out.append({"slot": h.slot, "sequence": h.sequence, "key": h.key or "",
                    "text": _text(h.payload), "metadata": h.metadata or {},
                    "dense": round(h.score, 4), "lexical": round(lexical, 4),
                    "fused": round(ranked, 4)})
    return out

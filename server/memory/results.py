"""What a bank's operations return: plain values, safe to use outside its lock."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SlotWrite:
    """What one written code did (the proto's ``WrittenSlot``)."""

    slot: int
    key: str | None
    evicted: bool
    evicted_key: str | None
    sequence: int
    replaced: bool


@dataclass
class Hit:
    """One recalled memory.

    Attributes:
        code: the stored code [m] in the code dtype and the bank's layout
            (``MemoryBank.wire_codes`` gives the codec's; a copy, safe outside the lock).
    """

    slot: int
    key: str | None
    score: float
    weight: float
    sequence: int
    payload: bytes | None
    code: torch.Tensor
    metadata: dict[str, str] | None = None


@dataclass
class QueryResult:
    hits: list[Hit] = field(default_factory=list)


@dataclass
class ReadResult:
    """One ``QueryResult`` per query; ``soft`` is the softmax-weighted mix of the
    dequantised codes [Q, m] float32 (latent space; with a scorer, its search space
    [Q, search_dim]), or None when not requested or the bank is empty."""

    results: list[QueryResult]
    soft: torch.Tensor | None = None


@dataclass(frozen=True)
class BankStats:
    name: str
    capacity: int
    occupied: int
    policy: str
    half_life: float
    code_dim: int
    code_dtype: str
    evictions_total: int
    writes_total: int
    reads_total: int
    counter_min: float
    counter_max: float
    counter_mean: float
    memory_bytes: int
    payload_bytes: int
    reserved_bytes: int = 0
    index: IndexStats | None = None
    context: int = 0
    codec: CodecStats | None = None


@dataclass(frozen=True)
class CodecStats:
    """Which codec a bank's codes are in (``DescribeBank``'s ``codec``).

    Attributes:
        state: "served" (the served model; the bank does not fit one), "staging" (the
            served model, while the bank stages items for its own), "fitting" (a fit
            runs), "own" (the bank's own codec).
        model_hash: content hash of the codec the codes are in ("" for the served one).
        fitted_on: memories the own codec was fitted on (0 before).
        fitted_at: Unix time of that fit (0 before).
        staged: items staged for the next fit (or refit). threshold: staged items at
            which it fits.
        declined: fits that were not clearly better on held-out staged items than
            the codec the bank had, so it kept that one.
        held_out_mse / replaced_mse: squared error per item on the fit's held-out
            staged items of the own codec as fitted without them (which decided the
            swap), and of the codec it replaced.
    """

    state: str
    model_hash: str = ""
    fitted_on: int = 0
    fitted_at: float = 0.0
    staged: int = 0
    threshold: int = 0
    declined: int = 0
    held_out_mse: float = 0.0
    replaced_mse: float = 0.0


@dataclass(frozen=True)
class IndexStats:
    """A bank's approximate index (``DescribeBank``'s ``index``).

    Attributes:
        state: "none" (reads scan), "training" (the first index is being built;
            reads scan), "ready" or "retraining" (reads search the index; a
            replacement is being built).
        lists: inverted lists (centroids); 0 without an index.
        trained_at: occupied slots the centroids were trained on.
        nprobe: lists a read probes by default.
        slots: slots in the lists (== occupied when ready).
        threshold: occupied slots from which the bank is indexed (0: never).
    """

    state: str
    lists: int
    trained_at: int
    nprobe: int
    slots: int
    threshold: int



@dataclass
class FusedHit(Hit):
    """A hit of a hybrid or lexical read: ``score`` is the cosine, ``rank_score`` the
    fused (or BM25) score that ordered it."""

    cosine: float = 0.0
    lexical: float = 0.0  # BM25 score, 0 if no word matched
    rank_score: float = 0.0
    context: list[ContextMemory] | None = None  # neighbours in its thread, with context


@dataclass(frozen=True)
class ContextMemory:
    """A memory next to a hit in its thread (``threads``): ``offset`` -1 is the one
    written just before it, 1 the one just after."""

    offset: int
    slot: int
    key: str | None
    text: bytes
    sequence: int

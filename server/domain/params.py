"""What the domain layer takes and gives besides arrays: validated read parameters,
written slots, one query's hits and the served model's description."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codecs.base import ItemChecks
from ..errors import InvalidArgument
from ..memory.fusion import FUSION_METHODS, MAX_CONTEXT
from ..memory.hybrid import MODES
from ..memory.metadata import validate_metadata
from ..memory.options import EXHAUSTIVE, ReadOptions
from ..memory.results import Hit, SlotWrite

MAX_TOP_K = 1024


class WrittenSlots(list[SlotWrite]):
    """What a Write did: one ``SlotWrite`` per written slot, plus ``checks``, the
    codec's per-input-item domain checks (None for codes, or a codec without them)."""

    checks: ItemChecks | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about the served codec and the request limits."""

    name: str
    kind: str
    input_shape: tuple[int, int]
    code_dim: int
    code_dtype: str
    bytes_per_code: int
    input_bytes: int
    compression_ratio: float
    model_hash: str
    device: str
    max_batch_size: int
    max_message_bytes: int
    max_top_k: int
    max_bank_capacity: int
    max_payload_bytes: int
    max_key_length: int
    memory_limit_bytes: int
    max_banks: int
    embedder: str = ""  # the text embedder, "" when the model serves vectors only


@dataclass
class QueryHits:
    """One query's hits, with reconstructions [L, D] per hit when asked for."""

    hits: list[Hit]
    reconstructions: list[np.ndarray] | None = None
    soft_reconstruction: np.ndarray | None = None


@dataclass(frozen=True)
class ReadParams:
    """Validated parameters of a read; equal params let concurrent reads share a search."""

    top_k: int = 1
    temperature: float = 1.0
    min_score: float | None = None
    soft: bool = False
    count_access: bool = True
    where: tuple[tuple[str, str], ...] = ()  # metadata equality filter, sorted items
    # "dense", "hybrid" or "lexical" (see memory.hybrid); None: hybrid for a text query
    # of a bank that holds text memories, else dense
    mode: str | None = None
    nprobe: int = 0  # lists an indexed bank probes (0: its default)
    exhaustive: bool = False  # scan every slot even if the bank is indexed
    fusion: str | None = None  # "convex" or "rrf" (memory.fusion); None: convex
    context: int | None = None  # context recall neighbours; None: the bank's setting

    @staticmethod
    def filter_items(where: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        """A filter map, validated, as the hashable ``where`` of equal params."""
        checked = validate_metadata(where, "filter")
        return tuple(sorted(checked.items())) if checked else ()

    @property
    def effort(self) -> int:
        """The bank read's ``nprobe`` (``EXHAUSTIVE`` when an exact scan is asked for)."""
        return EXHAUSTIVE if self.exhaustive else self.nprobe

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be in [1, {MAX_TOP_K}], got {self.top_k}",
                                  field="top_k")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InvalidArgument(f"temperature must be > 0, got {self.temperature}",
                                  field="temperature")
        if self.min_score is not None and math.isnan(self.min_score):
            raise InvalidArgument("min_score must be a number", field="min_score")
        if self.nprobe < 0:
            raise InvalidArgument(f"nprobe must be >= 0 (0: the server's default), got "
                                  f"{self.nprobe}", field="nprobe")
        if self.fusion is not None and self.fusion not in FUSION_METHODS:
            raise InvalidArgument(f"fusion must be one of {', '.join(FUSION_METHODS)}, got "
                                  f"{self.fusion!r}", field="fusion")
        if self.context is not None and not 0 <= self.context <= MAX_CONTEXT:
            raise InvalidArgument(f"context must be between 0 and {MAX_CONTEXT}, got "
                                  f"{self.context}", field="context")
        if self.mode is not None and self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}",
                                  field="mode")

    def options(self, *, payloads: bool) -> ReadOptions:
        """The memory layer's parameters of this read (``payloads``: copy them)."""
        return ReadOptions(top_k=self.top_k, temperature=self.temperature,
                           min_score=self.min_score, soft=self.soft,
                           count_access=self.count_access, where=dict(self.where) or None,
                           nprobe=self.effort, payloads=payloads)

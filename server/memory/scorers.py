"""How a read multiplies its queries with stored codes: one kernel per kind of code.

A kernel takes *folded* unit queries [Q, m] (the unit query in the search space
times the int8 scale and the similarity weights, so raw codes can be multiplied
directly) and a block of stored codes [c, m], and writes their products [Q, c]
before the slot's inverse norm. The scan (``scan``), the index probe and hybrid
recall all score through the kernel ``kernel_for`` picks, so a memory gets the
same score whichever path reads it.

Kinds, as FAISS splits its flat, scalar-quantiser and PQ scanners:

- ``FloatKernel``: float32 codes, one matrix product per span.
- ``ConvertingKernel``: float16 / int8 codes converted to float32 one
  cache-sized chunk at a time (never a float copy of the bank).
- ``Int8LimbKernel``: one int8 query on CPU split into int8 limbs, so the bank is
  read as int8 by an exact int8 x int8 -> int32 product.
- ``DecodingKernel``: packed codes decoded by the codec's scorer, chunk by chunk.
- ``LookupKernel``: packed codes scored straight from per-dim lookup tables
  (the scorer's ``dots``) for reads of a few queries.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import numpy as np
import torch

from .scoring import CodeScorer
from .spanops import copy_

# Rows converted at a time by a read on CPU: small enough that the float32 copy of an
# int8/float16 chunk and its scores stay in cache, large enough to amortise per-call
# overhead (measured by ``apcm bench read``).
READ_CHUNK_ROWS = 4096
# Rows a codec's scorer decodes at once: its unpacking makes int64 temporaries of
# ~12 KB per row, so 1,024 rows stay in cache; 4,096 measured 4x slower per row.
SCORER_CHUNK_ROWS = 1024
# Rows per int8 x int8 matmul call of a single-query int8 read (3 MB at m = 192: the
# second and third limb read the chunk from cache).
INT8_CHUNK_ROWS = 16384
# Lookup-table scoring costs per code and query (0.06-0.12 us here on byte-aligned
# codes), a decode per code (1.6 us) shared by every query of the read: above this
# many queries, decode.
LUT_MAX_QUERIES = 12


class Kernel(ABC):
    """Products of one read's folded queries with blocks of stored codes.

    Attributes:
        chunk_rows: rows one ``dots`` call should get on CPU (None: any number).
    """

    chunk_rows: int | None = None

    @abstractmethod
    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        """Writes ``q [Q, m] @ rows(block).T`` into ``out`` [Q, c]."""

    @abstractmethod
    def rows(self, block: torch.Tensor) -> torch.Tensor:
        """The float32 rows [c, m] a block of codes is scored as (a soft read mixes
        them); valid until the next call."""

    def dots_at(self, q: torch.Tensor, codes: torch.Tensor, at: torch.Tensor,
                out: torch.Tensor) -> None:
        """Writes ``q [Q, m] @ rows(codes[at]).T`` into ``out`` [Q, len(at)]."""
        self.dots(q, codes.index_select(0, at), out)


class FloatKernel(Kernel):
    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(q, block.T, out=out)

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        return block


class ConvertingKernel(Kernel):
    """float16 / int8 codes: each chunk converted into one reused float32 buffer."""

    chunk_rows = READ_CHUNK_ROWS

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        need = block.numel()
        if self._buf is None or self._buf.numel() < need or self._buf.device != block.device:
            self._buf = torch.empty(need, device=block.device)
        return self._buf[:need].view(block.shape).copy_(block)

    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(q, self.rows(block).T, out=out)


class Int8LimbKernel(Kernel):
    """One query split into int8 limbs (``int8_limbs``): ``sum_j scale_j * (codes @
    limb_j)``, each product exact in int32, is as exact as a float32 product while
    the bank is read as int8."""

    chunk_rows = INT8_CHUNK_ROWS

    def __init__(self, q: torch.Tensor) -> None:
        self._limbs = int8_limbs(q[0])

    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        del q  # the limbs are the query
        row = out.view(1, -1)
        for j, (limb, scale) in enumerate(self._limbs):
            product = torch._int_mm(block, limb).view(1, -1)
            if j == 0:
                torch.mul(product, scale, out=row)
            else:
                row.add_(product, alpha=scale)

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        return block.float()


class DecodingKernel(Kernel):
    """Packed codes decoded by the codec's scorer one cache-sized chunk at a time."""

    chunk_rows: int | None = SCORER_CHUNK_ROWS

    def __init__(self, scorer: CodeScorer) -> None:
        self._scorer = scorer

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        return self._scorer.codes(block)

    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(q, self.rows(block).T, out=out)


class LookupKernel(DecodingKernel):
    """Packed codes scored from the scorer's per-dim lookup tables, no decode."""

    chunk_rows = None  # no decoded block to keep in cache

    def dots(self, q: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
        scores = self._scorer.dots(q, block)
        assert scores is not None  # ``kernel_for`` checked the scorer applies
        copy_(out, scores)

    def dots_at(self, q: torch.Tensor, codes: torch.Tensor, at: torch.Tensor,
                out: torch.Tensor) -> None:
        scores = self._scorer.dots(q, codes, at)  # rows read in place: no gathered copy
        assert scores is not None
        copy_(out, scores)


def kernel_for(q: torch.Tensor, codes: torch.Tensor, *, int8_scaled: bool,
               scorer: CodeScorer | None, soft: bool) -> Kernel:
    """The kernel for one read of folded queries ``q`` [Q, m] (on the bank's device).

    Args:
        codes: the bank's code tensor (its dtype and device decide).
        int8_scaled: the codes are int8 with a per-dimension scale.
        scorer: the codec's scorer for packed codes, else None.
        soft: the read also mixes the scored rows (needs them decoded).
    """
    if scorer is not None:
        few = q.shape[0] <= LUT_MAX_QUERIES and not soft
        if few and scorer.dots(q, codes[:0]) is not None:
            return LookupKernel(scorer)
        return DecodingKernel(scorer)
    if codes.dtype == torch.float32:
        return FloatKernel()
    if (int8_scaled and q.shape[0] == 1 and not soft and q.device.type == "cpu"
            and int_mm_works()):
        return Int8LimbKernel(q)
    return ConvertingKernel()


def int8_limbs(q: torch.Tensor, n: int = 3) -> list[tuple[torch.Tensor, float]]:
    """Splits a float query [m] into int8 limbs: ``q ~= sum_j scale_j * limb_j``.

    Three limbs of 8 bits leave a residual below float32 rounding.

    Returns:
        (limb [m, 1] int8, scale) pairs; all-zero limbs are left out.
    """
    rest = q.detach().cpu().double().numpy()  # numpy: cheaper than torch ops on [m]
    limbs = []
    for _ in range(n):
        step = float(np.abs(rest).max()) / 127.0
        if step == 0.0:
            break
        digits = np.clip(np.rint(rest / step), -127, 127)
        limbs.append((torch.from_numpy(digits.astype(np.int8).reshape(-1, 1)), step))
        rest = rest - digits * step
    return limbs or [(torch.zeros(q.shape[0], 1, dtype=torch.int8), 0.0)]


@functools.cache
def int_mm_works() -> bool:
    """Whether this torch build has a CPU int8 x int8 -> int32 matmul (a private op)."""
    try:
        a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
        b = torch.tensor([[4], [5], [-6]], dtype=torch.int8)
        return int(torch._int_mm(a, b)[0, 0]) == -24
    except (AttributeError, RuntimeError, NotImplementedError):
        return False

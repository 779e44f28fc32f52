"""Compiled CPU kernels of the IDRP v2 code: quantise + pack and unpack + table lookup
of a batch in one pass over each row, for :class:`apcm.server.codecs.idrp.transform.BitPacker`.

The torch formulation of the same code makes a full [B, d] or [B, parts] temporary per
step (divide, add, floor, clamp, cast, gather, shift, cumulative sum, difference),
each a pass over memory; here a row's fields go through a bit accumulator, MSB
first, in the packer's stream order, so every byte is written once. Arithmetic is
the torch path's to the bit: float32 divide, then float32 add, then floor (no
reciprocal, no fused multiply-add), so the code bytes stay those pinned by
``tests/test_v2_packing.py``.

Arguments are numpy arrays: ``dims`` [n_fields] the coded dims in stream order and
``widths`` [n_fields] their field widths (1..8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numba
import numpy as np


def jit(fn: Callable[..., None]) -> Callable[..., None]:
    """Compiled, cached on disk where numba finds a writable place: next to this
    file, ``$NUMBA_CACHE_DIR`` or the user's cache folder. With none (a read-only
    install and no writable home) numba refuses ``cache=True`` at decoration, so
    the kernel is compiled at every start instead of failing the import."""
    try:
        return cast(Callable[..., None], numba.njit(cache=True, nogil=True,
                                                    boundscheck=False)(fn))
    except RuntimeError:
        return cast(Callable[..., None], numba.njit(nogil=True, boundscheck=False)(fn))


@jit
def quantize_pack(y: np.ndarray, step: np.ndarray, half: np.ndarray, dims: np.ndarray,
                  widths: np.ndarray, out: np.ndarray) -> None:
    """Latents y [B, d] float32 -> codes ``out`` [B, n_bytes] uint8, with
    ``cell = clip(floor(y / step + half), 0, 2 * half - 1)``; step, half [d] float32."""
    d = y.shape[1]
    top = 2 * half - 1
    zero = np.float32(0.0)
    cells = np.empty(d, dtype=np.int32)
    for r in range(y.shape[0]):
        # a row's cells in dim order first: a loop the compiler vectorises
        for i in range(d):
            v = np.floor(y[r, i] / step[i] + half[i])
            # NaN fails the first test and lands in cell 0, as the torch path's int
            # cast of NaN (INT_MIN) does once packing masks its low bits
            v = v if v >= zero else zero
            v = v if v <= top[i] else top[i]
            cells[i] = np.int32(v)
        _pack_row(cells, dims, widths, out[r])


@jit
def pack_cells(cells: np.ndarray, dims: np.ndarray, widths: np.ndarray,
               out: np.ndarray) -> None:
    """Cells [B, d] int (0 .. 2**w - 1) -> codes ``out`` [B, n_bytes] uint8."""
    for r in range(cells.shape[0]):
        _pack_row(cells[r], dims, widths, out[r])


@jit
def _pack_row(cells: np.ndarray, dims: np.ndarray, widths: np.ndarray,
              out: np.ndarray) -> None:
    """One row's cells [d] -> its code bytes ``out`` [n_bytes], MSB first."""
    acc = 0
    have = 0
    k = 0
    for j in range(dims.shape[0]):
        w = widths[j]
        acc = (acc << w) | (int(cells[dims[j]]) & ((1 << w) - 1))
        have += w
        if have >= 8:
            have -= 8
            out[k] = (acc >> have) & 255
            k += 1
            acc &= (1 << have) - 1


@jit
def unpack_cells(codes: np.ndarray, dims: np.ndarray, widths: np.ndarray,
                 out: np.ndarray) -> None:
    """Codes [B, n_bytes] uint8 -> cells into ``out`` [B, d] int32 (zeroed by the caller)."""
    for r in range(codes.shape[0]):
        _unpack_row(codes[r], dims, widths, out[r])


@jit
def unpack_lookup(codes: np.ndarray, dims: np.ndarray, widths: np.ndarray,
                  table: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
    """Codes [B, n_bytes] uint8 -> ``out`` [B, d] = ``table[offset + cell]`` (float32);
    an uncoded dim reads its single entry, as a cell of 0 would."""
    d = out.shape[1]
    cells = np.zeros(d, dtype=np.int32)  # uncoded dims are never written: cell 0
    for r in range(codes.shape[0]):
        _unpack_row(codes[r], dims, widths, cells)
        for i in range(d):
            out[r, i] = table[offset[i] + cells[i]]


@jit
def _unpack_row(code: np.ndarray, dims: np.ndarray, widths: np.ndarray,
                cells: np.ndarray) -> None:
    """One code's bytes [n_bytes] -> its coded dims' cells in ``cells`` [d]."""
    acc = 0
    have = 0
    k = 0
    for j in range(dims.shape[0]):
        w = widths[j]
        if have < w:
            acc = (acc << 8) | code[k]
            k += 1
            have += 8
        have -= w
        cells[dims[j]] = (acc >> have) & ((1 << w) - 1)
        acc &= (1 << have) - 1

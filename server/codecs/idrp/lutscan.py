"""Scores of queries against packed IDRP v2 codes without decoding them.

A v2 code decodes dim by dim: ``v_d = table[offset_d + cell_d]`` with ``cell_d`` a bit
field of the code. The dot product of a query ``q`` with the decoded vector is then a
sum of table entries scaled by the query, so one lookup table per query,
``lut[t] = q[dim_of(t)] * table[t]``, turns scoring into one lookup and one add per
coded dim: asymmetric distance computation with per-dim tables, exact up to float
summation order. Decoding into a float block and multiplying (what ``codes`` +
``torch.mm`` do) costs a gather, a write and a read of 4 bytes per dim instead;
measured on the default model it is what made a read of a 100k-memory bank take
hundreds of milliseconds.

The kernel is compiled by numba (once per process, cached on disk when the package
folder is writable). It is serial and releases the GIL: large calls are split over
a few threads here, and concurrent reads run side by side. numba's own parallel
loops would need a threading layer that is safe under concurrent callers (TBB or
OpenMP), which a slim image may lack.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .bitkernels import jit
from .transform import BitPacker

PARALLEL_ROWS = 16_384  # below this, one thread: a hand-off costs more than it saves
_BLOCK_ROWS = 256  # rows a scan scores for every query before moving on (48 KB at 192 B)

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()),
                                       thread_name_prefix="apcm-lut")
        return _pool


PREFETCH_AHEAD = 4  # rows ahead of the one scored whose bytes are asked for early


@intrinsic
def _prefetch(typingctx, codes, i, j):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Asks the CPU to fetch the cache line of ``codes[i, j]`` (a C-contiguous 2-d
    array) ahead of its use: LLVM's prefetch, a hint that never faults. A probe's rows
    are scattered over the bank, and without it each row's cache misses waited in
    turn: 0.40 us per 192-byte code at 1M slots, 0.13 us with it (rows in order: 0.06)."""
    sig = types.void(codes, i, j)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        at = cgutils.get_item_pointer(context, builder, array_type, array, [args[1], args[2]])
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
            "llvm.prefetch.p0")
        # read access, keep in every cache level, data cache
        builder.call(fn, [builder.bitcast(at, byte_ptr), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@jit
def _scan(codes: np.ndarray, rows: np.ndarray, byte_lut: np.ndarray, lut: np.ndarray,
          base: np.ndarray, word: np.ndarray, shift: np.ndarray, mask: np.ndarray,
          out: np.ndarray) -> None:  # pragma: no cover
    """out[q, i] = query q's dot with code ``codes[rows[i]]`` (``codes[i]`` when ``rows``
    is empty). Four partial sums per code: one sum would chain every add on the
    previous one's latency, which measured 4x slower than the table reads."""
    n_bytes = codes.shape[1]
    n_q, n_split = lut.shape[0], word.shape[0]
    indexed = rows.shape[0] > 0
    n = out.shape[1]
    # rows in blocks, each block scored query by query: one query's byte tables
    # (n_bytes x 1 KB) and the block stay in cache together, where all queries'
    # tables at once overflow it from a few queries on
    for b0 in range(0, n, _BLOCK_ROWS):
        b1 = min(n, b0 + _BLOCK_ROWS)
        for q in range(n_q):
            table = byte_lut[q]
            for i in range(b0, b1):
                if indexed and q == 0 and i + PREFETCH_AHEAD < n:
                    ahead = rows[i + PREFETCH_AHEAD]
                    for line in range(0, n_bytes, 64):
                        _prefetch(codes, ahead, line)  # type: ignore[call-arg]
                row = codes[rows[i]] if indexed else codes[i]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                j = 0
                while j + 4 <= n_bytes:
                    a0 += table[j, row[j]]
                    a1 += table[j + 1, row[j + 1]]
                    a2 += table[j + 2, row[j + 2]]
                    a3 += table[j + 3, row[j + 3]]
                    j += 4
                while j < n_bytes:
                    a0 += table[j, row[j]]
                    j += 1
                for f in range(n_split):
                    k = word[f]
                    w = np.int32(row[k]) << 8
                    if k + 1 < n_bytes:
                        w |= np.int32(row[k + 1])
                    a1 += lut[q, base[f] + ((w >> shift[f]) & mask[f])]
                out[q, i] = (a0 + a1) + (a2 + a3)


@jit
def _byte_tables(lut: np.ndarray, slot: np.ndarray, base: np.ndarray, shift: np.ndarray,
                 mask: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    out[:] = 0.0
    for q in range(lut.shape[0]):
        for f in range(slot.shape[0]):
            j, b, s, m = slot[f], base[f], shift[f], mask[f]
            for v in range(256):
                out[q, j, v] += lut[q, b + ((v >> s) & m)]


class LutScorer:
    """Dot products of search-space queries with the decoded items of packed codes.

    Fields that lie inside one byte are summed per byte ahead of the scan: byte j's
    256-entry table holds, for each byte value, the sum of its fields' entries, so
    a code costs one lookup per byte plus one two-byte extraction per field that
    crosses a byte boundary. In the codec's wire layout (fields in width order) about
    half the fields cross one; in the layout banks store (``byte_aligned_order``)
    only a handful do, which made the scan 3-4x faster per code.

    Args:
        packer: the codes' bit layout.
        table: [T] float32 cell values of every dim, dim d's at ``offset[d] + cell``.
        offset: [d] int, where each dim's cells start in ``table``.
        bias: [d] float32 added to every decoded vector (``v = table[...] + bias``).
    """

    def __init__(self, packer: BitPacker, table: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor) -> None:
        self.table = table.detach().cpu().float().numpy()
        offset_np = offset.detach().cpu().to(torch.int64).numpy()
        d = offset_np.shape[0]
        self.dim_of = np.zeros(self.table.shape[0], dtype=np.int64)
        for i in range(d):  # entries of dim i: offset[i] up to the next dim's
            self.dim_of[offset_np[i]:] = i
        mask = packer._mask.numpy().astype(np.int64)
        word = packer._word.numpy().astype(np.int64)
        shift = packer._wshift.numpy().astype(np.int64)
        coded = np.flatnonzero(mask > 0)
        whole = coded[shift[coded] >= 8]  # window shift >= 8: the field is in byte ``word``
        split = coded[shift[coded] < 8]
        self.word, self.shift = word[split], shift[split].astype(np.int32)
        self.mask, self.base = mask[split].astype(np.int32), offset_np[split]
        self.n_bytes = packer.n_bytes  # one table per byte, all-zero where no field is whole
        self.whole_slot = word[whole].astype(np.int64)  # field -> its byte's table
        self.whole_base = offset_np[whole]
        self.whole_shift = (shift[whole] - 8).astype(np.int32)  # within its byte
        self.whole_mask = mask[whole].astype(np.int32)
        # uncoded dims always decode to their cell 0: a constant per query
        uncoded = np.setdiff1d(np.arange(d), coded)
        constant = np.zeros(d, dtype=np.float32)
        constant[uncoded] = self.table[offset_np[uncoded]]
        self.bias = bias.detach().cpu().float().numpy() + constant
        self.dim = d
        self.scores(np.zeros((1, d), np.float32),
                    np.zeros((1, packer.n_bytes), np.uint8))  # compile now, not on a read

    def scores(self, queries: np.ndarray, codes: np.ndarray,
               rows: np.ndarray | None = None) -> np.ndarray:
        """Queries [Q, d] float32 and codes [c, n_bytes] uint8 -> dots [Q, c] float32;
        with ``rows`` [r] int64, of ``codes[rows]`` -> [Q, r], read in place (a probe
        scores its lists' slots without copying their codes out)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        codes = np.ascontiguousarray(codes)
        at = _NO_ROWS if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        n = codes.shape[0] if rows is None else at.shape[0]
        out = np.empty((queries.shape[0], n), dtype=np.float32)
        if n == 0:
            return out
        lut = queries[:, self.dim_of] * self.table[None, :]
        byte_lut = np.empty((queries.shape[0], self.n_bytes, 256), dtype=np.float32)
        _byte_tables(lut, self.whole_slot, self.whole_base, self.whole_shift, self.whole_mask,
                     byte_lut)
        parts = min(torch.get_num_threads(), n // PARALLEL_ROWS)
        tables = (byte_lut, lut, self.base, self.word, self.shift, self.mask)
        if parts <= 1:
            _scan(codes, at, *tables, out)
        else:
            bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
            spans = list(zip(bounds[:-1], bounds[1:], strict=True))
            blocks = [np.empty((queries.shape[0], b - a), dtype=np.float32) for a, b in spans]
            futures = [_executor().submit(_scan, *_part(codes, at, a, b), *tables, block)
                       for (a, b), block in zip(spans, blocks, strict=True)]
            for (a, b), block, future in zip(spans, blocks, futures, strict=True):
                future.result()
                out[:, a:b] = block
        out += (queries @ self.bias)[:, None]
        return out


_NO_ROWS = np.empty(0, dtype=np.int64)


def _part(codes: np.ndarray, rows: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The codes and row ids of positions [a, b) of a scan (views, no copy)."""
    return (codes, rows[a:b]) if rows.shape[0] else (codes[a:b], rows)

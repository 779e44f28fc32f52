"""Transform coding of the IDRP latent: per-dim uniform quantisers, integer bit
allocation and bit packing (the code of :mod:`apcm.server.codecs.idrp.v2`).

Fitting is numpy float64 (deterministic, done once); serving is torch.

- Quantiser of dim i with ``b_i`` bits: midrise uniform, centred at 0, clamped to
  ``2**b_i`` cells, ``cell = clip(floor(z / step_i + 2**b_i / 2), 0, 2**b_i - 1)``;
  each cell decodes to a table value (its training mean, shrunk toward the cell
  midpoint with weight 2). Dims with ``b_i = 0`` are not coded (``z_aux``).
- Step: the MSE-optimal uniform step for N(0, 1) at ``b`` bits (``gauss_step``)
  x the dim's std x a factor from 15 log-spaced values in [0.6, 1.6], the one with
  the lowest training MSE.
- Allocation: ``sum_i b_i = 8 * budget`` exactly, ``0 <= b_i <= 8``, minimising the
  sum of measured per-dim distortions by dynamic programming (a multiple-choice
  knapsack; integer reverse water-filling is the special case of Gaussian
  distortions).
- Robustness to a shift of the variance spectrum (fitting only; the coder is the
  same): ``hedge`` h allocates bits and scales steps as if dim i's variance were
  ``(1 - h) var_i + h mean(var)`` instead of the training ``var_i`` (sentence
  embeddings of another register put energy where training had little);
  ``rotate_groups`` turns each group of dims given the same width by a seeded
  random orthogonal matrix (same rate; spreads an unseen source's energy evenly
  over the group, so one range fits all of it). ``h = 0`` without rotation is the
  plain classical coder.
- Packing: fields grouped by width (ascending), dims ascending within a width, each
  field MSB first, bytes MSB first (``numpy.packbits`` order): exactly ``budget``
  bytes, no padding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import bitkernels

MAX_BITS = 8
STEP_FACTORS = np.exp(np.linspace(np.log(0.6), np.log(1.6), 15))
CENTROID_SHRINK = 2.0


def _uniform_mse(x: np.ndarray, w: np.ndarray, step: float, levels: int) -> float:
    q = np.clip(np.floor(x / step + levels / 2), 0, levels - 1)
    return float((w * (x - (q + 0.5 - levels / 2) * step) ** 2).sum())


@functools.cache
def gauss_step(bits: int) -> float:
    """MSE-optimal step of a ``bits``-bit midrise uniform quantiser for N(0, 1)."""
    x = np.linspace(-12, 12, 48001)
    w = np.exp(-0.5 * x * x)
    w /= w.sum()
    levels = 2**bits
    lo, hi = 1e-4, 8.0 / levels * 2 + 2.0
    for _ in range(80):  # golden-section search: the MSE is unimodal in the step
        a, c = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if _uniform_mse(x, w, a, levels) < _uniform_mse(x, w, c, levels):
            hi = c
        else:
            lo = a
    return 0.5 * (lo + hi)


def allocate_bits(dist: np.ndarray, total_bits: int) -> np.ndarray:
    """Exact integer allocation: argmin sum_i dist[i, b_i] s.t. sum_i b_i == total_bits.

    Args:
        dist: [d, B + 1] distortion of dim i at b bits (column 0: not coded).
        total_bits: bits to spend, at most d * B.

    Returns:
        bits [d] int64.
    """
    d, nb = dist.shape
    if not 0 <= total_bits <= d * (nb - 1):
        raise ValueError(f"cannot spend {total_bits} bits on {d} dims of at most {nb - 1}")
    cost = np.full(total_bits + 1, np.inf)
    cost[0] = 0.0
    choice = np.zeros((d, total_bits + 1), dtype=np.int8)
    for i in range(d):
        best = np.full(total_bits + 1, np.inf)
        arg = np.zeros(total_bits + 1, dtype=np.int8)
        for b in range(min(nb, total_bits + 1)):
            cand = np.full(total_bits + 1, np.inf)
            cand[b:] = cost[: total_bits + 1 - b] + dist[i, b]
            better = cand < best
            best[better], arg[better] = cand[better], b
        cost, choice[i] = best, arg
    bits = np.zeros(d, dtype=np.int64)
    t = total_bits
    for i in range(d - 1, -1, -1):
        bits[i] = choice[i, t]
        t -= int(bits[i])
    return bits


def _cells(z: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    levels = 2**bits
    return np.clip(np.floor(z / step + levels / 2), 0, levels - 1)


def _centroid_mse(z: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    """Per-column MSE [k] of z [N, k] quantised with ``bits`` bits, cells at their means."""
    q = _cells(z, step, bits).astype(np.int64)
    levels = 2**bits
    err = np.zeros(z.shape[1])
    for j in range(z.shape[1]):
        cnt = np.bincount(q[:, j], minlength=levels)
        s1 = np.bincount(q[:, j], weights=z[:, j], minlength=levels)
        s2 = np.bincount(q[:, j], weights=z[:, j] ** 2, minlength=levels)
        nz = cnt > 0
        err[j] = (s2[nz] - s1[nz] ** 2 / cnt[nz]).sum() / len(z)
    return err


def fit_steps(z: np.ndarray, max_bits: int = MAX_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim, per-width steps and their training distortions.

    Args:
        z: training latents [N, d] (float64).

    Returns:
        steps [d, max_bits + 1] and dist [d, max_bits + 1] (column 0: step 0 and
        E z_i^2, the cost of not coding dim i and predicting 0).
    """
    d = z.shape[1]
    sigma = np.sqrt(np.maximum(z.var(0), 1e-24))
    steps = np.zeros((d, max_bits + 1))
    dist = np.zeros((d, max_bits + 1))
    dist[:, 0] = (z**2).mean(0)
    for b in range(1, max_bits + 1):
        base = gauss_step(b) * sigma
        errs = np.stack([_centroid_mse(z, base * g, b) for g in STEP_FACTORS])
        k = errs.argmin(0)
        steps[:, b] = base * STEP_FACTORS[k]
        dist[:, b] = errs[k, np.arange(d)]
    return steps, dist


def build_table(z: np.ndarray, step: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction values of every cell: training mean shrunk to the midpoint.

    Args:
        z: training latents [N, d]. step, bits: [d].

    Returns:
        table [sum_i max(2**b_i, 1)] float32 (an uncoded dim has one entry, 0) and
        offset [d] int64, the start of dim i's block.
    """
    sizes = np.where(bits > 0, 1 << bits, 1)
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    table = np.zeros(int(sizes.sum()), dtype=np.float64)
    for j in np.flatnonzero(bits > 0):
        levels = 1 << int(bits[j])
        mid = (np.arange(levels) + 0.5 - levels / 2) * step[j]
        q = _cells(z[:, j], step[j], int(bits[j])).astype(np.int64)
        cnt = np.bincount(q, minlength=levels)
        s1 = np.bincount(q, weights=z[:, j], minlength=levels)
        shrunk = (s1 + CENTROID_SHRINK * mid) / (cnt + CENTROID_SHRINK)
        table[offset[j]: offset[j] + levels] = shrunk
    return table.astype(np.float32), offset


@dataclass
class QuantizerFit:
    """A fitted transform quantiser (numpy), see :func:`fit_quantizer`.

    ``rotation`` [d, d] (orthogonal, block diagonal over equal-width groups) when the
    fit rotated the latent: the quantiser codes ``z @ rotation.T``; None otherwise.
    """

    bits: np.ndarray  # [d] int64
    step: np.ndarray  # [d] float32, 0 where bits == 0
    table: np.ndarray  # [T] float32
    offset: np.ndarray  # [d] int64
    rotation: np.ndarray | None = None


def hedge_ratio(var: np.ndarray, hedge: float) -> np.ndarray:
    """[d] ratio of the hedged variance ``(1 - h) var + h mean(var)`` to ``var``."""
    target = (1.0 - hedge) * var + hedge * var.mean()
    return target / np.maximum(var, 1e-24)


def fit_steps_at(z: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Per-dim steps [d] at given widths (0 where ``bits`` is 0), searched as in
    :func:`fit_steps`."""
    sigma = np.sqrt(np.maximum(z.var(0), 1e-24))
    step = np.zeros(z.shape[1])
    for w in np.unique(bits[bits > 0]).tolist():
        cols = np.flatnonzero(bits == w)
        base = gauss_step(w) * sigma[cols]
        errs = np.stack([_centroid_mse(z[:, cols], base * g, w) for g in STEP_FACTORS])
        step[cols] = base * STEP_FACTORS[errs.argmin(0)]
    return step


def group_rotation(bits: np.ndarray, seed: int) -> np.ndarray:
    """Block-diagonal orthogonal [d, d]: a random rotation of each group of dims with
    the same non-zero width (widths ascending, dims ascending within a group; one
    ``numpy.random.default_rng(seed)``, Q of the QR of a standard normal matrix with
    ``diag(R) > 0``); identity on uncoded dims and on groups of one."""
    d = len(bits)
    rot = np.eye(d)
    rng = np.random.default_rng(seed)
    for w in np.unique(bits[bits > 0]).tolist():
        idx = np.flatnonzero(bits == w)
        if len(idx) < 2:
            continue
        q, r = np.linalg.qr(rng.standard_normal((len(idx), len(idx))))
        rot[np.ix_(idx, idx)] = q * np.sign(np.diag(r))
    return rot


def fit_quantizer(z: np.ndarray, budget_bytes: int, n_fit: int = 8000, seed: int = 0,
                  max_bits: int = MAX_BITS, hedge: float = 0.0,
                  rotate_groups: bool = False, hedge_steps: bool = True) -> QuantizerFit:
    """Steps and allocation on a seeded subsample of ``n_fit`` rows, tables on all of ``z``.

    Args:
        z: training latents [N, d].
        budget_bytes: bytes per code; ``8 * budget_bytes`` bits are allocated.
        hedge: 0..1, variance hedge toward isotropic for allocation and (with
            ``hedge_steps``) steps.
        rotate_groups: rotate each equal-width group (``rotation`` of the result),
            then refit the steps of the rotated latent at the same widths.
    """
    z = np.asarray(z, dtype=np.float64)
    sub = z[np.random.default_rng(seed).permutation(len(z))[:n_fit]]
    steps, dist = fit_steps(sub, max_bits)
    ratio = hedge_ratio(sub.var(0), hedge) if hedge > 0 else np.ones(z.shape[1])
    bits = allocate_bits(dist * ratio[:, None], 8 * budget_bytes)
    rotation = None
    if rotate_groups:
        rotation = group_rotation(bits, seed)
        z, sub = z @ rotation.T, sub @ rotation.T
        step = fit_steps_at(sub, bits)
        if hedge > 0 and hedge_steps:
            step = step * np.sqrt(hedge_ratio(sub.var(0), hedge))
    else:
        step = steps[np.arange(z.shape[1]), bits] * (np.sqrt(ratio) if hedge_steps else 1.0)
    step[bits == 0] = 0.0
    step32 = step.astype(np.float32)
    table, offset = build_table(z.astype(np.float32), step32, bits)
    return QuantizerFit(bits, step32, table, offset, rotation)


def refit_table(z: np.ndarray, fit: QuantizerFit) -> QuantizerFit:
    """Same bits and steps, tables refitted on new latents (after a flow changed them)."""
    table, offset = build_table(np.asarray(z, np.float32), fit.step, fit.bits)
    return QuantizerFit(fit.bits, fit.step, table, offset)


def bit_layout(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which dim and which bit of its field each packed bit carries (the format's
    definition, one entry per bit; :class:`BitPacker` is the fast equivalent).

    Returns:
        dim [8 * budget] int64 and shift [8 * budget] int64 (bit position in the field,
        MSB first), in packing order.
    """
    dims: list[int] = []
    shifts: list[int] = []
    for w in torch.unique(bits[bits > 0]).tolist():
        for i in torch.nonzero(bits == w).flatten().tolist():
            dims.extend([i] * w)
            shifts.extend(range(w - 1, -1, -1))
    return torch.tensor(dims, dtype=torch.int64), torch.tensor(shifts, dtype=torch.int64)


_BYTE_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def pack(cells: torch.Tensor, dim: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Cells [B, d] int -> packed codes [B, len(dim) / 8] uint8, bit by bit (reference)."""
    bitvals = (cells[:, dim].to(torch.int32) >> shift.to(torch.int32)) & 1
    weights = _BYTE_WEIGHTS.to(cells.device)
    return (bitvals.view(cells.shape[0], -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack(codes: torch.Tensor, dim: torch.Tensor, shift: torch.Tensor, d: int) -> torch.Tensor:
    """Packed codes [B, nbytes] uint8 -> cells [B, d] int64 (0 for uncoded dims), bit by
    bit (reference)."""
    n = codes.shape[0]
    bitvals = (codes.to(torch.int64).unsqueeze(-1) >> (7 - torch.arange(8, device=codes.device)))
    bitvals = (bitvals & 1).view(n, -1) << shift
    cells = torch.zeros(n, d, dtype=torch.int64, device=codes.device)
    return cells.index_add_(1, dim, bitvals)


def _byte_fillings(width: int = 8) -> list[tuple[int, ...]]:
    """Every multiset of field widths (1..8) that fills one byte, widest fields first."""
    out: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], left: int, most: int) -> None:
        if left == 0:
            out.append(prefix)
        for w in range(min(left, most), 0, -1):
            extend(prefix + (w,), left - w, w)

    extend((), width, width)
    return out


_FILLINGS = _byte_fillings()


def byte_aligned_order(bits: torch.Tensor) -> list[int]:
    """An order of the coded dims in which as few fields as possible cross a byte.

    Bytes are filled one at a time with the widest-first set of remaining fields
    that fills a byte exactly; the fields no exact filling takes go last, in the
    wire order. A field inside one byte is scored by that byte's 256-entry table; one
    across two bytes needs both bytes and its own lookup (``lutscan``), which is why
    a bank stores its codes in this order.
    """
    widths = bits.detach().cpu().to(torch.int64).tolist()
    by_width: dict[int, list[int]] = {}
    for i in sorted(range(len(widths)), key=lambda i: (widths[i], i)):
        if widths[i] > 0:
            by_width.setdefault(widths[i], []).append(i)
    order: list[int] = []
    while True:
        for filling in _FILLINGS:
            need: dict[int, int] = {}
            for w in filling:
                need[w] = need.get(w, 0) + 1
            if all(len(by_width.get(w, ())) >= n for w, n in need.items()):
                order.extend(by_width[w].pop(0) for w in filling)
                break
        else:
            break
    return order + sorted((i for dims in by_width.values() for i in dims),
                          key=lambda i: (widths[i], i))


class BitPacker:
    """The packing of :func:`bit_layout`, a field (not a bit) at a time.

    A field of ``w <= 8`` bits starting at stream bit ``p`` lies in the 16-bit window
    of bytes ``p // 8`` and ``p // 8 + 1``, shifted left by ``a = 16 - w - p % 8``.
    Packing cuts each field's window into its part in the first byte and, when the
    field crosses a byte boundary, its part in the second; in stream order these
    parts land on non-decreasing bytes, and fields never share a bit, so each byte
    is the sum of a contiguous run of parts (a cumulative sum read at run ends).
    Unpacking reads every dim's window from the byte pairs and masks its field.
    That is the torch formulation (``pack_torch``, ``unpack_torch``: any device); on
    the CPU the same bytes come from compiled kernels that stream each row's fields
    through a bit accumulator (:mod:`apcm.server.codecs.idrp.bitkernels`), which also
    fuse quantising into packing and table lookup into unpacking.

    Args:
        bits: [d] int bits per dim, summing to a multiple of 8.
        order: the coded dims in stream order (default: by width, then dim, the
            codec's wire layout; ``byte_aligned_order`` gives a layout for scanning).
    """

    def __init__(self, bits: torch.Tensor, order: list[int] | None = None) -> None:
        widths = bits.detach().cpu().to(torch.int64)
        total = int(widths.sum())
        if total % 8 or bool((widths < 0).any()) or bool((widths > MAX_BITS).any()):
            raise ValueError(f"bits must be 0..{MAX_BITS} per dim summing to whole bytes, "
                             f"got a sum of {total}")
        self.d, self.n_bytes = len(widths), total // 8
        coded = sorted(torch.nonzero(widths > 0).flatten().tolist(),
                       key=lambda i: (int(widths[i]), i))
        if order is None:
            order = coded
        elif sorted(order) != sorted(coded):
            raise ValueError("order must name every coded dim once")
        parts: list[tuple[int, int, int, int]] = []  # (dim, left shift, right shift, byte)
        word = torch.zeros(self.d, dtype=torch.int64)
        wshift = torch.zeros(self.d, dtype=torch.int64)
        mask = torch.zeros(self.d, dtype=torch.int64)
        p = 0
        for i in order:
            w = int(widths[i])
            k, a = p // 8, 16 - w - p % 8
            word[i], wshift[i], mask[i] = k, a, (1 << w) - 1
            parts.append((i, a, 8, k))
            if p % 8 + w > 8:
                parts.append((i, a, 0, k + 1))
            p += w
        table = torch.tensor(parts, dtype=torch.int64).reshape(-1, 4)
        self._src = table[:, 0].contiguous()
        self._lshift = table[:, 1].to(torch.int32)
        self._rshift = table[:, 2].to(torch.int32)
        byte_t = table[:, 3].contiguous()
        # index of the last part of each byte (every byte holds at least one bit)
        self._run_end = torch.searchsorted(byte_t, torch.arange(self.n_bytes), right=True) - 1
        self._word, self._wshift, self._mask = word, wshift.to(torch.int32), mask.to(torch.int32)
        # the compiled CPU kernels walk the fields in stream order
        self._dims = np.asarray(order, dtype=np.int64)
        self._widths = widths.numpy()[self._dims]

    def to(self, device: torch.device | str) -> BitPacker:
        for name in ("_src", "_lshift", "_rshift", "_run_end", "_word", "_wshift", "_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def pack(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells [B, d] int (0 .. 2**b_i - 1) -> codes [B, n_bytes] uint8."""
        if cells.device.type != "cpu":
            return self.pack_torch(cells)
        out = torch.empty(cells.shape[0], self.n_bytes, dtype=torch.uint8)
        bitkernels.pack_cells(cells.contiguous().numpy(), self._dims, self._widths, out.numpy())
        return out

    def pack_torch(self, cells: torch.Tensor) -> torch.Tensor:
        """``pack`` in torch ops, on any device (a field's parts summed per byte)."""
        parts = cells.index_select(1, self._src).to(torch.int32)  # fresh: shift in place
        parts.bitwise_left_shift_(self._lshift).bitwise_right_shift_(self._rshift)
        ends = parts.bitwise_and_(255).cumsum(1, dtype=torch.int32).index_select(1, self._run_end)
        out = ends.clone()
        out[:, 1:] -= ends[:, :-1]
        return out.to(torch.uint8)

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, n_bytes] uint8 -> cells [B, d] int32 (0 for uncoded dims)."""
        if codes.shape[1] != self.n_bytes:
            raise ValueError(f"codes have {codes.shape[1]} bytes, the layout {self.n_bytes}")
        if codes.device.type != "cpu":
            return self.unpack_torch(codes)
        cells = torch.zeros(codes.shape[0], self.d, dtype=torch.int32)
        bitkernels.unpack_cells(codes.contiguous().numpy(), self._dims, self._widths,
                                cells.numpy())
        return cells

    def unpack_torch(self, codes: torch.Tensor) -> torch.Tensor:
        """``unpack`` in torch ops, on any device (every dim's 16-bit window, masked)."""
        padded = torch.nn.functional.pad(codes.to(torch.int32), (0, 1))
        words = (padded[:, :-1] << 8).bitwise_or_(padded[:, 1:])
        fields = words.index_select(1, self._word)  # fresh: shift and mask in place
        return fields.bitwise_right_shift_(self._wshift).bitwise_and_(self._mask)

    def quantize_pack(self, y: torch.Tensor, step: torch.Tensor, half: torch.Tensor,
                      ) -> torch.Tensor:
        """Latents y [B, d] float32 on the CPU -> codes [B, n_bytes] uint8 of the cells
        ``clip(floor(y / step + half), 0, 2**b_i - 1)`` (step, half [d] float32), without
        the cells in between: ``pack(cells)`` to the byte."""
        out = torch.empty(y.shape[0], self.n_bytes, dtype=torch.uint8)
        bitkernels.quantize_pack(y.contiguous().numpy(), step.contiguous().numpy(),
                                 half.contiguous().numpy(), self._dims, self._widths,
                                 out.numpy())
        return out

    def unpack_lookup(self, codes: torch.Tensor, table: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
        """Codes [B, n_bytes] uint8 on the CPU -> ``table[offset + cells]`` [B, d]
        float32 (uncoded dims: ``table[offset]``), without the cells in between."""
        if codes.shape[1] != self.n_bytes:
            raise ValueError(f"codes have {codes.shape[1]} bytes, the layout {self.n_bytes}")
        out = torch.empty(codes.shape[0], self.d, dtype=torch.float32)
        bitkernels.unpack_lookup(codes.contiguous().numpy(), self._dims, self._widths,
                                 table.contiguous().numpy(), offset.contiguous().numpy(),
                                 out.numpy())
        return out

"""Classical transform-coding pieces for the baselines (numpy only).

- :data:`GAUSS_STEP`: step / sigma of the MSE-optimal uniform midrise quantiser
  (clamped to 2^b cells) for N(0, 1), per bit width b, computed numerically;
  :func:`gauss_mse` its normalised distortion.
- :func:`allocate_bits`: exact integer bit allocation minimising the summed
  distortion under a total bit budget (multiple-choice knapsack by dynamic
  programming); with distortion var_i * gauss_mse(b) it is the integer form of
  reverse water-filling on the variances.
- :func:`pack` / :func:`unpack`: fields of different widths <-> exactly
  ceil(sum(bits) / 8) bytes per item.

Ported from the transform-codec prototype of issue 11 (``tcodec.py``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MAX_BITS = 8


def _grid() -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-10, 10, 20001)
    w = np.exp(-0.5 * x * x)
    return x, w / w.sum()


def _q_mse(x: np.ndarray, w: np.ndarray, step: float, levels: int) -> float:
    q = np.clip(np.floor(x / step + levels / 2), 0, levels - 1)
    return float((w * (x - (q + 0.5 - levels / 2) * step) ** 2).sum())


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(step, mse) of the optimal uniform quantiser of N(0,1) for b = 0..MAX_BITS."""
    x, w = _grid()
    step, err = np.zeros(MAX_BITS + 1), np.ones(MAX_BITS + 1)
    for b in range(1, MAX_BITS + 1):
        levels = 2**b
        lo, hi = 1e-4, 8.0 / levels * 2 + 2.0
        for _ in range(50):  # golden-section search on a unimodal MSE
            a, c = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
            if _q_mse(x, w, a, levels) < _q_mse(x, w, c, levels):
                hi = c
            else:
                lo = a
        step[b] = 0.5 * (lo + hi)
        err[b] = _q_mse(x, w, step[b], levels)
    return step, err


def gauss_step(bits: np.ndarray) -> np.ndarray:
    """Step / sigma per width (0 for 0 bits)."""
    return _tables()[0][np.asarray(bits, dtype=np.int64)]


def gauss_mse(bits: np.ndarray) -> np.ndarray:
    """Distortion / variance of the optimal uniform quantiser of a Gaussian, per width."""
    return _tables()[1][np.asarray(bits, dtype=np.int64)]


def allocate_bits(dist: np.ndarray, total_bits: int) -> np.ndarray:
    """Integer widths b_i minimising sum_i dist[i, b_i] with sum b_i == total_bits.

    Args:
        dist: [d, B+1] distortion of dim i at b bits (b = 0: not coded).
        total_bits: the budget; more than d * B is clipped to d * B.
    """
    d, nb = dist.shape
    total_bits = min(int(total_bits), d * (nb - 1))
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
    if t != 0:
        raise AssertionError("bit allocation did not spend the budget")
    return bits


def quantize(z: np.ndarray, step: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """[N, k] -> cell indices in [0, 2^b): midrise uniform quantiser centred at 0, clamped."""
    levels = (1 << bits).astype(np.float64)
    return np.clip(np.floor(z / step + levels / 2), 0, levels - 1).astype(np.int64)


def dequantize(q: np.ndarray, step: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Cell indices -> cell midpoints."""
    levels = (1 << bits).astype(np.float64)
    return (q + 0.5 - levels / 2) * step


def pack(codes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """[N, d] integer fields of widths ``bits`` -> [N, ceil(sum bits / 8)] uint8, MSB first."""
    chunks = []
    for w in np.unique(bits[bits > 0]):
        dims = np.flatnonzero(bits == w)
        shifts = np.arange(w - 1, -1, -1, dtype=np.int64)
        chunks.append(((codes[:, dims, None] >> shifts) & 1).astype(np.uint8)
                      .reshape(len(codes), -1))
    return np.packbits(np.concatenate(chunks, axis=1), axis=1)


def unpack(data: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack`: [N, nbytes] uint8 -> [N, d] int64 (0 where bits == 0)."""
    n, d = len(data), len(bits)
    flat = np.unpackbits(data, axis=1)
    codes = np.zeros((n, d), dtype=np.int64)
    pos = 0
    for w in np.unique(bits[bits > 0]):
        dims = np.flatnonzero(bits == w)
        seg = flat[:, pos: pos + w * len(dims)].reshape(n, len(dims), w).astype(np.int64)
        codes[:, dims] = seg @ (1 << np.arange(w - 1, -1, -1, dtype=np.int64))
        pos += w * len(dims)
    return codes

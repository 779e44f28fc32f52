"""Reconstruction and retrieval metrics on flattened items [N, d] (numpy, float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(np.mean((x.astype(np.float64) - x_hat) ** 2))


def mae(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(np.mean(np.abs(x.astype(np.float64) - x_hat)))


def psnr(x: np.ndarray, x_hat: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over the whole set, peak = ``data_range``."""
    err = mse(x, x_hat)
    return float("inf") if err == 0 else float(10 * np.log10(data_range**2 / err))


def mean_cosine(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean cosine similarity between each item and its reconstruction."""
    num = np.sum(x * x_hat, axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k_cosine(queries: np.ndarray, base: np.ndarray, k: int,
                 exclude_self: bool = True, block: int = 1024) -> np.ndarray:
    """Ids [Q, k] of each query's k most cosine-similar base items, best first.

    With ``exclude_self`` query i is base item i and is not its own neighbour.
    Computed in float32, ``block`` queries at a time.
    """
    q, b = _unit(queries), _unit(base)
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), block):
        sims = q[start:start + block] @ b.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[start:start + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall_of(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean overlap |approx_i & exact_i| / k of two id arrays [Q, k]."""
    k = exact.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def recall_at_k(x: np.ndarray, x_hat: np.ndarray, k: int = 10,
                exact: np.ndarray | None = None) -> float:
    """Overlap of cosine top-k neighbours: exact queries vs decoded database, over exact.

    Every held-out item queries the others; the exact neighbours come from the
    original vectors, the approximate ones from the decoded vectors (what a
    memory bank holding only the codes would return). ``exact``: the exact ids
    ``top_k_cosine(x, x, k)`` when already computed.
    """
    if exact is None:
        exact = top_k_cosine(x, x, k)
    return recall_of(top_k_cosine(x, x_hat, k), exact)


def search_recall_at_k(search: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
                       x: np.ndarray, k: int = 10, exact: np.ndarray | None = None) -> float:
    """:func:`recall_at_k` for a search-only method: ``search(queries, base, k)`` -> ids.

    Every item queries the whole set for k + 1 ids; its own id is dropped (or
    the last one if it is not among them).
    """
    if exact is None:
        exact = top_k_cosine(x, x, k)
    ids = search(x, x, k + 1)
    approx = np.stack([
        np.array([j for j in row if j != i][:k]) for i, row in enumerate(ids)])
    return recall_of(approx, exact)

"""Reconstruction and retrieval metrics on flattened items [N, d] (numpy, float64)."""

from __future__ import annotations

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


def _top_k_cosine(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    b = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
    sims = q @ b.T
    np.fill_diagonal(sims, -np.inf)  # an item is not its own neighbour
    return np.argsort(-sims, axis=1)[:, :k]


def recall_at_k(x: np.ndarray, x_hat: np.ndarray, k: int = 10) -> float:
    """Overlap of cosine top-k neighbours: exact queries vs decoded database, over exact.

    Every held-out item queries the others; the exact neighbours come from the
    original vectors, the approximate ones from the decoded vectors (what a
    memory bank holding only the codes would return).
    """
    exact = _top_k_cosine(x, x, k)
    approx = _top_k_cosine(x, x_hat, k)
    hits = [len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)

"""PNG figures for model cards: loss curves and original / IDRP / PCA image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(history: list[dict[str, float]], init_val_mse: float, path: str | Path,
               title: str) -> None:
    """Train loss and validation MSE per epoch, with the PCA init's validation MSE as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (MSE, noisy input)")
    ax.plot(epochs, [h["val_mse"] for h in history], label="validation MSE (stored codes)")
    ax.axhline(init_val_mse, color="grey", linestyle="--", label="init = PCA, validation")
    qat = [h["epoch"] for h in history if h.get("phase", 0) > 0]
    if qat:
        ax.axvspan(min(qat) - 0.5, max(qat) + 0.5, color="orange", alpha=0.15, label="int8 QAT")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reconstruction_grid(rows: dict[str, np.ndarray], path: str | Path, title: str) -> None:
    """One row of images per entry (e.g. original, IDRP, PCA), columns = items.

    Args:
        rows: label -> images [n, H, W], same n for every row.
    """
    plt = _pyplot()
    n = next(iter(rows.values())).shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.0, len(rows) * 1.1), squeeze=False)
    lo = min(float(v.min()) for v in rows.values())
    hi = max(float(v.max()) for v in rows.values())
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

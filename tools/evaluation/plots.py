"""PNG figures: loss curves, original / IDRP / PCA image grids, rate–distortion curves."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np


def _pyplot() -> ModuleType:
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


MODEL_COLOR = "#c00000"  # no baseline gets it: the model's line must stand out


def _is_model(family: str) -> bool:
    return "(model)" in family


def rate_distortion(points: dict[str, list[dict[str, Any]]], metric: str, ylabel: str,
                    path: str | Path, title: str, log_y: bool = False) -> bool:
    """One panel per split: ``metric`` against bytes per code (log x), one line per method family.

    The served models' lines (family ending "(model)") are drawn last, thick, in
    ``MODEL_COLOR`` and listed first in the legend; the baselines are thinner lines
    in muted colours underneath, so a baseline that ties the model cannot hide it.

    Args:
        points: split -> rows with keys ``family``, ``bytes_per_code`` and ``metric``
            (rows whose value is None are left out).
    Returns False (and writes nothing) when no row has a value.
    """
    panels = {s: [r for r in rows if r.get(metric) is not None] for s, rows in points.items()}
    panels = {s: rows for s, rows in panels.items() if rows}
    if not panels:
        return False
    plt = _pyplot()
    ncols = min(2, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows + 0.9),
                             squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    families = sorted({r["family"] for rows in panels.values() for r in rows},
                      key=lambda f: (not _is_model(f), f))
    baselines = [f for f in families if not _is_model(f)]
    cmap = plt.get_cmap("tab10")
    muted = [cmap(i) for i in range(10) if i != 3]  # tab10's red is too close to the model's
    markers = "os^vD<>pPX*h"
    for ax, (split, rows) in zip(axes, panels.items(), strict=False):
        for fam in families:
            pts = sorted((r["bytes_per_code"], r[metric]) for r in rows if r["family"] == fam)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if _is_model(fam):
                ax.plot(xs, ys, marker="o", color=MODEL_COLOR, linewidth=3.2, markersize=7,
                        markeredgecolor="white", zorder=10, label=fam)
            else:
                i = baselines.index(fam)
                ax.plot(xs, ys, marker=markers[i % len(markers)], color=muted[i % len(muted)],
                        linewidth=1.1, markersize=4, alpha=0.75, zorder=2,
                        linestyle="-" if i < len(muted) else "--", label=fam)
        ax.set_xscale("log", base=2)
        budgets = sorted({r["bytes_per_code"] for r in rows})
        ax.set_xticks(budgets, [str(b) for b in budgets], fontsize=7)
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("bytes per code (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(split, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = min(3, len(labels))
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9,
                        frameon=False)
    for text in legend.get_texts():
        if _is_model(text.get_text()):
            text.set_fontweight("bold")
    fig.suptitle(title, fontsize=10)
    legend_in = 0.2 * ((len(labels) + ncol - 1) // ncol) + 0.1
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    _to_palette(path)
    return True


def _to_palette(path: str | Path, colors: int = 96) -> None:
    """Rewrite a PNG with an adaptive palette: line plots keep their look at ~1/3 the bytes."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors)
    small.save(path, optimize=True)

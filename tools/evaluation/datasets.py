"""Loading item arrays for ``apcm train`` / ``apcm eval`` from .npy or .safetensors files.

A safetensors file may hold named splits (``train``, ``val``, ``test``, ...);
a .npy file (read with ``allow_pickle=False``) or a single-tensor file holds
one array that the caller splits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def load_arrays(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in ``path``; a .npy file yields {"data": array}."""
    path = Path(path)
    if path.suffix == ".npy":
        return {"data": torch.from_numpy(np.load(path, allow_pickle=False))}
    if path.suffix == ".safetensors":
        return load_file(str(path))
    raise ValueError(f"{path}: expected a .npy or .safetensors file")


def as_items(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[N, ...] with prod(...) = L*D -> [N, L, D] float32."""
    if x[0].numel() != shape[0] * shape[1]:
        raise ValueError(f"items of shape {tuple(x.shape[1:])} do not fit --shape {shape}")
    return x.reshape(x.shape[0], *shape).float()


def split(x: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of [N, ...] into (rest, held-out ``fraction``)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_out = max(1, int(round(fraction * x.shape[0])))
    return x[order[n_out:]], x[order[:n_out]]


def parse_shape(text: str) -> tuple[int, int]:
    """"L,D" -> (L, D)."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"--shape must be L,D with positive integers, got {text!r}")
    return parts[0], parts[1]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

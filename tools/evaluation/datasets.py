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


def corpus_splits(sources: dict[str, np.ndarray], ood: tuple[str, ...] | list[str],
                  seed: int = 0, fractions: tuple[float, float] = (0.7, 0.8)
                  ) -> dict[str, np.ndarray]:
    """Per-source stratified train/val/test split of a multi-source corpus; OOD sources whole.

    In sorted source order, each in-domain source is shuffled by one seeded numpy
    generator and cut at ``fractions`` (70 % train, 10 % val, 20 % test); the
    concatenated val and test are shuffled again, and each OOD source (in the
    order given) is shuffled and kept whole under its own name. The same generator
    sequence as the issue-11 codec prototype, so its splits are reproduced exactly.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for name in sorted(sources):
        if name in ood:
            continue
        x = sources[name][rng.permutation(len(sources[name]))]
        a, b = int(fractions[0] * len(x)), int(fractions[1] * len(x))
        parts["train"].append(x[:a])
        parts["val"].append(x[a:b])
        parts["test"].append(x[b:])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    for k in ("val", "test"):
        out[k] = out[k][rng.permutation(len(out[k]))]
    for name in ood:
        out[name] = sources[name][rng.permutation(len(sources[name]))]
    return out

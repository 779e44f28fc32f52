"""Binarised 16x16 patches of scikit-image's ``gravel`` texture (the paper's rock images).

The 512x512 grey image is binarised at the median of its training half (left
256 columns). Train = left half, rows 0-383 (stride 4); validation = left half,
rows 384-511 (stride 4; no patch overlaps the training rows); test = right
half (stride 8). The training patches are augmented with the 8 flips/rotations
of the square (the texture has no preferred orientation). Writes
``data/gravel/gravel.safetensors`` (``train``, ``val``, ``test`` [N, 16, 16]
float32 in {0, 1}) and the committed fixture
``tests/fixtures/gravel_heldout.safetensors`` (256 test patches).

``--grey`` keeps the grey levels (0-255, no binarisation) and writes
``data/gravel/gravel-grey.safetensors`` and ``tests/fixtures/gravel_grey_heldout.safetensors``
instead (the IDRP v2 ``gravel-grey`` model).

Usage: ``.venv/bin/python scripts/prepare_gravel.py [--grey]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PATCH = 16


def patches(image: np.ndarray, stride: int) -> np.ndarray:
    """All PATCH x PATCH windows of ``image`` [H, W] at ``stride`` -> [N, PATCH, PATCH]."""
    h, w = image.shape
    return np.stack([
        image[r : r + PATCH, c : c + PATCH]
        for r in range(0, h - PATCH + 1, stride)
        for c in range(0, w - PATCH + 1, stride)
    ])


def dihedral(p: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [8N, H, W]: the four rotations of p and of its transpose."""
    views = [np.rot90(q, k, axes=(1, 2)) for q in (p, p.transpose(0, 2, 1)) for k in range(4)]
    return np.concatenate(views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/gravel", help="output folder (git-ignored)")
    parser.add_argument("--fixture", default="tests/fixtures/gravel_heldout.safetensors",
                        help="small committed test fixture")
    parser.add_argument("--no-augment", action="store_true",
                        help="do not add the flips/rotations of the training patches")
    parser.add_argument("--fixture-size", type=int, default=256, help="patches in the fixture")
    parser.add_argument("--grey", action="store_true", help="keep grey levels (0-255)")
    args = parser.parse_args()
    if args.grey and args.fixture == parser.get_default("fixture"):
        args.fixture = "tests/fixtures/gravel_grey_heldout.safetensors"

    from skimage import data

    grey = data.gravel().astype(np.float64)
    left, right = grey[:, :256], grey[:, 256:]
    threshold = float(np.median(left))
    binary = (lambda a: a.astype(np.float32)) if args.grey \
        else (lambda a: (a > threshold).astype(np.float32))
    splits = {
        "train": patches(binary(left[:384]), 4),
        "val": patches(binary(left[384:]), 4),
        "test": patches(binary(right), 8),
    }
    if not args.no_augment:
        splits["train"] = dihedral(splits["train"])
    meta = {"augment": str(not args.no_augment), "source": "skimage.data.gravel()",
            "threshold": "none (grey levels)" if args.grey else str(threshold),
            "splits": "train=left half rows 0-383 stride 4; val=left rows 384-511 stride 4; "
                      "test=right half stride 8"}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in splits.items()}
    print({k: tuple(v.shape) for k, v in tensors.items()}, "threshold", threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ("gravel-grey.safetensors" if args.grey
                                  else "gravel.safetensors")), metadata=meta)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(splits["test"]), args.fixture_size, replace=False))
    save_file({"test": tensors["test"][pick].contiguous()}, args.fixture, metadata=meta)


if __name__ == "__main__":
    main()

"""scikit-learn's 8x8 handwritten digits with a fixed 70/15/15 split.

Writes ``data/digits/digits.safetensors`` (``train``, ``val``, ``test``
[N, 8, 8] float32, pixel values 0-16, plus ``*_labels``) and the committed
fixture ``tests/fixtures/digits_heldout.safetensors`` (the whole test split).

Usage: ``.venv/bin/python scripts/prepare_digits.py``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/digits", help="output folder (git-ignored)")
    parser.add_argument("--fixture", default="tests/fixtures/digits_heldout.safetensors",
                        help="small committed test fixture")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(images))
    n_train, n_val = int(0.7 * len(images)), int(0.15 * len(images))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val],
             "test": order[n_train + n_val :]}
    tensors: dict[str, torch.Tensor] = {}
    for name, idx in parts.items():
        tensors[name] = torch.from_numpy(images[idx]).contiguous()
        tensors[f"{name}_labels"] = torch.from_numpy(digits.target[idx].astype(np.int64))
    meta = {"source": "sklearn.datasets.load_digits()", "split_seed": str(args.seed),
            "splits": "70/15/15 train/val/test after a seeded permutation"}
    print({k: tuple(v.shape) for k, v in tensors.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "digits.safetensors"), metadata=meta)
    save_file({"test": tensors["test"], "test_labels": tensors["test_labels"]}, args.fixture,
              metadata=meta)


if __name__ == "__main__":
    main()

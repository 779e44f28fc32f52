"""Loading item arrays from .npy (never pickled) or .safetensors files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_items(path: str | Path, shape: tuple[int, int] | None = None,
               tensor: str | None = None) -> np.ndarray:
    """Items as float32 [N, L, D].

    Args:
        path: ``.npy`` (loaded with ``allow_pickle=False``) or ``.safetensors``.
        shape: (L, D) to reshape flat rows to; required when the file is [N, L*D].
        tensor: name of the safetensors tensor (default ``x``, else the only tensor).
    """
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        name = tensor or ("x" if "x" in tensors else None)
        if name is None:
            if len(tensors) != 1:
                raise ValueError(f"{path}: name the tensor to use; it holds {sorted(tensors)}")
            name = next(iter(tensors))
        array = tensors[name]
    else:
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    array = np.asarray(array, dtype=np.float32)
    if shape is not None:
        array = array.reshape(len(array), *shape)
    if array.ndim != 3:
        raise ValueError(f"{path}: items must be [N, L, D]; got {array.shape}, pass --shape")
    return array

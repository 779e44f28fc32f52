"""Codecs compared at equal bytes per code: our codecs, FAISS PQ/OPQ, bit-packing.

Every method maps flattened items [N, d] float32 to codes [N, bytes] (or its
own dtype) and back; ``bytes_per_code`` is what one stored item costs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from apcm.server.codecs.base import Codec


class Method(ABC):
    """A compressor under evaluation."""

    name: str
    bytes_per_code: int

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """[N, d] float32 -> codes [N, ...]."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> [N, d] float32."""

    def round_trip_error(self, x: np.ndarray) -> float | None:
        """max |x - f^-1(f(x))| of an invertible part, if the method has one."""
        return None


class CodecMethod(Method):
    """One of our codecs (IDRP or PCA), through its stored code dtype."""

    def __init__(self, name: str, codec: Codec) -> None:
        self.name = name
        self.codec = codec
        self.bytes_per_code = codec.bytes_per_code

    def encode(self, x: np.ndarray) -> np.ndarray:
        items = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.codec.compress(items.reshape(-1, *self.codec.input_shape)).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        out = self.codec.decompress(torch.from_numpy(codes))
        return out.reshape(codes.shape[0], -1).cpu().numpy()

    def round_trip_error(self, x: np.ndarray) -> float | None:
        model = getattr(self.codec, "model", None)
        if model is None:
            return None
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.codec.device)
            z, _ = model.flow(xt)
            return float((model.flow_inverse(z) - xt).abs().max())


class FaissMethod(Method):
    """FAISS product quantisation (``PQ``) or rotated PQ (``OPQ``) with 8-bit sub-codes.

    Args:
        kind: "PQ" or "OPQ". n_bytes: code size = number of sub-quantisers
            (must divide d). x_train: [N, d] float32 training items.
        opq_iters: OPQ's alternating rotation/codebook rounds (faiss default 50;
            fewer keeps 192 sub-quantisers on 384-d trainable in minutes on CPU).
    """

    def __init__(
        self, kind: str, n_bytes: int, x_train: np.ndarray, seed: int = 0, opq_iters: int = 10
    ) -> None:
        import faiss

        # faiss' OpenMP k-means slows down >10x when its threads compete with torch's
        faiss.omp_set_num_threads(1)
        d = x_train.shape[1]
        if d % n_bytes:
            raise ValueError(f"{kind} needs d={d} divisible by the byte budget {n_bytes}")
        spec = f"PQ{n_bytes}x8" if kind == "PQ" else f"OPQ{n_bytes},PQ{n_bytes}x8"
        index: Any = faiss.index_factory(d, spec)
        self.index = index
        pq_index: Any = index if kind == "PQ" else faiss.downcast_index(index.index)
        # polysemous training only reorders codes for Hamming search; it does not change
        # reconstructions and takes minutes
        pq_index.do_polysemous_training = False
        pq_index.pq.cp.min_points_per_centroid = 1  # small sets are fine; silences warnings
        if kind == "OPQ":
            opq: Any = faiss.downcast_VectorTransform(index.chain.at(0))
            opq.niter = opq_iters
            opq.niter_pq_0 = 4  # first round as cheap as the others (faiss default 40)
            spec += f" ({opq_iters} iters)"
        np.random.seed(seed)  # faiss' k-means sampling uses its own seed; this fixes ours
        self.index.train(np.ascontiguousarray(x_train, dtype=np.float32))
        self.name = f"FAISS {spec}"
        self.bytes_per_code = int(self.index.sa_code_size())

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(codes)


class BitPackMethod(Method):
    """Lossless 1 bit per value for binary {0, 1} data (``np.packbits``)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.name = "bit-packing (lossless)"
        self.bytes_per_code = (dim + 7) // 8

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > 0.5, axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.unpackbits(codes, axis=1, count=self.dim).astype(np.float32)

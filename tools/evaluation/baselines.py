"""Codecs compared at equal bytes per code: our codecs and the classical baselines.

Every method maps flattened items [N, d] float32 to codes [N, bytes] (or its
own dtype) and back; ``bytes_per_code`` is what one stored item costs. Every
baseline is fitted on the items its constructor gets (``x_train``): the training
split, or the searched database itself for an in-domain fit
(:func:`apcm.tools.evaluation.curves.run_curves`).

Baselines: PCA (float32/float16/int8, via :class:`CodecMethod` of a fitted
``PCACodec``), FAISS PQ and OPQ+PQ, FAISS scalar quantisers SQ8/SQ6/SQ4 (on
the leading PCA dims that fill the budget), RaBitQ (FAISS ``IndexRaBitQ``;
behind its random rotation; search only: no faithful decoder for multi-bit
codes), the water-filling
transform coder (PCA + integer reverse water-filling + uniform quantisers),
random orthogonal rotation + uniform b-bit quantiser, and lossless
bit-packing for binary data. :func:`in_domain_codec` is our own codec fitted
the way an adaptive bank is to fit it on its own memories.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from apcm.server.codecs.base import Codec
from apcm.server.codecs.idrp.v2 import TransformCodec

#: family of :func:`in_domain_codec`'s rows
IN_DOMAIN_IDRP = "idrp v2 fitted in domain (adaptive bank)"


class Method(ABC):
    """A compressor under evaluation."""

    name: str
    bytes_per_code: int
    #: curve label shared by the same method at different budgets (plots)
    family: str = ""
    #: False for search-only methods (no decoder): they report recall, not distortion
    reconstructs: bool = True

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """[N, d] float32 -> codes [N, ...]."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> [N, d] float32."""

    def round_trip_error(self, x: np.ndarray) -> float | None:
        """max |x - f^-1(f(x))| of an invertible part, if the method has one."""
        return None

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
        """Ids [Q, k] of the best base items per query; only for search-only methods."""
        raise NotImplementedError(f"{self.name} has a decoder; rank decoded vectors instead")


class CodecMethod(Method):
    """One of our codecs (IDRP or PCA), through its stored code dtype."""

    def __init__(self, name: str, codec: Codec) -> None:
        self.name = name
        self.codec = codec
        self.bytes_per_code = codec.bytes_per_code
        self.family = name

    def encode(self, x: np.ndarray) -> np.ndarray:
        items = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.codec.compress(items.reshape(-1, *self.codec.input_shape)).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        out = self.codec.decompress(torch.from_numpy(codes))
        return out.reshape(codes.shape[0], -1).cpu().numpy()

    def round_trip_error(self, x: np.ndarray) -> float | None:
        model = getattr(self.codec, "model", None)
        # only codecs with an invertible flow (IDRP) have a round trip to check
        if model is None or not hasattr(model, "flow") or not hasattr(model, "flow_inverse"):
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
        if x_train.shape[0] < 256:
            raise ValueError(f"{kind}'s 256-centroid k-means needs >= 256 training items")
        if kind == "OPQ" and x_train.shape[0] <= d:
            # faiss' OPQ training aborts the process (invalid free) when n <= d
            raise ValueError(f"OPQ needs more training items than dims ({d})")
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
        self.family = "FAISS PQ" if kind == "PQ" else "FAISS OPQ+PQ"
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
        self.family = self.name
        self.bytes_per_code = (dim + 7) // 8

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > 0.5, axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.unpackbits(codes, axis=1, count=self.dim).astype(np.float32)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class PCAProjection:
    """PCA of the training items, fitted in float64 with the mean; keeps the first ``m`` axes."""

    def __init__(self, x_train: np.ndarray, m: int) -> None:
        x = np.asarray(x_train, dtype=np.float64)
        self.mean = x.mean(0)
        xc = x - self.mean
        evals, evecs = np.linalg.eigh(xc.T @ xc / len(x))
        self.rot = evecs[:, ::-1][:, :m].T.copy()  # [m, d], rows by decreasing variance
        self.var = np.maximum(evals[::-1][:m], 0.0)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.rot.T

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return y @ self.rot + self.mean


def _one_faiss_thread() -> None:
    import faiss

    # faiss' OpenMP k-means slows down >10x when its threads compete with torch's
    faiss.omp_set_num_threads(1)


class FaissSQMethod(Method):
    """FAISS ``ScalarQuantizer`` (uniform per-dim range, ``bits`` per value).

    The budget fixes the number of coded dims: m = 8 * budget / bits. If m < d the
    items are first projected onto their leading m PCA axes (fitted on the same
    training split); m > d or a fractional m is impossible (``ValueError``).
    """

    def __init__(self, bits: int, budget: int, x_train: np.ndarray) -> None:
        import faiss

        _one_faiss_thread()
        d = x_train.shape[1]
        m = 8 * budget // bits
        if m * bits != 8 * budget or m > d:
            raise ValueError(f"SQ{bits} cannot fill {budget} bytes on {d} dims")
        qtype = {8: faiss.ScalarQuantizer.QT_8bit, 6: faiss.ScalarQuantizer.QT_6bit,
                 4: faiss.ScalarQuantizer.QT_4bit}[bits]
        self.proj = PCAProjection(x_train, m) if m < d else None
        self.sq: Any = faiss.ScalarQuantizer(m, qtype)
        self.sq.train(self._y(x_train))
        self.bytes_per_code = int(self.sq.code_size)
        self.family = f"FAISS SQ{bits}"
        self.name = self.family + (f" (PCA-{m})" if self.proj is not None else "")

    def _y(self, x: np.ndarray) -> np.ndarray:
        return _f32(self.proj.forward(x) if self.proj is not None else x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.sq.compute_codes(self._y(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        y = self.sq.decode(np.ascontiguousarray(codes))
        return _f32(self.proj.inverse(y)) if self.proj is not None else y


def rabitq_config(d: int, budget: int) -> tuple[int, int] | None:
    """(nb_bits, dims) of the RaBitQ code that best fills ``budget`` bytes, or None.

    The most bits per dim for which the code still covers at least 3/4 of the
    dims (the leading PCA axes when fewer than d), with as many dims as fit.
    """
    import faiss

    def code_size(dims: int, nb: int) -> int:
        index: Any = faiss.IndexRaBitQ(dims, faiss.METRIC_INNER_PRODUCT, nb)
        return int(index.code_size)

    for nb in range(8, 0, -1):
        dims = d
        while dims > 0 and code_size(dims, nb) > budget:
            dims -= 1
        if dims >= 0.75 * d:
            return nb, dims
    return None


class RaBitQMethod(Method):
    """FAISS RaBitQ (inner product, multi-bit) behind its random rotation, search only.

    RaBitQ's error bounds assume the code's axes are a random rotation of the
    data's (faiss' ``RR{d},RaBitQ``); on PCA axes, whose variances fall by orders
    of magnitude, its sign bits waste most of their information. So the items go
    through a seeded ``RandomRotationMatrix`` (``rotate``; False reproduces the old,
    unrotated baseline for comparison) before ``IndexRaBitQ``. Queries are float
    (``qb`` 0), not quantised.

    ``sa_decode`` of a multi-bit RaBitQ code ignores the extra bits, so no
    distortion is reported; recall uses FAISS' own search. When the code covers
    fewer than d dims, items and queries are projected on the leading PCA axes
    (for a fixed query q, q.x = q.mean + (P q).(P(x - mean)) on the kept axes, so
    the ranking is that of the projected inner product); the rotation follows the
    projection.
    """

    reconstructs = False

    def __init__(self, budget: int, x_train: np.ndarray, rotate: bool = True,
                 seed: int = 0) -> None:
        import faiss

        _one_faiss_thread()
        d = x_train.shape[1]
        config = rabitq_config(d, budget)
        if config is None:
            raise ValueError(f"no RaBitQ code fits {budget} bytes")
        self.nb_bits, dims = config
        self.proj = PCAProjection(x_train, dims) if dims < d else None
        rabitq: Any = faiss.IndexRaBitQ(dims, faiss.METRIC_INNER_PRODUCT, self.nb_bits)
        rabitq.qb = 0  # faiss' default quantises queries to 4 bits
        index: Any = rabitq
        if rotate:
            rotation: Any = faiss.RandomRotationMatrix(dims, dims)
            rotation.init(seed)
            index = faiss.IndexPreTransform(rotation, rabitq)
            self.rotation, self.rabitq = rotation, rabitq  # the wrapper does not own them
        index.train(self._y(x_train))
        self.index = index
        self.bytes_per_code = int(index.sa_code_size())
        self.family = "FAISS RaBitQ" if rotate else "FAISS RaBitQ, no rotation"
        self.name = f"FAISS {'RR+' if rotate else ''}RaBitQ {self.nb_bits}-bit" + (
            f" (PCA-{dims})" if self.proj is not None else "")

    def _y(self, x: np.ndarray) -> np.ndarray:
        return _f32(self.proj.forward(x) if self.proj is not None else x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(self._y(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError("RaBitQ is evaluated by search only")

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
        self.index.reset()
        self.index.add(self._y(base))
        q = _f32(queries @ self.proj.rot.T if self.proj is not None else queries)
        _, ids = self.index.search(q, k)
        self.index.reset()
        return ids


class WaterFillingMethod(Method):
    """Classical transform coder: PCA + reverse water-filling + uniform quantisers.

    PCA over all d dims (float64, with mean, on the training split); integer bit
    widths b_i in 0..8 with sum b_i = 8 * budget minimising sum var_i * D(b_i),
    D = distortion of the MSE-optimal uniform quantiser of a unit Gaussian (the
    integer form of reverse water-filling on the PCA variances); per-dim step
    = Gaussian-optimal step * sigma_i, midrise, clamped, midpoint reconstruction;
    dims with 0 bits decode to the mean. Codes are bit-packed to exactly
    ``budget`` bytes.
    """

    def __init__(self, budget: int, x_train: np.ndarray) -> None:
        from . import transform

        d = x_train.shape[1]
        if 8 * budget > transform.MAX_BITS * d:
            raise ValueError(f"{budget} bytes exceed 8 bits on each of {d} dims")
        self.proj = PCAProjection(x_train, d)
        var = np.maximum(self.proj.var, 1e-12)
        widths = np.arange(transform.MAX_BITS + 1)
        dist = var[:, None] * transform.gauss_mse(widths)[None, :]
        self.bits = transform.allocate_bits(dist, 8 * budget)
        self.step = transform.gauss_step(self.bits) * np.sqrt(var)
        self.coded = self.bits > 0
        self.bytes_per_code = budget
        self.family = "water-filling TC"
        self.name = f"water-filling TC ({int(self.coded.sum())} dims coded)"

    def encode(self, x: np.ndarray) -> np.ndarray:
        from . import transform

        z = self.proj.forward(x)
        q = np.zeros(z.shape, dtype=np.int64)
        c = self.coded
        q[:, c] = transform.quantize(z[:, c], self.step[c], self.bits[c])
        return transform.pack(q, self.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        from . import transform

        q = transform.unpack(codes, self.bits)
        z = np.zeros(q.shape, dtype=np.float64)
        c = self.coded
        z[:, c] = transform.dequantize(q[:, c], self.step[c], self.bits[c])
        return _f32(self.proj.inverse(z))


class RandomRotationMethod(Method):
    """Random orthogonal rotation + uniform b-bit quantiser on every dim.

    x -> R (x - mean) with R a seeded random orthogonal matrix (QR of a Gaussian
    matrix), then every rotated dim gets the same width b = 8 * budget / d
    (the remainder bits go one each to the first dims) with the Gaussian-optimal
    step for that dim's training sigma; midpoint reconstruction; bit-packed to
    exactly ``budget`` bytes. No data-dependent basis: only the mean and the
    per-dim scales are fitted.
    """

    def __init__(self, budget: int, x_train: np.ndarray, seed: int = 0) -> None:
        from . import transform

        x = np.asarray(x_train, dtype=np.float64)
        d = x.shape[1]
        total = 8 * budget
        if total > transform.MAX_BITS * d or total < d:
            raise ValueError(f"{budget} bytes do not give 1..8 bits to each of {d} dims")
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
        self.rot = (q * np.sign(np.diag(r))).T
        self.mean = x.mean(0)
        z = (x - self.mean) @ self.rot.T
        self.bits = np.full(d, total // d, dtype=np.int64)
        self.bits[: total - int(self.bits.sum())] += 1
        self.step = transform.gauss_step(self.bits) * np.sqrt(np.maximum(z.var(0), 1e-12))
        self.bytes_per_code = budget
        self.family = "random rotation + uniform SQ"
        widths = sorted(set(self.bits.tolist()))
        self.name = f"random rotation + uniform {'/'.join(map(str, widths))}-bit SQ"

    def encode(self, x: np.ndarray) -> np.ndarray:
        from . import transform

        z = (np.asarray(x, dtype=np.float64) - self.mean) @ self.rot.T
        return transform.pack(transform.quantize(z, self.step, self.bits), self.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        from . import transform

        z = transform.dequantize(transform.unpack(codes, self.bits), self.step, self.bits)
        return _f32(z @ self.rot + self.mean)


def in_domain_codec(x: np.ndarray, budget: int, input_shape: tuple[int, int],
                    renorm: bool | None = None) -> CodecMethod:
    """IDRP v2 fitted on ``x`` [N, d] itself: the fit planned for adaptive banks.

    No hedge and no group rotation: those buy robustness to another source's
    spectrum, which a fit on the searched items does not need. ``renorm``: the
    shipped model's setting at this budget (None: off, as ``TransformCodec.fit``
    decides without validation items).
    """
    items = torch.from_numpy(_f32(x)).reshape(-1, *input_shape)
    codec = TransformCodec.fit(items, budget, renorm=renorm, hedge=0.0, rotate_groups=False)
    method = CodecMethod(f"{IN_DOMAIN_IDRP} {budget} B", codec)
    method.family = IN_DOMAIN_IDRP
    return method

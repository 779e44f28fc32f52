"""Evaluate methods on held-out items and render the markdown table."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from apcm.server.codecs.base import Codec
from apcm.server.codecs.pca import PCACodec
from apcm.server.codecs.quant import CodeQuantizer

from . import metrics
from .baselines import (
    BitPackMethod,
    CodecMethod,
    FaissMethod,
    FaissSQMethod,
    Method,
    RaBitQMethod,
    RandomRotationMethod,
    WaterFillingMethod,
)


@dataclass
class Row:
    """One method's held-out numbers."""

    method: str
    bytes_per_code: int
    ratio: float
    mse: float | None
    mae: float | None
    psnr: float | None
    cosine: float | None
    recall10: float | None
    round_trip: float | None
    encode_per_s: float
    decode_per_s: float | None
    family: str = ""


def _rate(fn: Callable[[np.ndarray], np.ndarray], arg: np.ndarray,
          min_seconds: float = 0.3) -> tuple[np.ndarray, float]:
    """``fn(arg)`` and items/s: best of repeated whole-batch calls over ``min_seconds``."""
    out = fn(arg)  # warm-up, and the output we report
    best, spent = math.inf, 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        fn(arg)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return out, len(arg) / max(best, 1e-9)


def evaluate(
    method: Method,
    x: np.ndarray,
    data_range: float | None = None,
    embeddings: bool = False,
    exact: np.ndarray | None = None,
    timing_s: float = 0.3,
) -> Row:
    """Numbers for ``method`` on held-out ``x`` [N, d] float32.

    ``exact``: the exact top-10 ids of ``x`` (``metrics.top_k_cosine(x, x, 10)``) when
    already computed; ``timing_s``: seconds of repeated calls per throughput figure.
    A search-only method (``reconstructs`` False) reports recall@10
    from its own search and no distortion.
    """
    codes, enc_rate = _rate(method.encode, x, timing_s)
    if not method.reconstructs:
        return Row(
            method=method.name, bytes_per_code=method.bytes_per_code,
            ratio=x.shape[1] * 4 / method.bytes_per_code, mse=None, mae=None, psnr=None,
            cosine=None,
            recall10=metrics.search_recall_at_k(method.search, x, 10, exact)
            if embeddings else None,
            round_trip=None, encode_per_s=enc_rate, decode_per_s=None, family=method.family,
        )
    x_hat, dec_rate = _rate(method.decode, codes, timing_s)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    return Row(
        method=method.name,
        bytes_per_code=method.bytes_per_code,
        ratio=x.shape[1] * 4 / method.bytes_per_code,
        mse=metrics.mse(x, x_hat),
        mae=metrics.mae(x, x_hat),
        psnr=metrics.psnr(x, x_hat, data_range) if data_range else None,
        cosine=metrics.mean_cosine(x, x_hat) if embeddings else None,
        recall10=metrics.recall_at_k(x, x_hat, 10, exact) if embeddings else None,
        round_trip=method.round_trip_error(x),
        encode_per_s=enc_rate,
        decode_per_s=dec_rate,
        family=method.family,
    )


def baselines(
    codec: Codec, x_train: np.ndarray, binary: bool = False, faiss: bool = True
) -> list[Method]:
    """PCA in each code dtype, PQ and OPQ, all at ``codec``'s byte budget; bit-packing if binary.

    PCA and FAISS are fitted on ``x_train`` [N, d], the model's training split.
    """
    budget, d = codec.bytes_per_code, x_train.shape[1]
    items = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    items = items.reshape(-1, *codec.input_shape)
    methods: list[Method] = []
    for dtype in ("float32", "float16", "int8"):
        m = budget // CodeQuantizer(dtype, torch.ones(1)).itemsize
        if 1 <= m <= d:
            pca = PCACodec.fit(items, m, dtype)
            same = " (same m)" if m == codec.code_dim else ""
            methods.append(CodecMethod(f"PCA {dtype} m={m}{same}", pca))
    if faiss:
        for kind in ("PQ", "OPQ"):
            if d % budget == 0:
                methods.append(FaissMethod(kind, budget, x_train))
    if binary:
        methods.append(BitPackMethod(d))
    return methods


def budget_baselines(
    budget: int, x_train: np.ndarray, input_shape: tuple[int, int], *, binary: bool = False,
    faiss: bool = True, opq: bool = True, rabitq: bool = True,
) -> tuple[list[Method], list[str]]:
    """Every baseline that fits exactly ``budget`` bytes per code (RaBitQ: at most).

    All are fitted on ``x_train`` [N, d], the training split. Returns the methods
    and one line per baseline that is not applicable at this budget (and why).
    """
    d = x_train.shape[1]
    items = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    items = items.reshape(-1, *input_shape)
    methods: list[Method] = []
    skipped: list[str] = []

    # not Callable[[], Method]: mypy rejects the lambdas' defaulted loop-variable argument
    def add(label: str, make: Callable[..., Method]) -> None:
        try:
            methods.append(make())
        except (ValueError, RuntimeError) as e:
            skipped.append(f"{label} at {budget} B: n/a ({e})")

    for dtype in ("float32", "float16", "int8"):
        itemsize = CodeQuantizer(dtype, torch.ones(1)).itemsize
        m = budget // itemsize
        if m * itemsize == budget and 1 <= m <= d:
            method = CodecMethod(f"PCA {dtype} m={m}", PCACodec.fit(items, m, dtype))
            method.family = f"PCA {dtype}"
            methods.append(method)
        else:
            skipped.append(f"PCA {dtype} at {budget} B: n/a ({budget} B is not 1..{d} values)")
    if faiss:
        kinds = ("PQ", "OPQ") if opq else ("PQ",)
        for kind in kinds:
            add(f"FAISS {kind}", lambda kind=kind: FaissMethod(kind, budget, x_train))
        for bits in (8, 6, 4):
            add(f"FAISS SQ{bits}", lambda bits=bits: FaissSQMethod(bits, budget, x_train))
        if rabitq:
            add("FAISS RaBitQ", lambda: RaBitQMethod(budget, x_train))
    add("water-filling TC", lambda: WaterFillingMethod(budget, x_train))
    add("random rotation + uniform SQ", lambda: RandomRotationMethod(budget, x_train))
    if binary and BitPackMethod(d).bytes_per_code <= budget:
        methods.append(BitPackMethod(d))
    return methods, skipped


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)


def to_markdown(rows: list[Row]) -> str:
    """GitHub markdown table; columns with no values (e.g. PSNR for embeddings) are dropped."""
    cols = [
        ("method", lambda r: r.method),
        ("bytes/code", lambda r: str(r.bytes_per_code)),
        ("ratio", lambda r: f"{r.ratio:.0f}:1"),
        ("MSE", lambda r: _fmt(r.mse, ".4g") if r.mse is not None else "n/a"),
        ("MAE", lambda r: _fmt(r.mae, ".4g") if r.mae is not None else "n/a"),
        ("PSNR dB", lambda r: _fmt(r.psnr, ".2f")),
        ("mean cos", lambda r: _fmt(r.cosine, ".4f")),
        ("recall@10", lambda r: _fmt(r.recall10, ".3f")),
        ("round-trip err", lambda r: _fmt(r.round_trip, ".1e")),
        ("encode items/s", lambda r: f"{r.encode_per_s:,.0f}"),
        ("decode items/s",
         lambda r: f"{r.decode_per_s:,.0f}" if r.decode_per_s is not None else "n/a"),
    ]
    keep = [(name, f) for name, f in cols if any(f(r) != "—" for r in rows) or name in
            ("round-trip err",)]
    lines = ["| " + " | ".join(n for n, _ in keep) + " |",
             "|" + "|".join("---" for _ in keep) + "|"]
    lines += ["| " + " | ".join(f(r) for _, f in keep) + " |" for r in rows]
    return "\n".join(lines)

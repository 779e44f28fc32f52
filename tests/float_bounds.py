"""Tolerances for float32 sums derived from the arithmetic, not picked by hand.

A d-term float32 dot product summed in any order (torch's blocking depends on the
thread count, a lookup-table scan adds in code order) is within
``d * u * sum_i |a_i b_i|`` of the exact value, ``u = 2**-24`` (Higham, Accuracy and
Stability of Numerical Algorithms, 3.1). The helpers compare against a float64
reference with that bound times a small ``factor`` (2: room for up to d more
roundings per term, such as scales multiplied in or the inputs' own rounding),
elementwise, so a score of 50 and one of 0.01 each get the tolerance their terms
allow. A real bug (a wrong code, a dropped dim)
moves a score by one whole term, far more than ``d * u`` of the sum of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

U = 2.0 ** -24  # float32 unit roundoff
# a float32 product can underflow by up to half the smallest subnormal per term
_UNDERFLOW = 2.0 ** -150

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def _f64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a [Q, d] or [d] and b [n, d] or [d]."""
    return a @ (b.T if b.ndim == 2 else b)


def assert_within_bound(got: ArrayLike, ref: ArrayLike, bound: ArrayLike,
                        what: str = "values") -> None:
    """``|got - ref| <= bound`` elementwise; the message names the worst element."""
    got_t, ref_t, bound_t = _f64(got), _f64(ref), _f64(bound)
    assert got_t.shape == ref_t.shape, f"{what}: shape {tuple(got_t.shape)}, " \
                                       f"expected {tuple(ref_t.shape)}"
    bound_t = bound_t.expand_as(ref_t)
    err = (got_t - ref_t).abs()
    over = err - bound_t
    bad = ~(over <= 0)  # NaN counts as a violation
    if bool(bad.any()):
        flat = int(torch.nan_to_num(over, nan=float("inf")).argmax())
        at = tuple(int(i) for i in np.unravel_index(flat, tuple(ref_t.shape)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref_t.numel()} outside the float32 bound; "
            f"worst at {at}: got {got_t[at].item():.9g}, reference {ref_t[at].item():.9g}, "
            f"|error| {err[at].item():.3g} > bound {bound_t[at].item():.3g} "
            f"({err[at].item() / max(bound_t[at].item(), 1e-300):.3g}x)")


def float32_dot_bound(a: ArrayLike, b: ArrayLike, *, factor: float = 2.0,
                      magnitude: ArrayLike | None = None,
                      terms: int | None = None) -> torch.Tensor:
    """Bound on the error of float32 ``a @ b.T`` summed in any order, float64.

    ``magnitude`` replaces ``|a| @ |b|.T`` where the computation sums other terms
    than ``a_i b_i`` (e.g. ``a.t + a.o`` for ``b = t + o``); ``terms`` replaces d.
    """
    a_t, b_t = _f64(a), _f64(b)
    d = terms if terms is not None else a_t.shape[-1]
    mag = _products(a_t.abs(), b_t.abs()) if magnitude is None else _f64(magnitude)
    return factor * d * (U * mag + _UNDERFLOW)


def split_magnitude(a: ArrayLike, b: ArrayLike, offset: ArrayLike) -> torch.Tensor:
    """``|a| @ (|b - o| + |o|).T``: the terms of ``a @ b.T`` computed as ``a.(b - o) +
    a.o`` (a lookup-table scan adds a query's products with the table entries and with
    the offset apart), which can be far larger than ``|a| @ |b|.T`` where b - o and o
    cancel."""
    o = _f64(offset)
    return _products(_f64(a).abs(), (_f64(b) - o).abs() + o.abs())


def assert_float32_dots(got: ArrayLike, a: ArrayLike, b: ArrayLike, *, factor: float = 2.0,
                        magnitude: ArrayLike | None = None, terms: int | None = None,
                        what: str = "dot products") -> None:
    """``got`` [Q, n] is float32 ``a @ b.T`` (a [Q, d], b [n, d]) in some summation order."""
    ref = _products(_f64(a), _f64(b))
    assert_within_bound(got, ref, float32_dot_bound(a, b, factor=factor, magnitude=magnitude,
                                                    terms=terms), what)


def float32_cosine_bound(a: ArrayLike, b: ArrayLike, *, factor: float = 2.0,
                         magnitude: ArrayLike | None = None) -> torch.Tensor:
    """Bound on the error of float32 cosines of the rows of a and b, float64.

    ``magnitude`` is the sum of the terms' magnitudes over ``|a| |b|`` (default
    ``|a| @ |b|.T / (|a| |b|)``), the dot's share of the bound.
    """
    a_t, b_t = _f64(a), _f64(b)
    d = a_t.shape[-1]
    na, nb = a_t.norm(dim=-1), b_t.norm(dim=-1)
    norms = na[..., None] * nb if a_t.ndim == 2 and b_t.ndim == 2 else na * nb
    cos = _products(a_t, b_t) / norms.clamp_min(1e-300)
    mag = _products(a_t.abs(), b_t.abs()) / norms.clamp_min(1e-300) if magnitude is None \
        else _f64(magnitude)
    # each side's norm (d-term sum of squares, sqrt, divide or reciprocal and multiply)
    # is off by at most (d/2 + 3)u relative, which scales the cosine by that much
    return factor * (d * U * mag + (d + 6) * U * cos.abs() + d * _UNDERFLOW)


def assert_float32_cosines(got: ArrayLike, a: ArrayLike, b: ArrayLike, *,
                           factor: float = 2.0, magnitude: ArrayLike | None = None,
                           what: str = "cosines") -> None:
    """``got`` [Q, n] is the float32 cosine of rows of a [Q, d] and b [n, d] (unnormalised
    inputs; the reference normalises them in float64)."""
    a_t, b_t = _f64(a), _f64(b)
    ref = _products(torch.nn.functional.normalize(a_t, dim=-1),
                    torch.nn.functional.normalize(b_t, dim=-1))
    assert_within_bound(got, ref, float32_cosine_bound(a_t, b_t, factor=factor,
                                                       magnitude=magnitude), what)


def float32_softmax_bound(scores: ArrayLike, score_bound: ArrayLike, temperature: float, *,
                          factor: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference weights ``softmax(scores / T)`` [Q, n] and the bound on float32 weights
    computed from scores within ``score_bound`` of ``scores`` (float64, both [Q, n]).

    A read weighs ``exp((s - shift) / T) / sum``: an error e in s scales a term by
    ``exp(e / T)``, the subtract, divide and exp add a few u per term, the sum of n
    positive terms n u and the quotient one u, so a weight's relative error is at most
    ``expm1((e_i + e_max + 8u) / T) + (n + 5) u`` (|s - shift| <= 2).
    """
    s, e = _f64(scores), _f64(score_bound).expand_as(_f64(scores))
    weights = torch.softmax(s / temperature, dim=-1)
    n = s.shape[-1]
    e_max = e.amax(dim=-1, keepdim=True)
    rel = torch.expm1((e + e_max + 8 * U) / temperature) + (n + 5) * U
    return weights, factor * rel * weights


def float32_mix_bound(weights: ArrayLike, weight_bound: ArrayLike, values: ArrayLike, *,
                      factor: float = 2.0) -> torch.Tensor:
    """Bound on float32 ``weights @ values`` ([Q, n] @ [n, m]) where the weights used are
    within ``weight_bound`` of ``weights``: their error carried through plus an n-term
    sum, a divide by the weights' sum and a scale, n + 2 roundings of ``w @ |values|``."""
    w, v = _f64(weights), _f64(values).abs()
    return _f64(weight_bound) @ v + factor * (w.shape[-1] + 2) * U * (w @ v)


def pca_encode_bound(codec: object, x: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 codes ``(x - mean) @ W.T`` [n, m] of a float32 PCA codec (``mean``,
    ``components``) and the bound on its float32 codes: a d-term dot of the rounded
    difference, d + 1 roundings of ``|x - mean| @ |W|.T``."""
    mean, w = _f64(codec.mean), _f64(codec.components)  # type: ignore[attr-defined]
    centred = _f64(x).reshape(-1, w.shape[1]) - mean
    return centred @ w.T, float32_dot_bound(centred, w, terms=w.shape[1] + 1)


def pca_decode_bound(codec: object, z: ArrayLike,
                     z_bound: ArrayLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 items ``z @ W + mean`` [n, d] of codes z [n, m] and the bound on their
    float32 decode: an m-term dot plus the mean, m + 1 roundings, and where the codes
    decoded are only known to lie within ``z_bound`` of z, that error carried through W."""
    mean, w = _f64(codec.mean), _f64(codec.components)  # type: ignore[attr-defined]
    z_t = _f64(z).reshape(-1, w.shape[0])
    carried = torch.zeros(()) if z_bound is None else _f64(z_bound) @ w.abs()
    size = z_t.abs() + (0.0 if z_bound is None else _f64(z_bound))
    magnitude = size @ w.abs() + mean.abs()
    bound = float32_dot_bound(z_t, w.T, magnitude=magnitude, terms=w.shape[0] + 1)
    return z_t @ w + mean, bound + carried

"""The float32 bounds of ``float_bounds`` hold for sums in any order and still catch
a one-term error: what makes them fit to replace hand-picked tolerances."""

from __future__ import annotations

import pytest
import torch
from float_bounds import (
    assert_float32_cosines,
    assert_float32_dots,
    assert_within_bound,
    float32_cosine_bound,
    float32_mix_bound,
    float32_softmax_bound,
    pca_decode_bound,
    pca_encode_bound,
)

from apcm.server.codecs.pca import PCACodec


def _pair(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, d)  # terms of very different sizes: order matters
    a = torch.randn(5, d, generator=gen) * scale
    b = torch.randn(300, d, generator=gen) * scale.flip(0)
    return a, b


@pytest.mark.parametrize("d", [8, 64, 384])
def test_float32_sums_in_any_order_are_within_the_bound(d: int) -> None:
    a, b = _pair(d, d)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(1))
    assert_float32_dots(a @ b.T, a, b)
    assert_float32_dots(a[:, perm] @ b[:, perm].T, a, b)
    serial = torch.zeros(a.shape[0], b.shape[0])
    for i in range(d):  # one term at a time: the worst-conditioned order
        serial += a[:, i:i + 1] * b[:, i]
    assert_float32_dots(serial, a, b)
    unit = torch.nn.functional.normalize
    assert_float32_cosines(unit(a, dim=1) @ unit(b, dim=1).T, a, b)
    assert_float32_cosines((a @ b.T) / a.norm(dim=1, keepdim=True) * (1 / b.norm(dim=1)),
                           a, b)


@pytest.mark.parametrize("d", [8, 64, 384])
def test_a_dropped_term_is_caught(d: int) -> None:
    a = torch.randn(5, d, generator=torch.Generator().manual_seed(d))
    b = torch.randn(300, d, generator=torch.Generator().manual_seed(d + 1))
    dropped = a[:, 1:] @ b[:, 1:].T
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        assert_float32_dots(dropped, a, b)
    unit = torch.nn.functional.normalize
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        assert_float32_cosines(unit(a[:, 1:], dim=1) @ unit(b, dim=1)[:, 1:].T, a, b)


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_float32_softmax_and_mix_are_within_the_bound_and_a_wrong_one_is_not(
        temperature: float) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 64, generator=gen), torch.randn(5000, 64, generator=gen)
    unit = torch.nn.functional.normalize
    scores = unit(a, dim=1) @ unit(b, dim=1).T  # float32, as a read computes them
    ref = unit(a.double(), dim=1) @ unit(b.double(), dim=1).T
    bound = float32_cosine_bound(a, b)
    weights, weight_bound = float32_softmax_bound(ref, bound, temperature)
    e = torch.exp((scores - 1) / temperature)
    total = torch.zeros(4)
    for i in range(0, 5000, 1000):  # summed span by span, as a read does
        total += e[:, i:i + 1000].sum(dim=1)
    assert_within_bound(e / total[:, None], weights, weight_bound, "weights")
    mix = float32_mix_bound(weights, weight_bound, b)
    assert_within_bound((e @ b) / total[:, None], weights @ b.double(), mix, "mix")
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        wrong = torch.softmax(scores / (temperature * 1.01), dim=1)
        assert_within_bound(wrong, weights, weight_bound, "weights")
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        # a span left out of the mix (a worst-case n-term bound cannot see one item of
        # weight 1/n: the rounding of n terms may be as large)
        assert_within_bound((e[:, 1000:] @ b[1000:]) / total[:, None], weights @ b.double(),
                            mix)


def test_pca_round_trips_are_within_the_bound_and_a_dropped_component_is_not() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(300, 64, generator=gen) * torch.linspace(0.1, 10, 64)
    codec = PCACodec.fit(x[:200].reshape(200, 8, 8), 8, "float32")
    codes = codec.compress(x[200:].reshape(100, 8, 8))
    z, z_bound = pca_encode_bound(codec, x[200:])
    assert_within_bound(codes, z, z_bound, "codes")
    decoded = codec.decompress(codes).reshape(100, -1)
    assert_within_bound(decoded, *pca_decode_bound(codec, codes), "items")
    assert_within_bound(decoded, *pca_decode_bound(codec, z, z_bound), "round trip")
    dropped = codes.clone()
    dropped[:, -1] = 0
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        assert_within_bound(dropped, z, z_bound, "codes")
    with pytest.raises(AssertionError, match="outside the float32 bound"):
        assert_within_bound(codec.decompress(dropped).reshape(100, -1),
                            *pca_decode_bound(codec, codes), "items")

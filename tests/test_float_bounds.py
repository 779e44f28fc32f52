"""The float32 bounds of ``float_bounds`` hold for sums in any order and still catch
a one-term error: what makes them fit to replace hand-picked tolerances."""

from __future__ import annotations

import pytest
import torch
from float_bounds import assert_float32_cosines, assert_float32_dots


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

"""A read's elementwise steps on CPU (numpy, in place on torch's buffers) equal the
torch ops they stand for."""

from __future__ import annotations

import math

import torch

from apcm.server.memory import spanops


def test_span_steps_equal_the_torch_ops_in_place() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 5000, generator=gen) * 2 - 1
    factors = torch.rand(5000, generator=gen)
    keep = torch.rand(5000, generator=gen) > 0.3
    shift = scores.max(dim=1, keepdim=True).values
    want = (scores * factors).masked_fill(~keep, -math.inf)
    got = scores.clone()
    buffer = got.data_ptr()
    spanops.scale_(got, factors)
    spanops.mask_(got, keep)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sums = spanops.exp_sum_(got, shift, 0.5)
    torch.testing.assert_close(got, ((want - shift) / 0.5).exp())
    torch.testing.assert_close(sums, got.sum(dim=1))
    assert got.data_ptr() == buffer  # every step wrote into the read's own buffer
    one = spanops.exp_sum_(want[:1].clone(), torch.tensor(1.0), 2.0)
    torch.testing.assert_close(one, ((want[:1] - 1.0) / 2.0).exp().sum(dim=1))
    idx = torch.tensor([4, 0, 4999, 17])
    assert torch.equal(spanops.gather(factors, idx), factors.index_select(0, idx))
    dst = torch.empty(3, 5000)
    spanops.copy_(dst, want)
    assert torch.equal(dst, want)

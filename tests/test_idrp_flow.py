"""Bijections of the IDRP flow: exact inverses and correct log-determinants,
checked on perturbed (non-zero) weights so the identity-at-init cannot hide bugs."""

from __future__ import annotations

import pytest
import torch

from apcm.server.codecs.idrp.flow import AffineCoupling, FixedScale, PCARotation, Permutation
from apcm.server.codecs.idrp.model import IDRP, IDRPConfig


def perturb(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def layers(d: int) -> list[torch.nn.Module]:
    gen = torch.Generator().manual_seed(1)
    coupling = AffineCoupling(d, hidden=16, n_res=2, scale_clamp=2.0, shift_bound=5.0)
    perturb(coupling, 0.5)
    return [
        PCARotation(torch.randn(d, generator=gen), random_orthogonal(d, 2)),
        FixedScale(torch.rand(d, generator=gen) + 0.5),
        Permutation(torch.randperm(d, generator=gen)),
        coupling,
    ]


@pytest.mark.parametrize("index", range(4))
def test_each_layer_inverts_exactly(index: int) -> None:
    layer = layers(8)[index].eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    assert not torch.allclose(y, x)
    assert (layer.inverse(y) - x).abs().max() < 1e-5


@pytest.mark.parametrize("index", range(4))
def test_log_det_matches_autograd_jacobian(index: int) -> None:
    layer = layers(6)[index].double().eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, log_det = layer(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        # the rotation is stored in float32, so it is orthogonal only to ~1e-7
        assert torch.allclose(log_det[i], expected, atol=1e-6)


def test_coupling_scale_is_soft_clamped() -> None:
    coupling = AffineCoupling(8, hidden=16, n_res=1, scale_clamp=1.5, shift_bound=3.0)
    perturb(coupling, 50.0)
    x = torch.randn(128, 8) * 10
    s, t = coupling._scale_shift(x[:, :4])
    assert s.abs().max() <= 1.5 and t.abs().max() <= 3.0
    assert s.abs().max() > 1.0  # the clamp is active, not trivially satisfied


def perturbed_model(d: int = 12, m: int = 3, n_blocks: int = 4) -> IDRP:
    x = torch.randn(500, d, generator=torch.Generator().manual_seed(5))
    model = IDRP.from_data(x, IDRPConfig(dim=d, code_dim=m, n_blocks=n_blocks, hidden=32,
                                         n_res=1, aux_hidden=16))
    perturb(model, 0.1, seed=6)
    return model.eval()


def test_full_flow_round_trip_on_standardised_data() -> None:
    model = perturbed_model()
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(7))
    z, _ = model.flow(x)
    pca_whitened = model.layers[1](model.layers[0](x)[0])[0]
    assert (z - pca_whitened).abs().max() > 1.0  # the perturbed flow is far from its init
    assert (model.flow_inverse(z) - x).abs().max() <= 1e-5


def test_full_flow_log_det_matches_autograd() -> None:
    model = perturbed_model(d=6, m=2, n_blocks=3).double()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    _, log_det = model.flow(x)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model.flow(v[None])[0][0], x[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_forward_splits_latent_and_is_batch_size_invariant() -> None:
    model = perturbed_model()
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(9))
    z_comp, z_aux, log_det = model(x)
    assert z_comp.shape == (40, 3) and z_aux.shape == (40, 9) and log_det.shape == (40,)
    one_by_one = torch.cat([model.compress(x[i : i + 1]) for i in range(40)])
    assert torch.allclose(one_by_one, z_comp, rtol=1e-5, atol=1e-5)
    full = model.decompress(z_comp)
    assert torch.allclose(torch.cat([model.decompress(z_comp[i : i + 1]) for i in range(40)]),
                          full, rtol=1e-5, atol=1e-5)

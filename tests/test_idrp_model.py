"""The untrained IDRP is exactly PCA-m (the 'never worse than PCA' starting point)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA

from apcm.server.codecs.idrp.model import IDRP, IDRPConfig


def correlated_data(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(d, d))
    return (rng.normal(size=(n, d)) * np.linspace(2.0, 0.05, d)) @ basis + rng.normal(size=d)


def test_untrained_model_equals_sklearn_pca() -> None:
    d, m = 24, 6
    train = correlated_data(400, d, 0)
    test = correlated_data(100, d, 1)
    model = IDRP.from_data(torch.from_numpy(train), IDRPConfig(dim=d, code_dim=m, n_blocks=4))
    model.eval()
    pca = PCA(n_components=m).fit(train)
    expected = pca.inverse_transform(pca.transform(test))
    x = torch.from_numpy(test).float()
    recon = model.decompress(model.compress(x)).detach().double().numpy()
    assert np.abs(recon - expected).max() < 1e-5 * np.abs(test).max()
    # z_comp is the whitened principal coefficients (up to each direction's sign)
    scale = model.layers[1].scale[:m].double().numpy()
    coeffs = model.compress(x).detach().double().numpy() * scale
    assert np.allclose(np.abs(coeffs), np.abs(pca.transform(test)), atol=1e-4)


def test_untrained_predictor_outputs_zero_and_unwhitened_model_is_pca_too() -> None:
    d, m = 16, 4
    train = correlated_data(300, d, 2)
    model = IDRP.from_data(torch.from_numpy(train),
                           IDRPConfig(dim=d, code_dim=m, n_blocks=2, whiten=False)).eval()
    x = torch.from_numpy(correlated_data(50, d, 3)).float()
    z_comp, z_aux, _ = model(x)
    assert torch.count_nonzero(model.predict_aux(z_comp)) == 0
    pca = PCA(n_components=m).fit(train)
    assert np.allclose(np.abs(z_comp.detach().numpy()), np.abs(pca.transform(x.double().numpy())),
                       atol=1e-4)
    # the discarded part carries the remaining variance, so it is not trivially zero
    assert z_aux.abs().mean() > 1e-3


def test_permutations_are_stored_and_final_one_restores_pca_order() -> None:
    model = IDRP(IDRPConfig(dim=10, code_dim=3, n_blocks=3, seed=7))
    perms = [layer.perm for layer in model.layers if hasattr(layer, "perm")]
    composed = torch.arange(10)
    for p in perms:
        composed = composed[p]
    assert torch.equal(composed, torch.arange(10))
    assert any(not torch.equal(p, torch.arange(10)) for p in perms)
    assert "layers.3.perm" in model.state_dict()

"""Leave-one-source-out cross-validation: no fold ever fits on the source it scores."""

from __future__ import annotations

import numpy as np

from apcm.tools.evaluation.baselines import Method
from apcm.tools.training.robustness import codec_fitter, loso, mean_score

D = 16


def _sources() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Three sources with different spectra, unit norm, split train / val / test."""
    rng = np.random.default_rng(0)
    vectors: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    labels: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for k, name in enumerate(("a", "b", "c")):
        scales = np.roll(np.geomspace(2.0, 0.05, D), 4 * k)
        x = rng.standard_normal((900, D)) * scales
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        for split, lo, hi in (("train", 0, 600), ("val", 600, 700), ("test", 700, 900)):
            vectors[split].append(x[lo:hi])
            labels[split].append(np.full(hi - lo, name))
    return ({k: np.concatenate(v) for k, v in vectors.items()},
            {k: np.concatenate(v) for k, v in labels.items()})


def test_each_fold_fits_without_its_source_and_scores_it() -> None:
    vectors, labels = _sources()
    fitted_on: list[np.ndarray] = []
    inner = codec_fitter(4)

    def recording(train: np.ndarray, val: np.ndarray) -> Method:
        fitted_on.append(train)
        return inner(train, val)

    scores = loso(vectors, labels, recording, max_items=300)
    assert sorted(scores) == ["a", "b", "c"]
    for source, train in zip(sorted(scores), fitted_on, strict=True):
        held = np.concatenate([vectors[k][labels[k] == source] for k in ("train", "val", "test")])
        # no training row of the fold is a row of the left-out source
        assert not (train[:, None, :] == held[None, :, :]).all(-1).any()
        assert len(train) == 1200
    for s in scores.values():
        assert 0 < s.cosine <= 1 and 0 <= s.recall10 <= 1 and s.mse > 0
    m = mean_score(scores)
    assert m.cosine == np.mean([s.cosine for s in scores.values()])


def test_fit_in_domain_beats_the_fold_that_never_saw_the_source() -> None:
    vectors, labels = _sources()
    fit = codec_fitter(4)
    left_out = loso(vectors, labels, fit, max_items=300)["a"]
    seen = fit(vectors["train"], vectors["val"])
    held = vectors["test"][labels["test"] == "a"]
    x_hat = seen.decode(seen.encode(held))
    assert float(((x_hat - held) ** 2).sum(1).mean()) < left_out.mse

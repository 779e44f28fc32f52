"""Leave-one-source-out (LOSO) cross-validation of the text coder's fit.

The company also evaluates on text we never see, so robustness settings (the
variance hedge, group rotation) are chosen by how the coder does on a *training*
source it was not fitted on: fit on the training split of all in-domain sources
but one, measure on the left-out source, average over sources. The held-out OOD
sources (``fortunes``, ``licenses``) take no part in any choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from apcm.server.codecs.idrp.v2 import TransformCodec

from ..evaluation import metrics
from ..evaluation.baselines import Method

# fit(train [N, d], val [V, d]) -> a method that encodes and decodes [M, d] vectors
Fitter = Callable[[np.ndarray, np.ndarray], Method]


@dataclass(frozen=True)
class FoldScore:
    """Decoded-vector numbers of one fit on one set: MSE per vector (sum over dims),
    mean cosine, recall@10 (each item queries the rest of the set)."""

    mse: float
    cosine: float
    recall10: float


def score(method: Method, x: np.ndarray) -> FoldScore:
    """Numbers of ``method`` on vectors ``x`` [N, d]."""
    x = np.ascontiguousarray(x, np.float32)
    x_hat = method.decode(method.encode(x)).reshape(x.shape)
    return FoldScore(float(((x_hat - x) ** 2).sum(1).mean()), metrics.mean_cosine(x, x_hat),
                     metrics.recall_at_k(x, x_hat, 10))


def codec_fitter(budget: int, **fit_kwargs: Any) -> Fitter:
    """Fits the untrained v2 coder (:meth:`TransformCodec.fit` with ``fit_kwargs``:
    ``hedge``, ``rotate_groups``...) at ``budget`` bytes."""
    from ..evaluation.baselines import CodecMethod

    def fit(train: np.ndarray, val: np.ndarray) -> Method:
        codec = TransformCodec.fit(torch.from_numpy(train)[:, None, :], budget,
                                   val=torch.from_numpy(val)[:, None, :], **fit_kwargs)
        return CodecMethod("IDRP v2", codec)

    return fit


def loso(vectors: dict[str, np.ndarray], labels: dict[str, np.ndarray], fit: Fitter,
         max_items: int = 1500, seed: int = 0) -> dict[str, FoldScore]:
    """Per left-out source: fit on ``train`` (validation: ``val``) rows of the other
    sources, score on up to ``max_items`` rows of the left-out source (from any split,
    since none of its rows was fitted on).

    Args:
        vectors: ``train`` / ``val`` / ``test`` arrays [N, d].
        labels: the source of each row, same keys, [N] str.
        fit: the method to fit per fold (e.g. :func:`codec_fitter`).
    """
    out: dict[str, FoldScore] = {}
    rng = np.random.default_rng(seed)
    for source in sorted(set(labels["train"].tolist())):
        keep = {k: labels[k] != source for k in ("train", "val")}
        held = np.concatenate([vectors[k][labels[k] == source] for k in ("train", "val", "test")])
        held = held[rng.permutation(len(held))[:max_items]]
        method = fit(vectors["train"][keep["train"]], vectors["val"][keep["val"]])
        out[source] = score(method, held)
    return out


def mean_score(scores: dict[str, FoldScore]) -> FoldScore:
    """Unweighted mean over sources (each register counts once)."""
    vals = list(scores.values())
    return FoldScore(float(np.mean([s.mse for s in vals])),
                     float(np.mean([s.cosine for s in vals])),
                     float(np.mean([s.recall10 for s in vals])))

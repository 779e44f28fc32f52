"""Search under the codec's similarity weights: exact weighted cosine, an unchanged
soft read, and better neighbours than plain code cosine on the shipped text model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from float_bounds import (
    assert_within_bound,
    float32_cosine_bound,
    float32_mix_bound,
    float32_softmax_bound,
)
from safetensors.numpy import load_file

from apcm.server.codecs.base import load_codec
from apcm.server.codecs.quant import CodeQuantizer
from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.eviction import make_policy
from apcm.server.memory.options import ReadOptions

M = 16


def _bank(code_dtype: str, scale, metric) -> MemoryBank:
    return MemoryBank("w", 64, code_dim=M, code_dtype=code_dtype, scale=scale,
                      device=torch.device("cpu"), policy=make_policy("lfu", 0.0),
                      max_payload_bytes=64, max_key_length=16, metric=metric)


@pytest.mark.parametrize("code_dtype", ["float32", "int8"])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_scores_are_cosine_under_the_weights(code_dtype: str, n_queries: int) -> None:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(40, M, generator=gen) * torch.linspace(0.2, 3.0, M)
    quant = CodeQuantizer(code_dtype, CodeQuantizer.fit_int8_scale(latents)
                          if code_dtype == "int8" else None)
    metric = torch.rand(M, generator=gen) * 4 + 0.1
    bank = _bank(code_dtype, quant.scale, metric)
    codes = quant.quantize(latents)
    bank.apply_write(list(range(40)), codes, [None] * 40, [None] * 40, list(range(1, 41)))
    queries = torch.randn(n_queries, M, generator=gen)
    result = bank.read(queries,
                       ReadOptions(top_k=5, temperature=0.7, soft=True, count_access=False))

    stored = quant.dequantize(codes).double()
    w = metric.double()
    cos = torch.nn.functional.normalize(queries.double() * w, dim=1) @ \
        torch.nn.functional.normalize(stored * w, dim=1).T
    # the weights and int8 scale multiplied in before the dot add a few roundings per
    # term, within the d more that the bound's factor 2 allows
    cos_bound = float32_cosine_bound(queries.double() * w, stored * w)
    weights, weight_bound = float32_softmax_bound(cos, cos_bound, 0.7)
    for q, res in enumerate(result.results):
        best = torch.argsort(cos[q], descending=True)[:5]
        assert [h.slot for h in res.hits] == best.tolist()
        assert_within_bound([h.score for h in res.hits], cos[q, best], cos_bound[q, best],
                            "scores")
        assert_within_bound([h.weight for h in res.hits], weights[q, best],
                            weight_bound[q, best], "weights")
    # The soft read mixes the stored latents themselves, not their weighted versions.
    assert_within_bound(result.soft, weights @ stored,
                        float32_mix_bound(weights, weight_bound, stored), "soft mix")


def test_shipped_text_model_recalls_better_with_its_weights() -> None:
    codec = load_codec("model_weights/text-minilm-v1.safetensors")  # IDRP v1, int8
    weights = codec.similarity_weights
    assert weights is not None and weights.shape == (codec.code_dim,)
    fixture = load_file("tests/fixtures/text_heldout.safetensors")
    memories = torch.from_numpy(fixture["test"].astype(np.float32))
    queries = torch.from_numpy(fixture["ood"].astype(np.float32))

    def top10(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(a.reshape(len(a), -1), dim=1)
        b = torch.nn.functional.normalize(b.reshape(len(b), -1), dim=1)
        return (b @ a.T).topk(10, dim=1).indices

    def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
        return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10
                              for f, t in zip(found, truth, strict=True)]))

    truth = top10(memories, queries)
    with torch.inference_mode():
        stored = codec.quantizer.dequantize(codec.compress(memories))
        asked = codec.encode_latent(queries.reshape(len(queries), -1))
    plain = recall(top10(stored, asked), truth)
    weighted = recall(top10(stored * weights, asked * weights), truth)
    assert weighted > plain + 0.05, (plain, weighted)

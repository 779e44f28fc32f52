"""Reads of packed IDRP v2 banks score codes through per-dim lookup tables
(``lutscan``) instead of decoding them: the scores equal decode-then-dot for every
shipped allocation, and a bank's read ranks exactly like the decoded search."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from float_bounds import assert_float32_cosines, assert_float32_dots, split_magnitude

from apcm.server.codecs.base import load_codec
from apcm.server.codecs.idrp import lutscan
from apcm.server.codecs.idrp.v2 import TransformCodec
from apcm.server.memory import scan
from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.eviction import make_policy
from apcm.server.memory.options import ReadOptions
from apcm.server.memory.scorers import DecodingKernel, LookupKernel

ROOT = Path(__file__).resolve().parents[1]
V2_MODELS = ["text-minilm", "text-minilm-4x", "text-minilm-16x", "text-minilm-32x",
             "digits-v2", "gravel-grey"]


def _codec(name: str) -> TransformCodec:
    codec = load_codec(str(ROOT / "model_weights" / f"{name}.safetensors"),
                       torch.device("cpu"))
    assert isinstance(codec, TransformCodec)
    return codec


def _items(codec: TransformCodec, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *codec.input_shape, generator=gen)
    if codec.name.startswith("text"):  # the model's inputs are unit-norm
        x = torch.nn.functional.normalize(x.reshape(n, -1), dim=1)
    return x.reshape(n, -1)


def _lut_terms(codec: TransformCodec, queries: torch.Tensor,
               decoded: torch.Tensor) -> torch.Tensor:
    """The magnitude of the terms the tables add up: they sum ``q.t`` and ``q.o`` apart
    (decoded ``v = t + o``, o the search offset), which cancel in v for some models."""
    offset = codec.scorer.queries(torch.zeros(1, queries.shape[1]))[0]
    return split_magnitude(queries, decoded, offset)


@pytest.mark.parametrize("name", V2_MODELS)
def test_lookup_table_scores_equal_the_decoded_products(name: str) -> None:
    codec = _codec(name)
    scorer = codec.scorer
    codes = codec.quantizer.quantize(codec.encode_latent(_items(codec, 700, 0)))
    queries = scorer.queries(codec.encode_latent(_items(codec, 3, 1)))
    decoded = scorer.codes(codes)
    got = scorer.dots(queries, codes)
    assert got is not None and got.shape == (3, 700)
    assert_float32_dots(got, queries, decoded, magnitude=_lut_terms(codec, queries, decoded),
                        what=f"{name} scores")
    assert scorer.dots(queries, codes[:0]).shape == (3, 0)


def test_large_calls_split_over_threads_give_the_same_scores(monkeypatch) -> None:
    codec = _codec("text-minilm")
    codes = codec.quantizer.quantize(codec.encode_latent(_items(codec, 5000, 2)))
    queries = codec.scorer.queries(codec.encode_latent(_items(codec, 2, 3)))
    serial = codec.scorer.dots(queries, codes)
    monkeypatch.setattr(lutscan, "PARALLEL_ROWS", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    split = codec.scorer.dots(queries, codes)
    assert serial is not None and split is not None
    assert torch.equal(serial, split)


def test_a_packed_banks_reads_rank_as_the_decoded_search_one_query_or_many() -> None:
    codec = _codec("text-minilm")
    n = 3000
    x = _items(codec, n, 4)
    codes = codec.quantizer.quantize(codec.encode_latent(x))
    bank = MemoryBank("b", n, code_dim=codes.shape[1], code_dtype="uint8", scale=None,
                      device=torch.device("cpu"), policy=make_policy("lfu", 100.0),
                      max_payload_bytes=16, max_key_length=16, scorer=codec.scorer)
    slots = bank.plan_write([None] * n, 1)
    bank.apply_write(slots, codes, [None] * n, [None] * n, list(range(1, n + 1)))
    queries = codec.encode_latent(_items(codec, 20, 5))
    search = codec.scorer.queries(queries)
    assert isinstance(scan.kernel(bank, search[:1], soft=False), LookupKernel)  # one: tables
    # 20 queries share one decode per chunk
    assert type(scan.kernel(bank, search, soft=False)) is DecodingKernel
    singles = [bank.read(queries[i:i + 1], ReadOptions(top_k=10, count_access=False)).results[0]
               for i in range(queries.shape[0])]
    batch = bank.read(queries, ReadOptions(top_k=10, count_access=False)).results
    decoded = codec.scorer.codes(codes)
    q = codec.scorer.queries(queries)
    unit = torch.nn.functional.normalize
    exact = torch.topk(unit(q, dim=1) @ unit(decoded, dim=1).T, 10)
    terms = _lut_terms(codec, q, decoded) / (q.double().norm(dim=1, keepdim=True)
                                              * decoded.double().norm(dim=1))
    for results in (singles, batch):
        for i, res in enumerate(results):
            slots = exact.indices[i]
            assert [h.slot for h in res.hits] == slots.tolist()
            assert_float32_cosines([[h.score for h in res.hits]], q[i:i + 1], decoded[slots],
                                   magnitude=terms[i:i + 1, slots])


def test_the_kernels_load_where_numba_has_nowhere_to_cache() -> None:
    """A read-only install with no writable home: numba refuses ``cache=True`` at
    decoration, and the module must still import and score (compiled per start)."""
    child = (
        "import numba.core.caching as c\n"
        "c.CacheImpl._locator_classes = []\n"
        "import numpy as np\n"
        "from apcm.server.codecs.idrp import lutscan\n"
        "codes = np.array([[0b10110100]], dtype=np.uint8)\n"
        "lut = np.arange(4, dtype=np.float32)[None, :]\n"
        "out = np.zeros((1, 1), np.float32)\n"
        "lutscan._scan(codes, np.zeros(0, np.int64), np.zeros((1, 1, 256), np.float32), lut,"
        " np.array([0]), np.array([0]), np.array([14], np.int32), np.array([3], np.int32),"
        " out)\n"
        "print(float(out[0, 0]))\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # the top two bits of 0b10110100 (10 = 2) pick lut[2]
    assert done.stdout.strip().splitlines()[-1] == "2.0"

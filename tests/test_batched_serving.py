"""Micro-batching inside the real server: concurrent callers get exactly their own
results, the same as with batching off, and one bad request fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from float_bounds import assert_within_bound, float32_cosine_bound, pca_encode_bound

from apcm.client import InvalidArgumentError, MemoryClient


def _run_concurrently(fn, n: int) -> list:
    barrier = threading.Barrier(n)

    def call(i: int):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_compress_and_read_match_in_process(make_server, codec, digits,
                                                       batching: bool) -> None:
    srv = make_server(batching=batching, batch_max_wait_us=2000)
    address = f"127.0.0.1:{srv.port}"
    x = digits[:48]
    with MemoryClient(address) as c:
        c.write(x, mode="per_item", keys=[f"d{i}" for i in range(48)])

    def work(i: int):
        with MemoryClient(address) as c:
            item = x[i : i + 1]
            codes = c.compress(item)
            hits = c.read(item, top_k=2, count_access=False)[0].hits
            return codes, hits

    registry = srv.service.metrics.registry

    def largest_batch(method: str) -> float:
        # the histogram's sum minus its count is 0 exactly when every call had one item
        total = registry.get_sample_value("apcm_batch_size_sum", {"method": method}) or 0.0
        calls = registry.get_sample_value("apcm_batch_size_count", {"method": method}) or 0.0
        return total - calls

    # a batch sums in another order than a lone call: exact codes, float32 bound; the
    # item read back is within that of its stored encode, an angle of 2 |bound| / |code|
    expected, bound = pca_encode_bound(codec, x[:16])
    angle = 2 * bound.norm(dim=1) / expected.norm(dim=1)
    self_bound = float32_cosine_bound(expected, expected).diagonal() + angle ** 2 / 2
    for _ in range(5):  # batches form whenever callers overlap; a few rounds make sure
        results = _run_concurrently(work, 16)
        for i, (codes, hits) in enumerate(results):
            assert_within_bound(codes, expected[i:i + 1], bound[i:i + 1], "codes")
            assert hits[0].key == f"d{i}"
            assert_within_bound([hits[0].score], [1.0], self_bound[i:i + 1], "score of itself")
        if not batching or (largest_batch("Compress") > 0 and largest_batch("Read") > 0):
            break
    if batching:
        assert largest_batch("Compress") > 0, "16 concurrent Compress calls never batched"
        assert largest_batch("Read") > 0, "16 concurrent Reads never shared a search"
    else:
        assert registry.get_sample_value("apcm_batch_size_count", {"method": "Compress"}) \
            in (None, 0.0)


def test_a_bad_request_fails_alone_under_batching(make_server, digits) -> None:
    srv = make_server(batching=True, batch_max_wait_us=5000)
    address = f"127.0.0.1:{srv.port}"

    def work(i: int):
        with MemoryClient(address) as c:
            if i == 3:
                with pytest.raises(InvalidArgumentError):
                    c.compress(np.full((1, 8, 8), np.nan, np.float32))
                return None
            return c.compress(digits[i : i + 1])

    results = _run_concurrently(work, 8)
    assert sum(r is None for r in results) == 1
    assert all(r.shape == (1, 8) for r in results if r is not None)

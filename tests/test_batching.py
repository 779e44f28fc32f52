"""MicroBatcher behaviour: exact per-caller results, error isolation, latency bounds, bypass."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from float_bounds import assert_within_bound, pca_encode_bound

from apcm.server.codecs.pca import PCACodec
from apcm.server.domain.batching import KeyedBatcher, MicroBatcher


class Recorder:
    """A model call that records the rows of every call and can be held at a gate."""

    def __init__(self, fn, gate: threading.Event | None = None) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn
        self.gate = gate
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def __call__(self, items: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(items.shape[0])
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        return self.fn(items)


def row_checksum(items: np.ndarray) -> np.ndarray:
    """A row-wise function whose output identifies its input row."""
    return items.reshape(items.shape[0], -1).sum(axis=1, keepdims=True) * 2.0 + 1.0


def test_many_concurrent_callers_get_exactly_their_unbatched_results(digits) -> None:
    codec = PCACodec.fit(torch.from_numpy(digits[:1200]), 8, "float32")

    def compress(items: np.ndarray) -> np.ndarray:
        return codec.compress(torch.from_numpy(items)).numpy()

    observed: list[int] = []
    batcher = MicroBatcher(compress, max_batch=64, max_wait_s=0.002, observe=observed.append)
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(200):
        start = int(rng.integers(0, 1700))
        requests.append(digits[start:start + int(rng.integers(1, 6))])
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(batcher, requests))
    # a batch sums in another order than one request alone: exact codes, float32 bound
    for request, have in zip(requests, got, strict=True):
        assert_within_bound(have, *pca_encode_bound(codec, request), "codes")
    assert sum(observed) == sum(len(r) for r in requests)
    assert max(observed) <= 64


def test_observe_sees_combined_batches_under_concurrency() -> None:
    gate = threading.Event()
    model = Recorder(row_checksum, gate)
    observed: list[int] = []
    batcher = MicroBatcher(model, max_batch=128, max_wait_s=0.001, observe=observed.append)
    n_callers = 8
    inputs = [np.full((2, 3), float(i), dtype=np.float32) for i in range(n_callers)]
    with ThreadPoolExecutor(max_workers=n_callers) as pool:
        # The first caller occupies the model; the others queue behind it.
        first = pool.submit(batcher, inputs[0])
        assert model.entered.wait(5)
        rest = [pool.submit(batcher, x) for x in inputs[1:]]
        deadline = time.monotonic() + 5
        while batcher._queued_rows < 2 * (n_callers - 1) and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        outputs = [first.result(5)] + [f.result(5) for f in rest]
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(out, row_checksum(x))
    assert observed == [2, 2 * (n_callers - 1)]
    assert model.calls == observed


def test_lanes_run_that_many_calls_at_once_and_queue_the_rest() -> None:
    gate = threading.Event()
    model = Recorder(row_checksum, gate)
    inside = threading.Semaphore(0)

    def counted(items: np.ndarray) -> np.ndarray:
        inside.release()
        return model(items)

    batcher = MicroBatcher(counted, max_batch=128, max_wait_s=0.0, lanes=3)
    inputs = [np.full((1, 2), float(i), dtype=np.float32) for i in range(7)]
    with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
        futures = [pool.submit(batcher, x) for x in inputs[:3]]
        for _ in range(3):  # three lanes: all three callers are inside the model at once
            assert inside.acquire(timeout=5)
        futures += [pool.submit(batcher, x) for x in inputs[3:]]
        deadline = time.monotonic() + 5
        while batcher._queued_rows < 4 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert batcher._queued_rows == 4  # every lane busy: the rest wait
        gate.set()
        outputs = [f.result(5) for f in futures]
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(out, row_checksum(x))
    assert sorted(model.calls)[:3] == [1, 1, 1] and sum(model.calls) == len(inputs)
    assert batcher._running == 0


def test_a_bad_request_fails_alone_and_its_neighbours_succeed() -> None:
    gate = threading.Event()

    def picky(items: np.ndarray) -> np.ndarray:
        if (items < 0).any():
            raise ValueError("negative input")
        return row_checksum(items)

    model = Recorder(picky, gate)
    batcher = MicroBatcher(model, max_batch=64, max_wait_s=0.001)
    good = [np.full((1, 4), float(i), dtype=np.float32) for i in range(1, 6)]
    bad = np.full((2, 4), -1.0, dtype=np.float32)
    with ThreadPoolExecutor(max_workers=8) as pool:
        head = pool.submit(batcher, good[0])
        assert model.entered.wait(5)
        futures = [pool.submit(batcher, x) for x in (good[1], bad, *good[2:])]
        deadline = time.monotonic() + 5
        while batcher._queued_rows < 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        np.testing.assert_array_equal(head.result(5), row_checksum(good[0]))
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(5))
            except ValueError as e:
                outcomes.append(e)
    assert isinstance(outcomes[1], ValueError) and "negative" in str(outcomes[1])
    for x, out in zip((good[1], *good[2:]), outcomes[:1] + outcomes[2:], strict=True):
        np.testing.assert_array_equal(out, row_checksum(x))
    # One combined call of 6 rows failed, then each of its 5 requests ran alone.
    assert model.calls[:2] == [1, 6]
    assert sorted(model.calls[2:]) == [1, 1, 1, 1, 2]


def test_lone_request_returns_promptly_and_runs_alone() -> None:
    model = Recorder(row_checksum)
    batcher = MicroBatcher(model, max_batch=256, max_wait_s=0.2)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for _ in range(3):
        t0 = time.monotonic()
        out = batcher(x)
        assert time.monotonic() - t0 < 1.5
        np.testing.assert_array_equal(out, row_checksum(x))
    assert model.calls == [3, 3, 3]


def test_lone_request_after_a_burst_waits_at_most_max_wait() -> None:
    gate = threading.Event()
    model = Recorder(row_checksum, gate)
    batcher = MicroBatcher(model, max_batch=256, max_wait_s=0.2)
    x = np.ones((1, 4), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        head = pool.submit(batcher, x)
        assert model.entered.wait(5)
        queued = [pool.submit(batcher, x) for _ in range(3)]
        deadline = time.monotonic() + 5
        while batcher._queued_rows < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert batcher._queued_rows == 3
        gate.set()
        for f in (head, *queued):
            f.result(5)
    t0 = time.monotonic()
    np.testing.assert_array_equal(batcher(x), row_checksum(x))
    assert time.monotonic() - t0 < 1.5


def test_request_of_max_batch_rows_or_more_bypasses_the_queue() -> None:
    gate = threading.Event()
    model = Recorder(row_checksum, gate)
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.05)
    small = np.ones((1, 2), dtype=np.float32)
    big = np.arange(20, dtype=np.float32).reshape(10, 2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(batcher, small)
        assert model.entered.wait(5)
        # The model is busy with `held`, yet the big request is not queued behind it.
        big_result = pool.submit(batcher, big)
        deadline = time.monotonic() + 5
        while 10 not in model.calls and time.monotonic() < deadline:
            time.sleep(0.001)
        assert 10 in model.calls and batcher._queued_rows == 0
        gate.set()
        np.testing.assert_array_equal(big_result.result(5), row_checksum(big))
        np.testing.assert_array_equal(held.result(5), row_checksum(small))


def test_output_of_wrong_length_is_an_error_per_request() -> None:
    gate = threading.Event()

    def drops_a_row(items: np.ndarray) -> np.ndarray:
        return row_checksum(items)[: max(len(items) - 1, 1)]

    model = Recorder(drops_a_row, gate)
    batcher = MicroBatcher(model, max_batch=64, max_wait_s=0.001)
    one = np.ones((1, 2), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=3) as pool:
        head = pool.submit(batcher, one)
        assert model.entered.wait(5)
        others = [pool.submit(batcher, one * 3), pool.submit(batcher, one * 5)]
        deadline = time.monotonic() + 5
        while batcher._queued_rows < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert batcher._queued_rows == 2
        gate.set()
        # Single-row requests re-run alone and get their full (one-row) result.
        for f, x in zip((head, *others), (one, one * 3, one * 5), strict=True):
            np.testing.assert_array_equal(f.result(5), row_checksum(x))
    assert model.calls == [1, 2, 1, 1]


def test_torch_outputs_are_split_too() -> None:
    batcher = MicroBatcher(lambda x: torch.from_numpy(x) * 2, max_batch=16, max_wait_s=0.001)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = batcher(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.from_numpy(x) * 2)


def test_closed_batcher_still_answers_unbatched() -> None:
    model = Recorder(row_checksum)
    batcher = MicroBatcher(model, max_batch=16, max_wait_s=0.001)
    batcher.close()
    x = np.ones((2, 2), dtype=np.float32)
    np.testing.assert_array_equal(batcher(x), row_checksum(x))
    assert model.calls == [2]


def test_keyed_batcher_batches_only_within_a_key() -> None:
    gate = threading.Event()
    calls: list[tuple[str, int]] = []
    entered = threading.Event()
    lock = threading.Lock()

    def scaled(key: str, items: np.ndarray) -> np.ndarray:
        with lock:
            calls.append((key, items.shape[0]))
        entered.set()
        assert gate.wait(10)
        return items * {"a": 10.0, "b": 100.0}[key]

    batcher: KeyedBatcher[str] = KeyedBatcher(scaled, max_batch=64, max_wait_s=0.001)
    x = np.ones((1, 2), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=8) as pool:
        head = pool.submit(batcher, "a", x)
        assert entered.wait(5)
        fa = [pool.submit(batcher, "a", x * i) for i in (2, 3)]
        fb = pool.submit(batcher, "b", x * 4)  # another key: runs now, not behind "a"
        deadline = time.monotonic() + 5
        while ("b", 1) not in calls and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        np.testing.assert_array_equal(head.result(5), x * 10)
        for f, i in zip(fa, (2, 3), strict=True):
            np.testing.assert_array_equal(f.result(5), x * i * 10)
        np.testing.assert_array_equal(fb.result(5), x * 400)
    assert sorted(calls) == [("a", 1), ("a", 2), ("b", 1)]


def test_keyed_batcher_forgets_least_recent_keys() -> None:
    batcher: KeyedBatcher[int] = KeyedBatcher(lambda k, x: x + k, max_keys=2, max_batch=8,
                                              max_wait_s=0.0)
    x = np.zeros((1, 1), dtype=np.float32)
    for k in (1, 2, 1, 3):
        assert batcher(k, x)[0, 0] == k
    assert list(batcher.keys) == [1, 3]


@pytest.mark.parametrize("kwargs", [dict(max_batch=0, max_wait_s=0.1),
                                    dict(max_batch=4, max_wait_s=-1.0),
                                    dict(max_batch=4, max_wait_s=0.1, lanes=0)])
def test_invalid_limits_are_rejected(kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        MicroBatcher(row_checksum, **kwargs)

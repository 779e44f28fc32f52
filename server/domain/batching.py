"""Dynamic micro-batching for a thread-pool gRPC server.

Handlers are synchronous threads, so there is no event loop and no dedicated
batching thread: the batcher uses a *leader/follower* hand-off. At most
``lanes`` model calls per batcher are in flight (one for a model that already
uses every core per call; one per core for reads, whose scans are serial and
release the GIL). A request that arrives while a lane is free becomes a leader
and runs at once; requests that arrive while every lane is busy queue up, and
when a call finishes the head of the queue is promoted to leader of that lane
and takes everything queued (up to ``max_batch`` rows) into the next call.
Under load the queue fills exactly while the lanes are busy, so batches form
without anybody sleeping; an idle server adds no latency at all.

Waiting for a batch to fill (at most ``max_wait_s`` after the first queued
request arrived) only happens while concurrency has recently been seen (the
previous call carried more than one request), because a lone caller on a quiet
server has nothing to wait for. Followers block on their own ``Event`` (no
busy-waiting, and no thundering herd of ``notify_all`` wake-ups per batch).

Per-request errors stay separate: if ``fn`` raises on a combined batch, each
request of that batch is re-run alone and gets its own result or exception.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
Rows = Any  # a numpy array or a torch tensor [n, ...]; batches stay where they are
BatchFn = Callable[[Rows], Any]


class _Pending:
    """One caller's request: its rows, arrival time, and (once served) its outcome."""

    __slots__ = ("items", "rows", "arrived", "done", "promoted", "result", "error")

    def __init__(self, items: Rows) -> None:
        self.items = items
        self.rows = int(items.shape[0])
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.promoted = False
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class MicroBatcher:
    """Gathers concurrent calls of ``fn`` into one call on the concatenated rows.

    Args:
        fn: the model call, items [n, ...] -> outputs [n, ...]. Its output must
            support ``len()`` and slicing along the first axis (a numpy array, a
            torch tensor or a list); each caller gets a view of its own rows.
        max_batch: largest number of rows in one combined call. A request of
            ``max_batch`` rows or more runs alone, bypassing the queue.
        max_wait_s: longest a queued request waits for the batch to fill.
        observe: called with the row count of every call of ``fn`` (e.g. a
            Prometheus histogram's ``observe``).
        name: for ``repr`` and thread names in logs.
        lanes: most calls of ``fn`` in flight at once (queueing starts when all
            are busy).
    """

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch: int,
        max_wait_s: float,
        observe: Callable[[int], None] | None = None,
        name: str = "",
        lanes: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.fn = fn
        self.lanes = lanes
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._observe = observe
        self._lock = threading.Lock()
        self._arrivals = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0  # invariant: the queue is non-empty only while all lanes run
        self._recent_concurrency = False
        self._closed = False

    def __repr__(self) -> str:
        return (f"MicroBatcher({self.name!r}, max_batch={self.max_batch}, "
                f"wait={self.max_wait_s}, lanes={self.lanes})")

    def __call__(self, items: Rows) -> Any:
        """Run ``fn`` on ``items`` [b, ...], possibly batched with other callers' rows.

        Blocks until this request's rows are computed. Returns exactly ``fn``'s
        output rows for these items; raises what ``fn`` raised for them alone.
        """
        if items.shape[0] >= self.max_batch or self._closed:
            return self._call(items)
        req = _Pending(items)
        with self._lock:
            if self._running >= self.lanes:
                self._queue.append(req)
                self._queued_rows += req.rows
                self._arrivals.notify()
            else:
                self._running += 1
                req.promoted = True
        if not req.promoted:
            req.done.wait()
            if not req.promoted:
                return req.outcome()
        self._lead(req)
        return req.outcome()

    def close(self) -> None:
        """Stop batching: later calls run ``fn`` directly; queued requests still finish."""
        with self._lock:
            self._closed = True

    # -- the leader's work -------------------------------------------------------------
    def _call(self, items: Rows) -> Any:
        if self._observe is not None:
            self._observe(int(items.shape[0]))
        return self.fn(items)

    def _lead(self, first: _Pending) -> None:
        """Run one batch headed by ``first``, then hand the lead to the next in line."""
        batch: list[_Pending] = [first]
        try:
            batch = self._gather(first)
            self._run(batch)
        except BaseException as e:  # never leave a follower blocked, even on KeyboardInterrupt
            for r in batch:
                if r.result is None and r.error is None:
                    r.error = e
            raise
        finally:
            nxt = self._hand_off(len(batch))
            for r in batch[1:]:
                r.done.set()
            if nxt is not None:
                nxt.done.set()

    def _gather(self, first: _Pending) -> list[_Pending]:
        with self._lock:
            if self._recent_concurrency and self.max_wait_s > 0:
                deadline = first.arrived + self.max_wait_s
                while first.rows + self._queued_rows < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arrivals.wait(left)
            batch = [first]
            rows = first.rows
            while self._queue and rows + self._queue[0].rows <= self.max_batch:
                r = self._queue.popleft()
                self._queued_rows -= r.rows
                rows += r.rows
                batch.append(r)
            return batch

    def _hand_off(self, batch_requests: int) -> _Pending | None:
        with self._lock:
            self._recent_concurrency = batch_requests > 1 or bool(self._queue)
            if not self._queue:
                self._running -= 1
                return None
            nxt = self._queue.popleft()
            self._queued_rows -= nxt.rows
            nxt.promoted = True
            return nxt

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        try:
            out = self._call(_concat([r.items for r in batch]))
            total = sum(r.rows for r in batch)
            if len(out) != total:
                raise ValueError(f"batched fn returned {len(out)} rows for {total} inputs")
        except Exception:
            # Isolate the failure: each request gets its own result or its own error.
            for r in batch:
                self._run_alone(r)
            return
        start = 0
        for r in batch:
            r.result = out[start:start + r.rows]
            start += r.rows

    def _run_alone(self, req: _Pending) -> None:
        try:
            req.result = self._call(req.items)
        except Exception as e:
            req.error = e


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _concat(items: list[Any]) -> Any:
    """Rows of numpy arrays or torch tensors, joined where they are (no device copy)."""
    if isinstance(items[0], np.ndarray):
        return np.concatenate(items)
    import torch

    return torch.cat(items)


class KeyedBatcher(Generic[K]):
    """One :class:`MicroBatcher` per key, for calls that only batch with like calls.

    Read queries batch only with queries for the same bank and parameters
    (top_k, temperature, ...): ``fn(key, items)`` runs one matmul per key.
    Batchers are created on first use and hold no threads; the least recently
    used idle ones are forgotten beyond ``max_keys``.

    Args:
        fn: ``fn(key, items [n, ...]) -> outputs [n, ...]``.
        max_keys: how many keys keep a batcher.
        **kwargs: ``max_batch``, ``max_wait_s``, ``observe``, ``lanes`` of each batcher.
    """

    def __init__(self, fn: Callable[[K, Rows], Any], *, max_keys: int = 64,
                 **kwargs: Any) -> None:
        self.fn = fn
        self.max_keys = max_keys
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._batchers: dict[K, MicroBatcher] = {}
        self._closed = False

    def __call__(self, key: K, items: Rows) -> Any:
        """Run ``fn(key, items)``, batched with concurrent calls of the same key."""
        return self._batcher(key)(items)

    def _batcher(self, key: K) -> MicroBatcher:
        with self._lock:
            b = self._batchers.pop(key, None)
            if b is None:
                b = MicroBatcher(lambda items: self.fn(key, items), name=repr(key),
                                 **self._kwargs)
                if self._closed:
                    b.close()
            self._batchers[key] = b  # re-insert: dict order is recency order
            while len(self._batchers) > self.max_keys:
                # Dropping a batcher in use is safe: its callers hold a reference.
                self._batchers.pop(next(iter(self._batchers)))
            return b

    def close(self) -> None:
        """Stop batching for every key."""
        with self._lock:
            self._closed = True
            for b in self._batchers.values():
                b.close()

    @property
    def keys(self) -> Sequence[K]:
        with self._lock:
            return list(self._batchers)

"""A readers-writer lock: many readers at once, or one writer.

Phase-fair enough for a bank: a waiting writer stops new readers from entering
(writers never starve), and when a writer leaves, the readers that queued behind
it are let in before the next writer (readers never starve either). ``with lock:``
takes it exclusively, so code written for a plain ``threading.Lock`` keeps its
meaning; ``with lock.shared():`` takes it as a reader. Not reentrant.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # readers inside
        self._writer = False  # a writer inside
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admit = 0  # queued readers to let in before the next writer

    # -- exclusive ---------------------------------------------------------------------
    def acquire(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers or self._admit:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release(self) -> None:
        with self._cond:
            self._writer = False
            self._admit = self._readers_waiting
            self._cond.notify_all()

    def __enter__(self) -> ReadWriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- shared ------------------------------------------------------------------------
    def acquire_shared(self) -> None:
        with self._cond:
            if self._writer or self._writers_waiting:
                self._readers_waiting += 1
                while self._writer or (self._writers_waiting and not self._admit):
                    self._cond.wait()
                self._readers_waiting -= 1
                if self._admit:
                    self._admit -= 1
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    def readers(self) -> int:
        """Readers inside now (for tests and metrics; changes at once)."""
        return self._readers

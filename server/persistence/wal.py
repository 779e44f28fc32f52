"""Write-ahead log: every acknowledged mutation is on disk before its reply.

The segment files are in ``walsegments``, the record format in ``walformat`` and
start-up replay in ``walreplay``; their public names are importable from here too.

Durability modes (``wal_mode``):
    fsync: ``wait_durable`` returns after the record is fsynced. Concurrent callers
        share one ``write`` + ``fsync`` (leader/follower group commit).
    interval: ``wait_durable`` returns after ``write`` (survives ``kill -9``); a
        background thread fsyncs every ``interval_s`` (an OS crash or power loss
        can lose that window).
    off: like interval without the thread; the OS decides when data reaches disk.

After an I/O error the log refuses mutations (``WalError``, UNAVAILABLE) and a
thread retries every ``retry_s``: it cuts the failed segment back to its last
complete record, starts a new segment and writes the records that were not
durable yet. ``healthy`` and the listeners report the state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from .walformat import (
    VERSION,
    PreparedRecord,
    WalRecord,
    decode_body,
    encode_record,
    iter_segment,
    prepare_record,
)
from .walmark import AckMark, write_mark
from .walreplay import ReplayResult, WalCorruptError, WalGapError, replay
from .walsegments import SegmentFiles, list_segments, segment_path, write_all

log = logging.getLogger(__name__)

__all__ = [
    "MODES", "VERSION", "PreparedRecord", "ReplayResult", "WalCorruptError", "WalError",
    "WalGapError", "WalRecord", "WriteAheadLog", "decode_body", "encode_record",
    "iter_segment", "list_segments", "replay",
]

MODES = ("fsync", "interval", "off")


class WalError(Unavailable):
    """The log cannot make writes durable now (disk full, I/O error, closed)."""


class WriteAheadLog(SegmentFiles):
    """Appends records to the newest segment with group commit.

    ``prepare`` encodes a record (no lock needed); ``append`` gives it its
    sequence and buffers it (it runs under the store's sequence lock, so it only
    finishes a CRC); ``wait_durable`` writes and, in ``fsync`` mode, fsyncs.
    Whoever finds no flush in progress becomes the leader and flushes every
    buffered record; the rest wait on the condition and find their records
    already durable — one fsync per group. ``_fd``, ``_index``, ``_bytes`` and
    ``_good_end`` change only under ``_cond``.

    Args:
        directory: folder of the segments (created if missing).
        model_hash: content hash of the codec whose codes the log holds.
        mode: ``"fsync"``, ``"interval"`` or ``"off"``.
        interval_s: fsync period in ``interval`` mode.
        metrics: optional object with ``observe_fsync(seconds)``, ``set_wal_bytes(n)``
            and (optionally) ``set_wal_healthy(ok)``.
        retry_s: after an I/O error, seconds between attempts to start a new segment.
    """

    def __init__(
        self,
        directory: Path,
        model_hash: str,
        mode: str = "fsync",
        interval_s: float = 0.1,
        metrics: Any = None,
        retry_s: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"wal mode must be one of {MODES}, got {mode!r}")
        self.directory = Path(directory)
        self.model_hash = model_hash
        self.mode = mode
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._buf: list[bytes] = []
        self._buf_records = 0  # records in _buf, the last of them sequence _buf_seq
        self._buf_seq = 0
        self._mark_fd: int | None = None
        self._records = 0
        self._flushed_seq = 0
        self._appended = 0
        self._durable = 0
        self._flushing = False
        self._failed: BaseException | None = None
        self._failed_at = 0.0
        self._fd: int | None = None
        self._index = 0
        self._good_end = 0  # bytes of the current segment known to be completely written
        self._bytes = 0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._retrier: threading.Thread | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._written = 0
        # Called with ``written_bytes`` after each write (outside the log's locks).
        self.on_flush: Callable[[int], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Start a fresh segment after the existing ones (call after ``replay``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = list_segments(self.directory)
        with self._cond:
            self._bytes = sum(p.stat().st_size for _, p in existing)
        self._switch_segment((existing[-1][0] + 1) if existing else 1)
        if existing:
            self._link_previous(existing[-1][1])
        self._set_healthy(True)
        if self.mode == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name="apcm-wal-sync",
                                            daemon=True)
            self._syncer.start()

    def close(self) -> None:
        """Flush, fsync and close the log. Idempotent."""
        self._stop.set()
        for thread in (self._syncer, self._retrier):
            if thread is not None:
                thread.join()
        self._syncer = self._retrier = None
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._fd is None:
                return
            self._flushing = True
        try:
            if self._failed is None:
                self._flush_buffer(force_fsync=True)
        finally:
            with self._cond:
                fd, self._fd = self._fd, None
                self._flushing = False
                self._cond.notify_all()
            if fd is not None:
                os.close(fd)
            if self._mark_fd is not None:
                os.close(self._mark_fd)
                self._mark_fd = None

    @property
    def segment_index(self) -> int:
        """Index of the segment being appended to."""
        return self._index

    @property
    def size_bytes(self) -> int:
        """Bytes in all segments, as far as this process knows."""
        return self._bytes

    @property
    def written_bytes(self) -> int:
        """Record bytes this process wrote (never decreases; trimming does not count)."""
        return self._written

    @property
    def healthy(self) -> bool:
        """Whether a write appended now can be made durable (open, no unrecovered error)."""
        with self._cond:
            return self._fd is not None and self._failed is None

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(healthy)`` whenever the log turns unusable or usable again."""
        self._listeners.append(callback)

    # -- the MutationLog protocol ------------------------------------------------------
    def prepare(
        self, kind: str, bank: str, fields: dict[str, Any], count: int = 1
    ) -> PreparedRecord:
        """Encode a record without its sequence; call it before taking the sequence lock."""
        return prepare_record(kind, bank, fields, count)

    def append(self, seq: int, record: PreparedRecord) -> None:
        """Buffer ``record`` as sequence ``seq`` (its last one). Runs under the store's
        locks: no I/O, no encoding here.

        Raises:
            WalError: the log is failed or closed; the mutation must not be applied.
        """
        with self._cond:
            self._check_usable()
            self._buf.extend(record.finish(seq))
            self._buf_records += 1
            self._buf_seq = seq
            self._appended += 1

    def wait_durable(self, seq: int) -> None:
        """Block until every record appended so far (``seq``'s included) is durable per mode.

        Raises:
            WalError: the log could not be written; the mutation must not be acknowledged.
        """
        with self._cond:
            target = self._appended
            while self._durable < target:
                self._check_usable()
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                self._cond.release()
                try:
                    self._flush_buffer(force_fsync=False)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    self._cond.notify_all()
            self._check_usable()

    # -- segments ----------------------------------------------------------------------
    def rotate(self) -> int:
        """Flush and close the current segment, start the next; returns the new index.

        Every record appended before this call is in a segment below the new index
        (after an I/O error, rotating is a recovery attempt: the records that were
        not durable go into the new segment).
        """
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._fd is None:
                raise WalError("write-ahead log is closed")
            self._flushing = True
            failed = self._failed is not None
        try:
            if failed:
                if not self._recover_locked():
                    self._check_usable()
                return self._index
            self._flush_buffer(force_fsync=True)
            try:
                self._switch_segment(self._index + 1)
            except OSError as e:
                self._fail(e)
                raise WalError(f"write-ahead log rotation failed: {e}") from e
            return self._index
        finally:
            with self._cond:
                self._flushing = False
                self._cond.notify_all()

    # -- internals ---------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WalError(
                f"write-ahead log cannot make writes durable since "
                f"{time.strftime('%H:%M:%S', time.localtime(self._failed_at))}: "
                f"{self._failed}; retrying every {self.retry_s:g} s"
            )
        if self._fd is None:
            raise WalError("write-ahead log is closed")

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            first = self._failed is None
            self._failed = exc
            if first:
                self._failed_at = time.time()
            self._cond.notify_all()
            start_retrier = self._retrier is None or not self._retrier.is_alive()
            if start_retrier and not self._stop.is_set():
                self._retrier = threading.Thread(target=self._retry_loop,
                                                 name="apcm-wal-retry", daemon=True)
                self._retrier.start()
        if first:
            log.error("write-ahead log failed; writes are refused until it recovers: %s", exc)
            self._set_healthy(False)

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            with self._cond:
                if self._failed is None or self._fd is None:
                    return
                if self._flushing:
                    continue
                self._flushing = True
            try:
                if self._recover_locked():
                    return
            finally:
                with self._cond:
                    self._flushing = False
                    self._cond.notify_all()

    def _recover_locked(self) -> bool:
        """Start a new segment holding the records that were not durable. Caller holds
        the flushing role. Returns whether the log is usable again."""
        try:
            with self._cond:
                index, good_end = self._index, self._good_end
            # A half-written record must not stay in the middle of the log. By path: the
            # old descriptor may be the broken part.
            path = segment_path(self.directory, index)
            os.truncate(path, good_end)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._switch_segment(index + 1)
            self._flush_buffer(force_fsync=True, raise_os_error=True)
        except OSError as e:
            with self._cond:
                self._failed = e
            log.warning("write-ahead log still unusable: %s", e)
            return False
        with self._cond:
            self._failed = None
            self._cond.notify_all()
        log.warning("write-ahead log usable again: writing to %s",
                    segment_path(self.directory, self._index).name)
        self._set_healthy(True)
        return True

    def _flush_buffer(self, force_fsync: bool, raise_os_error: bool = False) -> None:
        """Write (and maybe fsync) everything buffered. Caller holds the flushing role."""
        with self._cond:
            batch, self._buf = self._buf, []
            records, self._buf_records = self._buf_records, 0
            upto, last_seq = self._appended, self._buf_seq
            fd, end = self._fd, self._good_end
        assert fd is not None
        data = b"".join(batch)
        try:
            if data:
                write_all(fd, data)
            if force_fsync or (data and self.mode == "fsync"):
                t0 = time.perf_counter()
                os.fsync(fd)
                if self.metrics is not None:
                    self.metrics.observe_fsync(time.perf_counter() - t0)
            if records:
                # before any of these writes is acknowledged (see walmark)
                assert self._mark_fd is not None
                write_mark(self._mark_fd,
                           AckMark(end + len(data), last_seq, self._records + records))
        except OSError as e:
            with self._cond:
                self._buf[:0] = batch  # kept for the new segment a recovery starts
                self._buf_records += records
            if raise_os_error:
                raise
            self._fail(e)
            raise WalError(f"write-ahead log write failed: {e}") from e
        self._records += records
        self._flushed_seq = max(self._flushed_seq, last_seq)
        with self._cond:
            self._durable = max(self._durable, upto)
            self._good_end += len(data)
            self._bytes += len(data)
            self._written += len(data)
            written = self._written
        if data:
            self._report_bytes()
            if self.on_flush is not None:
                self.on_flush(written)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._cond:
                if self._fd is None:
                    return
                if self._failed is not None:
                    continue
                fd = os.dup(self._fd)
            try:
                t0 = time.perf_counter()
                os.fsync(fd)
                if self.metrics is not None:
                    self.metrics.observe_fsync(time.perf_counter() - t0)
            except OSError as e:
                self._fail(e)
            finally:
                os.close(fd)

    def _set_healthy(self, ok: bool) -> None:
        setter = getattr(self.metrics, "set_wal_healthy", None)
        if setter is not None:
            setter(ok)
        for callback in list(self._listeners):
            try:
                callback(ok)
            except Exception:
                log.exception("write-ahead-log health listener failed")

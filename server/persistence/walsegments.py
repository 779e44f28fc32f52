"""Write-ahead-log segment files: their names, and creating, linking and deleting them.

Layout: ``<dir>/wal-<index:010d>.log`` segments, replayed in index order. A new
segment is started on every open, before every snapshot and after an I/O error,
so segments that a snapshot covers can be deleted whole. A segment that was
followed by another ends with a ``SEGMENT_END`` record naming it, so replay
notices a deleted segment. Next to each segment, ``wal-<index>.acked`` says how
far it was acknowledged (``walmark``). The record format is in ``walformat``; ``wal``
appends to the newest segment and ``walreplay`` reads them all back.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from ..fsutil import fsync_dir
from .walformat import (
    SEGMENT_END,
    VERSION,
    BadRecord,
    encode_header,
    encode_record,
    segment_version,
)
from .walmark import AckMark, open_mark, remove_mark

log = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^wal-(\d{10})\.log$")


def segment_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"wal-{index:010d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segments of the log in replay order, as ``(index, path)``."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _SEGMENT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


class SegmentFiles:
    """The segment files of a ``WriteAheadLog``: creating the next one, linking it
    from the one before, deleting those a snapshot covers.

    ``WriteAheadLog`` sets these attributes; ``_fd``, ``_index``, ``_bytes`` and
    ``_good_end`` change only under ``_cond``. ``_mark_fd`` is the current segment's
    acknowledgement mark, ``_records`` the records flushed into it and ``_flushed_seq``
    the last sequence flushed (only the flushing role changes them).
    """

    directory: Path
    model_hash: str
    metrics: Any
    _cond: threading.Condition
    _fd: int | None
    _index: int
    _good_end: int
    _bytes: int
    _mark_fd: int | None
    _records: int
    _flushed_seq: int

    def delete_segments_before(self, index: int) -> int:
        """Remove segments with a lower index (a durable snapshot covers them). Returns count."""
        removed = 0
        for i, path in list_segments(self.directory):
            if i >= min(index, self._index):
                break
            size = path.stat().st_size
            path.unlink()
            remove_mark(path)
            with self._cond:
                self._bytes -= size
            removed += 1
        if removed:
            fsync_dir(self.directory)
            self._report_bytes()
        return removed

    def _switch_segment(self, index: int) -> None:
        """Create segment ``index``, link the current one to it, make it current."""
        path = segment_path(self.directory, index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        header = encode_header(self.model_hash, index)
        mark_fd: int | None = None
        try:
            write_all(fd, header)
            os.fsync(fd)
            mark_fd = open_mark(path, AckMark(len(header), self._flushed_seq, 0))
            fsync_dir(self.directory)
        except OSError as e:
            os.close(fd)
            if mark_fd is not None:
                os.close(mark_fd)
            path.unlink(missing_ok=True)
            remove_mark(path)
            # a failed write names no file; the operator needs to know which disk is full
            raise OSError(e.errno, e.strerror, e.filename or str(path)) from e
        link = 0
        old, old_mark = self._fd, self._mark_fd
        if old is not None:
            link = self._write_link(old, index)
        with self._cond:
            self._fd, self._index, self._good_end = fd, index, len(header)
            self._bytes += len(header) + link
        self._mark_fd, self._records = mark_fd, 0
        if old is not None:
            os.close(old)  # after the swap: the sync thread dups the descriptor under _cond
        if old_mark is not None:
            os.close(old_mark)
        self._report_bytes()

    def _write_link(self, fd: int, index: int) -> int:
        """End the segment open at ``fd`` with a record naming the next one; returns its size."""
        data = encode_record(0, SEGMENT_END, "", {"next_segment": index}, count=0)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError as e:
            # The log stays correct; only a later deletion of the new segment goes unnoticed.
            log.warning("could not end the previous log segment with a link to %d: %s", index, e)
            return 0
        return len(data)

    def _link_previous(self, path: Path) -> None:
        try:
            if segment_version(path) != VERSION:
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except (OSError, BadRecord) as e:
            log.warning("could not link %s to the new segment: %s", path.name, e)
            return
        try:
            size = self._write_link(fd, self._index)
        finally:
            os.close(fd)
        with self._cond:
            self._bytes += size

    def _report_bytes(self) -> None:
        if self.metrics is not None:
            self.metrics.set_wal_bytes(self._bytes)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

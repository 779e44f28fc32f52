"""Write-ahead log: every acknowledged mutation is on disk before its reply.

Layout: ``<dir>/wal-<index:010d>.log`` segments, replayed in index order. A new
segment is started on every open and before every snapshot, so segments that a
snapshot covers can be deleted whole.

Segment = header, then records::

    header: b"APCMWAL\\n" | u32 version | u32 json_len | json | u32 crc32(all before)
    record: u32 body_len | u32 crc32(body_len bytes + body) | body
    body:   u64 seq | u32 meta_len | meta json | blob bytes

``meta`` holds the kind, the bank, JSON scalars and, per array field, its tag,
dtype and shape; the arrays' little-endian bytes follow in ``blob`` (no pickle).
A list of ``str``/``bytes`` is stored as int64 lengths followed by the data.

Durability modes (``wal_mode``):
    fsync: ``wait_durable`` returns after the record is fsynced. Concurrent callers
        share one ``write`` + ``fsync`` (leader/follower group commit).
    interval: ``wait_durable`` returns after ``write`` (survives ``kill -9``); a
        background thread fsyncs every ``interval_s`` (an OS crash or power loss
        can lose that window).
    off: like interval without the thread; the OS decides when data reaches disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from apcm.server.errors import ApcmError, FailedPrecondition
from apcm.server.fsutil import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"APCMWAL\n"
VERSION = 1
MODES = ("fsync", "interval", "off")
MAX_RECORD_BYTES = 1 << 31
_SEGMENT_RE = re.compile(r"^wal-(\d{10})\.log$")
_REC_HEAD = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<QI")
_FILE_HEAD = struct.Struct("<8sII")
_CRC = struct.Struct("<I")


class WalError(ApcmError):
    """The log cannot be written (disk full, I/O error); nothing more is acknowledged."""

    code = "INTERNAL"


class WalCorruptError(FailedPrecondition):
    """A record before the end of the log fails its checks; replay refuses to skip it."""


@dataclass
class WalRecord:
    """One logged mutation, as ``MemoryStore.apply_record`` takes it."""

    seq: int
    kind: str
    bank: str
    fields: dict[str, Any]


@dataclass
class ReplayResult:
    """What ``replay`` did: last sequence seen, records applied, bytes cut off a torn tail."""

    last_seq: int = 0
    applied: int = 0
    truncated_bytes: int = 0
    segments: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- encoding


def encode_record(seq: int, kind: str, bank: str, fields: dict[str, Any]) -> bytes:
    """Serialise one mutation into a framed, checksummed record.

    Args:
        seq: the store's sequence number of the mutation.
        kind: record type, e.g. ``"write"``.
        bank: bank name.
        fields: JSON scalars, numpy arrays (any shape) and lists of ``str``/``bytes``.

    Returns:
        The record bytes: length, CRC32 and body.
    """
    scalars: dict[str, Any] = {}
    arrays: list[list[Any]] = []
    blobs: list[bytes] = []
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"field {name!r}: object arrays cannot be logged")
            arr = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            arrays.append([name, "nd", arr.dtype.str, list(arr.shape)])
            blobs.append(arr.tobytes())
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (str, bytes, bytearray, memoryview)) for v in value
        ):
            is_str = isinstance(value[0], str)
            if any(isinstance(v, str) != is_str for v in value):
                raise TypeError(f"field {name!r} mixes str and bytes")
            items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
            lengths = np.array([len(b) for b in items], dtype="<i8")
            arrays.append([name, "str" if is_str else "bytes", "<i8", [len(items)]])
            blobs.append(lengths.tobytes())
            blobs.extend(items)
        elif isinstance(value, np.generic):
            scalars[name] = value.item()
        else:
            scalars[name] = value
    meta = json.dumps(
        {"kind": kind, "bank": bank, "scalars": scalars, "arrays": arrays},
        separators=(",", ":"),
    ).encode("utf-8")
    body = b"".join([_BODY_HEAD.pack(seq, len(meta)), meta, *blobs])
    head = struct.pack("<I", len(body))
    return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body


def decode_body(body: bytes | bytearray) -> WalRecord:
    """Parse a record body whose CRC already matched. Raises ``ValueError`` if malformed."""
    view = memoryview(body)
    seq, meta_len = _BODY_HEAD.unpack_from(view, 0)
    pos = _BODY_HEAD.size
    meta = json.loads(bytes(view[pos:pos + meta_len]))
    pos += meta_len
    fields: dict[str, Any] = dict(meta["scalars"])
    for name, tag, dtype_str, shape in meta["arrays"]:
        dtype = np.dtype(dtype_str)
        if dtype.hasobject or any(int(d) < 0 for d in shape):
            raise ValueError(f"array {name!r} has an invalid dtype or shape")
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if pos + nbytes > len(view):
            raise ValueError(f"array {name!r} runs past the record")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=pos).reshape(shape)
        pos += nbytes
        if tag == "nd":
            fields[name] = arr
            continue
        items: list[Any] = []
        for n in arr.tolist():
            if n < 0 or pos + n > len(view):
                raise ValueError(f"list {name!r} runs past the record")
            chunk = bytes(view[pos:pos + n])
            items.append(chunk.decode("utf-8") if tag == "str" else chunk)
            pos += n
        fields[name] = items
    if pos != len(view):
        raise ValueError("trailing bytes after the last field")
    return WalRecord(int(seq), meta["kind"], meta["bank"], fields)


def _encode_header(model_hash: str, index: int) -> bytes:
    meta = json.dumps({"model_hash": model_hash, "segment": index, "created_at": time.time()})
    head = _FILE_HEAD.pack(MAGIC, VERSION, len(meta)) + meta.encode("utf-8")
    return head + _CRC.pack(zlib.crc32(head))


# --------------------------------------------------------------------------- reading


class _BadRecord(Exception):
    def __init__(self, offset: int, reason: str, reaches_eof: bool) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        self.reaches_eof = reaches_eof


def _zeros_to_eof(f: BinaryIO) -> bool:
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _read_header(f: BinaryIO, size: int) -> dict[str, Any]:
    raw = f.read(_FILE_HEAD.size)
    if len(raw) < _FILE_HEAD.size:
        raise _BadRecord(0, "segment header is cut short", True)
    magic, version, meta_len = _FILE_HEAD.unpack(raw)
    if magic != MAGIC:
        raise _BadRecord(0, "not an ApCM write-ahead log (bad magic)", False)
    if version != VERSION:
        raise _BadRecord(0, f"unsupported log version {version}", False)
    if _FILE_HEAD.size + meta_len + _CRC.size > size:
        raise _BadRecord(0, "segment header is cut short", True)
    meta = f.read(meta_len)
    (crc,) = _CRC.unpack(f.read(_CRC.size))
    if crc != zlib.crc32(raw + meta):
        raise _BadRecord(0, "segment header fails its CRC", False)
    return json.loads(meta)


def iter_segment(
    path: Path, check_header: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[tuple[int, WalRecord]]:
    """Yield ``(end_offset, record)`` for each intact record of one segment.

    ``check_header`` sees the segment header's JSON before any record.

    Raises:
        _BadRecord: at the first record (or header) that fails a check; its
            ``reaches_eof`` says whether everything from there on looks like a
            torn final write (cut short, or followed only by zero bytes).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = _read_header(f, size)
        if check_header is not None:
            check_header(header)
        offset = f.tell()
        while offset < size:
            head = f.read(_REC_HEAD.size)
            if len(head) < _REC_HEAD.size:
                raise _BadRecord(offset, "record header cut short", True)
            length, crc = _REC_HEAD.unpack(head)
            end = offset + _REC_HEAD.size + length
            if length == 0 and crc == 0:
                raise _BadRecord(offset, "zero bytes where a record should be", _zeros_to_eof(f))
            if end > size or length > MAX_RECORD_BYTES:
                raise _BadRecord(offset, "record runs past the end of the file", True)
            body = bytearray(length)
            f.readinto(body)
            if crc != zlib.crc32(body, zlib.crc32(head[:4])):
                raise _BadRecord(offset, "record fails its CRC32", end == size or _zeros_to_eof(f))
            try:
                record = decode_body(body)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise _BadRecord(offset, f"record is malformed: {e}", False) from e
            offset = end
            yield end, record


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


def replay(
    directory: Path,
    model_hash: str,
    after_seq: int,
    apply: Callable[[WalRecord], None],
) -> ReplayResult:
    """Apply every logged record with ``seq > after_seq``, in log order.

    A torn tail of the last segment (cut short, or bad CRC followed only by
    zeros) is truncated away: its write was never acknowledged. Any other bad
    record stops replay with ``WalCorruptError`` — skipping it would silently
    drop an acknowledged memory.

    Raises:
        WalCorruptError: a record in the middle of the log is damaged.
        FailedPrecondition: the log was written for another model.
    """
    result = ReplayResult(last_seq=after_seq)
    segments = list_segments(directory)
    for i, (_, path) in enumerate(segments):
        last_segment = i == len(segments) - 1
        result.segments.append(path)

        def check_header(header: dict[str, Any], path: Path = path) -> None:
            logged_hash = header.get("model_hash")
            if logged_hash != model_hash:
                raise FailedPrecondition(
                    f"write-ahead log {path} was written for model {logged_hash}, but the "
                    f"served model is {model_hash}; serve model {logged_hash} or move the "
                    "data directory aside"
                )

        try:
            for _, record in iter_segment(path, check_header):
                result.last_seq = max(result.last_seq, record.seq)
                if record.seq > after_seq:
                    apply(record)
                    result.applied += 1
        except _BadRecord as bad:
            if not (last_segment and bad.reaches_eof):
                raise WalCorruptError(
                    f"write-ahead log {path} is corrupt at byte {bad.offset}: {bad.reason}; "
                    f"replay stopped after sequence {result.last_seq} (records after it "
                    "would be lost if skipped: restore the file or move it aside "
                    "deliberately)"
                ) from bad
            size = path.stat().st_size
            log.warning(
                "write-ahead log %s: torn final write at byte %d (%s); truncating %d bytes "
                "that were never acknowledged", path, bad.offset, bad.reason, size - bad.offset,
            )
            result.truncated_bytes += size - bad.offset
            if bad.offset == 0:
                # Crashed while creating the segment: no record was ever in it.
                path.unlink()
                fsync_dir(directory)
            else:
                _truncate(path, bad.offset)
    return result


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- writing


class WriteAheadLog:
    """Appends records to the newest segment with group commit.

    ``append`` only buffers (it runs under the store's locks); ``wait_durable``
    writes and, in ``fsync`` mode, fsyncs. Whoever finds no flush in progress
    becomes the leader and flushes every buffered record; the rest wait on the
    condition and find their records already durable — one fsync per group.

    Args:
        directory: folder of the segments (created if missing).
        model_hash: content hash of the codec whose codes the log holds.
        mode: ``"fsync"``, ``"interval"`` or ``"off"``.
        interval_s: fsync period in ``interval`` mode.
        metrics: optional object with ``observe_fsync(seconds)`` and ``set_wal_bytes(n)``.
    """

    def __init__(
        self,
        directory: Path,
        model_hash: str,
        mode: str = "fsync",
        interval_s: float = 0.1,
        metrics: Any = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"wal mode must be one of {MODES}, got {mode!r}")
        self.directory = Path(directory)
        self.model_hash = model_hash
        self.mode = mode
        self.interval_s = interval_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._buf: list[bytes] = []
        self._appended = 0
        self._durable = 0
        self._flushing = False
        self._failed: BaseException | None = None
        self._fd: int | None = None
        self._index = 0
        self._bytes = 0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Start a fresh segment after the existing ones (call after ``replay``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = list_segments(self.directory)
        self._bytes = sum(p.stat().st_size for _, p in existing)
        self._fd = self._new_segment((existing[-1][0] + 1) if existing else 1)
        self._report_bytes()
        if self.mode == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name="apcm-wal-sync",
                                            daemon=True)
            self._syncer.start()

    def close(self) -> None:
        """Flush, fsync and close the log. Idempotent."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
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

    @property
    def segment_index(self) -> int:
        """Index of the segment being appended to."""
        return self._index

    @property
    def size_bytes(self) -> int:
        """Bytes in all segments, as far as this process knows."""
        return self._bytes

    # -- the MutationLog protocol ------------------------------------------------------
    def append(self, seq: int, kind: str, bank: str, fields: dict[str, Any]) -> None:
        """Buffer one record. Runs under the store's locks: no I/O here."""
        record = encode_record(seq, kind, bank, fields)
        with self._cond:
            self._check_usable()
            self._buf.append(record)
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

        Every record appended before this call is in a segment below the new index.
        """
        with self._cond:
            while self._flushing:
                self._cond.wait()
            self._check_usable()
            self._flushing = True
        try:
            self._flush_buffer(force_fsync=True)
            old = self._fd
            assert old is not None
            self._fd = self._new_segment(self._index + 1)
            os.close(old)
            self._report_bytes()
            return self._index
        except OSError as e:
            self._fail(e)
            raise WalError(f"write-ahead log rotation failed: {e}") from e
        finally:
            with self._cond:
                self._flushing = False
                self._cond.notify_all()

    def delete_segments_before(self, index: int) -> int:
        """Remove segments with a lower index (a durable snapshot covers them). Returns count."""
        removed = 0
        for i, path in list_segments(self.directory):
            if i >= min(index, self._index):
                break
            size = path.stat().st_size
            path.unlink()
            self._bytes -= size
            removed += 1
        if removed:
            fsync_dir(self.directory)
            self._report_bytes()
        return removed

    # -- internals ---------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WalError(f"write-ahead log is unusable after an I/O error: {self._failed}")
        if self._fd is None:
            raise WalError("write-ahead log is closed")

    def _fail(self, exc: BaseException) -> None:
        log.error("write-ahead log failed; no further writes are acknowledged: %s", exc)
        with self._cond:
            self._failed = exc
            self._cond.notify_all()

    def _new_segment(self, index: int) -> int:
        path = self.directory / f"wal-{index:010d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        header = _encode_header(self.model_hash, index)
        _write_all(fd, header)
        os.fsync(fd)
        fsync_dir(self.directory)
        self._index = index
        self._bytes += len(header)
        return fd

    def _flush_buffer(self, force_fsync: bool) -> None:
        """Write (and maybe fsync) everything buffered. Caller holds the flushing role."""
        with self._cond:
            batch, self._buf = self._buf, []
            upto = self._appended
        fd = self._fd
        assert fd is not None
        try:
            if batch:
                data = b"".join(batch)
                _write_all(fd, data)
                self._bytes += len(data)
            if force_fsync or (batch and self.mode == "fsync"):
                t0 = time.perf_counter()
                os.fsync(fd)
                if self.metrics is not None:
                    self.metrics.observe_fsync(time.perf_counter() - t0)
        except OSError as e:
            self._fail(e)
            raise WalError(f"write-ahead log write failed: {e}") from e
        with self._cond:
            self._durable = max(self._durable, upto)
        if batch:
            self._report_bytes()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._cond:
                if self._fd is None or self._failed is not None:
                    return
                fd = os.dup(self._fd)
            try:
                t0 = time.perf_counter()
                os.fsync(fd)
                if self.metrics is not None:
                    self.metrics.observe_fsync(time.perf_counter() - t0)
            except OSError as e:
                self._fail(e)
                return
            finally:
                os.close(fd)

    def _report_bytes(self) -> None:
        if self.metrics is not None:
            self.metrics.set_wal_bytes(self._bytes)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

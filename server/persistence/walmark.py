"""How far each log segment was acknowledged: ``wal-<index>.acked`` next to the segment.

After every flush that may acknowledge writes, the log overwrites this small file
with the segment's byte count, its last sequence and how many records it holds
(no fsync of its own: it is exact after a process crash, and after a power loss
it can only lag, never run ahead). Replay compares a damaged tail with it: bytes
past the mark were never acknowledged and are a torn write; a bad record before
it is damage to acknowledged writes, and the mark says which sequences and how
many records were lost.

Format: ``u64 offset | u64 last_seq | u64 records | u32 crc32(the 24 bytes before)``.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_MARK = struct.Struct("<QQQ")
_CRC = struct.Struct("<I")
SUFFIX = ".acked"


@dataclass(frozen=True)
class AckMark:
    """Bytes ``offset`` of a segment were written before any write of it was
    acknowledged; they hold ``records`` records ending at sequence ``last_seq``."""

    offset: int
    last_seq: int
    records: int

    def encode(self) -> bytes:
        body = _MARK.pack(self.offset, self.last_seq, self.records)
        return body + _CRC.pack(zlib.crc32(body))


def mark_path(segment: Path) -> Path:
    return segment.with_suffix(SUFFIX)


def open_mark(segment: Path, mark: AckMark) -> int:
    """Create (or empty) the segment's mark file, write ``mark``; returns its descriptor."""
    fd = os.open(mark_path(segment), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_mark(fd, mark)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_mark(fd: int, mark: AckMark) -> None:
    """Overwrite the mark in place (one small write at offset 0)."""
    data = mark.encode()
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(f"short write to the log's acknowledgement mark (fd {fd})")


def read_mark(segment: Path) -> AckMark | None:
    """The segment's mark, or None when it has none or it fails its CRC (then
    nobody knows how far the segment was acknowledged)."""
    try:
        raw = mark_path(segment).read_bytes()
    except OSError:
        return None
    if len(raw) != _MARK.size + _CRC.size:
        return None
    (crc,) = _CRC.unpack_from(raw, _MARK.size)
    if crc != zlib.crc32(raw[:_MARK.size]):
        return None
    return AckMark(*_MARK.unpack_from(raw))


def remove_mark(segment: Path) -> None:
    mark_path(segment).unlink(missing_ok=True)

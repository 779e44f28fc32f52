"""Write-ahead-log file format: encoding, decoding and reading one segment.

Segment = header, then records::

    header: b"APCMWAL\\n" | u32 version | u32 json_len | json | u32 crc32(all before)

Version 2 (written now)::

    record: u32 body_len | u32 crc32(body) | u32 crc32(the 8 bytes before) | body
    body:   u32 meta_len | meta json | blob bytes | u64 seq

The header CRC protects the length: a flipped bit there is corruption, never
mistaken for a record cut short by a crash. The sequence comes last so a
record is encoded (``prepare``) before its sequence is known and finished
(``finish``) with one CRC over 8 bytes, continuing the body's CRC.

Version 1 (still read)::

    record: u32 body_len | u32 crc32(body_len bytes + body) | body
    body:   u64 seq | u32 meta_len | meta json | blob bytes

``meta`` holds the kind, the bank, the number of sequences the record covers
(``count``, ending at ``seq``), JSON scalars and, per array field, its tag,
dtype and shape; the arrays' little-endian bytes follow in ``blob`` (no pickle).
A list of ``str``/``bytes`` is stored as int64 lengths followed by the data.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"APCMWAL\n"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_RECORD_BYTES = 1 << 31
# Written at the end of a segment when the next one is started, so a deleted newest
# segment is noticed: the one before it names it.
SEGMENT_END = "segment_end"
_REC1_HEAD = struct.Struct("<II")
_BODY1_HEAD = struct.Struct("<QI")
_REC2_HEAD = struct.Struct("<III")
_META_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_FILE_HEAD = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
_LEN_CRC = struct.Struct("<II")


@dataclass
class WalRecord:
    """One logged mutation, as ``MemoryStore.apply_record`` takes it.

    ``count`` sequences end at ``seq`` (a write of n items uses n).
    """

    seq: int
    kind: str
    bank: str
    fields: dict[str, Any]
    count: int = 1

    @property
    def first_seq(self) -> int:
        return self.seq - self.count + 1


@dataclass(frozen=True)
class PreparedRecord:
    """A record encoded up to its sequence: ``chunks`` (body without the sequence),
    their total ``length`` and CRC32 ``crc``."""

    chunks: tuple[bytes, ...]
    length: int
    crc: int

    def finish(self, seq: int) -> list[bytes]:
        """The record's bytes with sequence ``seq``: header, body chunks, sequence."""
        seq_bytes = _SEQ.pack(seq)
        head = _LEN_CRC.pack(self.length + _SEQ.size, zlib.crc32(seq_bytes, self.crc))
        return [head + _CRC.pack(zlib.crc32(head)), *self.chunks, seq_bytes]


def prepare_record(
    kind: str, bank: str, fields: dict[str, Any], count: int = 1
) -> PreparedRecord:
    """Encode one mutation without its sequence number.

    Args:
        kind: record type, e.g. ``"write"``.
        bank: bank name.
        fields: JSON scalars, numpy arrays (any shape) and lists of ``str``/``bytes``.
        count: sequences the record covers (they end at the sequence ``finish`` gets).
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
        {"kind": kind, "bank": bank, "count": int(count), "scalars": scalars, "arrays": arrays},
        separators=(",", ":"),
    ).encode("utf-8")
    chunks = (_META_LEN.pack(len(meta)) + meta, *blobs)
    crc = 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
    return PreparedRecord(chunks, sum(len(c) for c in chunks), crc)


def encode_record(seq: int, kind: str, bank: str, fields: dict[str, Any], count: int = 1) -> bytes:
    """One complete record (prepare + finish)."""
    return b"".join(prepare_record(kind, bank, fields, count).finish(seq))


def _decode_fields(view: memoryview, pos: int, end: int, meta: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = dict(meta["scalars"])
    for name, tag, dtype_str, shape in meta["arrays"]:
        dtype = np.dtype(dtype_str)
        if dtype.hasobject or any(int(d) < 0 for d in shape):
            raise ValueError(f"array {name!r} has an invalid dtype or shape")
        count = 1
        for d in shape:
            count *= int(d)
        nbytes = count * dtype.itemsize
        if pos + nbytes > end:
            raise ValueError(f"array {name!r} runs past the record")
        arr = np.frombuffer(view, dtype=dtype, count=count, offset=pos).reshape(shape)
        pos += nbytes
        if tag == "nd":
            fields[name] = arr
            continue
        items: list[Any] = []
        for n in arr.tolist():
            if n < 0 or pos + n > end:
                raise ValueError(f"list {name!r} runs past the record")
            chunk = bytes(view[pos:pos + n])
            items.append(chunk.decode("utf-8") if tag == "str" else chunk)
            pos += n
        fields[name] = items
    if pos != end:
        raise ValueError("trailing bytes after the last field")
    return fields


def decode_body(body: bytes | bytearray, version: int = VERSION,
                fields_after: int = -1) -> WalRecord:
    """Parse a record body whose CRC already matched. Raises ``ValueError`` if malformed.

    ``fields_after``: a version-2 record of a mutation with a sequence at most this
    is returned without its fields (``{}``): replay skips what a snapshot holds, and
    decoding every key and payload of those records was most of a restart's replay.
    """
    view = memoryview(body)
    if version == 1:
        seq, meta_len = _BODY1_HEAD.unpack_from(view, 0)
        pos, end = _BODY1_HEAD.size, len(view)
    else:
        if len(view) < _META_LEN.size + _SEQ.size:
            raise ValueError("record body is too short")
        (meta_len,) = _META_LEN.unpack_from(view, 0)
        pos, end = _META_LEN.size, len(view) - _SEQ.size
        (seq,) = _SEQ.unpack_from(view, end)
    if pos + meta_len > end:
        raise ValueError("record metadata runs past the record")
    meta = json.loads(bytes(view[pos:pos + meta_len]))
    if version != 1 and seq <= fields_after and meta["kind"] != SEGMENT_END:
        fields: dict[str, Any] = {}
    else:
        fields = _decode_fields(view, pos + meta_len, end, meta)
    count = int(meta.get("count", 1))
    if version == 1 and "sequences" in fields:
        count = len(fields["sequences"])
    if meta["kind"] != SEGMENT_END and not 1 <= count <= seq:
        raise ValueError(f"record covers {count} sequences ending at {seq}")
    return WalRecord(int(seq), meta["kind"], meta["bank"], fields, count)


def encode_header(model_hash: str, index: int) -> bytes:
    meta = json.dumps({"model_hash": model_hash, "segment": index, "created_at": time.time()})
    head = _FILE_HEAD.pack(MAGIC, VERSION, len(meta)) + meta.encode("utf-8")
    return head + _CRC.pack(zlib.crc32(head))


# --------------------------------------------------------------------------- reading


class BadRecord(Exception):
    """A record (or segment header) fails a check.

    ``reaches_eof`` says whether the damage runs to the end of the file (the record
    is cut short, ends the file, or only zero bytes follow it): nothing intact
    comes after it. ``complete`` says the record is all there (its header CRC
    held and the file holds its full length), so it cannot be a torn append.
    """

    def __init__(self, offset: int, reason: str, reaches_eof: bool,
                 complete: bool = False) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        self.reaches_eof = reaches_eof
        self.complete = complete


def _zeros_to_eof(f: io.BufferedReader) -> bool:
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


def read_header(f: io.BufferedReader, size: int) -> tuple[int, dict[str, Any]]:
    """``(version, header JSON)`` of a segment open at offset 0. Raises ``BadRecord``."""
    raw = f.read(_FILE_HEAD.size)
    if len(raw) < _FILE_HEAD.size:
        raise BadRecord(0, "segment header is cut short", True)
    magic, version, meta_len = _FILE_HEAD.unpack(raw)
    if magic != MAGIC:
        raise BadRecord(0, "not an ApCM write-ahead log (bad magic)", False)
    if version not in READABLE_VERSIONS:
        raise BadRecord(0, f"unsupported log version {version}", False)
    if _FILE_HEAD.size + meta_len + _CRC.size > size:
        raise BadRecord(0, "segment header is cut short", True)
    meta = f.read(meta_len)
    (crc,) = _CRC.unpack(f.read(_CRC.size))
    if crc != zlib.crc32(raw + meta):
        raise BadRecord(0, "segment header fails its CRC", False)
    return version, json.loads(meta)


def segment_version(path: Path) -> int:
    """Format version of a segment. Raises ``BadRecord`` or ``OSError``."""
    with open(path, "rb") as f:
        return read_header(f, path.stat().st_size)[0]


def _records_v1(f: io.BufferedReader, offset: int, size: int) -> Iterator[tuple[int, WalRecord]]:
    while offset < size:
        head = f.read(_REC1_HEAD.size)
        if len(head) < _REC1_HEAD.size:
            raise BadRecord(offset, "record header cut short", True)
        length, crc = _REC1_HEAD.unpack(head)
        end = offset + _REC1_HEAD.size + length
        if length == 0 and crc == 0:
            raise BadRecord(offset, "zero bytes where a record should be", _zeros_to_eof(f))
        if end > size or length > MAX_RECORD_BYTES:
            # Version 1 cannot tell a cut-short record from a damaged length.
            raise BadRecord(offset, "record runs past the end of the file", True)
        body = bytearray(length)
        f.readinto(body)
        if crc != zlib.crc32(body, zlib.crc32(head[:4])):
            raise BadRecord(offset, "record fails its CRC32", end == size or _zeros_to_eof(f))
        yield end, _decode(offset, body, 1)
        offset = end


def _records_v2(f: io.BufferedReader, offset: int, size: int,
                fields_after: int = -1) -> Iterator[tuple[int, WalRecord]]:
    while offset < size:
        head = f.read(_REC2_HEAD.size)
        if len(head) < _REC2_HEAD.size:
            raise BadRecord(offset, "record header cut short", True)
        length, crc, head_crc = _REC2_HEAD.unpack(head)
        if head == bytes(_REC2_HEAD.size):
            raise BadRecord(offset, "zero bytes where a record should be", _zeros_to_eof(f))
        if head_crc != zlib.crc32(head[:8]):
            # Not a torn write: a complete record's length and CRC are written together.
            raise BadRecord(offset, "record header (length) fails its CRC32", _zeros_to_eof(f))
        end = offset + _REC2_HEAD.size + length
        if length > MAX_RECORD_BYTES or length < _META_LEN.size + _SEQ.size:
            raise BadRecord(offset, f"record length {length} is impossible", False)
        if end > size:
            raise BadRecord(offset, "record runs past the end of the file", True)
        body = bytearray(length)
        f.readinto(body)
        if crc != zlib.crc32(body):
            # The header's CRC proved the length whole and the body is all there: the
            # bytes changed after they were written, so this is damage, not a torn append.
            raise BadRecord(offset, f"record body fails its CRC32 (it says sequence "
                            f"{_SEQ.unpack_from(body, length - _SEQ.size)[0]})",
                            end == size or _zeros_to_eof(f), complete=True)
        yield end, _decode(offset, body, 2, fields_after)
        offset = end


def _decode(offset: int, body: bytearray, version: int, fields_after: int = -1) -> WalRecord:
    try:
        return decode_body(body, version, fields_after)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BadRecord(offset, f"record is malformed: {e}", False) from e


def iter_segment(
    path: Path, check_header: Callable[[dict[str, Any]], None] | None = None,
    fields_after: int = -1,
) -> Iterator[tuple[int, WalRecord]]:
    """Yield ``(end_offset, record)`` for each intact record of one segment.

    ``check_header`` sees the segment header's JSON before any record; records up to
    sequence ``fields_after`` come without their fields (``decode_body``).

    Raises:
        BadRecord: at the first record (or header) that fails a check.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        version, header = read_header(f, size)
        if check_header is not None:
            check_header(header)
        if version == 1:
            yield from _records_v1(f, f.tell(), size)
        else:
            yield from _records_v2(f, f.tell(), size, fields_after)


def decode_records(data: bytes) -> list[WalRecord]:
    """The version-2 records packed back to back in ``data`` (a cluster log message).

    Raises:
        BadRecord: a record fails a check (any, the last included: a message is
            never torn).
    """
    f: Any = io.BufferedReader(io.BytesIO(data))  # the readers take any buffered stream
    return [record for _, record in _records_v2(f, 0, len(data))]

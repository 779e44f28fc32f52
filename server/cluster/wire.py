"""Protobuf wire format by hand, where decoding into message objects would cost a copy.

The router only needs the bank name of a request to route it (``string_field``);
the tensors stay bytes and travel to the owner as they came. A bank import reads
its chunks' fields as views of the received bytes (``fields``), and a move
serializes them with ``varint``.
"""

from __future__ import annotations

from collections.abc import Iterator


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def string_field(buf: bytes, number: int) -> str | None:
    """The last top-level occurrence of string field ``number`` (proto3: last wins).

    Returns None when the field is absent or the bytes are not a valid message
    (the real deserializer then reports the error).
    """
    found = None
    pos = 0
    try:
        while pos < len(buf):
            tag, pos = _varint(buf, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(buf, pos)
                if pos + size > len(buf):
                    return None
                if field == number:
                    found = buf[pos:pos + size].decode("utf-8")
                pos += size
            else:
                return None  # groups are not used by apcm.v1
    except (ValueError, UnicodeDecodeError):
        return None
    return found


def varint(n: int) -> bytes:
    """The protobuf varint encoding of ``n >= 0``."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(buf: bytes) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each top-level field: varints and fixed-width values as
    ints, length-delimited ones as views of ``buf`` (no copy).

    Raises:
        ValueError: the bytes are not a valid message.
    """
    view = memoryview(buf)
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated fixed-width field")
            yield field, int.from_bytes(buf[pos:pos + size], "little")
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("length-delimited field runs past the message")
            yield field, view[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")

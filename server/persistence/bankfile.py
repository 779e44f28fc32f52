"""A bank's safetensors encoding: what a move sends and an import file holds.

The same layout as a snapshot's arrays for one bank (``MemoryBank.export``), with
the bank's config as JSON metadata. ``encode_views`` yields the header and the
arrays' own buffers (no copy); ``decode_bank`` gives views of the encoded bytes
(``np.frombuffer``), so rebuilding a bank costs no per-item work.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ..errors import InvalidArgument

FORMAT = "apcm-bank"
_HEADER_ALIGN = 8
# safetensors dtype names <-> numpy
_DTYPES = {"BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
           "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"),
           "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
           "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_NAMES = {v: k for k, v in _DTYPES.items()}


def encode_views(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[memoryview]:
    """A bank's safetensors encoding as buffers to send in order: the header, then each
    array's own bytes (views, not copies). Their total length is the encoding's size."""
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "config": json.dumps(config)}}
    views = []
    offset = 0
    # widest items first: with the header padded to 8 bytes every array stays aligned
    for name in sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n)):
        a = np.ascontiguousarray(arrays[name])
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = a.astype(dtype, copy=False)
        tag = _NAMES.get(dtype)
        if tag is None:
            raise ValueError(f"array {name!r} has dtype {a.dtype}, which cannot be sent")
        header[name] = {"dtype": tag, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        views.append(memoryview(a.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % _HEADER_ALIGN)
    return [memoryview(struct.pack("<Q", len(head)) + head), *views]


def encode_bank(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """The encoding in one piece (tests and tools; moves send ``encode_views``)."""
    return b"".join(encode_views(config, arrays))


def decode_bank(data: bytes | bytearray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The (config, arrays) of an encoded bank; the arrays are views of ``data``
    (writable when ``data`` is a ``bytearray``). Raises ``InvalidArgument``."""
    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        if 8 + size > len(data):
            raise ValueError("the header runs past the data")
        header = json.loads(bytes(data[8:8 + size]))
        meta = header.pop("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        config = json.loads(meta["config"])
        start, end = 8 + size, 8 + size
        arrays: dict[str, np.ndarray] = {}
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, stop = (start + int(o) for o in spec["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if begin != end or stop - begin != count * dtype.itemsize:
                raise ValueError(f"array {name!r} has bad offsets for its shape")
            arrays[name] = np.frombuffer(data, dtype=dtype, count=count,
                                         offset=begin).reshape(shape)
            end = stop
        if end != len(data):
            raise ValueError(f"{len(data) - end} bytes after the last array")
        return config, arrays
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise InvalidArgument(f"not an encoded bank: {e}") from e

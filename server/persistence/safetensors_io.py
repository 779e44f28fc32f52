"""The safetensors layout of snapshot and bank files: one dtype table, encoder and parser.

A file is an 8-byte little-endian header length, a JSON header (padded with spaces
to 8 bytes) naming each tensor's dtype, shape and byte range plus a ``__metadata__``
map of strings, then the tensors' bytes. ``encode`` hands out the arrays' own
buffers and ``decode`` gives views of the buffer it is handed. The ``safetensors``
library (0.8) writes as fast, but through a ``.tmpXXXXXX`` file of its own and in
another header order; its readers copy every tensor: 4-5 times slower reading a
1M-code snapshot, 90 ms instead of 0.03 ms to decode that bank sent in a move.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = 8  # bytes of the header length
SUFFIX = ".safetensors"
_ALIGN = 8
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype.str: name for name, dtype in DTYPES.items()}
Specs = dict[str, dict[str, Any]]


def checksum(metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
    """"sha256:<hex>" over the metadata (JSON, sorted keys) and every tensor's name,
    dtype, shape and bytes, in name order: what snapshot and bank files carry."""
    h = hashlib.sha256()
    h.update(json.dumps(metadata, sort_keys=True).encode("utf-8"))
    for name in sorted(tensors):
        arr = tensors[name]
        h.update(f"\n{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        if arr.nbytes:
            h.update(arr.data.cast("B"))
    return "sha256:" + h.hexdigest()


def little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous and little-endian: copied only if it was not already."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def encode(
    tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str], *,
    metadata_first: bool,
) -> list[memoryview]:
    """The encoding as buffers to write in order: the length and header, then each
    tensor's own bytes (a view, not a copy, of a little-endian contiguous array),
    laid out in the order given.

    ``metadata_first`` places ``__metadata__`` before or after the tensors in the
    header; snapshot and bank files have always differed there, and their bytes stay.

    Raises:
        ValueError: a dtype safetensors has no name for.
    """
    specs: Specs = {}
    views = []
    offset = 0
    for name, arr in tensors:
        arr = little_endian(arr)
        tag = _NAMES.get(arr.dtype.str)
        if tag is None:
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors "
                             "cannot hold")
        specs[name] = {"dtype": tag, "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        views.append(arr.reshape(-1).view(np.uint8).data)
    header = ({"__metadata__": metadata, **specs} if metadata_first
              else {**specs, "__metadata__": metadata})
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % _ALIGN)
    return [memoryview(len(head).to_bytes(PREFIX, "little") + head), *views]


def header_length(prefix: Any) -> int:
    """The header's length from the first 8 bytes.

    Raises:
        ValueError: fewer than 8 bytes.
    """
    if len(prefix) < PREFIX:
        raise ValueError("file is shorter than a safetensors header")
    return int.from_bytes(bytes(prefix[:PREFIX]), "little")


def parse_header(raw: Any) -> tuple[dict[str, str], Specs]:
    """The (metadata, tensor specs) of a header's JSON bytes.

    Raises:
        ValueError: not a JSON object, or metadata that is not one.
    """
    header = json.loads(bytes(raw))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("header metadata is not a JSON object")
    return {str(k): str(v) for k, v in metadata.items()}, header


def read_header(path: Path) -> tuple[int, dict[str, str], Specs]:
    """(offset of the first tensor byte, metadata, specs) of a file; reads only its header.

    Raises:
        OSError, ValueError: unreadable or a malformed header.
    """
    with open(path, "rb") as f:
        header_len = header_length(f.read(PREFIX))
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise ValueError(f"header of {header_len} bytes runs past the end of the file")
    return PREFIX + header_len, *parse_header(raw)


def views(buf: Any, base: int, specs: Specs) -> dict[str, np.ndarray]:
    """Each tensor of ``specs`` as a view of ``buf``, whose tensor bytes start at ``base``.

    Raises:
        ValueError, KeyError, TypeError: a dtype, shape or byte range that does not fit.
    """
    room = len(buf) - base
    out: dict[str, np.ndarray] = {}
    for key, spec in specs.items():
        dtype = DTYPES[spec["dtype"]]
        shape = [int(d) for d in spec["shape"]]
        begin, end = (int(o) for o in spec["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= room \
                or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r} has inconsistent shape or offsets")
        out[key] = np.frombuffer(buf, dtype=dtype, count=count,
                                 offset=base + begin).reshape(shape)
    return out


def decode(buf: Any, *, dense: bool = False) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors as views of ``buf``) of a whole encoding in memory.

    ``dense`` also refuses gaps, overlaps and bytes after the last tensor, as the
    safetensors spec does; snapshots have always been read without that check.

    Raises:
        ValueError, KeyError, TypeError: truncated, or a header that does not fit.
    """
    base = PREFIX + header_length(buf)
    if base > len(buf):
        raise ValueError(f"header of {base - PREFIX} bytes runs past the end of the file")
    metadata, specs = parse_header(memoryview(buf)[PREFIX:base])
    tensors = views(buf, base, specs)
    if dense:
        end = 0
        for key, spec in sorted(specs.items(), key=lambda kv: int(kv[1]["data_offsets"][0])):
            begin, stop = (int(o) for o in spec["data_offsets"])
            if begin != end:
                raise ValueError(f"array {key!r} has bad offsets for its shape")
            end = stop
        if base + end != len(buf):
            raise ValueError(f"{len(buf) - base - end} bytes after the last array")
    return metadata, tensors


def save(path: Path, buffers: list[memoryview]) -> None:
    """Write ``encode``'s buffers at exactly ``path``, each straight from its array
    (``safetensors.save_file`` writes a ``.tmpXXXXXX`` file of its own beside it
    first, which a crash leaves behind)."""
    with open(path, "wb") as f:
        for buf in buffers:
            f.write(buf)


def load(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Read a file with one ``readinto``; the tensors are views of that buffer.

    The library's reader copies every tensor out of a memory map; restore time is
    dominated by I/O and the checksum, so we read once and check every bound here.

    Raises:
        OSError, ValueError, KeyError, TypeError: unreadable, truncated, or a header
        that does not fit.
    """
    size = path.stat().st_size
    buf = np.empty(size, dtype=np.uint8)  # unlike bytearray, not zero-filled first
    with open(path, "rb", buffering=0) as f:
        view, got = buf.data, 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"file shrank while reading ({got} of {size} bytes)")
            got += n
    return decode(buf)

"""A bank's safetensors encoding: what a move sends and an import file holds.

The same layout as a snapshot's arrays for one bank (``MemoryBank.export``), with
the bank's config as JSON metadata. ``encode_views`` yields the header and the
arrays' own buffers (no copy); ``decode_bank`` gives views of the encoded bytes
(``np.frombuffer``), so rebuilding a bank costs no per-item work.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from . import safetensors_io

FORMAT = "apcm-bank"


def encode_views(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[memoryview]:
    """A bank's safetensors encoding as buffers to send in order: the header, then each
    array's own bytes (views, not copies). Their total length is the encoding's size."""
    # widest items first: with the header padded to 8 bytes every array stays aligned
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    return safetensors_io.encode(((n, arrays[n]) for n in order),
                                 {"format": FORMAT, "config": json.dumps(config)},
                                 metadata_first=True)


def encode_bank(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """The encoding in one piece (tests and tools; moves send ``encode_views``)."""
    return b"".join(encode_views(config, arrays))


def decode_bank(data: bytes | bytearray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The (config, arrays) of an encoded bank; the arrays are views of ``data``
    (writable when ``data`` is a ``bytearray``). Raises ``InvalidArgument``."""
    try:
        meta, arrays = safetensors_io.decode(data, dense=True)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        config = json.loads(meta["config"])
        return config, arrays
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"not an encoded bank: {e}") from e

"""A bank on the wire: its exported arrays in one safetensors blob, sent in chunks.

The blob is what a snapshot holds for the bank (``MemoryBank.export``), plus its
config as JSON metadata; the receiver verifies length and SHA-256 before it
decodes anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from apcm.server.errors import InvalidArgument
from apcm.v1 import cluster_pb2

FORMAT = "apcm-bank"
CHUNK_BYTES = 1 << 20


def encode_bank(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    tensors = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    return save(tensors, metadata={"format": FORMAT, "config": json.dumps(config)})


def decode_bank(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The (config, arrays) of an encoded bank. Raises ``InvalidArgument``."""
    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        meta = json.loads(bytes(data[8:8 + size]))["__metadata__"]
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        return json.loads(meta["config"]), load(bytes(data))
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise InvalidArgument(f"not an encoded bank: {e}") from e


def chunks(bank: str, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """``BankChunk`` messages carrying ``data``: size first, SHA-256 last."""
    view = memoryview(data)
    n = max(1, -(-len(data) // chunk_bytes))
    for i in range(n):
        chunk = cluster_pb2.BankChunk(bank=bank, data=bytes(view[i * chunk_bytes:
                                                                 (i + 1) * chunk_bytes]))
        if i == 0:
            chunk.total_bytes = len(data)
        if i == n - 1:
            chunk.sha256 = hashlib.sha256(data).hexdigest()
        yield chunk


def assemble(stream: Iterable[Any]) -> tuple[str, bytes]:
    """(bank, data) from ``BankChunk`` messages, verified. Raises ``InvalidArgument``."""
    bank, total, digest = "", -1, ""
    parts: list[bytes] = []
    for chunk in stream:
        if chunk.bank:
            if bank and chunk.bank != bank:
                raise InvalidArgument("chunks name different banks", field="bank")
            bank = chunk.bank
        if total < 0:
            total = chunk.total_bytes
        parts.append(chunk.data)
        digest = chunk.sha256 or digest
    data = b"".join(parts)
    if not bank:
        raise InvalidArgument("no bank name in the chunks", field="bank")
    if len(data) != total or hashlib.sha256(data).hexdigest() != digest:
        raise InvalidArgument(f"bank {bank!r}: the chunks are incomplete or corrupt "
                              f"({len(data)} of {total} bytes, checksum "
                              f"{'missing' if not digest else 'checked'})")
    return bank, data

"""A bank's encoding and its hand-serialized chunks, without servers."""

from __future__ import annotations

import numpy as np
import pytest

from apcm.server.cluster.transfer import (
    ChunkReader,
    assemble,
    chunks,
    decode_bank,
    encode_bank,
    encode_views,
    serialized_chunks,
)
from apcm.server.errors import InvalidArgument
from apcm.v1 import cluster_pb2


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"codes": rng.integers(0, 255, (7, 5), dtype=np.uint8),
            "occupied": np.array([1, 0, 1, 1, 0, 1, 1], dtype=np.uint8),
            "counts": rng.random(7), "sequences": np.arange(7, dtype=np.int64),
            "inv_norms": rng.random(7).astype(np.float32), "flags": np.ones(3, dtype=bool)}


def test_encoding_round_trips_with_aligned_writable_views() -> None:
    config = {"name": "notes", "capacity": 7}
    data = bytearray(encode_bank(config, _arrays()))
    assert len(data) == sum(len(v) for v in encode_views(config, _arrays()))
    got_config, got = decode_bank(data)
    assert got_config == config
    for name, a in _arrays().items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a)
        assert got[name].flags.writeable and got[name].flags.aligned  # views of data
    with pytest.raises(InvalidArgument, match="not an encoded bank"):
        decode_bank(bytes(data[:-3]))


def test_chunks_parse_without_protobuf_and_detect_damage() -> None:
    data = encode_bank({"name": "b"}, _arrays())
    raw = list(serialized_chunks("b", encode_views({"name": "b"}, _arrays()), chunk_bytes=100))
    assert len(raw) == -(-len(data) // 100) + 1  # data messages, then the CRC-32
    # the protobuf runtime reads the same messages
    parsed = [cluster_pb2.BankChunk.FromString(r) for r in raw]
    assert parsed[0].bank == "b" and parsed[0].total_bytes == len(data)
    assert parsed[-1].HasField("crc32") and not parsed[-1].data
    assert assemble(parsed) == ("b", data)
    assert assemble(chunks("b", data, 64)) == ("b", data)
    # a flipped byte, or a lost chunk, is refused
    damaged = [cluster_pb2.BankChunk.FromString(r) for r in raw]
    damaged[1].data = bytes([damaged[1].data[0] ^ 1]) + damaged[1].data[1:]
    with pytest.raises(InvalidArgument, match="incomplete or corrupt"):
        assemble(damaged)
    with pytest.raises(InvalidArgument, match="incomplete or corrupt"):
        assemble(parsed[:1] + parsed[2:])
    reader = ChunkReader()
    with pytest.raises(InvalidArgument, match="not a BankChunk"):
        reader.next_data(b"\x12\x7f")  # a length past the end

"""The client SDK end to end: the real client against a real server on port 0.

Covers typed errors carrying the server's message, round trips equal to the
in-process codec, the asyncio twin, channel lifecycle and retry behaviour.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from float_bounds import (
    assert_within_bound,
    float32_cosine_bound,
    pca_decode_bound,
    pca_encode_bound,
)

from apcm.client import (
    AlreadyExistsError,
    AsyncMemoryClient,
    ClientClosedError,
    InvalidArgumentError,
    MemoryClient,
    MessageTooLargeError,
    NotFoundError,
    Overloaded,
    RetryPolicy,
)
from apcm.server.codecs.base import Codec

HELD_OUT = slice(1200, 1232)  # the fixture codec was fitted on digits[:1200]


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Counts attempts per method."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)


def _bank_name() -> str:
    return f"client-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------ model


def test_model_info_describes_the_served_codec(client: MemoryClient, codec: Codec) -> None:
    info = client.model_info()
    assert info.kind == "pca" and info.name == codec.name
    assert info.input_shape == (8, 8)
    assert (info.code_dim, info.code_dtype) == (codec.code_dim, "float32")
    assert info.bytes_per_code == 8 * 4 and info.input_bytes == 64 * 4
    assert info.compression_ratio == pytest.approx(8.0)
    assert info.model_hash == codec.content_hash
    assert info.device == "cpu" and info.max_batch_size == 512


def test_round_trip_equals_the_in_process_codec(
    client: MemoryClient, codec: Codec, digits: np.ndarray
) -> None:
    x = digits[HELD_OUT]
    want_codes, code_bound = pca_encode_bound(codec, x)
    codes = client.compress(x)
    assert codes.dtype == np.float32 and codes.shape == (32, 8)
    assert_within_bound(codes, want_codes, code_bound, "codes")
    out = client.decompress(codes)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert_within_bound(out.reshape(len(x), -1), *pca_decode_bound(codec, codes), "items")
    # float64 and list inputs are converted client-side and give the same codes
    for same in (client.compress(x.astype(np.float64)), client.compress(x[:2].tolist())):
        assert same.dtype == np.float32
        assert_within_bound(same, want_codes[:len(same)], code_bound[:len(same)],
                            "codes of converted inputs")


# ------------------------------------------------------------------ typed errors


def test_bad_shape_is_invalid_argument_with_the_server_message_and_no_retry(
    server_address: str, digits: np.ndarray
) -> None:
    rec = Recorder()
    with MemoryClient(server_address, retries=3, interceptors=[rec]) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.compress(digits[0])  # [8, 8]: the batch dimension is missing
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "8, 8" in info.value.message  # the server names what came
        assert isinstance(info.value.__cause__, grpc.RpcError)
        assert rec.methods == ["Compress"]
        bad = digits[:2].copy()
        bad[1, 3, 3] = np.nan
        with pytest.raises(InvalidArgumentError, match="(?i)nan"):
            client.compress(bad)
        assert rec.methods == ["Compress", "Compress"]


def test_unknown_bank_is_not_found(client: MemoryClient, digits: np.ndarray) -> None:
    with pytest.raises(NotFoundError, match="no-such-bank"):
        client.describe_bank("no-such-bank")
    with pytest.raises(NotFoundError):
        client.write(digits[:1], bank="no-such-bank")


def test_existing_bank_is_already_exists_unless_exist_ok(client: MemoryClient) -> None:
    name = _bank_name()
    info = client.create_bank(name, 16, policy="lfu")
    assert (info.name, info.capacity, info.occupied, info.policy) == (name, 16, 0, "lfu")
    assert (info.code_dim, info.code_dtype) == (8, "float32")
    with pytest.raises(AlreadyExistsError):
        client.create_bank(name, 16)
    assert client.create_bank(name, 99, exist_ok=True).capacity == 16
    assert name in {b.name for b in client.list_banks()}


def test_oversized_message_is_too_large_not_overloaded(
    make_server: Callable[..., object], digits: np.ndarray
) -> None:
    server = make_server(max_message_bytes=64 * 1024)
    x = np.resize(digits, (300, 8, 8))  # 300 * 256 B = 75 KiB > 64 KiB: 76816 B in proto
    with MemoryClient(f"127.0.0.1:{server.port}", retries=0) as client, \
            pytest.raises(MessageTooLargeError) as info:
        client.compress(x)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not isinstance(info.value, Overloaded)
    assert info.value.limit == "max_message_bytes"
    # the server's check answered (its limit is below this client's): size, setting, fix
    assert info.value.message == (
        "the CompressRequest message is 76816 bytes, over the server's max_message_bytes of "
        "65536 (--max-message-bytes, env APCM_MAX_MESSAGE_BYTES): send fewer items per call")


def test_a_request_over_the_clients_own_limit_names_it(
    make_server: Callable[..., object], digits: np.ndarray
) -> None:
    server = make_server()
    x = np.resize(digits, (300, 8, 8))
    with MemoryClient(f"127.0.0.1:{server.port}", retries=0,
                      max_message_bytes=64 * 1024) as client, \
            pytest.raises(MessageTooLargeError) as info:
        client.compress(x)
    assert info.value.message == (
        "the request is 76816 bytes, over this client's max_message_bytes of 65536 "
        "(MemoryClient(max_message_bytes=...), which matches the server's default "
        "--max-message-bytes): send fewer items per call")


# ------------------------------------------------------------------ banks


def test_write_then_read_recalls_payloads_and_reconstructions(
    client: MemoryClient, codec: Codec, digits: np.ndarray
) -> None:
    bank = _bank_name()
    client.create_bank(bank, 8)
    x = digits[1300:1305]
    notes = [f"digit {i}" for i in range(5)]
    slots = client.write(x, bank=bank, mode="per_item", payloads=notes,
                         keys=[f"k{i}" for i in range(5)])
    assert [s.key for s in slots] == [f"k{i}" for i in range(5)]
    assert len({s.slot for s in slots}) == 5 and not any(s.evicted for s in slots)
    assert [s.sequence for s in slots] == sorted(s.sequence for s in slots)

    want_codes, code_bound = pca_encode_bound(codec, x)
    results = client.read(x, bank=bank, top_k=2, reconstruct=True, payloads=True, soft=True)
    assert len(results) == 5
    for i, result in enumerate(results):
        best = result.hits[0]
        assert (best.slot, best.key, best.payload) == (slots[i].slot, f"k{i}", notes[i].encode())
        # query and memory are float32 encodes of x[i], each within code_bound of the
        # exact code: their angle is at most 2 |code_bound| / |code|
        z, z_bound = want_codes[i:i + 1], code_bound[i:i + 1]
        angle = 2 * float(z_bound.norm() / z.norm())
        assert_within_bound([best.score], [1.0], float32_cosine_bound(z, z)[0] + angle ** 2 / 2,
                            "score of the item itself")
        assert len(result.hits) == 2 and result.hits[1].score <= best.score
        assert 0.0 < best.weight <= 1.0
        assert_within_bound(best.reconstruction.reshape(1, -1),
                            *pca_decode_bound(codec, z, z_bound), "reconstruction")
        assert result.soft_reconstruction is not None
        assert result.soft_reconstruction.shape == (8, 8)

    plain = client.read(x[:1], bank=bank)[0]
    assert plain.hits[0].payload is None and plain.hits[0].reconstruction is None
    assert plain.soft_reconstruction is None


def test_write_upserts_by_key_and_mean_mode_takes_one_slot(
    client: MemoryClient, digits: np.ndarray
) -> None:
    bank = _bank_name()
    client.create_bank(bank, 4)
    first = client.write(digits[:3], bank=bank, keys="note", payloads="v1")
    assert len(first) == 1 and not first[0].replaced
    again = client.write(digits[3:6], bank=bank, keys="note", payloads="v2")
    assert again[0].replaced and again[0].slot == first[0].slot
    assert client.describe_bank(bank).occupied == 1
    hit = client.read(digits[3:6].mean(axis=0, keepdims=True), bank=bank, payloads=True)[0].hits[0]
    assert hit.payload == b"v2"


def test_delete_clear_and_drop(client: MemoryClient, digits: np.ndarray) -> None:
    bank = _bank_name()
    client.create_bank(bank, 8)
    slots = client.write(digits[:4], bank=bank, mode="per_item", keys=["a", "b", "c", "d"])
    deleted, missing = client.delete_slots(bank, slots=[slots[0].slot], keys=["b", "zz"])
    assert (deleted, missing) == (2, ["zz"])
    assert client.describe_bank(bank).occupied == 2
    assert client.clear_bank(bank).occupied == 0
    client.drop_bank(bank)
    with pytest.raises(NotFoundError):
        client.describe_bank(bank)


def test_read_without_counting_leaves_counters(client: MemoryClient, digits: np.ndarray) -> None:
    bank = _bank_name()
    client.create_bank(bank, 4, policy="lfu")
    client.write(digits[:1], bank=bank)
    client.read(digits[:1], bank=bank, count_access=False)
    assert client.describe_bank(bank).reads_total == 0
    client.read(digits[:1], bank=bank)
    assert client.describe_bank(bank).reads_total == 1


# ------------------------------------------------------------------ snapshots


def test_snapshot_create_list_restore(client: MemoryClient, digits: np.ndarray) -> None:
    bank = _bank_name()
    client.create_bank(bank, 4)
    client.write(digits[:2], bank=bank, keys="kept")
    name = f"snap-{uuid.uuid4().hex[:8]}"
    snap = client.create_snapshot(name)
    assert snap.name == name and bank in snap.banks and snap.size_bytes > 0
    assert snap.model_hash == client.model_info().model_hash
    listed = {s.name: s for s in client.list_snapshots()}
    assert name in listed and listed[name].valid

    client.drop_bank(bank)
    restored = client.restore_snapshot(name)
    assert restored.snapshot.name == name
    assert bank in {b.name for b in restored.banks}
    assert client.describe_bank(bank).occupied == 1
    with pytest.raises(NotFoundError):
        client.restore_snapshot("never-taken")


# ------------------------------------------------------------------ async, lifecycle, retry


def test_async_client_matches_the_sync_client(
    client: MemoryClient, server_address: str, digits: np.ndarray
) -> None:
    x = digits[HELD_OUT]
    bank = _bank_name()

    async def main() -> None:
        async with AsyncMemoryClient(server_address) as aclient:
            assert await aclient.health() == "SERVING"
            assert await aclient.model_info() == client.model_info()
            codes, many = await asyncio.gather(aclient.compress(x), aclient.compress(x[:4]))
            np.testing.assert_array_equal(codes, client.compress(x))
            np.testing.assert_array_equal(many, codes[:4])
            np.testing.assert_array_equal(await aclient.decompress(codes),
                                          client.decompress(codes))
            await aclient.create_bank(bank, 4)
            written = await aclient.write(codes=codes[:2], bank=bank, mode="per_item",
                                          payloads=["x", "y"])
            hits = (await aclient.read(codes=codes[1:2], bank=bank, payloads=True))[0].hits
            assert (hits[0].slot, hits[0].payload) == (written[1].slot, b"y")
            with pytest.raises(NotFoundError):
                await aclient.describe_bank("no-such-bank")
            with pytest.raises(InvalidArgumentError):
                await aclient.compress(x[0])
        with pytest.raises(ClientClosedError):
            await aclient.model_info()

    asyncio.run(main())
    assert client.describe_bank(bank).occupied == 2


def test_context_manager_closes_the_channel(server_address: str) -> None:
    with MemoryClient(server_address) as client:
        assert client.health() == "SERVING"
    with pytest.raises(ClientClosedError):
        client.health()
    with pytest.raises(ValueError):  # grpc refuses RPCs on a closed channel
        client.channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=1)


def test_retry_reaches_a_server_that_starts_late(make_server: Callable[..., object]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    starter = threading.Timer(0.5, lambda: make_server(grpc_port=port))
    rec = Recorder()
    patient = RetryPolicy(max_retries=30, initial_backoff_s=0.05, max_backoff_s=0.2)
    with MemoryClient(f"127.0.0.1:{port}", retries=patient, timeout=20,
                      interceptors=[rec]) as client:
        starter.start()
        try:
            status = client.health()
        finally:
            starter.join()
        assert status in ("SERVING", "NOT_SERVING")  # NOT_SERVING while warming up
        assert len(rec.methods) >= 2  # refused at least once, then retried
        client.wait_until_serving(timeout=20)
        assert client.model_info().input_shape == (8, 8)

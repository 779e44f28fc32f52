"""Issue 13 "Hardening": requests that could take the server down, or that got the
wrong status code, through a real server on port 0 and the real client."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from apcm.client import ApcmError, LimitExceededError, MemoryClient
from apcm.v1 import memory_pb2, memory_pb2_grpc


def _error(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=20, **kwargs)
    return info.value.code(), info.value.details()


def _fill(client: MemoryClient, digits: np.ndarray, n: int, bank: str = "") -> None:
    client.write(digits[:n], bank=bank, mode="per_item")


# -- item 1: one Read must not build a reply the server cannot send -------------------------
def test_read_whose_reply_would_exceed_the_message_limit_is_refused_before_the_work(
    make_server, digits
) -> None:
    srv = make_server(max_message_bytes=1 << 20)
    with MemoryClient(f"127.0.0.1:{srv.port}", max_message_bytes=1 << 20) as c:
        _fill(c, digits, 64)
        queries = c.compress(digits[:512])
        # 512 queries x 64 hits x 256 reconstruction bytes = 8 MB > 1 MiB
        with pytest.raises(LimitExceededError) as info:
            c.read(codes=queries, top_k=64, reconstruct=True)
        err = info.value
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.limit == "max_message_bytes"
        for word in ("top_k", "queries", "include_reconstruction", str(1 << 20)):
            assert word in err.message, (word, err.message)
        # the same read within the limit is answered
        small = c.read(codes=queries[:4], top_k=64, reconstruct=True)
        assert len(small) == 4 and len(small[0].hits) == 64


def test_read_estimate_counts_payloads(make_server, digits) -> None:
    srv = make_server(max_message_bytes=1 << 20)
    with MemoryClient(f"127.0.0.1:{srv.port}", max_message_bytes=1 << 20) as c:
        c.write(digits[:32], mode="per_item", payloads=[b"x" * 20_000] * 32)
        # 2 queries x 32 hits x 20 kB = 1.3 MB > 1 MiB
        with pytest.raises(ApcmError) as info:
            c.read(codes=c.compress(digits[:2]), top_k=32, payloads=True)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "include_payloads" in info.value.message
        assert len(c.read(codes=c.compress(digits[:2]), top_k=32)[0].hits) == 32


# -- item 3: names are validated on every RPC and never echoed unbounded --------------------
LONG_NAME = "b" * 4000


@pytest.fixture
def stub(server_address: str):
    with grpc.insecure_channel(server_address) as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)


@pytest.mark.parametrize("rpc,request_of", [
    ("DescribeBank", lambda n: memory_pb2.DescribeBankRequest(name=n)),
    ("ClearBank", lambda n: memory_pb2.ClearBankRequest(name=n)),
    ("DropBank", lambda n: memory_pb2.DropBankRequest(name=n)),
    ("DeleteSlots", lambda n: memory_pb2.DeleteSlotsRequest(bank=n, slots=[0])),
    ("Read", lambda n: memory_pb2.ReadRequest(bank=n)),
    ("Write", lambda n: memory_pb2.WriteRequest(bank=n)),
    ("RestoreSnapshot", lambda n: memory_pb2.RestoreSnapshotRequest(name=n)),
    ("CreateSnapshot", lambda n: memory_pb2.CreateSnapshotRequest(name=n)),
])
def test_long_names_are_invalid_argument_with_a_short_message(stub, rpc, request_of) -> None:
    code, message = _error(getattr(stub, rpc), request_of(LONG_NAME))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message[:200])
    assert "at most 64" in message and len(message) < 300


def test_not_found_message_does_not_echo_more_than_a_bounded_name(stub) -> None:
    code, message = _error(stub.DescribeBank, memory_pb2.DescribeBankRequest(name="nope-" * 10))
    assert code == grpc.StatusCode.NOT_FOUND and "nope-" in message


# -- item 4: undecodable requests are INVALID_ARGUMENT, not INTERNAL ------------------------
@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff",  # not a protobuf message
    b"\x0a\x02\xc3\x28",  # field 1 (bank, a string) holding invalid UTF-8
])
def test_undecodable_request_is_invalid_argument(server_address: str, raw: bytes) -> None:
    with grpc.insecure_channel(server_address) as channel:
        call = channel.unary_unary("/apcm.v1.MemoryService/DescribeBank",
                                   request_serializer=None, response_deserializer=None)
        code, message = _error(call, raw)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "DescribeBankRequest" in message


# -- item 5: unknown enum values and absurd half-lives are refused --------------------------
def test_unknown_write_mode_is_invalid_argument(stub, digits) -> None:
    from apcm.wire.tensors import to_proto

    code, message = _error(stub.Write, memory_pb2.WriteRequest(
        inputs=to_proto(digits[:2]), mode=99))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in message and "WRITE_MODE_PER_ITEM (2)" in message


def test_unknown_policy_is_invalid_argument(stub) -> None:
    code, message = _error(stub.CreateBank, memory_pb2.CreateBankRequest(
        name="enum-policy", capacity=4, policy=99))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in message and "EVICTION_POLICY_LFU_DECAY (2)" in message


def test_unknown_dtype_names_the_valid_names_and_numbers(stub) -> None:
    from apcm.v1 import tensor_pb2

    bad = tensor_pb2.Tensor(shape=[1, 8, 8], dtype=0, data=b"\0" * 256)
    code, message = _error(stub.Compress, memory_pb2.CompressRequest(inputs=bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "float32 (1)" in message and "DTYPE_UNSPECIFIED" in message


@pytest.mark.parametrize("half_life", [1e-300, 1e308])
def test_absurd_half_life_is_invalid_argument(client: MemoryClient, half_life: float) -> None:
    with pytest.raises(ApcmError) as info:
        client.create_bank("half-life-bounds", 4, policy="lfu_decay", half_life=half_life)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "half_life" in info.value.message


# -- item 2: banks and payloads respect a memory limit and a bank count ---------------------
def test_memory_limit_and_bank_count_are_enforced_and_exported(make_server, digits) -> None:
    from prometheus_client import generate_latest

    # float32 codes of m=8: 32 + 29 metadata = 61 bytes per slot; default bank 64 slots
    srv = make_server(memory_limit_bytes=100_000, max_banks=3)
    with MemoryClient(f"127.0.0.1:{srv.port}") as c:
        with pytest.raises(LimitExceededError) as info:
            c.create_bank("too-big", 2000)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.limit == "memory_limit_bytes"
        assert "122000" in info.value.message and "100000" in info.value.message
        c.create_bank("fits", 1000)
        c.write(digits[:2], bank="fits", mode="per_item", payloads=[b"p" * 16_000] * 2)
        with pytest.raises(LimitExceededError) as info:
            c.write(digits[:1], bank="fits", payloads=[b"p" * 16_000])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.limit == "memory_limit_bytes"
        assert "memory_limit_bytes" in info.value.message
        c.create_bank("third", 1)
        with pytest.raises(LimitExceededError) as info:
            c.create_bank("fourth", 1)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.limit == "max_banks"
        assert "max_banks" in info.value.message
    text = generate_latest(srv.service.metrics.registry).decode()
    assert "apcm_memory_limit_bytes 100000.0" in text
    used = [line for line in text.splitlines() if line.startswith("apcm_memory_used_bytes ")]
    assert used and 96_000 < float(used[0].split()[1]) <= 100_000
    assert "apcm_banks 3.0" in text


def test_default_memory_limit_comes_from_the_cgroup_or_ram() -> None:
    from apcm.server.config import MEMORY_LIMIT_FRACTION, Settings, detected_memory_bytes

    limit = Settings().effective_memory_limit_bytes
    assert limit == int(detected_memory_bytes() * MEMORY_LIMIT_FRACTION) > 0
    assert Settings(memory_limit_bytes=123).effective_memory_limit_bytes == 123


# -- item 7: the limits are part of the contract ---------------------------------------------
def test_model_info_reports_every_limit(make_server) -> None:
    srv = make_server(memory_limit_bytes=10_000_000, max_banks=7, max_payload_bytes=1000,
                      max_key_length=32, max_bank_capacity=5000)
    with MemoryClient(f"127.0.0.1:{srv.port}") as c:
        info = c.model_info()
    assert (info.max_top_k, info.max_bank_capacity, info.max_payload_bytes,
            info.max_key_length, info.memory_limit_bytes, info.max_banks,
            info.max_batch_size) == (1024, 5000, 1000, 32, 10_000_000, 7, 512)

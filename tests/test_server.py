"""The foundation contract through a real server on port 0: round trips, bad input
status codes, health, reflection, metrics, overload and message limits."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apcm.client import InvalidArgumentError, MemoryClient
from apcm.v1 import memory_pb2, memory_pb2_grpc, tensor_pb2
from apcm.wire.tensors import to_proto


@pytest.fixture(scope="module")
def stub(server_address: str):
    channel = grpc.insecure_channel(
        server_address, options=[("grpc.max_send_message_length", 256 * 1024 * 1024)]
    )
    yield memory_pb2_grpc.MemoryServiceStub(channel)
    channel.close()


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10)
    return info.value.code(), info.value.details()


def test_model_info_describes_the_served_codec(client: MemoryClient, codec) -> None:
    info = client.model_info()
    assert tuple(info.input_shape) == (8, 8)
    assert info.code_dim == 8 and info.code_dtype == "float32"
    assert info.bytes_per_code == 32 and info.input_bytes == 256
    assert info.compression_ratio == pytest.approx(8.0)
    assert info.model_hash == codec.content_hash
    assert info.device == "cpu"


def test_round_trip_equals_in_process_codec(client: MemoryClient, codec, digits) -> None:
    x = digits[1500:1564]
    codes = client.compress(x)
    expected_codes = codec.compress(torch.from_numpy(x)).numpy()
    assert codes.dtype == np.float32 and codes.shape == (64, 8)
    np.testing.assert_array_equal(codes, expected_codes)
    recon = client.decompress(codes)
    np.testing.assert_array_equal(recon, codec.decompress(torch.from_numpy(codes)).numpy())
    # PCA-8 on held-out digits reconstructs far better than the mean image would.
    mean_err = ((x - digits[:1200].mean(0)) ** 2).mean()
    assert ((recon - x) ** 2).mean() < 0.5 * mean_err


def _tensor(shape, dtype=tensor_pb2.DTYPE_FLOAT32, data=None, fill=0.5):
    count = int(np.prod(shape))
    if data is None:
        data = np.full(count, fill, dtype=np.float32).tobytes()
    return tensor_pb2.Tensor(shape=list(shape), dtype=dtype, data=data)


BAD_COMPRESS = {
    "wrong item shape": (_tensor((2, 8, 7)), r"shape \[B, 8, 8\], got \[2, 8, 7\]"),
    "flat input": (_tensor((2, 64)), r"shape \[B, 8, 8\]"),
    "empty batch": (_tensor((0, 8, 8)), r"empty"),
    "batch over max": (_tensor((513, 8, 8)), r"513 exceeds the maximum of 512"),
    "bytes do not match shape": (
        _tensor((2, 8, 8), data=b"\0" * 100), r"needs 512 bytes, got 100"
    ),
    # np.prod of these wraps to 0 in int64, which matched b"" before the check used Python ints
    "element count overflows int64": (
        _tensor((4611686018427387904, 2, 2), data=b""), r"needs 73786976294838206464 bytes"
    ),
    "two 2**32 dims": (_tensor((4294967296, 4294967296), data=b""), r"needs \d+ bytes, got 0"),
    "unspecified dtype": (_tensor((1, 8, 8), dtype=tensor_pb2.DTYPE_UNSPECIFIED), r"dtype"),
    "int8 inputs": (
        _tensor((1, 8, 8), dtype=tensor_pb2.DTYPE_INT8, data=b"\1" * 64), r"must be float32"
    ),
    "NaN": (_tensor((1, 8, 8), fill=np.nan), r"NaN or Inf"),
    "Inf": (_tensor((1, 8, 8), fill=np.inf), r"NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMPRESS))
def test_bad_compress_input_is_invalid_argument(stub, case: str) -> None:
    tensor, pattern = BAD_COMPRESS[case]
    code, message = _code(stub.Compress, memory_pb2.CompressRequest(inputs=tensor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(pattern, message), message


BAD_DECOMPRESS = {
    "wrong code dim": (_tensor((2, 9)), r"shape \[B, 8\], got \[2, 9\]"),
    "wrong code dtype": (
        _tensor((2, 8), dtype=tensor_pb2.DTYPE_FLOAT16, data=b"\0" * 32), r"dtype float32"
    ),
    "NaN code": (_tensor((1, 8), fill=np.nan), r"NaN or Inf"),
    "empty": (_tensor((0, 8)), r"empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECOMPRESS))
def test_bad_decompress_input_is_invalid_argument(stub, case: str) -> None:
    tensor, pattern = BAD_DECOMPRESS[case]
    code, message = _code(stub.Decompress, memory_pb2.DecompressRequest(codes=tensor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(pattern, message), message


def test_client_raises_typed_error_with_server_message(client: MemoryClient) -> None:
    with pytest.raises(InvalidArgumentError, match=r"got \[3, 4, 4\]"):
        client.compress(np.zeros((3, 4, 4), np.float32))


def test_server_stays_healthy_after_bad_input(stub, client: MemoryClient, server_address) -> None:
    for tensor, _ in BAD_COMPRESS.values():
        with pytest.raises(grpc.RpcError):
            stub.Compress(memory_pb2.CompressRequest(inputs=tensor), timeout=10)
    assert client.compress(np.zeros((1, 8, 8), np.float32)).shape == (1, 8)
    with grpc.insecure_channel(server_address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_is_resource_exhausted_naming_the_limit(make_server) -> None:
    """Any client (not only ours, whose channel stops it first) is told the size, the
    setting and the fix; past twice the limit gRPC itself refuses, still with numbers."""
    srv = make_server(max_message_bytes=1 << 20)
    big = memory_pb2.CompressRequest(inputs=to_proto(np.zeros((4200, 8, 8), np.float32)))
    huge = memory_pb2.CompressRequest(inputs=to_proto(np.zeros((8400, 8, 8), np.float32)))
    with grpc.insecure_channel(
        f"127.0.0.1:{srv.port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        compress = memory_pb2_grpc.MemoryServiceStub(ch).Compress
        with pytest.raises(grpc.RpcError) as info:
            compress(big, timeout=10)
        code, details = _code(compress, huge)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == (
        f"the CompressRequest message is {big.ByteSize()} bytes, over the server's "
        "max_message_bytes of 1048576 (--max-message-bytes, env APCM_MAX_MESSAGE_BYTES): "
        "send fewer items per call")
    assert ("apcm-limit", "max_message_bytes") in info.value.trailing_metadata()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"({huge.ByteSize()} vs. 2097152)" in details


def test_overload_is_resource_exhausted(make_server) -> None:
    """With one RPC admitted at a time, concurrent callers are refused, not queued forever."""
    from concurrent.futures import ThreadPoolExecutor

    from apcm.client import Overloaded

    srv = make_server(max_concurrent_rpcs=1)
    x = np.random.default_rng(0).random((512, 8, 8), dtype=np.float32)
    refused: list[Overloaded] = []
    deadline = time.monotonic() + 20

    def hammer(_: int) -> None:
        with MemoryClient(f"127.0.0.1:{srv.port}", retries=0) as c:
            while not refused and time.monotonic() < deadline:
                try:
                    c.decompress(c.compress(x))
                except Overloaded as e:
                    refused.append(e)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(hammer, range(8)))
    assert refused, "no call was refused although 8 clients shared one RPC slot"
    assert refused[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_goes_not_serving_on_shutdown(make_server) -> None:
    srv = make_server()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        service = health_pb2.HealthCheckRequest(service="apcm.v1.MemoryService")
        assert stub.Check(service, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 2.0})
        stopper.start()
        seen = [r.status for r in _drain(watch)]
        stopper.join()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen


def _drain(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


def test_reflection_lets_a_generic_client_call_the_service(server_address: str) -> None:
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server_address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "apcm.v1.MemoryService" in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("apcm.v1.MemoryService").methods_by_name["GetModelInfo"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary(
            "/apcm.v1.MemoryService/GetModelInfo",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = call(request_cls(), timeout=5)
    assert list(reply.input_shape) == [8, 8] and reply.code_dim == 8


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _sample(text: str, name: str, default: float | None = None, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{name}{{{want}}} not in the scrape")


def test_metrics_move_with_calls(server, client: MemoryClient) -> None:
    before = _scrape(server.metrics_port)
    ok_before = _sample(before, "apcm_requests_total", 0.0, method="Compress", code="OK")
    client.compress(np.zeros((5, 8, 8), np.float32))
    client.compress(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError):
        client.compress(np.zeros((1, 2, 2), np.float32))
    after = _scrape(server.metrics_port)
    assert _sample(after, "apcm_requests_total", method="Compress", code="OK") == ok_before + 2
    assert _sample(after, "apcm_requests_total", method="Compress", code="INVALID_ARGUMENT") >= 1
    assert _sample(after, "apcm_items_processed_total", method="Compress") >= 8
    assert _sample(after, "apcm_request_duration_seconds_count", method="Compress") >= 3
    assert _sample(after, "apcm_serving") == 1.0
    assert _sample(after, "apcm_model_info", kind="pca", code_dim="8") == 1.0
    assert "process_cpu_seconds_total" in after


def test_bank_gauges_follow_writes(server, client: MemoryClient) -> None:
    name = "gauge-bank"
    client.create_bank(name, 16, exist_ok=True)
    client.clear_bank(name)
    client.write(codes=np.eye(8, dtype=np.float32)[:3], bank=name, mode="per_item")
    text = _scrape(server.metrics_port)
    assert _sample(text, "apcm_bank_capacity_slots", bank=name) == 16
    assert _sample(text, "apcm_bank_occupied_slots", bank=name) == 3
    assert _sample(text, "apcm_bank_writes_total", bank=name) >= 3


def test_reflection_v1_answers_like_v1alpha(server_address: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server_address) as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                            timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "apcm.v1.MemoryService" in names and "grpc.reflection.v1.ServerReflection" in names

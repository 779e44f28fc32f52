"""Client SDK behaviour that needs no server and no torch.

Retry and metadata tests run against a closed port (a real connection
refusal gives a real UNAVAILABLE) and observe attempts through a client
interceptor, the SDK's public hook.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from apcm.client import (
    AsyncMemoryClient,
    ClientClosedError,
    InvalidArgumentError,
    LimitExceededError,
    MemoryClient,
    MessageTooLargeError,
    NotFoundError,
    Overloaded,
    ResourceExhaustedError,
    RetryPolicy,
    TLSConfig,
    UnavailableError,
    _calls,
)
from apcm.client.channel import auth_metadata, channel_options
from apcm.client.errors import ERROR_BY_CODE, ApcmError, from_rpc_error
from apcm.v1 import tensor_pb2

ROOT = Path(__file__).resolve().parents[1]
# The server extras. grpc itself probes the grpc_* ones inside try/except, so for
# those the test proves only that the client works without them.
NEVER_IMPORTED = ("torch", "safetensors", "prometheus_client", "apcm.server")
NOT_REQUIRED = ("grpc_health", "grpc_reflection", "grpc_status")
FAST_RETRY = RetryPolicy(max_retries=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture(scope="module")
def closed_address() -> str:
    """An address on which nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Records the method and metadata of every attempt."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.calls.append((details.method, dict(details.metadata or ())))
        return continuation(details, request)


class AsyncRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method
        self.calls.append(method.decode() if isinstance(method, bytes) else method)
        return await continuation(details, request)


# ------------------------------------------------------------------ packaging


def test_client_imports_and_connects_without_server_packages() -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        NEVER = {NEVER_IMPORTED!r}
        BLOCKED = NEVER + {NOT_REQUIRED!r}
        attempts = []

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    if name.startswith(NEVER):
                        attempts.append(name)
                    raise ImportError(f"{{name}} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import apcm.client
        from apcm.client import AsyncMemoryClient, MemoryClient

        with MemoryClient("127.0.0.1:1", retries=0, timeout=2) as client:
            try:
                client.health()
            except apcm.client.UnavailableError:
                pass

        async def main():
            async with AsyncMemoryClient("127.0.0.1:1", retries=0, timeout=2):
                pass

        asyncio.run(main())
        assert not attempts, attempts
        loaded = [m for m in sys.modules if m.startswith(BLOCKED)]
        assert not loaded, loaded
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_base_dependencies_are_client_only() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()
             for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy"}
    assert "torch" in " ".join(project["optional-dependencies"]["server"])


# ------------------------------------------------------------------ errors


class _FailedCall(grpc.RpcError):
    """The three accessors grpc's failed calls expose, with chosen values."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize("code, cls", sorted(ERROR_BY_CODE.items(), key=lambda kv: kv[0].name))
def test_each_status_code_maps_to_its_exception(code: grpc.StatusCode, cls: type) -> None:
    err = from_rpc_error(_FailedCall(code, "what went wrong"))
    assert isinstance(err, cls)  # RESOURCE_EXHAUSTED: a subclass, see below
    assert err.code is code and err.message == "what went wrong"
    assert str(err) == f"{code.name}: what went wrong"


def test_unmapped_code_is_the_base_error_and_invalid_argument_is_a_value_error() -> None:
    err = from_rpc_error(_FailedCall(grpc.StatusCode.CANCELLED, "gone"))
    assert type(err) is ApcmError and err.code is grpc.StatusCode.CANCELLED
    assert isinstance(from_rpc_error(_FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "x")),
                      ValueError)
    assert not isinstance(from_rpc_error(_FailedCall(grpc.StatusCode.NOT_FOUND, "x")), ValueError)
    assert issubclass(NotFoundError, ApcmError)


def test_resource_exhausted_tells_a_limit_a_size_and_a_busy_server_apart() -> None:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    limit = from_rpc_error(_FailedCall(code, "full", (("apcm-limit", "memory_limit_bytes"),)))
    assert type(limit) is LimitExceededError and limit.limit == "memory_limit_bytes"
    size = from_rpc_error(_FailedCall(code, "Received message larger than max (9 vs. 4)"))
    assert type(size) is MessageTooLargeError
    busy = from_rpc_error(_FailedCall(code, "Concurrent RPC limit exceeded!"))
    assert type(busy) is Overloaded
    assert all(isinstance(e, ResourceExhaustedError) for e in (limit, size, busy))
    assert not isinstance(limit, Overloaded) and not isinstance(size, Overloaded)


# ------------------------------------------------------------------ retry


def test_backoffs_are_bounded_and_grow() -> None:
    import random

    policy = RetryPolicy(max_retries=6, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2)
    bounds = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    draws = [list(policy.backoffs(random.Random(seed))) for seed in range(200)]
    assert all(len(d) == 6 for d in draws)
    for i, bound in enumerate(bounds):
        column = [d[i] for d in draws]
        assert min(column) >= 0.0 and max(column) <= bound
        assert max(column) > 0.8 * bound  # full jitter reaches near the bound
    assert list(RetryPolicy(max_retries=0).backoffs()) == []
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_unavailable_is_retried_up_to_the_limit(closed_address: str) -> None:
    rec = Recorder()
    with MemoryClient(closed_address, retries=FAST_RETRY, interceptors=[rec]) as client, \
            pytest.raises(UnavailableError) as info:
        client.model_info()
    assert len(rec.calls) == 1 + FAST_RETRY.max_retries
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_retries_zero_means_one_attempt(closed_address: str) -> None:
    rec = Recorder()
    with MemoryClient(closed_address, retries=0, interceptors=[rec]) as client, \
            pytest.raises(UnavailableError):
        client.list_banks()
    assert len(rec.calls) == 1


def test_keyless_write_is_not_retried_but_keyed_write_is(closed_address: str) -> None:
    x = np.zeros((2, 8, 8), np.float32)
    rec = Recorder()
    with MemoryClient(closed_address, retries=FAST_RETRY, interceptors=[rec]) as client:
        with pytest.raises(UnavailableError):
            client.write(x)
        assert len(rec.calls) == 1
        with pytest.raises(UnavailableError):
            client.write(x, keys=["note-1"])
        assert len(rec.calls) == 1 + 1 + FAST_RETRY.max_retries


def test_deadline_bounds_the_retries(closed_address: str) -> None:
    many = RetryPolicy(max_retries=1000, initial_backoff_s=0.05, max_backoff_s=0.05)
    rec = Recorder()
    with MemoryClient(closed_address, retries=many, timeout=0.5, interceptors=[rec]) as client:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            client.health()
        elapsed = time.monotonic() - start
    assert elapsed < 1.5
    assert 2 <= len(rec.calls) < 1000


def test_async_client_retries_unavailable(closed_address: str) -> None:
    rec = AsyncRecorder()
    # Built outside any event loop: the channel opens in the loop that first uses it.
    client = AsyncMemoryClient(closed_address, retries=FAST_RETRY, interceptors=[rec])

    async def main() -> None:
        async with client:
            with pytest.raises(UnavailableError):
                await client.compress(np.zeros((1, 8, 8), np.float32))
        with pytest.raises(ClientClosedError):
            await client.health()

    asyncio.run(main())
    assert len(rec.calls) == 1 + FAST_RETRY.max_retries
    assert rec.calls[0] == "/apcm.v1.MemoryService/Compress"


# ------------------------------------------------------------------ metadata, options, TLS


def test_api_key_is_sent_as_bearer_metadata_on_every_call(closed_address: str) -> None:
    rec = Recorder()
    with MemoryClient(closed_address, api_key="s3cret", retries=0,
                      interceptors=[rec]) as client:
        for call in (client.health, client.model_info, client.list_snapshots):
            with pytest.raises(UnavailableError):
                call()
    assert [m for _, m in rec.calls] == [{"authorization": "Bearer s3cret"}] * 3
    assert rec.calls[0][0] == "/grpc.health.v1.Health/Check"
    assert auth_metadata(None) == ()
    with pytest.raises(ValueError):
        auth_metadata("key\nInjected: 1")


def test_channel_options_match_message_limit_and_server_name() -> None:
    tls = TLSConfig(root_certificates=b"pem", server_name="apcm.internal")
    opts = dict(channel_options(1234, RetryPolicy(), tls, [("grpc.keepalive_time_ms", 5)]))
    assert opts["grpc.max_send_message_length"] == 1234
    assert opts["grpc.max_receive_message_length"] == 1234
    assert opts["grpc.ssl_target_name_override"] == "apcm.internal"
    assert opts["grpc.keepalive_time_ms"] == 5  # caller's options win
    # grpc-core reads min_reconnect_backoff as the connect timeout: never shorten it
    assert "grpc.min_reconnect_backoff_ms" not in opts
    assert "grpc.ssl_target_name_override" not in dict(channel_options(1, RetryPolicy(), None))
    with pytest.raises(ValueError):
        channel_options(0, RetryPolicy(), None)


def test_tls_config_requires_key_with_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        TLSConfig(certificate_chain=b"cert")
    (tmp_path / "ca.pem").write_bytes(b"CA")
    cfg = TLSConfig.from_files(root_certificates=tmp_path / "ca.pem", server_name="x")
    assert cfg.root_certificates == b"CA" and cfg.private_key is None


# ------------------------------------------------------------------ request building


def test_inputs_are_sent_as_float32_and_codes_keep_their_dtype() -> None:
    x64 = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    tensor = _calls.compress(x64).request.inputs
    assert tensor.dtype == tensor_pb2.DTYPE_FLOAT32 and list(tensor.shape) == [2, 3, 4]
    assert np.array_equal(np.frombuffer(tensor.data, "<f4").reshape(2, 3, 4), x64)
    for dtype, code in (("int8", tensor_pb2.DTYPE_INT8), ("float16", tensor_pb2.DTYPE_FLOAT16),
                        ("float32", tensor_pb2.DTYPE_FLOAT32),
                        ("float64", tensor_pb2.DTYPE_FLOAT32)):
        codes = np.ones((3, 5), dtype=dtype)
        assert _calls.decompress(codes).request.codes.dtype == code
    with pytest.raises(InvalidArgumentError):
        _calls.decompress(np.ones((3, 5), dtype=np.int64))


def test_write_validates_counts_locally_and_encodes_text_payloads() -> None:
    x = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(InvalidArgumentError, match="payloads: expected none or 1"):
        _calls.write(x, payloads=["a", "b"])
    with pytest.raises(InvalidArgumentError, match="keys: expected none or 3"):
        _calls.write(x, mode="per_item", keys=["k1"])
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        _calls.write(x, codes=np.zeros((3, 4), np.float32))
    with pytest.raises(InvalidArgumentError, match="mode"):
        _calls.write(x, mode="sum")
    request = _calls.write(x, bank="b", mode="per_item",
                           payloads=["é", b"\x00", bytearray(b"z")]).request
    assert list(request.payloads) == ["é".encode(), b"\x00", b"z"]
    single = _calls.write(x, bank="b", payloads="one note", keys="k").request
    assert list(single.payloads) == [b"one note"] and list(single.keys) == ["k"]


def test_read_request_carries_options_and_leaves_unset_ones_unset() -> None:
    q = np.zeros((1, 4), np.float32)
    plain = _calls.read(codes=q).request
    assert plain.WhichOneof("query") == "codes"
    assert not plain.HasField("temperature") and not plain.HasField("min_score")
    assert not plain.skip_access_count
    full = _calls.read(codes=q, bank="bk", top_k=5, temperature=0.5, min_score=0.1,
                       reconstruct=True, payloads=True, soft=True, count_access=False).request
    assert (full.top_k, full.temperature, full.bank) == (5, 0.5, "bk")
    assert full.min_score == pytest.approx(0.1)
    assert full.include_reconstruction and full.include_payloads and full.soft
    assert full.skip_access_count
    with pytest.raises(InvalidArgumentError):
        _calls.read(codes=q, top_k=0)


def test_closed_client_refuses_calls_and_its_channel_is_closed(closed_address: str) -> None:
    with MemoryClient(closed_address) as client:
        pass
    with pytest.raises(ClientClosedError):
        client.model_info()
    with pytest.raises(ValueError):  # grpc refuses RPCs on a closed channel
        client.channel.unary_unary("/grpc.health.v1.Health/Check")(b"")
    client.close()  # idempotent


def test_health_messages_match_the_standard_ones() -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    from apcm.client import _health

    ours = _health.HealthCheckRequest(service="apcm.v1.MemoryService").SerializeToString()
    assert ours == health_pb2.HealthCheckRequest(service="apcm.v1.MemoryService") \
        .SerializeToString()
    for status in ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"):
        wire = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        ).SerializeToString()
        assert _health.status_name(_health.HealthCheckResponse.FromString(wire)) == status

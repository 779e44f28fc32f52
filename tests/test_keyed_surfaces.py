"""With API keys on, only health ``Check`` answers without a key (as Qdrant lets
only its health check through): reflection (v1 and v1alpha) and health ``Watch``
need a key unless ``--reflection-without-key`` opens reflection; the metrics
page binds loopback unless ``--metrics-host`` says otherwise. Real servers, real
clients."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from test_security import RW_KEY

from apcm.server.api.app import ApcmServer

ROOT = Path(__file__).resolve().parents[1]
AUTH = (("authorization", f"Bearer {RW_KEY}"),)
LIST = reflection_pb2.ServerReflectionRequest(list_services="")


def _reflect(channel: grpc.Channel, version: str,
             metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    reply = next(call(iter([LIST]), timeout=10, metadata=metadata))
    return {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_needs_a_key_unless_opened(
    make_server: Callable[..., ApcmServer], version: str
) -> None:
    keyed = make_server(api_keys=RW_KEY)
    with grpc.insecure_channel(f"127.0.0.1:{keyed.port}") as ch:
        with pytest.raises(grpc.RpcError) as exc:
            _reflect(ch, version)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "apcm.v1.MemoryService" in _reflect(ch, version, AUTH)
    opened = make_server(api_keys=RW_KEY, reflection_without_key=True)
    with grpc.insecure_channel(f"127.0.0.1:{opened.port}") as ch:
        assert "apcm.v1.MemoryService" in _reflect(ch, version)


def test_only_health_check_is_open_watch_needs_a_key(
    make_server: Callable[..., ApcmServer]
) -> None:
    srv = make_server(api_keys=RW_KEY)
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as exc:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5, metadata=AUTH)
        assert next(watch).status == serving
        watch.cancel()


def test_metrics_bind_loopback_by_default(model_path: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "apcm.server.cli", "serve", "--model", str(model_path),
           "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--grpc-port", "0",
           "--metrics-port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "apcm: serving gRPC" in line:
                break
        assert ", metrics on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"apcm_serving" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)

"""Container health check: asks the server's standard gRPC health service.

Used by the Dockerfile's ``HEALTHCHECK`` (and by a Kubernetes ``exec`` probe when
TLS is on, since native gRPC probes speak plaintext only). Exit status 0 when the
server answers SERVING, 1 otherwise. Needs only grpcio and grpcio-health-checking.

Reads the server's own ``APCM_*`` settings to find the port and whether TLS is
on; with TLS, it trusts ``APCM_HEALTHCHECK_CA`` (default: the server's own
``APCM_TLS_CERT``; set the CA bundle where that does not verify) and
checks the name ``APCM_HEALTHCHECK_SERVER_NAME`` (default ``localhost``). With
mTLS it presents ``APCM_HEALTHCHECK_CERT``/``APCM_HEALTHCHECK_KEY`` (default:
the server's own certificate and key, which the client CA must then have signed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_for(env: dict[str, str]) -> grpc.Channel:
    """A channel to this container's own server, plaintext or TLS as the server is."""
    target = f"127.0.0.1:{env.get('APCM_GRPC_PORT', '50051')}"
    cert = env.get("APCM_TLS_CERT", "")
    if not cert:
        return grpc.insecure_channel(target)
    key = env.get("APCM_TLS_KEY", "")
    mtls = bool(env.get("APCM_TLS_CLIENT_CA", ""))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(env.get("APCM_HEALTHCHECK_CA", "") or cert),
        private_key=_read(env.get("APCM_HEALTHCHECK_KEY", "") or key) if mtls else None,
        certificate_chain=_read(env.get("APCM_HEALTHCHECK_CERT", "") or cert) if mtls else None,
    )
    name = env.get("APCM_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target, credentials, (("grpc.ssl_target_name_override", name),))


def check(env: dict[str, str], timeout_s: float = 3.0) -> bool:
    """True when the server's overall health status is SERVING."""
    with channel_for(env) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(0 if check(dict(os.environ)) else 1)

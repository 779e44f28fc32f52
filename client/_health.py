"""The two messages of the standard ``grpc.health.v1.Health/Check`` call.

grpcio-health-checking is a server extra, so the client must not need it. The
messages are built from a descriptor in a private pool: real protobuf
encoding without a hand-rolled wire format, and no clash with the generated
``grpc_health`` module when both live in one process (as in the tests).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
_PACKAGE = "grpc.health.v1"
_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _build_messages() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="apcm_client_health.proto", package=_PACKAGE, syntax="proto3"
    )
    request = fdp.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service", number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = fdp.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(_STATUSES):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status", number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=f".{_PACKAGE}.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _build_messages()


def status_name(response: object) -> str:
    """"SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN" (also for future values)."""
    number = int(response.status)  # type: ignore[attr-defined]
    return _STATUSES[number] if 0 <= number < len(_STATUSES) else "UNKNOWN"

"""Domain errors -> gRPC statuses: the one place a call is aborted.

``api.interceptors.ErrorInterceptor`` calls it for every handler; the interceptors
that answer before it can (API keys, the cluster router) call it themselves.
"""

from __future__ import annotations

from typing import NamedTuple, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import ApcmError


class _StatusFields(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _StatusWithTrailers(_StatusFields, grpc.Status):
    """A ``grpc.Status`` whose trailers add ours to the rich-error detail."""


def abort_with_error(context: grpc.ServicerContext, error: ApcmError) -> NoReturn:
    """Abort the RPC with the error's status (``context.abort`` raises); field errors
    carry a BadRequest detail, and the error's ``trailers`` go with the status."""
    code = grpc.StatusCode[error.code]
    trailers = error.trailers
    if error.field is None:
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, error.message)
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=error.field, description=error.message
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code), message=error.message, details=[detail]
    )
    grpc_status = rpc_status.to_status(status)
    if trailers:  # abort_with_status replaces earlier trailers with the status's own
        grpc_status = _StatusWithTrailers(grpc_status.code, grpc_status.details,
                                          (*grpc_status.trailing_metadata, *trailers))
    context.abort_with_status(grpc_status)
    raise AssertionError("context.abort_with_status returned")  # grpc's abort raises

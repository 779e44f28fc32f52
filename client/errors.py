"""Typed client exceptions, one per gRPC status code the service uses on purpose.

Every RPC failure surfaces as an :class:`ApcmError` subclass carrying the
server's status code and message; the original ``grpc.RpcError`` is chained as
``__cause__``. One table (:data:`ERROR_BY_CODE`) maps codes to classes.
"""

from __future__ import annotations

import grpc

RETRY_AFTER_KEY = "retry-after-s"


class ApcmError(Exception):
    """Base class of every error the client raises for a failed call.

    Attributes:
        code: the gRPC status code.
        message: the server's message (the status details).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(ApcmError, ValueError):
    """The request was malformed (shape, dtype, NaN, empty batch, bad name...)."""


class NotFoundError(ApcmError):
    """Unknown bank, slot or snapshot."""


class AlreadyExistsError(ApcmError):
    """A bank or snapshot of that name exists."""


class FailedPreconditionError(ApcmError):
    """The server is not ready, or a snapshot belongs to another model."""


class Overloaded(ApcmError):
    """RESOURCE_EXHAUSTED: the server is overloaded or a message is too large.

    Attributes:
        retry_after_s: the server's ``retry-after-s`` hint in seconds, or None.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


ResourceExhaustedError = Overloaded


class UnauthenticatedError(ApcmError):
    """No API key, or an unknown one."""


class PermissionDeniedError(ApcmError):
    """The API key may not call this method (e.g. a read-only key writing)."""


class UnavailableError(ApcmError):
    """The server could not be reached (after the client's retries)."""


class DeadlineExceededError(ApcmError):
    """The call did not finish within its deadline."""


class UnimplementedError(ApcmError):
    """The server does not implement this method."""


class InternalError(ApcmError):
    """A server-side bug; the server logged the details."""


class ClientClosedError(RuntimeError):
    """A call was made on a client after ``close()``."""


ERROR_BY_CODE: dict[grpc.StatusCode, type[ApcmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (sync or asyncio), UNKNOWN if it has none."""
    code = getattr(err, "code", None)
    return code() if callable(code) else grpc.StatusCode.UNKNOWN


def from_rpc_error(err: grpc.RpcError) -> ApcmError:
    """Convert a failed call into its typed exception (raise it ``from err``)."""
    code = status_code(err)
    details = getattr(err, "details", None)
    message = (details() if callable(details) else None) or ""
    cls = ERROR_BY_CODE.get(code, ApcmError)
    if cls is Overloaded:
        return Overloaded(code, message, retry_after_s=_retry_after(err))
    return cls(code, message)


def invalid_argument(message: str) -> InvalidArgumentError:
    """A client-side INVALID_ARGUMENT for a request the server would reject anyway."""
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _retry_after(err: grpc.RpcError) -> float | None:
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None

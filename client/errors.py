"""Typed client exceptions, one per gRPC status code the service uses on purpose.

Every RPC failure surfaces as an :class:`ApcmError` subclass carrying the
server's status code and message; the original ``grpc.RpcError`` is chained as
``__cause__``. One table (:data:`ERROR_BY_CODE`) maps codes to classes.
"""

from __future__ import annotations

import re

import grpc

from apcm.wire.trailers import LIMIT_KEY

# gRPC's own refusal of a message over a channel's or server's size limit
_SIZE_LIMIT_MESSAGES = ("larger than max", "message too large")


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


class ResourceExhaustedError(ApcmError):
    """RESOURCE_EXHAUSTED. Catch this for all three kinds; each has its own subclass."""


class Overloaded(ResourceExhaustedError):
    """The server is busy (e.g. its concurrent-RPC limit): the same call may succeed
    later."""


class LimitExceededError(ResourceExhaustedError):
    """A server limit refuses this request: retrying it unchanged will not help.

    Attributes:
        limit: the server setting that refused it: ``memory_limit_bytes``,
            ``max_banks`` or ``max_message_bytes``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, limit: str) -> None:
        super().__init__(code, message)
        self.limit = limit


class MessageTooLargeError(LimitExceededError):
    """A request or reply is over a message size limit (the client's channel options
    or the server's ``max_message_bytes``): send smaller batches. ``limit`` is
    ``"max_message_bytes"``."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 limit: str = "max_message_bytes") -> None:
        super().__init__(code, message, limit)


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
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
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
    if cls is ResourceExhaustedError:
        return _resource_exhausted(err, code, message)
    return cls(code, message)


def _resource_exhausted(err: grpc.RpcError, code: grpc.StatusCode,
                        message: str) -> ResourceExhaustedError:
    limit = _trailer(err, LIMIT_KEY)
    if limit == "max_message_bytes":
        return MessageTooLargeError(code, message)
    if limit is not None:
        return LimitExceededError(code, message, limit)
    if any(m in message.lower() for m in _SIZE_LIMIT_MESSAGES):
        return MessageTooLargeError(code, _size_advice(message))
    return Overloaded(code, message)


_GRPC_SIZE = re.compile(r"(CLIENT|SERVER): (Sent|Received) message larger than max "
                        r"\((\d+) vs\. (\d+)\)")


def _size_advice(message: str) -> str:
    """gRPC's "CLIENT: Sent message larger than max (A vs. B)" as which message, which
    limit and what to change."""
    m = _GRPC_SIZE.search(message)
    if m is None:
        return message
    side, verb, size, limit = m.groups()
    if side == "SERVER":
        return (f"the request is {size} bytes, over the server's receive limit of {limit} "
                "bytes (set by its --max-message-bytes): send fewer items per call")
    if verb == "Sent":
        return (f"the request is {size} bytes, over this client's max_message_bytes of "
                f"{limit} (MemoryClient(max_message_bytes=...), which matches the server's "
                "default --max-message-bytes): send fewer items per call")
    return (f"the reply is {size} bytes, over this client's max_message_bytes of {limit} "
            "(MemoryClient(max_message_bytes=...)): ask for less per call (fewer items, a "
            "smaller top_k, no reconstructions)")


def invalid_argument(message: str) -> InvalidArgumentError:
    """A client-side INVALID_ARGUMENT for a request the server would reject anyway."""
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _trailer(err: grpc.RpcError, key: str) -> str | None:
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for k, value in metadata or ():
        if k == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None

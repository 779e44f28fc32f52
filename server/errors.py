"""Domain errors. Each carries the gRPC status code name it maps to.

The code is a plain string (a ``grpc.StatusCode`` member name) so that the
model and bank modules stay free of grpc; the service layer resolves it.
"""

from __future__ import annotations

from apcm.wire.trailers import LIMIT_KEY


class ApcmError(Exception):
    """Base class of every error the service reports to a client on purpose."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """Trailing metadata the client gets with the status (none by default)."""
        return ()


class InvalidArgument(ApcmError):
    code = "INVALID_ARGUMENT"


class NotFound(ApcmError):
    code = "NOT_FOUND"


class AlreadyExists(ApcmError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ApcmError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ApcmError):
    """A server limit refuses the request: retrying the same request will not help.

    Args:
        limit: the setting that refused it (``memory_limit_bytes``, ``max_banks``,
            ``max_message_bytes``); sent to the client in a trailer.
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, limit: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.limit = limit

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((LIMIT_KEY, self.limit),)


class DeadlineExceeded(ApcmError):
    """The caller's deadline passed before the work was done; the rest was not started."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(ApcmError):
    """A resource the request needs is failing now (e.g. the disk); retrying later may work."""

    code = "UNAVAILABLE"


class Unauthenticated(ApcmError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ApcmError):
    code = "PERMISSION_DENIED"


class ModelFileError(FailedPrecondition):
    """A weights file is unreadable, of an unknown kind, or fails its hash check."""

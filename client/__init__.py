"""ApCM client SDK: numpy in, numpy out, over gRPC. Needs grpcio, protobuf and numpy only.

Example:
    >>> from apcm.client import MemoryClient
    >>> with MemoryClient("localhost:50051") as client:
    ...     codes = client.compress(x)                      # x: [B, L, D]
    ...     client.write(x, payloads=["a note"])            # one memory, the batch mean
    ...     hits = client.read(x[:1], top_k=3)[0].hits
"""

from apcm.wire.tensors import TensorFormatError

from .aio import AsyncMemoryClient
from .channel import TLSConfig
from .errors import (
    AlreadyExistsError,
    ApcmError,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LimitExceededError,
    MessageTooLargeError,
    NotFoundError,
    Overloaded,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .retry import RetryPolicy
from .sync import MemoryClient
from .types import (
    BankIndex,
    BankInfo,
    ContextTurn,
    DeleteResult,
    Hit,
    ItemCheck,
    Memory,
    ModelInfo,
    QueryResult,
    RestoreResult,
    SnapshotInfo,
    WrittenSlot,
    WrittenSlots,
)

__all__ = [
    "AlreadyExistsError",
    "ApcmError",
    "AsyncMemoryClient",
    "BankIndex",
    "BankInfo",
    "ClientClosedError",
    "ContextTurn",
    "DeadlineExceededError",
    "DeleteResult",
    "FailedPreconditionError",
    "Hit",
    "InternalError",
    "InvalidArgumentError",
    "ItemCheck",
    "LimitExceededError",
    "Memory",
    "MemoryClient",
    "MessageTooLargeError",
    "ModelInfo",
    "NotFoundError",
    "Overloaded",
    "PermissionDeniedError",
    "QueryResult",
    "ResourceExhaustedError",
    "RestoreResult",
    "RetryPolicy",
    "SnapshotInfo",
    "TLSConfig",
    "TensorFormatError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WrittenSlot",
    "WrittenSlots",
]

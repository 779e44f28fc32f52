"""Requests and response parsing shared by the sync and asyncio clients.

Each builder validates what the client can check cheaply, converts numpy to
messages and returns a :class:`Call`: the method to invoke, the request, how
to turn the response into result types, and whether a retry is safe. The two
clients only differ in how they invoke it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from apcm.v1 import memory_pb2, memory_pb2_grpc
from apcm.wire.tensors import from_proto, to_proto

from . import _health
from .errors import invalid_argument
from .types import (
    POLICY_CODES,
    WRITE_MODES,
    BankInfo,
    DeleteResult,
    Hit,
    ItemCheck,
    Memory,
    ModelInfo,
    QueryResult,
    RestoreResult,
    SnapshotInfo,
    WrittenSlots,
)

T = TypeVar("T")
HEALTH_CHECK = "HealthCheck"
_SERVICE_METHODS = (
    "GetModelInfo", "Compress", "Decompress", "Write", "Read", "CreateBank", "ListBanks",
    "DescribeBank", "DeleteSlots", "ClearBank", "DropBank", "CreateSnapshot", "ListSnapshots",
    "RestoreSnapshot",
)
Payload = bytes | str


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC, ready to invoke.

    Attributes:
        method: key into the table built by :func:`bind_methods`.
        request: the request message.
        parse: response message -> result.
        retryable: False when repeating an attempt that did reach the server
            could change the outcome (a write without keys would store twice).
    """

    method: str
    request: Any
    parse: Callable[[Any], T]
    retryable: bool = True


def bind_methods(channel: Any) -> dict[str, Any]:
    """Multi-callables for every method, on a sync or an asyncio channel."""
    stub = memory_pb2_grpc.MemoryServiceStub(channel)
    methods = {name: getattr(stub, name) for name in _SERVICE_METHODS}
    methods[HEALTH_CHECK] = channel.unary_unary(
        _health.CHECK_METHOD,
        request_serializer=_health.HealthCheckRequest.SerializeToString,
        response_deserializer=_health.HealthCheckResponse.FromString,
    )
    return methods


# ------------------------------------------------------------------ conversions


def as_inputs(x: Any) -> np.ndarray:
    """Inputs [B, L, D] as float32 (any real dtype is converted; shape is the server's call)."""
    arr = np.asarray(x)
    if arr.dtype.kind == "f" and arr.dtype.itemsize == 4:
        return arr
    if arr.dtype.kind in "fiu":
        return arr.astype(np.float32)
    raise invalid_argument(f"inputs must be a real-valued array, got dtype {arr.dtype}")


def as_codes(codes: Any) -> np.ndarray:
    """Codes [B, m]: float32, float16, int8 and uint8 (packed codes) pass as they are;
    other floats become float32."""
    arr = np.asarray(codes)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if (kind == "f" and size in (2, 4)) or (kind in "iu" and size == 1):
        return arr
    if kind == "f":
        return arr.astype(np.float32)
    raise invalid_argument(
        f"codes must be float32, float16, int8 or uint8, got dtype {arr.dtype}")


def _content(x: Any, codes: Any) -> tuple[str, np.ndarray]:
    if (x is None) == (codes is None):
        raise invalid_argument("pass exactly one of x (inputs [B, L, D]) or codes ([B, m])")
    return ("inputs", as_inputs(x)) if codes is None else ("codes", as_codes(codes))


def _as_list(values: Any, what: str) -> list[Any]:
    if values is None:
        return []
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        return [values]
    if not isinstance(values, Iterable):
        raise invalid_argument(f"{what} must be a sequence, got {type(values).__name__}")
    return list(values)


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise invalid_argument(f"payloads must be bytes or str, got {type(payload).__name__}")


def _check_count(values: list[Any], expected: int | None, what: str, mode: str) -> None:
    if values and expected is not None and len(values) != expected:
        raise invalid_argument(
            f"{what}: expected none or {expected} (one per written slot in {mode!r} mode), "
            f"got {len(values)}"
        )


# ------------------------------------------------------------------ model


def model_info() -> Call[ModelInfo]:
    return Call("GetModelInfo", memory_pb2.GetModelInfoRequest(), ModelInfo.from_proto)


def compress(x: Any) -> Call[np.ndarray]:
    request = memory_pb2.CompressRequest(inputs=to_proto(as_inputs(x)))
    return Call("Compress", request, lambda r: from_proto(r.codes))


def compress_checked(x: Any) -> Call[tuple[np.ndarray, list[ItemCheck]]]:
    request = memory_pb2.CompressRequest(inputs=to_proto(as_inputs(x)))
    return Call("Compress", request,
                lambda r: (from_proto(r.codes), [ItemCheck.from_proto(c) for c in r.checks]))


def decompress(codes: Any) -> Call[np.ndarray]:
    request = memory_pb2.DecompressRequest(codes=to_proto(as_codes(codes)))
    return Call("Decompress", request, lambda r: from_proto(r.outputs))


# ------------------------------------------------------------------ write / read


def write(
    x: Any, codes: Any, bank: str, mode: str, payloads: Any, keys: Any
) -> Call[WrittenSlots]:
    if mode not in WRITE_MODES:
        raise invalid_argument(f"mode must be one of {sorted(WRITE_MODES)}, got {mode!r}")
    field, arr = _content(x, codes)
    batch = int(arr.shape[0]) if arr.ndim >= 1 else None
    expected = 1 if mode == "mean" else batch
    payload_list = [_payload_bytes(p) for p in _as_list(payloads, "payloads")]
    key_list = [str(k) for k in _as_list(keys, "keys")]
    _check_count(payload_list, expected, "payloads", mode)
    _check_count(key_list, expected, "keys", mode)
    request = memory_pb2.WriteRequest(
        bank=bank, mode=WRITE_MODES[mode], payloads=payload_list, keys=key_list,
        **{field: to_proto(arr)},
    )
    # Keyed writes are upserts, so a repeat is harmless; keyless ones would duplicate.
    return Call(
        "Write", request, WrittenSlots.from_proto, retryable=bool(key_list),
    )


def read(
    x: Any,
    codes: Any,
    bank: str,
    top_k: int,
    temperature: float | None,
    min_score: float | None,
    reconstruct: bool,
    payloads: bool,
    soft: bool,
    count_access: bool,
    nprobe: int = 0,
    exhaustive: bool = False,
) -> Call[list[QueryResult]]:
    if int(top_k) < 1:
        raise invalid_argument(f"top_k must be >= 1, got {top_k}")
    if int(nprobe) < 0:
        raise invalid_argument(f"nprobe must be >= 0 (0: the server's default), got {nprobe}")
    field, arr = _content(x, codes)
    request = memory_pb2.ReadRequest(
        bank=bank, top_k=int(top_k), include_reconstruction=reconstruct,
        include_payloads=payloads, soft=soft, skip_access_count=not count_access,
        nprobe=int(nprobe), exhaustive=bool(exhaustive), **{field: to_proto(arr)},
    )
    if temperature is not None:
        request.temperature = float(temperature)
    if min_score is not None:
        request.min_score = float(min_score)
    return Call(
        "Read", request, lambda r: [QueryResult.from_proto(q, payloads) for q in r.results]
    )


# ------------------------------------------------------------------ text memories


def _texts(values: Any, what: str) -> list[str]:
    texts = _as_list(values, what)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise invalid_argument(f"{what} must be a non-empty string or list of non-empty strings")
    return texts


def _metadata_maps(metadata: Any, n: int) -> list[memory_pb2.MemoryMetadata]:
    """None, one map for every text, or one map per text."""
    if metadata is None:
        return []
    maps = [metadata] * n if isinstance(metadata, dict) else list(metadata)
    if len(maps) != n or not all(isinstance(m, dict) for m in maps):
        raise invalid_argument(f"metadata must be one dict, or {n} dicts (one per text)")
    return [memory_pb2.MemoryMetadata(entries={str(k): str(v) for k, v in (m or {}).items()})
            for m in maps]


def remember(texts: Any, bank: str, keys: Any, metadata: Any) -> Call[WrittenSlots]:
    text_list = _texts(texts, "texts")
    key_list = [str(k) for k in _as_list(keys, "keys")]
    _check_count(key_list, len(text_list), "keys", "per_item")
    request = memory_pb2.WriteRequest(
        bank=bank, mode=memory_pb2.WRITE_MODE_PER_ITEM, keys=key_list,
        texts=memory_pb2.TextBatch(texts=text_list),
        metadata=_metadata_maps(metadata, len(text_list)),
    )
    return Call("Write", request, WrittenSlots.from_proto, retryable=bool(key_list))


RECALL_MODES = {
    None: memory_pb2.RECALL_MODE_UNSPECIFIED,
    "dense": memory_pb2.RECALL_MODE_DENSE,
    "hybrid": memory_pb2.RECALL_MODE_HYBRID,
    "lexical": memory_pb2.RECALL_MODE_LEXICAL,
}


def recall(query: Any, bank: str, top_k: int, where: dict[str, str] | None,
           min_score: float | None, mode: str | None = None) -> Call[Any]:
    single = isinstance(query, str)
    queries = _texts(query, "query")
    if int(top_k) < 1:
        raise invalid_argument(f"top_k must be >= 1, got {top_k}")
    if mode not in RECALL_MODES:
        raise invalid_argument(f"mode must be 'hybrid', 'dense' or 'lexical' (or None for "
                               f"the server's choice), got {mode!r}")
    request = memory_pb2.ReadRequest(
        bank=bank, top_k=int(top_k), include_payloads=True,
        texts=memory_pb2.TextBatch(texts=queries),
        filter={str(k): str(v) for k, v in (where or {}).items()},
        mode=RECALL_MODES[mode],
    )
    if min_score is not None:
        request.min_score = float(min_score)

    def parse(r: Any) -> Any:
        out = [[Memory.from_hit(Hit.from_proto(h, True)) for h in q.hits] for q in r.results]
        return out[0] if single else out

    return Call("Read", request, parse)


# ------------------------------------------------------------------ banks


def create_bank(
    name: str, capacity: int, policy: str | None, half_life: float | None, exist_ok: bool
) -> Call[BankInfo]:
    if policy is not None and policy not in POLICY_CODES:
        raise invalid_argument(
            f"policy must be one of {sorted(POLICY_CODES)} or None, got {policy!r}"
        )
    request = memory_pb2.CreateBankRequest(
        name=name, capacity=int(capacity),
        policy=POLICY_CODES[policy] if policy else memory_pb2.EVICTION_POLICY_UNSPECIFIED,
        half_life=float(half_life or 0.0), exist_ok=exist_ok,
    )
    return Call("CreateBank", request, BankInfo.from_proto)


def list_banks() -> Call[list[BankInfo]]:
    return Call(
        "ListBanks", memory_pb2.ListBanksRequest(),
        lambda r: [BankInfo.from_proto(b) for b in r.banks],
    )


def describe_bank(name: str) -> Call[BankInfo]:
    return Call("DescribeBank", memory_pb2.DescribeBankRequest(name=name), BankInfo.from_proto)


def delete_slots(bank: str, slots: Iterable[int], keys: Iterable[str]) -> Call[DeleteResult]:
    request = memory_pb2.DeleteSlotsRequest(
        bank=bank, slots=[int(s) for s in slots], keys=[str(k) for k in _as_list(keys, "keys")]
    )
    return Call(
        "DeleteSlots", request, lambda r: DeleteResult(int(r.deleted), list(r.missing_keys))
    )


def clear_bank(name: str) -> Call[BankInfo]:
    return Call("ClearBank", memory_pb2.ClearBankRequest(name=name), BankInfo.from_proto)


def drop_bank(name: str) -> Call[None]:
    return Call("DropBank", memory_pb2.DropBankRequest(name=name), lambda r: None)


# ------------------------------------------------------------------ snapshots


def create_snapshot(name: str | None) -> Call[SnapshotInfo]:
    request = memory_pb2.CreateSnapshotRequest(name=name or "")
    return Call("CreateSnapshot", request, SnapshotInfo.from_proto)


def list_snapshots() -> Call[list[SnapshotInfo]]:
    return Call(
        "ListSnapshots", memory_pb2.ListSnapshotsRequest(),
        lambda r: [SnapshotInfo.from_proto(s) for s in r.snapshots],
    )


def restore_snapshot(name: str) -> Call[RestoreResult]:
    return Call(
        "RestoreSnapshot", memory_pb2.RestoreSnapshotRequest(name=name),
        lambda r: RestoreResult(
            SnapshotInfo.from_proto(r.snapshot), [BankInfo.from_proto(b) for b in r.banks]
        ),
    )


# ------------------------------------------------------------------ health


def health(service: str) -> Call[str]:
    return Call(
        HEALTH_CHECK, _health.HealthCheckRequest(service=service), _health.status_name
    )

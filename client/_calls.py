"""Every RPC method of the sync and asyncio clients, defined once.

Each builder here *is* a client method: its signature and docstring are the
method's (:mod:`._api` turns it into a method of both clients, minus the
``Call[...]`` around the result). It validates what the client can check
cheaply, converts numpy to messages and returns a :class:`Call`: the method to
invoke, the request, how to turn the response into result types, whether a
retry is safe, and the caller's deadline. The two clients only differ in how
they invoke it.
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
        timeout: the caller's deadline for all attempts, in seconds; None: the
            client's default.
    """

    method: str
    request: Any
    parse: Callable[[Any], T]
    retryable: bool = True
    timeout: float | None = None


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


def model_info(*, timeout: float | None = None) -> Call[ModelInfo]:
    """Describe the served codec (input shape, code size and dtype, ratio, hash)."""
    return Call("GetModelInfo", memory_pb2.GetModelInfoRequest(), ModelInfo.from_proto,
                timeout=timeout)


def compress(x: np.ndarray, *, timeout: float | None = None) -> Call[np.ndarray]:
    """Encode inputs.

    Args:
        x: inputs [B, L, D]; any real dtype, sent as float32.

    Returns:
        codes [B, m] in the model's code dtype.
    """
    request = memory_pb2.CompressRequest(inputs=to_proto(as_inputs(x)))
    return Call("Compress", request, lambda r: from_proto(r.codes), timeout=timeout)


def compress_checked(
    x: np.ndarray, *, timeout: float | None = None
) -> Call[tuple[np.ndarray, list[ItemCheck]]]:
    """Encode inputs and say what the model thinks of each.

    Returns:
        codes [B, m] and one :class:`ItemCheck` per item (in-domain percentile,
        out-of-domain flag, norm flag, reconstruction error); the list is empty
        when the server's model has no density (PCA, IDRP v1).
    """
    request = memory_pb2.CompressRequest(inputs=to_proto(as_inputs(x)))
    return Call("Compress", request,
                lambda r: (from_proto(r.codes), [ItemCheck.from_proto(c) for c in r.checks]),
                timeout=timeout)


def decompress(codes: np.ndarray, *, timeout: float | None = None) -> Call[np.ndarray]:
    """Decode codes.

    Args:
        codes: [B, m]; float32/float16/int8/uint8 are sent as they are.

    Returns:
        reconstructions [B, L, D] float32.
    """
    request = memory_pb2.DecompressRequest(codes=to_proto(as_codes(codes)))
    return Call("Decompress", request, lambda r: from_proto(r.outputs), timeout=timeout)


# ------------------------------------------------------------------ write / read


def write(
    x: np.ndarray | None = None,
    *,
    codes: np.ndarray | None = None,
    bank: str = "",
    mode: str = "mean",
    payloads: Iterable[bytes | str] | bytes | str | None = None,
    keys: Iterable[str] | str | None = None,
    timeout: float | None = None,
) -> Call[WrittenSlots]:
    """Store memories: inputs ``x`` [B, L, D] or ready ``codes`` [B, m] (exactly one).

    Args:
        bank: target bank ("" = the server's default bank).
        mode: "mean" stores the batch mean as one memory (the paper's write);
            "per_item" stores each item in its own slot.
        payloads: none, or one per written slot (1 in mean mode, B per item);
            str is encoded as UTF-8. A single bytes/str counts as one.
        keys: none, or one per written slot; an existing key is overwritten in place.

    Returns:
        one entry per written slot. Writes without keys are not retried,
        since a repeat could store the memory twice.
    """
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
        "Write", request, WrittenSlots.from_proto, retryable=bool(key_list), timeout=timeout,
    )


def read(
    x: np.ndarray | None = None,
    *,
    codes: np.ndarray | None = None,
    bank: str = "",
    top_k: int = 1,
    temperature: float | None = None,
    min_score: float | None = None,
    reconstruct: bool = False,
    payloads: bool = False,
    soft: bool = False,
    count_access: bool = True,
    nprobe: int = 0,
    exhaustive: bool = False,
    timeout: float | None = None,
) -> Call[list[QueryResult]]:
    """Recall memories by cosine similarity: queries ``x`` [Q, L, D] or ``codes`` [Q, m].

    Args:
        top_k: hits per query, best first.
        temperature: softmax temperature of the weights (server default 1.0).
        min_score: drop hits whose cosine score is below this.
        reconstruct: decode each hit to [L, D].
        payloads: return each hit's payload.
        soft: also return the softmax-weighted soft read [L, D].
        count_access: count this read in the slots' access counters
            (False to inspect without affecting eviction).
        nprobe: search effort of an indexed bank (``BankInfo.index``): inverted
            lists probed per query; 0 = the server's default. Higher is slower and
            closer to the exact scan.
        exhaustive: scan every slot even if the bank is indexed (exact top-k).

    Returns:
        one result per query, in order.
    """
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
        "Read", request, lambda r: [QueryResult.from_proto(q, payloads) for q in r.results],
        timeout=timeout,
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


def remember(
    texts: str | Iterable[str],
    bank: str | None = None,
    keys: str | Iterable[str] | None = None,
    metadata: dict[str, str] | Iterable[dict[str, str]] | None = None,
    *,
    timeout: float | None = None,
) -> Call[WrittenSlots]:
    """Store texts as memories, one each; the server embeds them with its model's
    embedder and keeps each text with its memory.

    Args:
        texts: one text or a list of texts.
        bank: target bank (None = the server's default bank).
        keys: none, or one per text; an existing key is overwritten in place.
        metadata: none, one string map for every text, or one per text (e.g.
            ``{"user": "u1", "kind": "fact"}``); usable as ``recall``'s filter.

    Returns:
        one written slot per text. Writes without keys are not retried.
    """
    text_list = _texts(texts, "texts")
    key_list = [str(k) for k in _as_list(keys, "keys")]
    _check_count(key_list, len(text_list), "keys", "per_item")
    request = memory_pb2.WriteRequest(
        bank=bank or "", mode=memory_pb2.WRITE_MODE_PER_ITEM, keys=key_list,
        texts=memory_pb2.TextBatch(texts=text_list),
        metadata=_metadata_maps(metadata, len(text_list)),
    )
    return Call("Write", request, WrittenSlots.from_proto, retryable=bool(key_list),
                timeout=timeout)


RECALL_FUSIONS = {
    None: memory_pb2.RECALL_FUSION_UNSPECIFIED,
    "convex": memory_pb2.RECALL_FUSION_CONVEX,
    "rrf": memory_pb2.RECALL_FUSION_RRF,
}
RECALL_MODES = {
    None: memory_pb2.RECALL_MODE_UNSPECIFIED,
    "dense": memory_pb2.RECALL_MODE_DENSE,
    "hybrid": memory_pb2.RECALL_MODE_HYBRID,
    "lexical": memory_pb2.RECALL_MODE_LEXICAL,
}


def recall(
    query: str | Iterable[str],
    bank: str | None = None,
    top_k: int = 5,
    filter: dict[str, str] | None = None,  # noqa: A002 - the documented name
    min_score: float | None = None,
    mode: str | None = None,
    *,
    context: int | None = None,
    fusion: str | None = None,
    timeout: float | None = None,
) -> Call[Any]:
    """Find the memories that best answer a text query, by words and meaning.

    Args:
        query: one text (returns a list of hits) or a list (a list of hit lists).
        top_k: hits per query, best first.
        filter: metadata equality filter, applied before top-k (and before fusion).
        min_score: drop hits whose cosine is below this (in every mode).
        mode: "hybrid" (words and meaning: BM25 over the bank's texts fused with
            the dense codes), "dense" (meaning only: cosine of codes) or "lexical"
            (words only: BM25); None lets the server choose (hybrid when the bank
            holds texts).
        context: context recall for conversations stored one turn per memory: a
            memory's ``context`` neighbours each side in its thread (the memories
            sharing its "thread" or "session" metadata, else the bank's, in write
            order) lift its score, and come back as each hit's ``.context``. 0 turns
            it off; None: the bank's setting (``create_bank(context=...)``, off by
            default).
        fusion: how hybrid fuses its rankings: "convex" (the default: a mix of the
            normalised scores) or "rrf" (reciprocal-rank fusion); None: convex.

    Returns:
        ``Memory`` hits with ``.text``, ``.key``, ``.score`` (the cosine, in every
        mode), ``.rank_score`` (what ordered them), ``.metadata`` and ``.context``.
    """
    single = isinstance(query, str)
    queries = _texts(query, "query")
    if int(top_k) < 1:
        raise invalid_argument(f"top_k must be >= 1, got {top_k}")
    if mode not in RECALL_MODES:
        raise invalid_argument(f"mode must be 'hybrid', 'dense' or 'lexical' (or None for "
                               f"the server's choice), got {mode!r}")
    if fusion not in RECALL_FUSIONS:
        raise invalid_argument(f"fusion must be 'convex' or 'rrf' (or None), got {fusion!r}")
    if context is not None and int(context) < 0:
        raise invalid_argument(f"context must be >= 0, got {context}")
    request = memory_pb2.ReadRequest(
        bank=bank or "", top_k=int(top_k), include_payloads=True,
        texts=memory_pb2.TextBatch(texts=queries),
        filter={str(k): str(v) for k, v in (filter or {}).items()},
        mode=RECALL_MODES[mode], fusion=RECALL_FUSIONS[fusion],
    )
    if min_score is not None:
        request.min_score = float(min_score)
    if context is not None:
        request.context = int(context)

    def parse(r: Any) -> Any:
        out = [[Memory.from_hit(Hit.from_proto(h, True)) for h in q.hits] for q in r.results]
        return out[0] if single else out

    return Call("Read", request, parse, timeout=timeout)


# ------------------------------------------------------------------ banks


def create_bank(
    name: str,
    capacity: int,
    *,
    policy: str | None = None,
    half_life: float | None = None,
    exist_ok: bool = False,
    context: int = 0,
    timeout: float | None = None,
) -> Call[BankInfo]:
    """Create a bank of ``capacity`` slots.

    Args:
        policy: "lfu" (the paper's), "lfu_decay", or None for the server default.
        half_life: half-life of access counts under lfu_decay, in writes
            (None: server default).
        exist_ok: succeed without change if the bank exists.
        context: context recall of the bank's text reads by default (neighbours each
            side, see ``recall``): for banks of conversation turns. 0 (off) for banks
            of unrelated facts, where write order means nothing.
    """
    if policy is not None and policy not in POLICY_CODES:
        raise invalid_argument(
            f"policy must be one of {sorted(POLICY_CODES)} or None, got {policy!r}"
        )
    request = memory_pb2.CreateBankRequest(
        name=name, capacity=int(capacity),
        policy=POLICY_CODES[policy] if policy else memory_pb2.EVICTION_POLICY_UNSPECIFIED,
        half_life=float(half_life or 0.0), exist_ok=exist_ok, context=int(context),
    )
    return Call("CreateBank", request, BankInfo.from_proto, timeout=timeout)


def list_banks(*, timeout: float | None = None) -> Call[list[BankInfo]]:
    """Every bank on the server, as :class:`BankInfo`."""
    return Call(
        "ListBanks", memory_pb2.ListBanksRequest(),
        lambda r: [BankInfo.from_proto(b) for b in r.banks], timeout=timeout,
    )


def describe_bank(name: str, *, timeout: float | None = None) -> Call[BankInfo]:
    """One bank's capacity, occupancy, policy, counters and index."""
    return Call("DescribeBank", memory_pb2.DescribeBankRequest(name=name), BankInfo.from_proto,
                timeout=timeout)


def delete_slots(
    bank: str,
    *,
    slots: Iterable[int] = (),
    keys: Iterable[str] = (),
    sequences: Iterable[int] | None = None,
    dry_run: bool = False,
    timeout: float | None = None,
) -> Call[DeleteResult]:
    """Free slots by index and/or key; returns ``(deleted, missing_keys)``.

    ``sequences`` (one per slot, a hit's ``.sequence``) frees a slot only while it
    still holds that memory; ``dry_run`` counts what would be freed.
    """
    request = memory_pb2.DeleteSlotsRequest(
        bank=bank, slots=[int(s) for s in slots], keys=[str(k) for k in _as_list(keys, "keys")],
        sequences=[int(q) for q in sequences or ()], dry_run=bool(dry_run),
    )
    if sequences is not None and not request.sequences and request.slots:
        raise invalid_argument("sequences is empty; give one per slot (or leave it out)")
    return Call(
        "DeleteSlots", request, lambda r: DeleteResult(int(r.deleted), list(r.missing_keys)),
        timeout=timeout,
    )


def clear_bank(name: str, *, timeout: float | None = None) -> Call[BankInfo]:
    """Free every slot; the bank remains."""
    return Call("ClearBank", memory_pb2.ClearBankRequest(name=name), BankInfo.from_proto,
                timeout=timeout)


def drop_bank(name: str, *, timeout: float | None = None) -> Call[None]:
    """Remove a bank entirely."""
    return Call("DropBank", memory_pb2.DropBankRequest(name=name), lambda r: None,
                timeout=timeout)


# ------------------------------------------------------------------ snapshots


def create_snapshot(
    name: str | None = None, *, timeout: float | None = None
) -> Call[SnapshotInfo]:
    """Write every bank to disk on the server (name: optional, default timestamped)."""
    request = memory_pb2.CreateSnapshotRequest(name=name or "")
    return Call("CreateSnapshot", request, SnapshotInfo.from_proto, timeout=timeout)


def list_snapshots(*, timeout: float | None = None) -> Call[list[SnapshotInfo]]:
    """Snapshots on the server's disk, newest first."""
    return Call(
        "ListSnapshots", memory_pb2.ListSnapshotsRequest(),
        lambda r: [SnapshotInfo.from_proto(s) for s in r.snapshots], timeout=timeout,
    )


def restore_snapshot(name: str, *, timeout: float | None = None) -> Call[RestoreResult]:
    """Replace every bank with the snapshot's contents."""
    return Call(
        "RestoreSnapshot", memory_pb2.RestoreSnapshotRequest(name=name),
        lambda r: RestoreResult(
            SnapshotInfo.from_proto(r.snapshot), [BankInfo.from_proto(b) for b in r.banks]
        ),
        timeout=timeout,
    )


# ------------------------------------------------------------------ health


def health(service: str = "", *, timeout: float | None = None) -> Call[str]:
    """Standard gRPC health check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
    return Call(
        HEALTH_CHECK, _health.HealthCheckRequest(service=service), _health.status_name,
        timeout=timeout,
    )

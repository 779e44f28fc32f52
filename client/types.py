"""Result types of the client: plain frozen dataclasses built from the v1 messages.

Arrays are numpy views over the response bytes (read-only, zero-copy); take
``np.array(x)`` for a writable copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from apcm.v1 import memory_pb2
from apcm.wire.tensors import DTYPE_NAMES, from_proto

POLICY_NAMES = {
    memory_pb2.EVICTION_POLICY_UNSPECIFIED: "unspecified",
    memory_pb2.EVICTION_POLICY_LFU: "lfu",
    memory_pb2.EVICTION_POLICY_LFU_DECAY: "lfu_decay",
}
POLICY_CODES = {name: code for code, name in POLICY_NAMES.items() if code}
WRITE_MODES = {"mean": memory_pb2.WRITE_MODE_MEAN, "per_item": memory_pb2.WRITE_MODE_PER_ITEM}


def _dtype_name(code: Any) -> str:
    return DTYPE_NAMES.get(code, "unspecified")


@dataclass(frozen=True)
class ModelInfo:
    """The served codec.

    Attributes:
        name: model name from the weights file.
        kind: codec family, "idrp" or "pca".
        input_shape: shape of one item, (L, D).
        code_dim: code dimension m.
        code_dtype: "float32", "float16" or "int8".
        bytes_per_code: bytes of one stored code.
        input_bytes: bytes of one float32 input item.
        compression_ratio: input_bytes / bytes_per_code.
        model_hash: SHA-256 content hash of the weights (hex).
        device: where the codec runs, e.g. "cpu" or "cuda:0".
        max_batch_size: largest batch the server accepts in one request.
        max_message_bytes: largest message the server accepts.
        embedder: the text embedder the model is bound to ("" = vectors only).
        max_message_bytes: largest message the server accepts or sends.
        max_top_k: largest ``top_k`` of a read.
        max_bank_capacity: largest capacity of a new bank.
        max_payload_bytes: largest payload of one memory.
        max_key_length: longest memory key, in characters.
        memory_limit_bytes: bytes all banks together may hold (0 if the server
            reports none, e.g. an older server).
        max_banks: most banks that may exist at once (0 if not reported).
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    code_dim: int
    code_dtype: str
    bytes_per_code: int
    input_bytes: int
    compression_ratio: float
    model_hash: str
    device: str
    max_batch_size: int
    max_message_bytes: int
    embedder: str = ""
    max_top_k: int = 0
    max_bank_capacity: int = 0
    max_payload_bytes: int = 0
    max_key_length: int = 0
    memory_limit_bytes: int = 0
    max_banks: int = 0

    @classmethod
    def from_proto(cls, msg: memory_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name,
            kind=msg.kind,
            input_shape=tuple(int(s) for s in msg.input_shape),
            code_dim=int(msg.code_dim),
            code_dtype=_dtype_name(msg.code_dtype),
            bytes_per_code=int(msg.bytes_per_code),
            input_bytes=int(msg.input_bytes),
            compression_ratio=float(msg.compression_ratio),
            model_hash=msg.model_hash,
            device=msg.device,
            max_batch_size=int(msg.max_batch_size),
            max_message_bytes=int(msg.max_message_bytes),
            embedder=msg.embedder,
            max_top_k=int(msg.max_top_k),
            max_bank_capacity=int(msg.max_bank_capacity),
            max_payload_bytes=int(msg.max_payload_bytes),
            max_key_length=int(msg.max_key_length),
            memory_limit_bytes=int(msg.memory_limit_bytes),
            max_banks=int(msg.max_banks),
        )


@dataclass(frozen=True)
class ItemCheck:
    """What the model says about one input item (models with a density, IDRP v2).

    Attributes:
        in_domain_percentile: the item's NLL as a percentile of the model's validation
            set (about 0.5 typical; near 1 = unlike the data the model was trained on).
        out_of_domain: the model does not vouch for the item (percentile above its
            threshold, or ``norm_off``).
        norm_off: the input's norm is not what the model expects (e.g. not unit norm).
        reconstruction_error: ||x - x_hat||^2 over the item, exact.
    """

    in_domain_percentile: float
    out_of_domain: bool
    norm_off: bool
    reconstruction_error: float

    @classmethod
    def from_proto(cls, msg: memory_pb2.ItemCheck) -> ItemCheck:
        return cls(float(msg.in_domain_percentile), bool(msg.out_of_domain),
                   bool(msg.norm_off), float(msg.reconstruction_error))


class WrittenSlots(list["WrittenSlot"]):
    """A Write's written slots (a list), plus ``checks``: one :class:`ItemCheck` per
    input item when the server's model has a density, else empty."""

    checks: list[ItemCheck]

    def __init__(self, slots: Any = (), checks: Any = ()) -> None:
        super().__init__(slots)
        self.checks = list(checks)

    @classmethod
    def from_proto(cls, msg: memory_pb2.WriteResponse) -> WrittenSlots:
        return cls([WrittenSlot.from_proto(s) for s in msg.slots],
                   [ItemCheck.from_proto(c) for c in msg.checks])


@dataclass(frozen=True)
class WrittenSlot:
    """Where one written memory went.

    Attributes:
        slot: slot index now holding the memory.
        key: key of the memory ("" if none).
        evicted: True if an older memory was evicted to make room.
        evicted_key: key of the evicted memory ("" if none).
        sequence: write sequence number (monotonic per server).
        replaced: True if the write overwrote the memory with the same key.
    """

    slot: int
    key: str
    evicted: bool
    evicted_key: str
    sequence: int
    replaced: bool

    @classmethod
    def from_proto(cls, msg: memory_pb2.WrittenSlot) -> WrittenSlot:
        return cls(
            slot=int(msg.slot), key=msg.key, evicted=msg.evicted, evicted_key=msg.evicted_key,
            sequence=int(msg.sequence), replaced=msg.replaced,
        )


@dataclass(frozen=True)
class Hit:
    """One recalled memory.

    Attributes:
        slot: slot index.
        key: slot key ("" if none).
        score: cosine similarity of query and memory codes, in [-1, 1], in every mode.
        weight: softmax weight of this slot among all occupied slots (hybrid and
            lexical reads: the hit's share of the returned rank scores).
        payload: payload bytes, or None when payloads were not requested.
        reconstruction: decoded memory [L, D] float32, or None when not requested.
        sequence: write sequence number of the memory (its age).
        metadata: the memory's string metadata ({} if none).
        cosine: the same cosine as ``score`` (kept for callers of the first text API).
        lexical_score: BM25 score of the memory's text for the query (0 in dense).
        rank_score: the score that ordered the hits: the cosine (dense), the fused
            score (hybrid) or BM25 (lexical); with context, lifted by its neighbours'.
        context: with context recall, the memories around this one in its thread
            (:class:`ContextTurn`, in order); () otherwise.
    """

    slot: int
    key: str
    score: float
    weight: float
    payload: bytes | None
    reconstruction: np.ndarray | None
    sequence: int
    metadata: dict[str, str] = field(default_factory=dict)
    cosine: float = 0.0
    lexical_score: float = 0.0
    rank_score: float = 0.0
    context: tuple[ContextTurn, ...] = ()

    @classmethod
    def from_proto(cls, msg: memory_pb2.Hit, with_payload: bool) -> Hit:
        recon = from_proto(msg.reconstruction) if msg.HasField("reconstruction") else None
        return cls(
            slot=int(msg.slot),
            key=msg.key,
            score=float(msg.score),
            weight=float(msg.weight),
            payload=bytes(msg.payload) if with_payload else None,
            reconstruction=recon,
            sequence=int(msg.sequence),
            metadata=dict(msg.metadata),
            cosine=float(msg.cosine),
            lexical_score=float(msg.lexical_score),
            rank_score=float(msg.rank_score),
            context=tuple(ContextTurn.from_proto(c) for c in msg.context),
        )


@dataclass(frozen=True)
class ContextTurn:
    """A memory next to a recalled one in its thread (``recall(context=...)``).

    Attributes:
        offset: its place relative to the hit: -1 written just before, 1 just after.
        text: its text (payload as UTF-8).
        key: its key ("" if none).
        slot: its slot.
        sequence: its write sequence number.
    """

    offset: int
    text: str
    key: str
    slot: int
    sequence: int

    @classmethod
    def from_proto(cls, msg: memory_pb2.ContextMemory) -> ContextTurn:
        return cls(offset=int(msg.offset), text=bytes(msg.payload).decode("utf-8", "replace"),
                   key=msg.key, slot=int(msg.slot), sequence=int(msg.sequence))


@dataclass(frozen=True)
class Memory:
    """One recalled text memory (``recall``).

    Attributes:
        text: the stored text (the memory's payload, decoded as UTF-8).
        key: the memory's key ("" if none).
        score: cosine similarity of query and memory, in [-1, 1], in every mode.
        metadata: the memory's string metadata ({} if none).
        slot: slot index in the bank.
        sequence: write sequence number (its age).
        cosine: the same cosine as ``score``.
        rank_score: the score that ordered the hits (fused in hybrid mode, BM25 in
            lexical mode, the cosine in dense mode; with context, lifted by its
            neighbours').
        context: with context recall, the turns before and after it in its thread
            (:class:`ContextTurn`, offsets -n..-1 then 1..n); () otherwise.
    """

    text: str
    key: str
    score: float
    metadata: dict[str, str]
    slot: int
    sequence: int
    cosine: float = 0.0
    rank_score: float = 0.0
    context: tuple[ContextTurn, ...] = ()

    @classmethod
    def from_hit(cls, hit: Hit) -> Memory:
        return cls(text=(hit.payload or b"").decode("utf-8", errors="replace"), key=hit.key,
                   score=hit.score, metadata=dict(hit.metadata), slot=hit.slot,
                   sequence=hit.sequence, cosine=hit.cosine, rank_score=hit.rank_score,
                   context=hit.context)


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query.

    Attributes:
        hits: best first; empty when the bank is empty or nothing passed min_score.
        soft_reconstruction: the soft read [L, D] float32, or None.
    """

    hits: list[Hit]
    soft_reconstruction: np.ndarray | None

    @classmethod
    def from_proto(cls, msg: memory_pb2.QueryResult, with_payloads: bool) -> QueryResult:
        soft = msg.soft_reconstruction
        return cls(
            hits=[Hit.from_proto(h, with_payloads) for h in msg.hits],
            soft_reconstruction=from_proto(soft) if msg.HasField("soft_reconstruction") else None,
        )


@dataclass(frozen=True)
class BankInfo:
    """A memory bank's configuration, occupancy and counters.

    Attributes:
        name: bank name.
        capacity: number of slots.
        occupied: slots holding a memory.
        policy: eviction policy, "lfu" or "lfu_decay".
        half_life: half-life of access counts under lfu_decay, in writes.
        code_dim: dimension of the stored codes.
        code_dtype: dtype of the stored codes.
        evictions_total: memories evicted since creation.
        writes_total: slots written since creation.
        reads_total: slot reads counted since creation.
        counter_min: smallest access counter over occupied slots.
        counter_max: largest access counter over occupied slots.
        counter_mean: mean access counter over occupied slots.
        memory_bytes: bytes of codes and per-slot metadata.
        payload_bytes: bytes of payloads.
        index: the bank's approximate index (``state`` "none": reads scan).
        context: context recall of the bank's text reads by default (0: off).
        codec: which codec the bank's codes are in (its own, fitted once it held
            enough memories, or the served model).
    """

    name: str
    capacity: int
    occupied: int
    policy: str
    half_life: float
    code_dim: int
    code_dtype: str
    evictions_total: int
    writes_total: int
    reads_total: int
    counter_min: float
    counter_max: float
    counter_mean: float
    memory_bytes: int
    payload_bytes: int
    index: BankIndex | None = None
    context: int = 0
    codec: BankCodec | None = None

    @classmethod
    def from_proto(cls, msg: memory_pb2.BankInfo) -> BankInfo:
        return cls(
            name=msg.name,
            capacity=int(msg.capacity),
            occupied=int(msg.occupied),
            policy=POLICY_NAMES.get(msg.policy, "unspecified"),
            half_life=float(msg.half_life),
            code_dim=int(msg.code_dim),
            code_dtype=_dtype_name(msg.code_dtype),
            evictions_total=int(msg.evictions_total),
            writes_total=int(msg.writes_total),
            reads_total=int(msg.reads_total),
            counter_min=float(msg.counter_min),
            counter_max=float(msg.counter_max),
            counter_mean=float(msg.counter_mean),
            memory_bytes=int(msg.memory_bytes),
            payload_bytes=int(msg.payload_bytes),
            index=BankIndex.from_proto(msg.index) if msg.HasField("index") else None,
            context=int(msg.context),
            codec=BankCodec.from_proto(msg.codec) if msg.HasField("codec") else None,
        )


@dataclass(frozen=True)
class BankCodec:
    """Which codec a bank's codes are in.

    Attributes:
        state: "served" (the served model; the bank never fits one), "staging" (the
            served model, staging items for a fit), "fitting", or "own" (the bank's
            own codec, fitted on ``fitted_on`` of its memories at ``fitted_at``, Unix
            seconds).
        model_hash: content hash of the bank's own codec ("" before).
        staged: items staged toward the next fit or refit. threshold: the count at
            which it fits.
        declined: fits not clearly better on held-out items than the bank's codec.
        held_out_mse / replaced_mse: squared error per item on the fit's held-out
            items of the own codec as fitted without them, and of the codec it
            replaced.
    """

    state: str
    model_hash: str
    fitted_on: int
    fitted_at: float
    staged: int
    threshold: int
    declined: int = 0
    held_out_mse: float = 0.0
    replaced_mse: float = 0.0

    @classmethod
    def from_proto(cls, msg: memory_pb2.BankCodec) -> BankCodec:
        name = memory_pb2.BankCodecState.Name(msg.state) if msg.state in \
            memory_pb2.BankCodecState.values() else "BANK_CODEC_STATE_UNSPECIFIED"
        return cls(state=name.removeprefix("BANK_CODEC_STATE_").lower(),
                   model_hash=msg.model_hash, fitted_on=int(msg.fitted_on),
                   fitted_at=float(msg.fitted_at), staged=int(msg.staged),
                   threshold=int(msg.threshold), declined=int(msg.declined),
                   held_out_mse=float(msg.held_out_mse),
                   replaced_mse=float(msg.replaced_mse))


@dataclass(frozen=True)
class BankIndex:
    """A bank's approximate (IVF) index.

    Attributes:
        state: "none", "training", "ready" or "retraining" (see the proto's IndexState).
        lists: inverted lists; 0 without an index.
        trained_at: occupied slots the centroids were trained on.
        default_nprobe: lists a read probes when it does not say.
        indexed_slots: slots in the lists.
        threshold: occupied slots from which the server indexes a bank (0: never).
    """

    state: str
    lists: int
    trained_at: int
    default_nprobe: int
    indexed_slots: int
    threshold: int

    @classmethod
    def from_proto(cls, msg: memory_pb2.BankIndex) -> BankIndex:
        name = memory_pb2.IndexState.Name(msg.state) if msg.state in \
            memory_pb2.IndexState.values() else "INDEX_STATE_UNSPECIFIED"
        return cls(state=name.removeprefix("INDEX_STATE_").lower(), lists=int(msg.lists),
                   trained_at=int(msg.trained_at), default_nprobe=int(msg.default_nprobe),
                   indexed_slots=int(msg.indexed_slots), threshold=int(msg.threshold))


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on the server's disk.

    Attributes:
        name: snapshot name.
        created_at: creation time, Unix seconds.
        size_bytes: file size.
        wal_sequence: last write-ahead-log sequence number it contains.
        model_hash: hash of the model its codes belong to.
        banks: names of the banks it holds.
        valid: True if its checksum verified when listed.
    """

    name: str
    created_at: float
    size_bytes: int
    wal_sequence: int
    model_hash: str
    banks: tuple[str, ...]
    valid: bool

    @classmethod
    def from_proto(cls, msg: memory_pb2.SnapshotInfo) -> SnapshotInfo:
        return cls(
            name=msg.name, created_at=float(msg.created_at), size_bytes=int(msg.size_bytes),
            wal_sequence=int(msg.wal_sequence), model_hash=msg.model_hash,
            banks=tuple(msg.banks), valid=msg.valid,
        )


class DeleteResult(NamedTuple):
    """Outcome of ``delete_slots``; unpacks as ``deleted, missing_keys``."""

    deleted: int
    missing_keys: list[str]


class RestoreResult(NamedTuple):
    """Outcome of ``restore_snapshot``: the snapshot and the banks after the restore."""

    snapshot: SnapshotInfo
    banks: list[BankInfo]

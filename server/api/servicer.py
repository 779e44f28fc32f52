"""The gRPC servicer: proto <-> domain translation only.

Every method unpacks its request into ``MemoryService`` arguments and packs the
result; readiness is checked by ``ReadinessInterceptor`` and domain errors become
status codes in ``ErrorInterceptor``.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from apcm.v1 import memory_pb2, memory_pb2_grpc
from apcm.wire.tensors import DTYPE_CODES, from_proto, to_proto

from ..domain.service import ItemChecks, MemoryService, QueryHits, ReadParams
from ..errors import InvalidArgument
from ..rpc.convert import POLICY_TO_PROTO, bank_info

POLICY_FROM_PROTO: dict[int, str | None] = {v: k for k, v in POLICY_TO_PROTO.items()}
POLICY_FROM_PROTO[memory_pb2.EVICTION_POLICY_UNSPECIFIED] = None  # the server's default
MODE_FROM_PROTO: dict[int, str | None] = {
    memory_pb2.RECALL_MODE_UNSPECIFIED: None,
    memory_pb2.RECALL_MODE_DENSE: "dense",
    memory_pb2.RECALL_MODE_HYBRID: "hybrid",
    memory_pb2.RECALL_MODE_LEXICAL: "lexical",
}
FUSION_FROM_PROTO: dict[int, str | None] = {
    memory_pb2.RECALL_FUSION_UNSPECIFIED: None,
    memory_pb2.RECALL_FUSION_CONVEX: "convex",
    memory_pb2.RECALL_FUSION_RRF: "rrf",
}
PER_ITEM_FROM_PROTO: dict[int, bool] = {
    memory_pb2.WRITE_MODE_UNSPECIFIED: False,
    memory_pb2.WRITE_MODE_MEAN: False,
    memory_pb2.WRITE_MODE_PER_ITEM: True,
}


def _from_enum(value: int, table: dict[int, Any], enum: Any, field: str) -> Any:
    """Translates a wire enum value; proto3 keeps unknown numbers, so check them here."""
    if value not in table:
        valid = ", ".join(f"{enum.Name(v)} ({v})" for v in enum.values() if v in table)
        raise InvalidArgument(f"{field} {value} is not one of {valid}", field=field)
    return table[value]


def snapshot_info(info: Any) -> memory_pb2.SnapshotInfo:
    return memory_pb2.SnapshotInfo(
        name=info.name,
        created_at=info.created_at,
        size_bytes=info.size_bytes,
        wal_sequence=info.wal_sequence,
        model_hash=info.model_hash,
        banks=list(info.banks),
        valid=info.valid,
    )


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Implements ``apcm.v1.MemoryService`` over a ``MemoryService``."""

    def __init__(self, service: MemoryService) -> None:
        self.service = service

    # -- model -----------------------------------------------------------------------
    def GetModelInfo(  # noqa: N802
        self, request: memory_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> memory_pb2.ModelInfo:
        info = self.service.model_info()
        return memory_pb2.ModelInfo(
            name=info.name,
            kind=info.kind,
            input_shape=list(info.input_shape),
            code_dim=info.code_dim,
            code_dtype=DTYPE_CODES[info.code_dtype],
            bytes_per_code=info.bytes_per_code,
            input_bytes=info.input_bytes,
            compression_ratio=info.compression_ratio,
            model_hash=info.model_hash,
            device=info.device,
            max_batch_size=info.max_batch_size,
            max_message_bytes=info.max_message_bytes,
            embedder=info.embedder,
            max_top_k=info.max_top_k,
            max_bank_capacity=info.max_bank_capacity,
            max_payload_bytes=info.max_payload_bytes,
            max_key_length=info.max_key_length,
            memory_limit_bytes=info.memory_limit_bytes,
            max_banks=info.max_banks,
        )

    def Compress(  # noqa: N802
        self, request: memory_pb2.CompressRequest, context: grpc.ServicerContext
    ) -> memory_pb2.CompressResponse:
        codes, checks = self.service.compress_checked(from_proto(request.inputs))
        return memory_pb2.CompressResponse(codes=to_proto(codes), checks=_checks(checks))

    def Decompress(  # noqa: N802
        self, request: memory_pb2.DecompressRequest, context: grpc.ServicerContext
    ) -> memory_pb2.DecompressResponse:
        outputs = self.service.decompress(from_proto(request.codes))
        return memory_pb2.DecompressResponse(outputs=to_proto(outputs))

    # -- write / read ------------------------------------------------------------------
    @staticmethod
    def _content(request: memory_pb2.WriteRequest | memory_pb2.ReadRequest,
                 oneof: str) -> dict[str, Any]:
        which = request.WhichOneof(oneof)
        if which == "texts":
            return {"texts": list(request.texts.texts)}
        return {which: from_proto(getattr(request, which))} if which else {}

    def Write(  # noqa: N802
        self, request: memory_pb2.WriteRequest, context: grpc.ServicerContext
    ) -> memory_pb2.WriteResponse:
        texts = request.WhichOneof("content") == "texts"
        # texts default to one memory each: the mean of unrelated sentences means nothing
        per_item = _from_enum(request.mode, PER_ITEM_FROM_PROTO, memory_pb2.WriteMode, "mode") \
            or (texts and request.mode == memory_pb2.WRITE_MODE_UNSPECIFIED)
        written = self.service.write(
            request.bank, **self._content(request, "content"), per_item=per_item,
            keys=list(request.keys), payloads=[bytes(p) for p in request.payloads],
            metadata=[dict(m.entries) for m in request.metadata],
            deadline=_deadline(context),
        )
        return memory_pb2.WriteResponse(slots=[
            memory_pb2.WrittenSlot(
                slot=w.slot, key=w.key or "", evicted=w.evicted, evicted_key=w.evicted_key or "",
                sequence=w.sequence, replaced=w.replaced,
            )
            for w in written
        ], checks=_checks(written.checks))

    def Read(  # noqa: N802
        self, request: memory_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> memory_pb2.ReadResponse:
        params = ReadParams(
            top_k=request.top_k if request.HasField("top_k") else 1,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            min_score=request.min_score if request.HasField("min_score") else None,
            soft=request.soft,
            count_access=not request.skip_access_count,
            where=ReadParams.filter_items(dict(request.filter)),
            mode=_from_enum(request.mode, MODE_FROM_PROTO, memory_pb2.RecallMode, "mode"),
            nprobe=request.nprobe,
            exhaustive=request.exhaustive,
            fusion=_from_enum(request.fusion, FUSION_FROM_PROTO, memory_pb2.RecallFusion,
                              "fusion"),
            context=request.context if request.HasField("context") else None,
        )
        results = self.service.read(
            request.bank, params, **self._content(request, "query"),
            include_reconstruction=request.include_reconstruction,
            include_payloads=request.include_payloads, deadline=_deadline(context),
        )
        return memory_pb2.ReadResponse(results=[_query_result(r) for r in results])

    # -- banks -----------------------------------------------------------------------
    def CreateBank(  # noqa: N802
        self, request: memory_pb2.CreateBankRequest, context: grpc.ServicerContext
    ) -> memory_pb2.BankInfo:
        stats = self.service.create_bank(
            request.name, request.capacity,
            policy=_from_enum(request.policy, POLICY_FROM_PROTO, memory_pb2.EvictionPolicy,
                              "policy"),
            half_life=request.half_life or None, exist_ok=request.exist_ok,
            context=request.context,
        )
        return bank_info(stats)

    def ListBanks(  # noqa: N802
        self, request: memory_pb2.ListBanksRequest, context: grpc.ServicerContext
    ) -> memory_pb2.ListBanksResponse:
        return memory_pb2.ListBanksResponse(
            banks=[bank_info(s) for s in self.service.list_banks()])

    def DescribeBank(  # noqa: N802
        self, request: memory_pb2.DescribeBankRequest, context: grpc.ServicerContext
    ) -> memory_pb2.BankInfo:
        return bank_info(self.service.describe_bank(request.name))

    def DeleteSlots(  # noqa: N802
        self, request: memory_pb2.DeleteSlotsRequest, context: grpc.ServicerContext
    ) -> memory_pb2.DeleteSlotsResponse:
        deleted, missing = self.service.delete_slots(
            request.bank, request.slots, request.keys,
            sequences=list(request.sequences) if request.sequences else None,
            dry_run=request.dry_run)
        return memory_pb2.DeleteSlotsResponse(deleted=deleted, missing_keys=missing)

    def ClearBank(  # noqa: N802
        self, request: memory_pb2.ClearBankRequest, context: grpc.ServicerContext
    ) -> memory_pb2.BankInfo:
        return bank_info(self.service.clear_bank(request.name))

    def DropBank(  # noqa: N802
        self, request: memory_pb2.DropBankRequest, context: grpc.ServicerContext
    ) -> memory_pb2.DropBankResponse:
        self.service.drop_bank(request.name)
        return memory_pb2.DropBankResponse()

    # -- snapshots ---------------------------------------------------------------------
    def CreateSnapshot(  # noqa: N802
        self, request: memory_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> memory_pb2.SnapshotInfo:
        return snapshot_info(self.service.create_snapshot(request.name or None))

    def ListSnapshots(  # noqa: N802
        self, request: memory_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> memory_pb2.ListSnapshotsResponse:
        return memory_pb2.ListSnapshotsResponse(
            snapshots=[snapshot_info(i) for i in self.service.list_snapshots()])

    def RestoreSnapshot(  # noqa: N802
        self, request: memory_pb2.RestoreSnapshotRequest, context: grpc.ServicerContext
    ) -> memory_pb2.RestoreSnapshotResponse:
        info = self.service.restore_snapshot(request.name)
        return memory_pb2.RestoreSnapshotResponse(
            snapshot=snapshot_info(info),
            banks=[bank_info(s) for s in self.service.list_banks()])


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` value (None: it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _query_result(r: QueryHits) -> memory_pb2.QueryResult:
    qr = memory_pb2.QueryResult()
    for i, h in enumerate(r.hits):
        hit = qr.hits.add(slot=h.slot, key=h.key or "", score=h.score, weight=h.weight,
                          sequence=h.sequence, metadata=h.metadata or {},
                          cosine=getattr(h, "cosine", h.score),
                          lexical_score=getattr(h, "lexical", 0.0),
                          rank_score=getattr(h, "rank_score", h.score))
        if h.payload:
            hit.payload = h.payload
        for c in getattr(h, "context", None) or ():
            hit.context.add(offset=c.offset, slot=c.slot, key=c.key or "", payload=c.text,
                            sequence=c.sequence)
        if r.reconstructions is not None:
            hit.reconstruction.CopyFrom(to_proto(r.reconstructions[i]))
    if r.soft_reconstruction is not None:
        qr.soft_reconstruction.CopyFrom(to_proto(r.soft_reconstruction))
    return qr


def _checks(checks: ItemChecks | None) -> list[memory_pb2.ItemCheck]:
    if checks is None:
        return []
    return [memory_pb2.ItemCheck(in_domain_percentile=p, out_of_domain=f, norm_off=n,
                                 reconstruction_error=e)
            for p, f, n, e in zip(checks.in_domain_percentile.tolist(), checks.flagged.tolist(),
                                  checks.norm_off.tolist(),
                                  checks.reconstruction_error.tolist(), strict=True)]

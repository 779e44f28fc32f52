"""The gRPC servicer: proto <-> domain translation only.

Validation of domain rules lives in the engine and the store; errors raised
there reach the client through ``ErrorInterceptor`` with their status codes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from apcm.server.domain.runtime import Runtime
from apcm.server.errors import InvalidArgument, Unimplemented
from apcm.v1 import memory_pb2, memory_pb2_grpc
from apcm.wire.tensors import DTYPE_CODES, from_proto, to_proto

POLICY_TO_PROTO = {
    "lfu": memory_pb2.EVICTION_POLICY_LFU,
    "lfu_decay": memory_pb2.EVICTION_POLICY_LFU_DECAY,
}
POLICY_FROM_PROTO = {v: k for k, v in POLICY_TO_PROTO.items()}
MAX_TOP_K = 1024


def bank_info(stats) -> memory_pb2.BankInfo:  # type: ignore[no-untyped-def]
    return memory_pb2.BankInfo(
        name=stats.name,
        capacity=stats.capacity,
        occupied=stats.occupied,
        policy=POLICY_TO_PROTO[stats.policy],
        half_life=stats.half_life,
        code_dim=stats.code_dim,
        code_dtype=DTYPE_CODES[stats.code_dtype],
        evictions_total=stats.evictions_total,
        writes_total=stats.writes_total,
        reads_total=stats.reads_total,
        counter_min=stats.counter_min,
        counter_max=stats.counter_max,
        counter_mean=stats.counter_mean,
        memory_bytes=stats.memory_bytes,
        payload_bytes=stats.payload_bytes,
    )


def snapshot_info(info) -> memory_pb2.SnapshotInfo:  # type: ignore[no-untyped-def]
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
    """Implements ``apcm.v1.MemoryService`` over a ``Runtime``."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _bank(self, name: str) -> str:
        return name or self.rt.settings.default_bank

    def _count(self, method: str, n: int) -> None:
        self.rt.metrics.items.labels(method).inc(n)

    # -- model -----------------------------------------------------------------------
    def GetModelInfo(self, request, context):  # noqa: N802
        c = self.rt.codec
        return memory_pb2.ModelInfo(
            name=c.name,
            kind=c.kind,
            input_shape=list(c.input_shape),
            code_dim=c.code_dim,
            code_dtype=DTYPE_CODES[c.code_dtype],
            bytes_per_code=c.bytes_per_code,
            input_bytes=c.input_bytes,
            compression_ratio=c.compression_ratio,
            model_hash=c.content_hash,
            device=str(c.device),
            max_batch_size=self.rt.settings.max_batch_size,
            max_message_bytes=self.rt.settings.max_message_bytes,
        )

    def Compress(self, request, context):  # noqa: N802
        self.rt.require_ready()
        inputs = self.rt.engine.check_inputs(from_proto(request.inputs))
        codes = self.rt.engine.compress(inputs)
        self._count("Compress", inputs.shape[0])
        return memory_pb2.CompressResponse(codes=to_proto(codes))

    def Decompress(self, request, context):  # noqa: N802
        self.rt.require_ready()
        codes = self.rt.engine.check_codes(from_proto(request.codes))
        outputs = self.rt.engine.decompress(codes)
        self._count("Decompress", codes.shape[0])
        return memory_pb2.DecompressResponse(outputs=to_proto(outputs))

    # -- write / read ------------------------------------------------------------------
    def _latents(self, request, oneof: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """z_comp [B, m] float32 of a request's ``inputs`` (encoded) or ``codes`` (dequantised)."""
        which = request.WhichOneof(oneof)
        engine = self.rt.engine
        if which == "inputs":
            return engine.encode_latent(engine.check_inputs(from_proto(request.inputs)))
        if which == "codes":
            return engine.codes_to_latent(engine.check_codes(from_proto(request.codes)))
        raise InvalidArgument(f"{oneof}: set either inputs or codes", field=oneof)

    def Write(self, request, context):  # noqa: N802
        self.rt.require_ready()
        bank = self._bank(request.bank)
        store, engine = self.rt.store, self.rt.engine
        store.get(bank)  # NOT_FOUND before any model work
        per_item = request.mode == memory_pb2.WRITE_MODE_PER_ITEM
        if request.WhichOneof("content") == "codes" and per_item:
            codes = torch.from_numpy(
                engine.check_codes(from_proto(request.codes)).copy()
            ).to(engine.codec.device)
        else:
            latents = self._latents(request, "content")
            if not per_item:
                latents = latents.mean(dim=0, keepdim=True)
            codes = engine.latent_to_codes(latents)
        n = codes.shape[0]
        payloads = [bytes(p) for p in request.payloads]
        keys = list(request.keys)
        for name, given in (("payloads", payloads), ("keys", keys)):
            if given and len(given) != n:
                raise InvalidArgument(
                    f"{name}: {len(given)} given, but this write fills {n} slot(s) "
                    f"({'one per item' if per_item else 'the batch mean is one memory'})",
                    field=name,
                )
        written = store.write(bank, codes, [k or None for k in keys] or [None] * n,
                              [p or None for p in payloads] or [None] * n)
        self._count("Write", n)
        self._observe_writes(bank, written)
        return memory_pb2.WriteResponse(slots=[
            memory_pb2.WrittenSlot(
                slot=w.slot, key=w.key or "", evicted=w.evicted, evicted_key=w.evicted_key or "",
                sequence=w.sequence, replaced=w.replaced,
            )
            for w in written
        ])

    def _observe_writes(self, bank: str, written) -> None:  # type: ignore[no-untyped-def]
        m = self.rt.metrics
        m.bank_writes.labels(bank).inc(len(written))
        evicted = sum(1 for w in written if w.evicted)
        if evicted:
            m.bank_evictions.labels(bank).inc(evicted)

    def Read(self, request, context):  # noqa: N802
        self.rt.require_ready()
        bank = self._bank(request.bank)
        self.rt.store.get(bank)
        top_k = request.top_k if request.HasField("top_k") else 1
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}", field="top_k")
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not (temperature > 0 and math.isfinite(temperature)):
            raise InvalidArgument(
                f"temperature must be > 0, got {temperature}", field="temperature"
            )
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and math.isnan(min_score):
            raise InvalidArgument("min_score must be a number", field="min_score")
        latents = self._latents(request, "query")
        result = self.rt.read(
            bank, latents, top_k=top_k, temperature=temperature, min_score=min_score,
            soft=request.soft, count_access=not request.skip_access_count,
        )
        self._count("Read", latents.shape[0])
        return memory_pb2.ReadResponse(results=self._results(result, request))

    def _results(self, result, request) -> list[memory_pb2.QueryResult]:  # type: ignore[no-untyped-def]
        engine = self.rt.engine
        recon_by_hit: list[np.ndarray] = []
        if request.include_reconstruction:
            codes = [h.code for r in result.results for h in r.hits]
            if codes:
                recon_by_hit = list(engine.decode_codes(torch.stack(codes)))
        soft = None
        if request.soft and result.soft is not None:
            soft = engine.decode_latent(result.soft)
        out, cursor = [], 0
        for q, query_result in enumerate(result.results):
            hits = query_result.hits
            qr = memory_pb2.QueryResult()
            for h in hits:
                hit = qr.hits.add(
                    slot=h.slot, key=h.key or "", score=h.score, weight=h.weight,
                    sequence=h.sequence,
                )
                if request.include_payloads and h.payload:
                    hit.payload = h.payload
                if recon_by_hit:
                    hit.reconstruction.CopyFrom(to_proto(recon_by_hit[cursor]))
                cursor += 1
            if soft is not None and hits:
                qr.soft_reconstruction.CopyFrom(to_proto(soft[q]))
            out.append(qr)
        return out

    # -- banks -----------------------------------------------------------------------
    def CreateBank(self, request, context):  # noqa: N802
        self.rt.require_ready()
        policy = POLICY_FROM_PROTO.get(request.policy)  # UNSPECIFIED -> server default
        stats = self.rt.store.create_bank(
            request.name, request.capacity, policy=policy,
            half_life=request.half_life or None, exist_ok=request.exist_ok,
        )
        return bank_info(stats)

    def ListBanks(self, request, context):  # noqa: N802
        return memory_pb2.ListBanksResponse(banks=[bank_info(s) for s in self.rt.store.list()])

    def DescribeBank(self, request, context):  # noqa: N802
        return bank_info(self.rt.store.describe(self._bank(request.name)))

    def DeleteSlots(self, request, context):  # noqa: N802
        self.rt.require_ready()
        deleted, missing = self.rt.store.delete(
            self._bank(request.bank), list(request.slots), list(request.keys)
        )
        return memory_pb2.DeleteSlotsResponse(deleted=deleted, missing_keys=missing)

    def ClearBank(self, request, context):  # noqa: N802
        self.rt.require_ready()
        stats = self.rt.store.clear(self._bank(request.name))
        return bank_info(stats)

    def DropBank(self, request, context):  # noqa: N802
        self.rt.require_ready()
        self.rt.store.drop_bank(request.name)
        self.rt.metrics.forget_bank(request.name)
        return memory_pb2.DropBankResponse()

    # -- snapshots ---------------------------------------------------------------------
    def _persistence(self):  # type: ignore[no-untyped-def]
        if self.rt.persistence is None:
            raise Unimplemented("snapshots are not available in this build")
        return self.rt.persistence

    def CreateSnapshot(self, request, context):  # noqa: N802
        self.rt.require_ready()
        return snapshot_info(self._persistence().snapshot(request.name or None))

    def ListSnapshots(self, request, context):  # noqa: N802
        infos = self._persistence().list_snapshots()
        return memory_pb2.ListSnapshotsResponse(snapshots=[snapshot_info(i) for i in infos])

    def RestoreSnapshot(self, request, context):  # noqa: N802
        self.rt.require_ready()
        info = self.rt.restore(request.name)
        return memory_pb2.RestoreSnapshotResponse(
            snapshot=snapshot_info(info), banks=[bank_info(s) for s in self.rt.store.list()]
        )

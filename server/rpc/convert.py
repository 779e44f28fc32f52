"""Domain -> proto conversions that ``api`` and ``cluster`` both send."""

from __future__ import annotations

from apcm.v1 import memory_pb2
from apcm.wire.tensors import DTYPE_CODES

from ..memory.results import BankStats

POLICY_TO_PROTO = {
    "lfu": memory_pb2.EVICTION_POLICY_LFU,
    "lfu_decay": memory_pb2.EVICTION_POLICY_LFU_DECAY,
}
INDEX_STATE_TO_PROTO = {
    "none": memory_pb2.INDEX_STATE_NONE,
    "training": memory_pb2.INDEX_STATE_TRAINING,
    "ready": memory_pb2.INDEX_STATE_READY,
    "retraining": memory_pb2.INDEX_STATE_RETRAINING,
}


def bank_info(stats: BankStats) -> memory_pb2.BankInfo:
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
        index=_bank_index(stats),
        context=stats.context,
        codec=_bank_codec(stats),
    )


CODEC_STATE_TO_PROTO = {
    "served": memory_pb2.BANK_CODEC_STATE_SERVED,
    "staging": memory_pb2.BANK_CODEC_STATE_STAGING,
    "fitting": memory_pb2.BANK_CODEC_STATE_FITTING,
    "own": memory_pb2.BANK_CODEC_STATE_OWN,
}


def _bank_codec(stats: BankStats) -> memory_pb2.BankCodec | None:
    c = stats.codec
    if c is None:
        return None
    return memory_pb2.BankCodec(
        state=CODEC_STATE_TO_PROTO[c.state], model_hash=c.model_hash, fitted_on=c.fitted_on,
        fitted_at=c.fitted_at, staged=c.staged, threshold=c.threshold, declined=c.declined,
        held_out_mse=c.held_out_mse, replaced_mse=c.replaced_mse)


def _bank_index(stats: BankStats) -> memory_pb2.BankIndex | None:
    ix = stats.index
    if ix is None:
        return None
    return memory_pb2.BankIndex(
        state=INDEX_STATE_TO_PROTO[ix.state], lists=ix.lists, trained_at=ix.trained_at,
        default_nprobe=ix.nprobe, indexed_slots=ix.slots, threshold=ix.threshold)

"""Which shard owns a bank: shared by the server's router and the SDK's direct routing.

A bank's owner is chosen by rendezvous (highest-random-weight) hashing: every
shard scores ``blake2b(shard, name)`` and the highest score wins. Growing the
cluster from N to N+1 shards moves exactly the banks the new shard now wins,
about 1/(N+1) of them, and moves none between the old shards.
"""

from __future__ import annotations

import functools
import hashlib

from google.protobuf.descriptor import ServiceDescriptor

from apcm.v1 import memory_pb2

PLACEMENT = "rendezvous-blake2b-64"
SERVICE = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]
# Bank-management requests name the bank ``name``; every other request ``bank``.
BANK_FIELD_NAMES = {"CreateBank": "name", "DescribeBank": "name", "ClearBank": "name",
                    "DropBank": "name"}


def _score(name: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=65536)
def owner_of(name: str, shard_count: int) -> int:
    """The shard (0..shard_count-1) that owns bank ``name``."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    return max(range(shard_count), key=lambda shard: _score(name, shard))


def bank_fields(service: ServiceDescriptor = SERVICE) -> dict[str, tuple[str, int]]:
    """Method name -> (name, number) of the request field naming the bank, for every
    unary method of ``service`` that addresses one bank."""
    out = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            continue
        f = m.input_type.fields_by_name.get(BANK_FIELD_NAMES.get(m.name, "bank"))
        if f is not None and f.type == f.TYPE_STRING:
            out[m.name] = (f.name, f.number)
    return out

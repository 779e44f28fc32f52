"""Shard snapshots in the JetStream object store, and the log trimmed below them.

A snapshot is the embedded mode's snapshot file (``persistence.snapshot``: safetensors,
checksummed) of one shard's banks, stored as object ``shard-<k>/<stream seq>``;
its description names the stream sequence it covers (every record at or below it is
in the copy) and the store sequence. A pod that starts, restarts or lost its disk
loads the newest snapshot that verifies and replays the stream after it. The
stream is purged below the oldest kept snapshot, so a damaged newest one always
leaves an older one plus the log.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import api
from nats.js.errors import NotFoundError

from ..memory.storebase import StoreState
from ..persistence.snapshot import SnapshotCorrupt, read_snapshot, snapshot_path, write_snapshot
from .natslink import NatsLink, stream_name

log = logging.getLogger(__name__)
KEEP = 2
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardSnapshot:
    name: str
    shard: int
    stream_seq: int
    store_seq: int
    size: int


def _prefix(shard: int) -> str:
    return f"shard-{shard}/"


async def list_snapshots(link: NatsLink, shard: int | None = None) -> list[ShardSnapshot]:
    """Snapshots of one shard (or all), newest first."""
    try:
        infos = await link.snapshots.list(ignore_deletes=True)
    except NotFoundError:  # an empty bucket
        return []
    out = []
    for info in infos:
        if info.deleted or not info.name.startswith("shard-"):
            continue
        try:
            d = json.loads(info.description or "{}")
            snap = ShardSnapshot(info.name, int(d["shard"]), int(d["stream_seq"]),
                                 int(d["store_seq"]), int(info.size or 0))
        except (KeyError, ValueError):
            continue
        if shard is None or snap.shard == shard:
            out.append(snap)
    out.sort(key=lambda s: (s.shard, s.stream_seq), reverse=True)
    return out


def encode(state: StoreState, model_hash: str, codec_kind: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="apcm-snap-") as tmp:
        write_snapshot(Path(tmp), "shard", banks=state.banks, wal_sequence=state.last_seq,
                       wal_segment=0, model_hash=model_hash, codec_kind=codec_kind)
        return snapshot_path(Path(tmp), "shard").read_bytes()


def decode(data: bytes) -> tuple[Any, dict[str, Any]]:
    """(info, banks) of a snapshot's bytes. Raises ``SnapshotCorrupt``."""
    with tempfile.TemporaryDirectory(prefix="apcm-snap-") as tmp:
        path = snapshot_path(Path(tmp), "shard")
        path.write_bytes(data)
        return read_snapshot(path)


async def put(link: NatsLink, shard: int, data: bytes, stream_seq: int,
              store_seq: int) -> ShardSnapshot:
    name = f"{_prefix(shard)}{stream_seq:020d}"
    meta = api.ObjectMeta(
        name=name, description=json.dumps(
            {"shard": shard, "stream_seq": stream_seq, "store_seq": store_seq}),
        options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
    await link.snapshots.put(name, data, meta=meta)
    return ShardSnapshot(name, shard, stream_seq, store_seq, len(data))


async def get(link: NatsLink, snap: ShardSnapshot) -> bytes:
    result = await link.snapshots.get(snap.name)
    return bytes(result.data)


async def prune(link: NatsLink, shard: int) -> int:
    """Deletes all but the newest ``KEEP`` snapshots of a shard and purges the stream
    below the oldest kept one; returns the first stream sequence kept."""
    snaps = await list_snapshots(link, shard)
    for old in snaps[KEEP:]:
        await link.snapshots.delete(old.name)
    kept = snaps[:KEEP]
    if len(kept) < KEEP:
        return 0  # one snapshot alone may be damaged: keep the whole log
    first = kept[-1].stream_seq + 1
    await link.js.purge_stream(stream_name(shard), seq=first)
    return first


def verify_error(e: Exception) -> bool:
    return isinstance(e, (SnapshotCorrupt, ValueError, OSError))

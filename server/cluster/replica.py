"""One shard as one pod holds it: its store, kept in step with the shard's stream.

Every replica (owner included) tails the stream with an ordered consumer and
applies each record through ``MemoryStore.apply_record``, the embedded mode's
replay path: records the store already holds (the owner's own, or those inside
the snapshot it loaded) are skipped by sequence, so the owner and its standbys
hold the same banks, slot for slot.

States: bootstrapping (snapshot + stream tail), ``ready`` (caught up, serving
reads), ``owner`` (after ``promote``: its store's log is a fenced ``ShardLog``).
A replica that is not the owner has a log that refuses every mutation, so a
write can never change a standby's banks without going through the stream. When
an owner's append fails (fenced, or no quorum in time), its store may hold
mutations the stream lacks: it is thrown away and rebuilt (``rebuild``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from nats.js import api

from ..errors import ApcmError, FailedPrecondition, Unavailable
from ..memory.store import MemoryStore, StoreState
from ..persistence.replayer import BatchingApplier
from ..persistence.walformat import BadRecord, decode_records
from . import snapshots
from .errors import ShardMoved
from .natslink import NatsLink, stream_name, subject
from .shardlog import FENCE_HEADER, ShardLog, fenced, publish_with_retry

log = logging.getLogger(__name__)
CATCH_UP_TIMEOUT_S = 600.0
CAUGHT_UP_LAG = 16  # stream messages a replica may trail by when it calls itself ready


class StandbyLog:
    """The log of a shard this pod does not own: every mutation is refused before it
    changes anything (``UNAVAILABLE``: the router sends the call to the owner)."""

    def __init__(self, shard: int, describe_owner: Callable[[], str]) -> None:
        self.shard = shard
        self.describe_owner = describe_owner

    def _refuse(self) -> ShardMoved:
        return fenced(self.shard, f"it is owned by {self.describe_owner()}, not this pod")

    def prepare(self, kind: str, bank: str, fields: dict[str, Any], count: int = 1) -> Any:
        raise self._refuse()

    def append(self, seq: int, record: Any) -> None:
        raise self._refuse()

    def wait_durable(self, seq: int) -> None:
        raise self._refuse()


class ShardReplica:
    """Args:
        link: the NATS connection.
        shard: which shard.
        new_store: makes an empty store for the shard's banks.
        describe_owner: how a refusal names the current owner.
        model_hash / codec_kind: what snapshots are tied to.
        on_failed: called (from a worker thread) when this replica must be rebuilt.
        bulk: the connection snapshots travel on (default ``link``).
    """

    def __init__(self, link: NatsLink, shard: int, new_store: Callable[[], MemoryStore],
                 describe_owner: Callable[[], str], model_hash: str, codec_kind: str,
                 on_failed: Callable[[ShardReplica, ApcmError], None],
                 bulk: NatsLink | None = None) -> None:
        self.link = link
        self.bulk = bulk or link
        self.shard = shard
        self.new_store = new_store
        self.describe_owner = describe_owner
        self.model_hash = model_hash
        self.codec_kind = codec_kind
        self.on_failed = on_failed
        self.store = self._fresh_store()
        self.applied = 0  # last stream sequence applied
        self.ready = False
        self.log: ShardLog | None = None
        self.term = 0
        self.failed: ApcmError | None = None
        self._cond = threading.Condition()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._sub: Any = None
        self._stopped = threading.Event()
        self._applier = threading.Thread(target=self._apply_loop,
                                         name=f"apcm-shard-{shard}", daemon=True)
        self.snapshot_lock = threading.Lock()
        self.applied_since_snapshot = 0
        self.bytes_since_snapshot = 0

    def _fresh_store(self) -> MemoryStore:
        store = self.new_store()
        store.set_log(StandbyLog(self.shard, self.describe_owner))
        return store

    @property
    def owner(self) -> bool:
        return self.log is not None

    # -- bootstrap and tail ------------------------------------------------------------
    def start(self) -> None:
        """Loads the newest good snapshot, subscribes after it and waits to catch up."""
        self.link.call(self.link.ensure_stream(self.shard))
        start = self._load_snapshot()
        info = self.link.call(self.link.js.stream_info(stream_name(self.shard)))
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        if first > start + 1 and last > start:
            raise FailedPrecondition(
                f"shard {self.shard}: its log starts at sequence {first}, but the newest "
                f"readable snapshot covers only up to {start}: the snapshots above it are "
                "damaged (see the object store apcm-snapshots)")
        self.applied = start
        if not self._applier.is_alive():
            self._applier.start()
        self._subscribe(start + 1)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        self.wait_applied(last, CATCH_UP_TIMEOUT_S)
        # Writes went on while the bootstrap applied: chase the stream until close to
        # its end, so a hand-over to this replica waits for a few messages, not for all
        # that arrived during a long bootstrap.
        while (last := self._last_seq()) - self.applied > CAUGHT_UP_LAG:
            self.wait_applied(last - CAUGHT_UP_LAG, max(deadline - time.monotonic(), 0.1))
        self.ready = True
        log.info("shard %d: caught up at stream sequence %d", self.shard, self.applied)

    def _last_seq(self) -> int:
        info = self.link.call(self.link.js.stream_info(stream_name(self.shard)))
        return int(info.state.last_seq)

    def _load_snapshot(self) -> int:
        for snap in self.bulk.call(snapshots.list_snapshots(self.bulk, self.shard), 60.0):
            try:
                data = self.bulk.call(snapshots.get(self.bulk, snap), 300.0)
                info, banks = snapshots.decode(data)
                if info.model_hash != self.model_hash:
                    raise FailedPrecondition(
                        f"snapshot {snap.name} belongs to model {info.model_hash}, this pod "
                        f"serves {self.model_hash}")
                self.store.load_state(StoreState(int(info.wal_sequence), banks))
                log.info("shard %d: loaded snapshot %s (%d banks)", self.shard, snap.name,
                         len(banks))
                return snap.stream_seq
            except Exception as e:  # a damaged snapshot: an older one and the log remain
                log.warning("shard %d: snapshot %s is unusable: %s", self.shard, snap.name, e)
                self.store = self._fresh_store()
        return 0

    def _subscribe(self, start: int) -> None:
        async def on_msg(msg: Any) -> None:
            self._queue.put(msg)

        async def subscribe() -> Any:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                        opt_start_seq=max(start, 1))
            return await self.link.js.subscribe(
                subject(self.shard), cb=on_msg, ordered_consumer=True, config=config,
                pending_msgs_limit=-1, pending_bytes_limit=-1, idle_heartbeat=1.0)

        self._sub = self.link.call(subscribe(), 30.0)

    def _apply_loop(self) -> None:
        applier = None
        while not self._stopped.is_set():
            try:
                msg = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg is None:
                return
            seq = int(msg.metadata.sequence.stream)
            if seq <= self.applied:
                continue  # redelivered after a consumer reset
            try:
                if seq != self.applied + 1:
                    raise FailedPrecondition(
                        f"shard {self.shard}: stream sequence {seq} follows {self.applied}")
                if msg.data and not (msg.headers or {}).get(FENCE_HEADER):
                    applier = BatchingApplier(self.store)
                    for record in decode_records(msg.data):
                        applier(record)
                    applier.flush()
            except (ApcmError, BadRecord) as e:
                err = e if isinstance(e, ApcmError) else FailedPrecondition(
                    f"shard {self.shard}: stream sequence {seq} is damaged: {e}")
                log.error("%s", err.message)
                self.failed = err
                self.on_failed(self, err)
                return
            with self._cond:
                self.applied = seq
                self.applied_since_snapshot += 1
                self.bytes_since_snapshot += len(msg.data)
                self._cond.notify_all()

    def wait_applied(self, seq: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.applied < seq:
                if self.failed is not None:
                    raise self.failed
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"shard {self.shard}: not caught up with the log "
                                      f"({self.applied} of {seq}) in {timeout:g} s")
                self._cond.wait(min(left, 0.5))

    # -- ownership ----------------------------------------------------------------------
    def promote(self, node: str, term: int, timeout: float = 10.0) -> None:
        """Become the writer: catch up, fence the stream, then take writes.

        Raises:
            Unavailable: could not catch up or fence in time (still a standby).
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.link.call(self.link.js.stream_info(stream_name(self.shard)))
            last = int(info.state.last_seq)
            self.wait_applied(last, max(deadline - time.monotonic(), 0.1))
            try:
                fence = publish_with_retry(
                    self.link, self.shard, b"", last, f"fence:{node}:{term}:{last}",
                    retry_s=max(deadline - time.monotonic(), 0.1),
                    headers={FENCE_HEADER: f"{node}:{term}"})
                break
            except ShardMoved:
                if time.monotonic() > deadline:
                    raise
        self.wait_applied(fence, max(deadline - time.monotonic(), 0.1))
        self.term = term
        shard_log = ShardLog(self.link, self.shard, fence, self.store.last_seq,
                             f"{node}:{term}", lambda e: self.on_failed(self, e))
        self.log = shard_log
        self.store.set_log(shard_log)
        self.applied_since_snapshot = 0
        log.info("shard %d: owned here (term %d, log at %d)", self.shard, term, fence)

    def demote(self, reason: ApcmError) -> None:
        """Stop writing: refuse new mutations, wait for the buffered ones.

        Raises:
            ApcmError: buffered mutations failed; the store must be rebuilt.
        """
        shard_log = self.log
        if shard_log is None:
            return
        self.store.set_log(StandbyLog(self.shard, self.describe_owner))
        try:
            shard_log.close(reason)
        finally:
            shard_log.stop()
            self.log = None

    # -- snapshots ----------------------------------------------------------------------
    def snapshot(self) -> snapshots.ShardSnapshot | None:
        """Owner only: writes a snapshot to the object store and trims the stream."""
        shard_log = self.log
        if shard_log is None:
            return None
        with self.snapshot_lock:
            covered = shard_log.acked[1]
            state = self.store.export_state()
            shard_log.wait_durable(self.store.last_seq)  # nothing unacknowledged in it
            data = snapshots.encode(state, self.model_hash, self.codec_kind)
            snap = self.bulk.call(
                snapshots.put(self.bulk, self.shard, data, covered, state.last_seq), 300.0)
            self.bulk.call(snapshots.prune(self.bulk, self.shard), 60.0)
            self.applied_since_snapshot = 0
            self.bytes_since_snapshot = 0
            log.info("shard %d: snapshot %s (%d bytes)", self.shard, snap.name, snap.size)
            return snap

    def stop(self) -> None:
        self.ready = False
        if self.log is not None:
            self.log.stop()
            self.log = None
        self._stopped.set()
        self._queue.put(None)
        if self._sub is not None:
            try:
                self.link.call(self._sub.unsubscribe(), 5.0)
            except Exception:
                log.debug("unsubscribe", exc_info=True)

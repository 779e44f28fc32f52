"""``ClusterNode``: one pod of a cluster on NATS JetStream (``--cluster nats://…``).

One control loop (``_tick``, every 0.2 s) keeps the pod in step with the two KV
buckets it watches:

- **membership**: the pod heartbeats ``node.<id>`` (its address and the shards it
  has caught up on); a member whose heartbeat did not change for the member TTL
  is gone. The replicas of a shard are the best-ranked live members
  (``shardmap.rank``); the pod starts a ``ShardReplica`` for every shard it
  should hold, and drops one it no longer should once the new holders caught up.
- **leases**: ``shard.<k>`` names the owner and its term. The owner renews it by
  compare-and-set; a lease whose revision did not change for ``--cluster-lease-s``
  (by the observer's clock) is expired, and the best-ranked caught-up replica
  takes it with compare-and-set, then fences the stream (``replica.promote``).
  An owner that is not the best-ranked caught-up replica hands the lease to it:
  it stops taking writes, lets the buffered ones reach the stream, and names the
  new owner in the lease, whose write pause is the hand-over, not the bank's size.
  Both changes of hands run in their own threads: the loop goes on renewing the
  other shards' leases (and one being taken over) meanwhile.

The node is also the service's persistence (``recover``/``start``/``close``,
snapshots): a pod's banks live in the streams and the object store, not on its
volume.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from nats.js.errors import KeyWrongLastSequenceError

from ..config import Settings
from ..errors import ApcmError, FailedPrecondition, Unavailable
from ..memory.store import MemoryStore
from ..persistence.snapshot import SnapshotInfo
from . import snapshots
from .natslink import NatsLink
from .replica import ShardReplica
from .shardlog import fenced
from .shardmap import ClusterView, Lease, Member, lease_key, member_key
from .shardstore import ShardedStore

log = logging.getLogger(__name__)
TICK_S = 0.2
# A shard's log past this many bytes since its snapshot is snapshotted whatever the
# message count: a pod joining replays the stream tail, and a long tail of large
# messages (bulk writes) stalled the shard's appends for seconds while it streamed.
SNAPSHOT_BYTES = 32 << 20


class ClusterNode:
    """Args:
        settings: server settings (``cluster*``, ``node_id``, ``advertise_address``).
        new_store: makes an empty ``MemoryStore`` for one shard.
        model_hash / codec_kind: what snapshots are tied to.
    """

    def __init__(self, settings: Settings, new_store: Callable[[], MemoryStore],
                 model_hash: str, codec_kind: str) -> None:
        self.settings = settings
        self.host = socket.gethostname()
        self.node = settings.node_id or os.environ.get("HOSTNAME") or self.host
        self.address = settings.advertise_address  # set once the port is bound
        self.shards = settings.cluster_shards
        self.lease_s = settings.cluster_lease_s
        self.model_hash = model_hash
        self.codec_kind = codec_kind
        self.view = ClusterView(self.shards, settings.cluster_replicas,
                                member_ttl_s=max(3.0, 2 * self.lease_s))
        self.replicas: dict[int, ShardReplica] = {}
        self._new_store = new_store
        self.store = ShardedStore(self.shards, self.replicas,
                                  settings.effective_memory_limit_bytes, self.describe_shard)
        servers = [u.strip() for u in settings.cluster.split(",") if u.strip()]
        self.link = NatsLink(servers, settings.cluster_stream_replicas, self.view.member_ttl_s,
                             name=f"apcm-{self.node}")
        # Snapshots (tens of MB) travel on their own connection and loop: on the log's,
        # a shard's log appends queued behind the upload's chunks for seconds.
        self.bulk = NatsLink(servers, settings.cluster_stream_replicas, self.view.member_ttl_s,
                             name=f"apcm-{self.node}-snapshots")
        self._renewed: dict[int, float] = {}  # shard -> monotonic time of last renewal
        self._starting: dict[int, futures.Future[None]] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="apcm-shard")
        # Taking over (catch up, fence) or handing over (drain) can take seconds; run
        # off the control loop, in their own threads, so lease renewals and heartbeats
        # of the other shards never wait behind them or behind a bootstrap.
        self._ownership = futures.ThreadPoolExecutor(max_workers=4,
                                                     thread_name_prefix="apcm-owner")
        self._changing: dict[int, futures.Future[None]] = {}
        self._lock = threading.RLock()
        self._leaving = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchers: list[Any] = []
        self._last_heartbeat = 0.0
        self._snapshot_at: dict[int, float] = {}
        self._serving = threading.Event()
        self._wake = threading.Event()

    # -- the service's persistence ---------------------------------------------------------
    wal_healthy = True

    def add_wal_listener(self, callback: Callable[[bool], None]) -> None:
        """Log health is the NATS quorum's: a write that cannot reach it fails itself."""

    def recover(self) -> None:
        """Connects, starts watching, joins and starts the control loop."""
        self.link.connect()
        self.bulk.connect()
        deadline = time.monotonic() + 60.0
        watching = False
        while True:  # a bucket JetStream just created may have no leader for a moment
            try:
                if not watching:
                    self.link.call(self._watch())
                    watching = True
                self._heartbeat(force=True)
                break
            except Exception as e:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"cannot join the cluster: {e!r}") from e
                log.warning("cluster: first heartbeat failed (%r); trying again", e)
                time.sleep(0.5)
        self._thread = threading.Thread(target=self._loop, name="apcm-cluster", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Waits (bounded) until this pod holds, caught up, the shards it should."""
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            wanted = self._wanted()
            if wanted and all(s in self.replicas and self.replicas[s].ready for s in wanted):
                return
            time.sleep(0.1)
        log.warning("cluster: still catching up on some shards; serving meanwhile")

    def set_serving(self, serving: bool) -> None:
        """The service serves gRPC calls (or stopped): only then may the pod own shards,
        or another pod's forwarded writes would find it refusing them."""
        if serving == self._serving.is_set():
            return
        if serving:
            self._serving.set()
        else:
            self._serving.clear()
        try:
            self._heartbeat(force=True)
        except Exception as e:  # the loop's next heartbeat says it
            log.debug("cluster: heartbeat failed: %r", e)

    def ensure_bank(self, name: str, capacity: int) -> None:
        """Creates the default bank through its shard's owner, once one exists."""
        shard = self.store.shard_of(name)
        replica = self.replicas.get(shard)
        if replica is not None and replica.owner:
            replica.store.create_bank(name, capacity, exist_ok=True)

    def close(self, final_snapshot: bool = True) -> None:
        """Hands every owned shard over (bounded), leaves, disconnects."""
        self._leaving = True
        deadline = time.monotonic() + 15.0
        try:
            self._heartbeat(force=True)
            while time.monotonic() < deadline and any(r.owner for r in self.replicas.values()):
                time.sleep(0.1)
        except ApcmError as e:
            log.warning("cluster: leaving without hand-over: %s", e.message)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for replica in list(self.replicas.values()):
            replica.stop()
        try:
            self.link.call(self.link.members.delete(member_key(self.node)), 3.0)
        except Exception:
            log.debug("cluster: could not remove the member key", exc_info=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ownership.shutdown(wait=False, cancel_futures=True)
        self.link.close()
        self.bulk.close()

    def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Snapshots every shard this pod owns now, into the object store."""
        if name is not None:
            raise FailedPrecondition("cluster snapshots are named by their shard and stream "
                                     "sequence: call CreateSnapshot without a name")
        done = [s for s in (r.snapshot() for r in list(self.replicas.values()) if r.owner)
                if s is not None]
        banks = sorted({b.name for r in self.replicas.values() if r.owner
                        for b in r.store.list()})
        return SnapshotInfo(name=",".join(s.name for s in done), created_at=time.time(),
                            size_bytes=sum(s.size for s in done),
                            wal_sequence=max((s.stream_seq for s in done), default=0),
                            model_hash=self.model_hash, banks=banks, valid=True)

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every shard snapshot in the object store (verified only when loaded)."""
        snaps = self.bulk.call(snapshots.list_snapshots(self.bulk), 30.0)
        return [SnapshotInfo(name=s.name, size_bytes=s.size, wal_sequence=s.stream_seq,
                             model_hash=self.model_hash, valid=True) for s in snaps]

    def restore(self, name: str) -> SnapshotInfo:
        raise FailedPrecondition(
            "RestoreSnapshot is not available in cluster mode: each shard's state is its "
            "stream, and snapshots only shorten it (docs/cluster.md)")

    # -- watching ---------------------------------------------------------------------------
    async def _watch(self) -> None:
        members = await self.link.members.watchall()
        leases = await self.link.leases.watchall()
        self._watchers = [members, leases]
        # the first updates are the current values, then None: wait for both
        await self._drain_initial(members, self._on_member)
        await self._drain_initial(leases, self._on_lease)
        self.link.loop.create_task(self._follow(members, self._on_member))
        self.link.loop.create_task(self._follow(leases, self._on_lease))

    async def _drain_initial(self, watcher: Any, apply: Callable[[Any], None]) -> None:
        while True:
            entry = await watcher.updates(timeout=10.0)
            if entry is None:
                return
            apply(entry)

    async def _follow(self, watcher: Any, apply: Callable[[Any], None]) -> None:
        while not self._stop.is_set():
            try:
                entry = await watcher.updates(timeout=1.0)
            except Exception as e:  # a timeout with nothing new, or a reconnect
                if "timeout" not in type(e).__name__.lower():
                    log.debug("cluster watch: %s", e)
                continue
            if entry is not None:
                apply(entry)

    def _on_member(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            for node in [n for n in self.view.members if member_key(n) == entry.key]:
                self.view.set_member(node, None)
        else:
            member = Member.decode(entry.value)
            self.view.set_member(member.node, member, entry.revision)

    def _on_lease(self, entry: Any) -> None:
        shard = int(entry.key.split(".", 1)[1])
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.view.set_lease(shard, None, time.monotonic())
        else:
            lease = Lease.decode(entry.value, entry.revision)
            self.view.set_lease(shard, lease, time.monotonic())
            replica = self.replicas.get(shard)
            if lease.node == self.node and replica is not None and not replica.owner:
                self._wake.set()  # handed to us: take it now, not at the next tick

    # -- the control loop -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception:  # one bad tick (NATS away) must not end the loop
                log.exception("cluster: control loop")

    def _wanted(self) -> set[int]:
        if self._leaving:
            return set()
        return {s for s in range(self.shards) if self.node in self.view.replicas_of(s)}

    def _tick(self) -> None:
        self._heartbeat()
        wanted = self._wanted()
        for shard in wanted - set(self.replicas):
            self._start_replica(shard)
        for shard, replica in list(self.replicas.items()):
            if not replica.ready:
                continue
            lease = self.view.owner(shard)
            if self._changing_hands(shard):
                self._renew_while_taking_over(shard, replica, lease)
                continue
            if replica.owner:
                self._keep_or_hand_over(shard, replica, lease)
            elif shard in wanted:
                self._maybe_take(shard, replica, lease)
            if shard not in wanted and not replica.owner and self._covered(shard):
                log.info("shard %d: no longer held here", shard)
                replica.stop()
                self.replicas.pop(shard, None)
        self._maybe_snapshot()

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        # at least three heartbeats per lease period: ``_preferred`` counts a pod as
        # reachable only if heard from within one
        every_s = min(self.view.member_ttl_s / 4, self.lease_s / 3)
        if not force and now - self._last_heartbeat < every_s:
            return
        # a pod that does not serve yet (warming up) or any more (stopping) offers no
        # shard: nobody hands it one, and it takes none (``_maybe_take``)
        ready = tuple(sorted(s for s, r in self.replicas.items() if r.ready)) \
            if self._serving.is_set() else ()
        member = Member(self.node, self.address, ready, self._leaving)
        self.link.call(self.link.members.put(member_key(self.node), member.encode()), 5.0)
        self._last_heartbeat = now

    def _start_replica(self, shard: int) -> None:
        fut = self._starting.get(shard)
        if fut is not None and not fut.done():
            return
        replica = ShardReplica(self.link, shard, self._new_shard_store,
                               lambda: self.describe_shard(shard), self.model_hash,
                               self.codec_kind, self._replica_failed, bulk=self.bulk)
        self.replicas[shard] = replica

        def run() -> None:
            try:
                replica.start()
                self._heartbeat(force=True)
            except Exception as e:  # NATS away, a damaged log: retried by a later tick
                log.error("shard %d: cannot catch up: %s", shard,
                          e.message if isinstance(e, ApcmError) else repr(e))
                replica.stop()
                self.replicas.pop(shard, None)

        self._starting[shard] = self._pool.submit(run)

    def _new_shard_store(self) -> MemoryStore:
        store = self._new_store()
        # the pod's memory limit counts every shard it holds, not one store's banks
        store.limit_usage = self.store.usage_bytes
        return store

    def _replica_failed(self, replica: ShardReplica, error: ApcmError) -> None:
        """An owner's append failed or the tail broke: rebuild from snapshot + stream."""
        def rebuild() -> None:
            log.warning("shard %d: rebuilding from the stream (%s)", replica.shard,
                        error.message)
            replica.stop()
            if self.replicas.get(replica.shard) is replica:
                self.replicas.pop(replica.shard, None)
            self._heartbeat(force=True)

        self._pool.submit(rebuild)

    def _covered(self, shard: int) -> bool:
        """Whether every pod that should hold ``shard`` has caught up on it."""
        wanted = self.view.replicas_of(shard)
        ready = {m.node for m in self.view.ready_replicas(shard)}
        return bool(wanted) and all(n in ready for n in wanted)

    def _preferred(self, shard: int) -> Member | None:
        """Who should own ``shard``: the first of its assigned holders that has caught
        up; None while none has (the owner then keeps it: handing it to a pod that is
        not assigned would only move it twice)."""
        # heard from within a lease period: the pod that just died is still "live"
        # for the member TTL, and a lease handed to it would stall until it expired
        ready = {m.node: m for m in self.view.ready_replicas(shard)
                 if not m.leaving and (m.node == self.node
                                       or self.view.heard_within(m.node, self.lease_s))}
        return next((ready[n] for n in self.view.replicas_of(shard) if n in ready), None)

    def _keep_or_hand_over(self, shard: int, replica: ShardReplica,
                           lease: Lease | None) -> None:
        now = time.monotonic()
        if lease is None or lease.node != self.node:
            self._step_down(shard, replica, "its lease names another pod")
            return
        if now - self._renewed.get(shard, 0.0) >= self.lease_s:
            # not renewed in a whole lease period: another pod may own it by now
            self._step_down(shard, replica, "its lease could not be renewed in time")
            return
        target = self._preferred(shard)
        if target is not None and target.node != self.node:
            self._in_background(shard, lambda: self._hand_over(shard, replica, lease, target))
            return
        if now - self._renewed[shard] >= self.lease_s / 4:
            self._renew(shard, replica, lease)

    def _changing_hands(self, shard: int) -> bool:
        fut = self._changing.get(shard)
        return fut is not None and not fut.done()

    def _in_background(self, shard: int, change: Callable[[], None]) -> None:
        self._changing[shard] = self._ownership.submit(change)

    def _renew_while_taking_over(self, shard: int, replica: ShardReplica,
                                 lease: Lease | None) -> None:
        """A lease taken and still being caught up on is kept, or it would expire."""
        if lease is not None and lease.node == self.node and not replica.owner and \
                time.monotonic() - self._renewed.get(shard, 0.0) >= self.lease_s / 4:
            self._renew(shard, replica, lease)

    def _renew(self, shard: int, replica: ShardReplica, lease: Lease) -> None:
        try:
            rev = self.link.call(self.link.leases.update(
                lease_key(shard), lease.encode(), last=lease.revision), 2.0)
        except KeyWrongLastSequenceError:
            self._step_down(shard, replica, "another pod took its lease")
            return
        except Exception as e:  # NATS unreachable: try again next tick, until it expires
            log.debug("shard %d: renewal failed: %s", shard, e)
            return
        self._renewed[shard] = time.monotonic()
        self.view.set_lease(shard, Lease(lease.node, lease.address, lease.term, rev),
                            time.monotonic())

    def _step_down(self, shard: int, replica: ShardReplica, why: str) -> None:
        log.warning("shard %d: stepping down: %s", shard, why)
        try:
            replica.demote(fenced(shard, "its owner changed"))
        except ApcmError as e:
            self._replica_failed(replica, e)

    def _hand_over(self, shard: int, replica: ShardReplica, lease: Lease,
                   target: Member) -> None:
        started = time.monotonic()
        try:
            replica.demote(fenced(shard, f"it is being handed over to {target.address}"))
        except ApcmError as e:
            self._replica_failed(replica, e)
            return
        new = Lease(target.node, target.address, lease.term + 1)
        try:
            rev = self.link.call(self.link.leases.update(
                lease_key(shard), new.encode(), last=lease.revision), 2.0)
        except Exception as e:  # the lease stays ours, unrenewed: it expires, or we retake it
            log.warning("shard %d: hand-over to %s failed: %s", shard, target.node, e)
            return
        self.view.set_lease(shard, Lease(new.node, new.address, new.term, rev),
                            time.monotonic())
        log.info("shard %d: handed over to %s (term %d) after %.1f ms", shard, target.node,
                 new.term, (time.monotonic() - started) * 1000)

    def _maybe_take(self, shard: int, replica: ShardReplica, lease: Lease | None) -> None:
        if not self._serving.is_set():
            return
        now = time.monotonic()
        if lease is not None and lease.node == self.node:
            # handed to us, or ours from before a restart: confirm by compare-and-set
            self._acquire(shard, replica, lease, lease.term)
            return
        expired = lease is None or self.view.lease_age(shard, now) >= self.lease_s
        if not expired:
            return
        preferred = self._preferred(shard)
        patience = self.lease_s * (0 if preferred is None or preferred.node == self.node
                                   else 0.5)
        if lease is not None and self.view.lease_age(shard, now) < self.lease_s + patience:
            return
        if lease is None and preferred is not None and preferred.node != self.node:
            return
        self._acquire(shard, replica, lease, (lease.term if lease else 0) + 1)

    def _acquire(self, shard: int, replica: ShardReplica, lease: Lease | None,
                 term: int) -> None:
        new = Lease(self.node, self.address, term)
        try:
            if lease is None:
                rev = self.link.call(self.link.leases.create(lease_key(shard), new.encode()),
                                     2.0)
            else:
                rev = self.link.call(self.link.leases.update(
                    lease_key(shard), new.encode(), last=lease.revision), 2.0)
        except Exception as e:  # someone else was faster, or NATS is away
            log.debug("shard %d: lease not taken: %s", shard, e)
            return
        self._renewed[shard] = time.monotonic()
        self.view.set_lease(shard, Lease(new.node, new.address, term, rev), time.monotonic())
        self._in_background(shard, lambda: self._take_over(shard, replica, term))

    def _take_over(self, shard: int, replica: ShardReplica, term: int) -> None:
        started = time.monotonic()
        try:
            replica.promote(self.node, term)
        except Exception as e:  # still a standby; the next tick tries again
            log.warning("shard %d: could not take over: %s", shard,
                        e.message if isinstance(e, ApcmError) else repr(e))
            return
        log.info("shard %d: took over (term %d) in %.1f ms", shard, term,
                 (time.monotonic() - started) * 1000)
        # the interval counts from here: a new owner does not rewrite a large shard's
        # snapshot in the first seconds of its term, while its writers resume
        self._snapshot_at[shard] = time.monotonic()
        if self.store.shard_of(self.settings.default_bank) == shard:
            self.ensure_bank(self.settings.default_bank, self.settings.default_bank_capacity)

    def _maybe_snapshot(self) -> None:
        every_s = self.settings.snapshot_interval_s
        every_n = self.settings.cluster_snapshot_messages
        now = time.monotonic()
        for shard, replica in list(self.replicas.items()):
            if not replica.owner:
                continue
            due = (every_n > 0 and replica.applied_since_snapshot >= every_n) or \
                replica.bytes_since_snapshot >= SNAPSHOT_BYTES or (
                every_s > 0 and replica.applied_since_snapshot > 0
                and now - self._snapshot_at.get(shard, now - every_s) >= every_s)
            if due and not replica.snapshot_lock.locked():
                self._snapshot_at[shard] = now
                self._pool.submit(self._snapshot_quietly, replica)

    def _snapshot_quietly(self, replica: ShardReplica) -> None:
        try:
            replica.snapshot()
        except Exception as e:
            log.warning("shard %d: snapshot failed: %s", replica.shard, e)

    # -- what the router and ClusterService ask -----------------------------------------------
    def describe_shard(self, shard: int) -> str:
        lease = self.view.owner(shard)
        return f"{lease.node} ({lease.address})" if lease else "no pod yet"

    def owner_address(self, shard: int) -> str | None:
        lease = self.view.owner(shard)
        return lease.address if lease else None

    def is_owner(self, shard: int) -> bool:
        replica = self.replicas.get(shard)
        return replica is not None and replica.owner

    def holds_ready(self, shard: int) -> bool:
        replica = self.replicas.get(shard)
        return replica is not None and replica.ready

    def replica_addresses(self, shard: int) -> list[str]:
        return sorted(m.address for m in self.view.ready_replicas(shard))

    def member_addresses(self) -> list[str]:
        return sorted({m.address for n, m in self.view.members.items()
                       if n in self.view.live_nodes()})


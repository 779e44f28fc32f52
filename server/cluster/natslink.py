"""One connection to the NATS cluster, driven from the server's worker threads.

nats-py is asyncio; the server is threads. ``NatsLink`` runs one event loop in a
daemon thread and ``call`` runs a coroutine there and waits for it. Every stream,
bucket and object store the cluster uses is created here (idempotently, with the
replication factor of ``--cluster-stream-replicas``) so all pods agree on them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import nats
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError

from ..errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

LEASES_BUCKET = "apcm-leases"
MEMBERS_BUCKET = "apcm-members"
SNAPSHOTS_BUCKET = "apcm-snapshots"
# Records of one batch message at most; the NATS server's max_payload must allow it
# (deploy/k8s/nats/nats.conf sets 8 MiB).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def stream_name(shard: int) -> str:
    return f"APCM_SHARD_{shard}"


def subject(shard: int) -> str:
    return f"apcm.shard.{shard}"


class NatsLink:
    """Args:
        servers: ``nats://host:port`` URLs of the NATS cluster.
        stream_replicas: JetStream replicas of every stream, bucket and object store.
        member_ttl_s: how long a member's heartbeat stays in the members bucket.
        name: the connection's name, shown by the NATS server's monitoring.
    """

    def __init__(self, servers: list[str], stream_replicas: int, member_ttl_s: float,
                 name: str) -> None:
        self.servers = servers
        self.stream_replicas = stream_replicas
        self.member_ttl_s = member_ttl_s
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="apcm-nats",
                                        daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.js: Any = None
        self.leases: Any = None
        self.members: Any = None
        self.snapshots: Any = None
        self._streams: set[int] = set()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Runs ``coro`` on the link's loop and returns its result.

        Raises:
            Unavailable: it did not finish within ``timeout`` seconds.
        """
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except FutureTimeout as e:
            if fut.done():  # the coroutine's own timeout (nats-py's is a TimeoutError too)
                raise Unavailable(f"the NATS cluster timed out: {e!r}") from e
            fut.cancel()
            raise Unavailable(f"the NATS cluster did not answer within {timeout:g} s") from None

    def connect(self, timeout: float = 60.0) -> None:
        """Connects and makes sure the buckets exist (retried: a JetStream cluster that
        just started, or several pods creating the buckets at once, may time out).

        Raises:
            Unavailable: no NATS server answered.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call(self._connect(), max(deadline - time.monotonic(), 1.0))
                return
            except Unavailable as e:
                if time.monotonic() >= deadline:
                    raise
                log.warning("nats: %s; trying again", e.message)
                time.sleep(0.5)

    async def _connect(self) -> None:
        async def error_cb(e: Exception) -> None:
            log.warning("nats: %s", e)

        if self.nc is not None:
            await self.nc.close()
        self.nc = await nats.connect(
            self.servers, name=self.name, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
            connect_timeout=2, allow_reconnect=True, error_cb=error_cb,
            ping_interval=2, max_outstanding_pings=2)
        self.js = self.nc.jetstream(timeout=10.0)
        r = self.stream_replicas
        self.leases = await self._bucket(api.KeyValueConfig(
            bucket=LEASES_BUCKET, history=1, replicas=r, storage=api.StorageType.FILE))
        self.members = await self._bucket(api.KeyValueConfig(
            bucket=MEMBERS_BUCKET, history=1, replicas=r, ttl=self.member_ttl_s,
            storage=api.StorageType.FILE))
        try:
            self.snapshots = await self.js.object_store(SNAPSHOTS_BUCKET)
        except (NotFoundError, BadRequestError):
            self.snapshots = await self.js.create_object_store(
                SNAPSHOTS_BUCKET, config=api.ObjectStoreConfig(
                    bucket=SNAPSHOTS_BUCKET, replicas=r, storage=api.StorageType.FILE))

    async def _bucket(self, config: api.KeyValueConfig) -> Any:
        try:
            return await self.js.key_value(config.bucket)
        except (NotFoundError, BadRequestError):
            try:
                return await self.js.create_key_value(config=config)
            except BadRequestError:  # another pod created it meanwhile
                return await self.js.key_value(config.bucket)

    async def ensure_stream(self, shard: int) -> None:
        """The shard's log stream: replicated, on disk, never trimmed by limits (only
        purged below a snapshot), duplicates of a retried batch dropped for 2 minutes."""
        if shard in self._streams:
            return
        config = api.StreamConfig(
            name=stream_name(shard), subjects=[subject(shard)],
            storage=api.StorageType.FILE, num_replicas=self.stream_replicas,
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.NEW,
            max_msg_size=MAX_MESSAGE_BYTES, duplicate_window=120.0)
        try:
            info = await self.js.stream_info(config.name)
        except NotFoundError:
            try:
                info = await self.js.add_stream(config)
            except BadRequestError:
                info = await self.js.stream_info(config.name)
        if info.config.num_replicas != self.stream_replicas:
            raise FailedPrecondition(
                f"stream {config.name} has {info.config.num_replicas} replicas, but this "
                f"pod runs with --cluster-stream-replicas {self.stream_replicas}")
        self._streams.add(shard)

    def close(self) -> None:
        """Closes the connection and ends every task on the loop, then the loop."""
        try:
            self.call(self._shutdown(), timeout=10.0)
        except Exception:  # already gone: nothing to flush
            log.debug("nats close", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)

    async def _shutdown(self) -> None:
        if self.nc is not None:
            await self.nc.close()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

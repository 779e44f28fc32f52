"""A shard owner's mutation log: its JetStream stream, appended to with fencing.

``ShardLog`` is the ``MutationLog`` (``memory.storebase``) of a shard's store
while this pod owns the shard. ``append`` only buffers the finished record; one
flusher thread publishes everything buffered as one message (group commit) and
``wait_durable`` returns once JetStream acknowledged it, i.e. a quorum of NATS
servers stored it (fsynced, with ``sync_interval: always``).

Fencing: every publish names the stream sequence it expects to follow
(``Nats-Expected-Last-Sequence``). A new owner publishes a fence message as its
first act, so an old owner that was paused or cut off past its lease can never
append again: its next publish is refused, and it fails every waiting write
(``UNAVAILABLE``, never acknowledged) and rebuilds from the stream. A publish that
times out (a NATS server died, a stream leader moved) is sent again with the same
``Nats-Msg-Id``, which JetStream deduplicates, so a retry never appends twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nats.js.errors import APIError

from ..errors import ApcmError, ResourceExhausted, Unavailable
from ..persistence.walformat import PreparedRecord, prepare_record
from .errors import ShardMoved
from .natslink import MAX_MESSAGE_BYTES, NatsLink, subject

log = logging.getLogger(__name__)

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
MSG_ID = "Nats-Msg-Id"
FENCE_HEADER = "Apcm-Fence"


def fenced(shard: int, why: str) -> ShardMoved:
    return ShardMoved(f"shard {shard} moved: {why}; retry", shard=shard)


async def publish(link: NatsLink, shard: int, payload: bytes, expected: int, msg_id: str,
                  headers: dict[str, str] | None = None) -> int:
    """Appends one message after stream sequence ``expected``; returns its sequence."""
    hdrs = {EXPECTED_LAST_SEQ: str(expected), MSG_ID: msg_id, **(headers or {})}
    ack = await link.js.publish(subject(shard), payload, headers=hdrs, timeout=2.0)
    return int(ack.seq)


def publish_with_retry(link: NatsLink, shard: int, payload: bytes, expected: int,
                       msg_id: str, retry_s: float,
                       headers: dict[str, str] | None = None) -> int:
    """``publish``, sent again (same message id) until ``retry_s`` has passed.

    Raises:
        ShardMoved: the stream moved past ``expected``: another owner appended.
        Unavailable: no NATS quorum answered in time.
    """
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return link.call(publish(link, shard, payload, expected, msg_id, headers), 5.0)
        except APIError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise fenced(shard, f"another pod appended to its log after sequence "
                                    f"{expected}") from e
            err: Exception = e
        except Exception as e:  # timeouts, no responders, reconnecting
            err = e
        if time.monotonic() >= deadline:
            raise Unavailable(f"shard {shard}: the NATS cluster did not store a write "
                              f"within {retry_s:g} s ({err}); retry") from err
        time.sleep(0.05)


class ShardLog:
    """Args:
        link: the NATS connection.
        shard: the shard whose stream this appends to.
        last_stream_seq: the stream sequence this owner's first append follows (its fence).
        durable_seq: the store sequence everything up to which is already in the stream.
        msg_prefix: unique per owner term (``node:term``), for message ids.
        on_failed: called once, from the flusher, when an append failed: the store
            then holds mutations the stream may lack and must be rebuilt.
        retry_s: how long one batch is retried before its writes fail.
    """

    def __init__(self, link: NatsLink, shard: int, last_stream_seq: int, durable_seq: int,
                 msg_prefix: str, on_failed: Callable[[ApcmError], None],
                 retry_s: float = 10.0) -> None:
        self.link = link
        self.shard = shard
        self.last_stream_seq = last_stream_seq
        self.msg_prefix = msg_prefix
        self.on_failed = on_failed
        self.retry_s = retry_s
        self._cond = threading.Condition()
        self._pending: list[tuple[int, list[bytes]]] = []
        self._durable = durable_seq
        self._failed: ApcmError | None = None
        self._closing: ApcmError | None = None
        self._busy = False
        # (store sequence, stream sequence) of the last acknowledged batch
        self.acked = (durable_seq, last_stream_seq)
        self._thread = threading.Thread(target=self._run, name=f"apcm-shardlog-{shard}",
                                        daemon=True)
        self._thread.start()

    # -- MutationLog -----------------------------------------------------------------
    def prepare(self, kind: str, bank: str, fields: dict[str, Any],
                count: int = 1) -> PreparedRecord:
        self._check_open()
        record = prepare_record(kind, bank, fields, count)
        if record.length + 64 > MAX_MESSAGE_BYTES:
            raise ResourceExhausted(
                f"this mutation's log record of {record.length} bytes exceeds a cluster log "
                f"message of {MAX_MESSAGE_BYTES} bytes: send fewer items per call",
                limit="max_message_bytes")
        return record

    def append(self, seq: int, record: PreparedRecord) -> None:
        with self._cond:
            self._check_open()
            self._pending.append((seq, record.finish(seq)))
            self._cond.notify_all()

    def wait_durable(self, seq: int) -> None:
        with self._cond:
            while self._durable < seq and self._failed is None:
                self._cond.wait()
            if self._durable < seq:
                assert self._failed is not None
                raise self._failed

    # -- owner side ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closing is not None:
            raise self._closing

    def close(self, reason: ApcmError, drain_s: float = 10.0) -> tuple[int, int]:
        """Refuses new appends, waits for the buffered ones; returns ``acked``.

        Raises:
            ApcmError: the buffered ones failed (the store must be rebuilt).
        """
        deadline = time.monotonic() + drain_s
        with self._cond:
            if self._closing is None:
                self._closing = reason
            self._cond.notify_all()
            while (self._pending or self._busy) and self._failed is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._failed is not None:
                raise self._failed
            return self.acked

    def stop(self) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = fenced(self.shard, "it is no longer owned here")
            self._cond.notify_all()
        self._thread.join(timeout=self.retry_s + 5.0)

    def _take(self) -> list[tuple[int, list[bytes]]] | None:
        with self._cond:
            while not self._pending and self._failed is None:
                if self._closing is not None:
                    self._cond.notify_all()
                self._cond.wait(0.5)
            if self._failed is not None:
                return None
            batch: list[tuple[int, list[bytes]]] = []
            size = 0
            while self._pending:
                seq, chunks = self._pending[0]
                n = sum(len(c) for c in chunks)
                if batch and size + n > MAX_MESSAGE_BYTES - 1024:
                    break
                batch.append(self._pending.pop(0))
                size += n
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            payload = b"".join(c for _, chunks in batch for c in chunks)
            top = batch[-1][0]
            try:
                stream_seq = publish_with_retry(
                    self.link, self.shard, payload, self.last_stream_seq,
                    f"{self.msg_prefix}:{self.last_stream_seq}", self.retry_s)
            except ApcmError as e:
                log.warning("shard %d: log append failed: %s", self.shard, e.message)
                with self._cond:
                    self._failed, self._busy = e, False
                    self._cond.notify_all()
                self.on_failed(e)
                return
            with self._cond:
                self.last_stream_seq = stream_seq
                self._durable = max(self._durable, top)
                self.acked = (self._durable, stream_seq)
                self._busy = False
                self._cond.notify_all()

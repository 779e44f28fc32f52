"""Ties the store to its snapshots and write-ahead log.

Data directory layout: ``<data_dir>/snapshots/<name>.safetensors`` and
``<data_dir>/wal/wal-<index>.log``.

Invariants:
    * Every mutation the store acknowledges is in the log (``start`` attaches it).
    * Before a snapshot copies the state, the log rotates to segment ``k``; every
      record in segments below ``k`` is in the copy, and the copy records ``k``.
    * Segments are deleted only when covered by the *second-newest* snapshot too,
      so a damaged newest snapshot falls back to the previous one without loss.

Start-up recovery is in ``recovery``, writing and scheduling snapshots in
``snapshotting``, the state they share in ``managerbase``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..memory.store import StoreState
from .managerbase import Written
from .recovery import RecoveryReport, StartupRecovery
from .snapshot import SnapshotInfo, default_name, read_snapshot
from .snapshotting import Snapshotting, SnapshotWriteError
from .wal import WriteAheadLog

log = logging.getLogger(__name__)

__all__ = ["PersistenceManager", "RecoveryReport", "SnapshotInfo", "SnapshotWriteError"]

# A restore moves sequence numbers this far ahead, past any a write still in flight
# on the replaced state can take, so the restored snapshot's sequence separates
# those writes (covered, never replayed onto it) from later ones (replayed).
RESTORE_SEQ_JUMP = 1 << 32


class PersistenceManager(StartupRecovery, Snapshotting):
    """Start-up recovery, snapshots (on demand, periodic, at shutdown), restore;
    constructed like ``ManagerBase``."""

    @property
    def wal_healthy(self) -> bool:
        """Whether acknowledged writes can be made durable now (False: writes get UNAVAILABLE)."""
        return self.wal is not None and self.wal.healthy

    def add_wal_listener(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(healthy)`` when the log turns unusable or usable again (e.g. to
        set health NOT_SERVING); registered before ``start``."""
        self._wal_listeners.append(callback)
        if self.wal is not None:
            self.wal.add_listener(callback)

    def start(self) -> None:
        """Open a fresh log segment, attach it to the store, start periodic snapshots."""
        self.wal = WriteAheadLog(
            self.wal_dir, self.codec_hash, mode=self.settings.wal_mode,
            interval_s=self.settings.wal_interval_s, metrics=self.metrics,
        )
        for callback in self._wal_listeners:
            self.wal.add_listener(callback)
        self.wal.open()
        self.store.set_log(self.wal)
        if self.settings.snapshot_wal_bytes > 0:
            self._wal_mark = -self.wal.size_bytes  # the log already on disk counts too
            self.wal.on_flush = self._on_wal_flush
        if self.settings.snapshot_interval_s > 0 or self.settings.snapshot_wal_bytes > 0:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._periodic, name="apcm-snapshots", daemon=True
            )
            self._thread.start()

    def close(self, final_snapshot: bool = True) -> None:
        """Stop periodic snapshots, optionally write a final one, close the log."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if final_snapshot and self.wal is not None:
                self.snapshot(automatic=True)
        finally:
            if self.wal is not None:
                self.store.set_log(None)
                self.wal.close()
                self.wal = None

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot on disk, newest first, each with its verified validity."""
        return self.snapshots.newest_first(verify=True)

    def restore(self, name: str) -> SnapshotInfo:
        """Replace every bank with snapshot ``name``, as one durable step.

        The restored state is first written as a new snapshot whose sequence is
        ``RESTORE_SEQ_JUMP`` past the current one, after the log is rotated; only
        then is memory swapped, at that sequence. A crash before that snapshot is
        durable recovers the pre-restore state; after it, the restored state plus
        the writes made after the swap (their sequences are above it). Writes still
        in flight on the replaced state have lower sequences: replaced, as live.

        Raises:
            InvalidArgument: a bad name. NotFound: no such snapshot.
            FailedPrecondition: damaged, or made with another model (names its hash).
            SnapshotWriteError: the restored state could not be written; nothing changed.
        """
        path = self.snapshots.path(name)
        self.snapshots.info(name, verify=False)  # NotFound when absent
        info, banks = read_snapshot(path)
        self._check_model(info)
        # The runtime refuses new RPCs meanwhile (NOT_SERVING); holding store.lock here
        # instead would invert the store's lock order.
        with self._snapshot_lock:
            t0 = time.perf_counter()
            try:
                seq = int(self.store.last_seq) + RESTORE_SEQ_JUMP
                boundary = self._rotate()
                created = time.time()
                after = self._write(f"{default_name(created, seq)}-restore-{name}"[:64],
                                    banks, seq, boundary, created)
            except Exception:
                self._observe(time.perf_counter() - t0, ok=False)
                raise
            self._observe(time.perf_counter() - t0, ok=True)
            self.snapshots.remember(after)
            self._last = None
            stamps = self.store.load_state(self._state(seq, banks))
            # the restored banks are new objects, which the new file holds as loaded
            self._last = Written.of(self.snapshots.path(after.name), after,
                                    StoreState(seq, {}, stamps))
            if int(self.store.last_seq) != seq:
                log.error("restore: in-flight writes moved the sequence past %d (now %d); "
                          "a crash before the next snapshot may replay them onto the restored "
                          "state", seq, self.store.last_seq)
            log.warning("restored snapshot %s (%d banks) as %s", name, len(banks), after.name)
            if self.wal is not None:
                # Older snapshots + this log would mix pre- and post-restore state; with
                # the log cut here, falling back past the restore is refused, not merged.
                self.wal.delete_segments_before(after.wal_segment)
            self.snapshots.prune(self.settings.snapshot_keep)
        return info

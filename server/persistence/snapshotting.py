"""Snapshots: writing them (on demand, periodic, at shutdown), when to take the
next one, and trimming the log and import files they make redundant.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import AlreadyExists, ApcmError, FailedPrecondition, Unavailable
from ..memory.store import StoreState
from .managerbase import ManagerBase, Written
from .snapshot import SnapshotInfo, default_name, map_bank_arrays, write_snapshot
from .wal import WalError
from .walsegments import list_segments

log = logging.getLogger(__name__)


class SnapshotWriteError(Unavailable):
    """A snapshot could not be written (disk full, I/O error); retrying later may work."""


class SnapshotDirUnwritable(FailedPrecondition):
    """The snapshot directory refuses writes (read-only, permissions): an operator must act."""


def _snapshot_write_error(e: OSError, path: Path) -> ApcmError:
    cls = SnapshotDirUnwritable if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) \
        else SnapshotWriteError
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    return cls(f"snapshot could not be written to {path}: {code}: {e.strerror or e}")


class Snapshotting(ManagerBase):
    """``snapshot`` and the periodic thread's loop (``start`` runs it)."""

    def _wal_grown(self) -> bool:
        wal = self.wal
        return wal is not None and self.settings.snapshot_wal_bytes > 0 and \
            wal.written_bytes - self._wal_mark >= self.settings.snapshot_wal_bytes

    def _on_wal_flush(self, written: int) -> None:
        if written - self._wal_mark >= self.settings.snapshot_wal_bytes:
            self._wake.set()

    def _periodic(self) -> None:
        # Always snapshot on the interval: read counters change without a log record.
        # Also once the log has grown past snapshot_wal_bytes: replay time stays bounded.
        # And once a bank's index was built: until a snapshot holds it, a restart would
        # serve that bank by exhaustive scans while k-means runs again.
        interval = self.settings.snapshot_interval_s
        due = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stop.is_set():
            woke = self._wake.wait(
                None if due == float("inf") else max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            indexed = self._index_built.is_set()
            self._index_built.clear()
            if woke and time.monotonic() < due and not self._wal_grown() and not indexed:
                continue  # a flush that raced with the last snapshot
            try:
                self.snapshot(automatic=True)
            except Exception:
                log.exception("automatic snapshot failed")
            due = time.monotonic() + interval if interval > 0 else float("inf")

    def snapshot(self, name: str | None = None, automatic: bool = False) -> SnapshotInfo:
        """Write a snapshot of every bank and trim the log it makes redundant.

        Banks unchanged since the last snapshot are streamed from its file
        (``reused_banks``). An ``automatic`` snapshot (periodic, log growth, shutdown)
        is skipped when nothing changed at all: the last one is returned, ``unchanged``.

        Raises:
            InvalidArgument: a bad name.
            AlreadyExists: a snapshot of that name exists.
            SnapshotWriteError: the file could not be written (UNAVAILABLE, names errno
                and path). SnapshotDirUnwritable: the folder refuses writes.
        """
        if name is not None:
            self.snapshots.path(name)  # validate before doing any work
        with self._snapshot_lock:
            t0 = time.perf_counter()
            try:
                info = self._snapshot_locked(name, automatic)
            except Exception:
                self._observe(time.perf_counter() - t0, ok=False)
                raise
            self._observe(time.perf_counter() - t0, ok=True)
            return info

    def _snapshot_locked(self, name: str | None, automatic: bool) -> SnapshotInfo:
        if name is not None and self.snapshots.path(name).exists():
            raise AlreadyExists(f"snapshot {name!r} already exists", field="name")
        last = self._last if self._last is not None and self._last.intact() else None
        if automatic and last is not None and last.last_seq == self.store.last_seq \
                and last.stamps == self.store.stamps():
            # Nothing changed since the last snapshot, access counters included: an
            # automatic snapshot would rewrite the same banks (asked-for ones still write).
            log.info("snapshot skipped: nothing changed since %s", last.info.name)
            return dataclasses.replace(last.info, unchanged=True)
        if self.wal is not None:
            self._wal_mark = self.wal.written_bytes
        boundary = self._rotate()
        state = self.store.export_state(last.stamps if last is not None else None)
        reused, shared = self._fill_partial(state, last)
        created = time.time()
        if name is None:
            name = default_name(created, state.last_seq)
            suffix = 1
            while self.snapshots.path(name).exists():
                suffix += 1
                name = f"{default_name(created, state.last_seq)}-{suffix}"
        info = self._write(name, state.banks, state.last_seq, boundary, created, shared)
        info.reused_banks = reused
        self.snapshots.remember(info)
        self._last = Written.of(self.snapshots.path(info.name), info, state)
        log.info("snapshot %s written: %d bytes, wal sequence %d, %d unchanged banks reused",
                 info.name, info.size_bytes, info.wal_sequence, len(reused))
        self.snapshots.prune(self.settings.snapshot_keep)
        self._trim_log()
        return info

    def _fill_partial(self, state: StoreState, last: Written | None
                      ) -> tuple[list[str], dict[str, str]]:
        """Completes the banks ``export_state`` copied partially (unchanged slots) with
        their arrays from the last snapshot file, or, for a bank whose slot arrays are
        in a bank file, with its counters there and that file's digest. Returns the
        names of those banks and the bank files the new snapshot keeps naming."""
        if not state.partial:
            return [], {}
        try:
            assert last is not None
            mapped = map_bank_arrays(last.path, state.partial)
            for bank in state.partial:
                arrays = state.banks[bank][1]
                for array_name, arr in mapped[bank].items():
                    arrays.setdefault(array_name, arr)
            shared = {b: d for b, d in last.info.bank_files.items() if b in state.partial}
            return sorted(state.partial), shared
        except (OSError, ValueError, KeyError, AssertionError) as e:
            # The file changed under us: copy those banks whole after all.
            log.warning("previous snapshot unusable for unchanged banks (%s); copying them", e)
            self._last = None
            fresh = self.store.export_state()
            for bank in state.partial:
                if bank not in fresh.banks:  # dropped meanwhile: its whole copy is gone
                    raise SnapshotWriteError(
                        f"snapshot: bank {bank!r} was dropped while the previous snapshot "
                        "became unusable; the next snapshot copies every bank") from e
                state.banks[bank] = fresh.banks[bank]
                state.stamps[bank] = fresh.stamps[bank]
            return [], {}

    def _write(self, name: str, banks: dict[str, Any], seq: int, boundary: int,
               created: float, bank_files: dict[str, str] | None = None) -> SnapshotInfo:
        try:
            return write_snapshot(
                self.snapshots.directory, name, banks=banks, wal_sequence=seq,
                wal_segment=boundary, model_hash=self.codec_hash, codec_kind=self.codec_kind,
                created_at=created, bank_files=bank_files,
                bank_file_bytes=self.settings.snapshot_bank_file_bytes,
            )
        except OSError as e:
            raise _snapshot_write_error(e, self.snapshots.path(name)) from e

    def _rotate(self) -> int:
        """Start a new log segment; returns the first index the snapshot may not cover."""
        if self.wal is not None:
            try:
                return self.wal.rotate()
            except WalError as e:
                # The state in memory holds every logged record, so a snapshot is still
                # worth writing; it covers every existing segment.
                log.error("snapshot without log rotation: %s", e.message)
        # Name the newest existing segment: start-up expects the snapshot's segment to exist.
        segments = list_segments(self.wal_dir)
        return segments[-1][0] if segments else 1

    def _trim_log(self) -> None:
        if self.wal is None:
            return
        ours = self._recoverable_snapshots()
        if ours:
            self.wal.delete_segments_before(min(i.wal_segment for i in ours))

    def _observe(self, seconds: float, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_snapshot(seconds, ok)

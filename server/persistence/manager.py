"""Ties the store to its snapshots and write-ahead log.

Data directory layout: ``<data_dir>/snapshots/<name>.safetensors`` and
``<data_dir>/wal/wal-<index>.log``.

Invariants:
    * Every mutation the store acknowledges is in the log (``start`` attaches it).
    * Before a snapshot copies the state, the log rotates to segment ``k``; every
      record in segments below ``k`` is in the copy, and the copy records ``k``.
    * Segments are deleted only when covered by the *second-newest* snapshot too,
      so a damaged newest snapshot falls back to the previous one without loss.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import AlreadyExists, ApcmError, FailedPrecondition, Unavailable
from ..memory.store import StoreState
from .bankfile import decode_bank
from .imports import ImportFiles
from .replayer import BatchingApplier
from .snapshot import (
    SnapshotCorrupt,
    SnapshotDirectory,
    SnapshotInfo,
    default_name,
    map_bank_arrays,
    read_snapshot,
    write_snapshot,
)
from .wal import WalError, WriteAheadLog
from .walreplay import replay
from .walsegments import list_segments, segment_path

log = logging.getLogger(__name__)

__all__ = ["PersistenceManager", "RecoveryReport", "SnapshotInfo", "SnapshotWriteError"]

# A restore moves sequence numbers this far ahead, past any a write still in flight
# on the replaced state can take, so the restored snapshot's sequence separates
# those writes (covered, never replayed onto it) from later ones (replayed).
RESTORE_SEQ_JUMP = 1 << 32


class SnapshotWriteError(Unavailable):
    """A snapshot could not be written (disk full, I/O error); retrying later may work."""


class SnapshotDirUnwritable(FailedPrecondition):
    """The snapshot directory refuses writes (read-only, permissions): an operator must act."""


def _snapshot_write_error(e: OSError, path: Path) -> ApcmError:
    cls = SnapshotDirUnwritable if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) \
        else SnapshotWriteError
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    return cls(f"snapshot could not be written to {path}: {code}: {e.strerror or e}")


@dataclass
class _Written:
    """The last snapshot this process wrote: the bank stamps it holds, so the next
    snapshot can skip or reuse unchanged banks, and the file's (size, mtime) then."""

    path: Path
    info: SnapshotInfo
    last_seq: int
    stamps: dict[str, tuple[int, int, int]]
    file_stamp: tuple[int, int]

    @classmethod
    def of(cls, path: Path, info: SnapshotInfo, state: StoreState) -> _Written:
        st = path.stat()
        return cls(path, info, state.last_seq, dict(state.stamps), (st.st_size, st.st_mtime_ns))

    def intact(self) -> bool:
        """Whether the file is still there, unchanged since it was written."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == self.file_stamp


@dataclass
class RecoveryReport:
    """What start-up recovery did."""

    snapshot: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    replayed: int = 0
    truncated_bytes: int = 0
    last_seq: int = 0


class PersistenceManager:
    """Start-up recovery, snapshots (on demand, periodic, at shutdown), restore.

    Args:
        store: the ``MemoryStore`` (``export_state``, ``load_state``, ``apply_record``,
            ``set_log``, ``last_seq``).
        settings: server settings (``data_dir``, ``snapshot_*``, ``wal_*``,
            ``allow_empty_start``).
        codec_hash: content hash of the served codec; snapshots and logs are tied to it.
        codec_kind: ``"pca"`` or ``"idrp"``.
        metrics: optional object with ``observe_snapshot(seconds, ok)``,
            ``set_wal_bytes(n)`` and ``observe_fsync(seconds)``.
    """

    def __init__(
        self,
        store: Any,
        settings: Settings,
        codec_hash: str,
        codec_kind: str,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.codec_hash = codec_hash
        self.codec_kind = codec_kind
        self.metrics = metrics
        root = Path(settings.data_dir)
        self.snapshots = SnapshotDirectory(root / "snapshots")
        self.wal_dir = root / "wal"
        self.imports = ImportFiles(root / "imports")
        self.wal: WriteAheadLog | None = None
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wal_listeners: list[Callable[[bool], None]] = []
        self._wake = threading.Event()
        self._wal_mark = 0  # WriteAheadLog.written_bytes when the last snapshot rotated it
        self._last: _Written | None = None  # the last snapshot this process wrote

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

    # -- start-up ----------------------------------------------------------------------
    def recover(self) -> RecoveryReport:
        """Load the newest valid snapshot, then replay the log after its sequence.

        Damaged snapshots are skipped for older ones, loudly. With snapshots on
        disk but none valid, start-up is refused unless ``allow_empty_start``.

        Raises:
            FailedPrecondition: no valid snapshot (and empty start not allowed); the
                snapshot or log belongs to another model (the message names its
                hash); log records a usable snapshot needs are missing or damaged.
        """
        report = RecoveryReport()
        self.snapshots.remove_partial_files()
        state = None
        info: SnapshotInfo | None = None
        names = self.snapshots.newest_first(verify=False)
        for candidate in names:
            try:
                info, banks = read_snapshot(self.snapshots.path(candidate.name))
            except SnapshotCorrupt as e:
                log.error("SKIPPING damaged snapshot %s: %s", candidate.name, e.message)
                report.skipped.append((candidate.name, e.message))
                continue
            self._check_model(info)
            state = self._state(info.wal_sequence, banks)
            break
        if names and state is None:
            reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped)
            if not self.settings.allow_empty_start:
                raise FailedPrecondition(
                    f"no valid snapshot in {self.snapshots.directory} ({reasons}); refusing "
                    "to start with empty banks. Restore a good snapshot file, or start with "
                    "--allow-empty-start to accept the loss"
                )
            log.error("no valid snapshot (%s); starting EMPTY because allow_empty_start", reasons)
        if info is not None and state is not None:
            self.store.load_state(state)
            report.snapshot = info.name
            log.info("loaded snapshot %s (wal sequence %d)", info.name, info.wal_sequence)
        after = info.wal_sequence if info is not None else 0
        report.last_seq = after
        if not self._log_covers(info, bool(names)):
            self.imports.remove_incoming()
            return report
        applier = BatchingApplier(self.store, self._load_import)
        result = replay(
            self.wal_dir, self.codec_hash, after, applier,
            covered_below=info.wal_segment if info is not None else 0,
            allow_loss=self.settings.allow_empty_start,
        )
        applier.flush()
        report.replayed = result.applied
        report.truncated_bytes = result.truncated_bytes
        if result.applied:
            log.info("replayed %d write-ahead-log records after sequence %d", result.applied,
                     after)
        report.last_seq = max(after, result.last_seq)
        # after replay: a record may name a file whose rename was not yet durable
        self.imports.remove_incoming()
        self._prune_imports()
        return report

    def _load_import(self, record: Any) -> tuple[Any, Any]:
        """(bank, text marks) of the verified import file an ``import_bank`` record names."""
        config, arrays = decode_bank(self.imports.read(record.fields))
        return self.store.bank_from_export(config, arrays), arrays.get("text_flags")

    def _log_covers(self, info: SnapshotInfo | None, had_snapshots: bool) -> bool:
        """Whether the log holds every segment the recovered snapshot does not cover."""
        segments = list_segments(self.wal_dir)
        need = info.wal_segment if info is not None else 1
        if info is not None and need > (segments[-1][0] if segments else 1):
            # The snapshot's log rotation created segment ``need`` (a rotation never
            # yields 1; a snapshot made without a log names an existing one): it is gone.
            missing = f"segment {segment_path(self.wal_dir, need).name} (sequences after " \
                      f"{info.wal_sequence})"
        elif not segments:
            return False
        elif segments[0][0] <= max(need, 1):
            return True
        else:
            missing = f"segments {max(need, 1)}..{segments[0][0] - 1}"
        if info is None and had_snapshots:
            # Empty start accepted: the log's head was covered by the lost snapshots.
            aside = self.wal_dir.with_name(f"wal.unusable-{int(time.time())}")
            self.wal_dir.rename(aside)
            log.error("write-ahead log lacks %s; moved it to %s and starting empty", missing,
                      aside)
            return False
        message = (
            f"write-ahead log {self.wal_dir} lacks {missing} needed after snapshot "
            f"{info.name if info else '(none)'}: acknowledged writes would be lost"
        )
        if not self.settings.allow_empty_start:
            raise FailedPrecondition(message + "; start with --allow-empty-start to accept it")
        log.error("%s; continuing because allow_empty_start", message)
        return True

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
        interval = self.settings.snapshot_interval_s
        due = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stop.is_set():
            woke = self._wake.wait(
                None if due == float("inf") else max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            if woke and time.monotonic() < due and not self._wal_grown():
                continue  # a flush that raced with the last snapshot
            try:
                self.snapshot(automatic=True)
            except Exception:
                log.exception("automatic snapshot failed")
            due = time.monotonic() + interval if interval > 0 else float("inf")

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

    # -- snapshots ---------------------------------------------------------------------
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
        reused = self._fill_partial(state, last)
        created = time.time()
        if name is None:
            name = default_name(created, state.last_seq)
            suffix = 1
            while self.snapshots.path(name).exists():
                suffix += 1
                name = f"{default_name(created, state.last_seq)}-{suffix}"
        info = self._write(name, state.banks, state.last_seq, boundary, created)
        info.reused_banks = reused
        self.snapshots.remember(info)
        self._last = _Written.of(self.snapshots.path(info.name), info, state)
        log.info("snapshot %s written: %d bytes, wal sequence %d, %d unchanged banks reused",
                 info.name, info.size_bytes, info.wal_sequence, len(reused))
        self.snapshots.prune(self.settings.snapshot_keep)
        self._trim_log()
        return info

    def _fill_partial(self, state: StoreState, last: _Written | None) -> list[str]:
        """Completes the banks ``export_state`` copied partially (unchanged slots) with
        their arrays from the last snapshot file; returns their names."""
        if not state.partial:
            return []
        try:
            assert last is not None
            mapped = map_bank_arrays(last.path, state.partial)
            for bank in state.partial:
                arrays = state.banks[bank][1]
                for array_name, arr in mapped[bank].items():
                    arrays.setdefault(array_name, arr)
            return sorted(state.partial)
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
            return []

    def _write(self, name: str, banks: dict[str, Any], seq: int, boundary: int,
               created: float) -> SnapshotInfo:
        try:
            return write_snapshot(
                self.snapshots.directory, name, banks=banks, wal_sequence=seq,
                wal_segment=boundary, model_hash=self.codec_hash, codec_kind=self.codec_kind,
                created_at=created,
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
        snapshots = self.snapshots.newest_first(verify=False)
        ours = [i for i in snapshots if i.model_hash == self.codec_hash]
        if ours:
            self.wal.delete_segments_before(min(i.wal_segment for i in ours[:2]))
        self._prune_imports()

    def _prune_imports(self) -> None:
        """Import files whose banks both newest snapshots hold go with their log records."""
        ours = [i for i in self.snapshots.newest_first(verify=False)
                if i.model_hash == self.codec_hash][:2]
        if ours:
            self.imports.prune(min(i.wal_sequence for i in ours))

    def _observe(self, seconds: float, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_snapshot(seconds, ok)

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
            self._last = None  # the restored banks are new objects
            self.store.load_state(self._state(seq, banks))
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

    # -- helpers -----------------------------------------------------------------------
    def _check_model(self, info: SnapshotInfo) -> None:
        if info.model_hash != self.codec_hash:
            raise FailedPrecondition(
                f"snapshot {info.name!r} was made with model {info.model_hash}, but this "
                f"server serves model {self.codec_hash}; it needs model {info.model_hash} "
                f"(serve that model, or give this one an empty --data-dir)"
            )

    @staticmethod
    def _state(last_seq: int, banks: dict[str, Any]) -> StoreState:
        return StoreState(last_seq=last_seq, banks=banks)

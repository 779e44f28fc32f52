"""Start-up recovery: the newest valid snapshot, then the log after it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import FailedPrecondition
from ..memory.store import StoreState
from .managerbase import ManagerBase, Written
from .replayer import BatchingApplier
from .snapshot import SnapshotCorrupt, SnapshotInfo, read_snapshot
from .walreplay import replay
from .walsegments import list_segments, segment_path

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What start-up recovery did."""

    snapshot: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    replayed: int = 0
    truncated_bytes: int = 0
    last_seq: int = 0


class StartupRecovery(ManagerBase):
    """``recover``: what start-up loads before the server takes writes."""

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
            segments = list_segments(self.wal_dir)
            if segments and segments[0][0] == 1:
                # nothing was ever trimmed: the log alone holds every acknowledged write
                log.error("no valid snapshot (%s); rebuilding every bank from the "
                          "write-ahead log, which holds every record since the start",
                          reasons)
            elif not self.settings.allow_empty_start:
                raise FailedPrecondition(
                    f"no valid snapshot in {self.snapshots.directory} ({reasons}); refusing "
                    "to start with empty banks. Restore a good snapshot file, or start with "
                    "--allow-empty-start to accept the loss"
                )
            else:
                log.error("no valid snapshot (%s); starting EMPTY because allow_empty_start",
                          reasons)
        if info is not None and state is not None:
            # the arrays are views of buffers read for this load alone: no copy needed
            stamps = self.store.load_state(state, adopt_arrays=True)
            # the file holds the banks as loaded: the next snapshot reuses the unchanged
            # ones from it, as if this process had written it
            self._last = Written.of(self.snapshots.path(info.name), info,
                                    StoreState(info.wal_sequence, {}, stamps))
            report.snapshot = info.name
            log.info("loaded snapshot %s (wal sequence %d)", info.name, info.wal_sequence)
        after = info.wal_sequence if info is not None else 0
        report.last_seq = after
        if not self._log_covers(info, bool(names)):
            return report
        applier = BatchingApplier(self.store)
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
        return report

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

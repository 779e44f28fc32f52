"""What every part of the persistence manager shares: its store, settings,
directories, log, locks and the last snapshot it wrote.

``recovery`` (start-up) and ``snapshotting`` (writing, scheduling, trimming) build
on ``ManagerBase``; ``manager.PersistenceManager`` joins them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import FailedPrecondition
from ..memory.store import StoreState
from .snapshot import SnapshotDirectory, SnapshotInfo
from .wal import WriteAheadLog


@dataclass
class Written:
    """The last snapshot this process wrote: the bank stamps it holds, so the next
    snapshot can skip or reuse unchanged banks, and the file's (size, mtime) then."""

    path: Path
    info: SnapshotInfo
    last_seq: int
    stamps: dict[str, tuple[int, int, int]]
    file_stamp: tuple[int, int]

    @classmethod
    def of(cls, path: Path, info: SnapshotInfo, state: StoreState) -> Written:
        st = path.stat()
        return cls(path, info, state.last_seq, dict(state.stamps), (st.st_size, st.st_mtime_ns))

    def intact(self) -> bool:
        """Whether the file is still there, unchanged since it was written."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == self.file_stamp


class ManagerBase:
    """The state of a ``PersistenceManager`` and the checks its parts share.

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
        self.wal: WriteAheadLog | None = None
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wal_listeners: list[Callable[[bool], None]] = []
        self._wake = threading.Event()
        self._wal_mark = 0  # WriteAheadLog.written_bytes when the last snapshot rotated it
        self._last: Written | None = None  # the last snapshot this process wrote
        # set when a bank's new index was swapped in: the periodic thread snapshots then
        self._index_built = threading.Event()
        store.index_listeners.append(self._on_index_built)

    def _on_index_built(self, bank: str) -> None:
        del bank  # the snapshot takes every changed bank
        self._index_built.set()
        self._wake.set()

    def _recoverable_snapshots(self) -> list[SnapshotInfo]:
        """The snapshots start-up may fall back on: the newest two of this model. With
        only one, none: until a second exists, the whole log stays, so a damaged
        first snapshot still leaves the log to rebuild from (unless the settings
        keep one snapshot only, which accepts that window)."""
        ours = [i for i in self.snapshots.newest_first(verify=False)
                if i.model_hash == self.codec_hash][:2]
        return ours if len(ours) == 2 or self.settings.snapshot_keep < 2 else []

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

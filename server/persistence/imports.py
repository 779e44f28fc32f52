"""Files of banks moved in from another server, referenced by ``import_bank`` log records.

A bank streamed in is written to ``<data_dir>/imports/incoming-*.part`` while it
arrives, then fsynced. When the store installs the bank it renames the file to
``<seq>.bank`` (the sequence of its ``import_bank`` record), fsyncs the folder and
logs the record with the file's length and CRC-32: the import is durable through
the write-ahead log like any mutation, without a snapshot. Replay reads the file
back and refuses it (loudly, never half-applied) when it is missing, cut short or
fails its CRC.

A file is needed while a snapshot that start-up may use precedes its record, so it
goes when the log segments holding its record go (``prune``).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition
from ..fsutil import fsync_dir

log = logging.getLogger(__name__)
RECORD_KIND = "import_bank"
_FINAL = re.compile(r"^(\d{20})\.bank$")
_INCOMING = re.compile(r"^incoming-[0-9a-f]{32}\.part$")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at once
SYNC_EVERY_BYTES = 4 << 20  # start writing back after this many new bytes


class ImportFileError(FailedPrecondition):
    """An import file a log record names is missing, cut short or damaged."""


@dataclass
class Incoming:
    """A bank's bytes being received: written to ``path`` as they come, with a running
    CRC-32. ``finish`` fsyncs the file and maps it (``buffer``) so the bank is
    rebuilt from it without another copy."""

    path: Path
    size: int
    fd: int
    written: int = 0
    crc32: int = 0
    buffer: Any = None
    committed: bool = False  # named by a log record: never deleted here
    _synced_to: int = 0
    _syncer: threading.Thread | None = None
    _sync_error: list[OSError] = field(default_factory=list)

    def write(self, data: Any) -> None:
        """Appends ``data`` (bytes or memoryview). Raises ``ValueError`` past the size."""
        if self.written + len(data) > self.size:
            raise ValueError(f"more than the announced {self.size} bytes")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.crc32 = zlib.crc32(data, self.crc32)
        self.written += len(data)
        if self.written - self._synced_to >= SYNC_EVERY_BYTES and not self._syncing():
            # the disk writes what has arrived while the rest is still on the wire
            self._synced_to = self.written
            self._syncer = threading.Thread(target=self._sync, name="apcm-import-sync",
                                            daemon=True)
            self._syncer.start()

    def _syncing(self) -> bool:
        return self._syncer is not None and self._syncer.is_alive()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:  # re-raised by finish: a failed writeback must not pass
            self._sync_error.append(e)

    def _join(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None

    def finish(self) -> None:
        """Makes the bytes durable (fsync) and maps them copy-on-write (``buffer``:
        writable, changes never reach the file). The caller checks ``written`` and
        ``crc32`` first.

        Raises:
            OSError: a write-back failed.
        """
        self._join()
        if self._sync_error:
            raise self._sync_error[0]
        os.fsync(self.fd)
        if self.written:
            self.buffer = mmap.mmap(self.fd, self.written, flags=mmap.MAP_PRIVATE | _POPULATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self.buffer = bytearray()
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Deletes an import that failed, unless its log record may name it."""
        self._join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            self.path.unlink(missing_ok=True)


class ImportFiles:
    """The ``imports`` folder of one server's data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def incoming(self, total_bytes: int) -> Incoming:
        """A new file for a bank of ``total_bytes`` bytes about to arrive."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"incoming-{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return Incoming(path, total_bytes, fd)

    def commit(self, incoming: Incoming, seq: int) -> dict[str, Any]:
        """Renames a finished file after its record's sequence; returns the record's
        fields. Runs under the store's locks, so no fsync here: ``sync`` makes the
        name durable after them, and until it has, a crash may leave the file under
        its incoming name, which the record also carries (``read`` falls back to it)."""
        name = f"{seq:020d}.bank"
        incoming_name = incoming.path.name
        os.replace(incoming.path, self.directory / name)
        incoming.path = self.directory / name
        incoming.committed = True
        return {"file": name, "bytes": incoming.written, "crc32": incoming.crc32,
                "incoming": incoming_name}

    def sync(self) -> None:
        """Makes committed names durable (call with no store lock held)."""
        fsync_dir(self.directory)

    def read(self, fields: dict[str, Any]) -> bytearray:
        """The verified bytes of the file an ``import_bank`` record names.

        Raises:
            ImportFileError: the file is missing, of the wrong length or fails its CRC.
        """
        name = str(fields.get("file", ""))
        if not _FINAL.match(name):
            raise ImportFileError(f"import record names an invalid file {name!r}")
        path = self.directory / name
        was = str(fields.get("incoming", ""))  # absent from older records
        if not path.exists() and _INCOMING.match(was) and (self.directory / was).exists():
            # the rename was not durable when the record was: finish it now
            os.replace(self.directory / was, path)
            fsync_dir(self.directory)
        size, crc = int(fields["bytes"]), int(fields["crc32"])
        try:
            with open(path, "rb") as f:
                data = bytearray(size)
                got = f.readinto(data)
                extra = f.read(1)
        except OSError as e:
            raise ImportFileError(f"import file {path} cannot be read: {e}") from e
        if got != size or extra:
            raise ImportFileError(f"import file {path} holds {got}{'+' if extra else ''} "
                                  f"bytes, its log record says {size}: torn or replaced")
        if zlib.crc32(data) != crc:
            raise ImportFileError(f"import file {path} fails its CRC-32: damaged")
        return data

    def prune(self, needed_after_seq: int) -> list[str]:
        """Deletes files whose records have sequence ``<= needed_after_seq`` (every
        snapshot start-up may use holds those banks), and unfinished incoming files
        (call only at start-up, or with no import running). Returns the names."""
        gone: list[str] = []
        if not self.directory.is_dir():
            return gone
        for path in sorted(self.directory.iterdir()):
            m = _FINAL.match(path.name)
            if m is not None and int(m.group(1)) <= needed_after_seq:
                path.unlink(missing_ok=True)
                gone.append(path.name)
        if gone:
            log.info("deleted %d import files covered by snapshots", len(gone))
        return gone

    def remove_incoming(self) -> list[str]:
        """Deletes files of imports cut short (at start-up: no import is running)."""
        gone: list[str] = []
        if self.directory.is_dir():
            for path in self.directory.glob("incoming-*.part"):
                path.unlink(missing_ok=True)
                gone.append(path.name)
        return gone

"""Snapshot files: every bank in one checksummed safetensors file.

Tensors are named ``bank/<bank name>/<array>`` (codes, occupancy, counters,
sequences, keys and payloads as uint8 data + int64 offsets, ...). String
metadata holds the schema version, the codec kind and content hash, the last
write-ahead-log sequence the file contains, the first log segment it does not
cover, the creation time, each bank's config as JSON, and a SHA-256 over the
metadata and every tensor's name, dtype, shape and bytes — a flipped bit or a
truncated file fails verification instead of loading silently.

A large bank's slot arrays may live in a bank file instead (``bankfiles``), shared
with the other snapshots in which the bank is unchanged; the snapshot then names
the file's digest (``bank_files``) and holds only that bank's config and counters.
Such a snapshot has schema version 2, so a server that cannot follow the name
refuses the file instead of loading a bank without its memories.

The caller copies the state under the store's locks; this module writes the
copy outside them (``atomic_write``: temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..fsutil import atomic_write, fsync_dir
from ..memory.names import validate_bank_name, validate_snapshot_name
from . import bankfiles, safetensors_io

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
SCHEMA_WITH_BANK_FILES = "2"  # names bank files: older servers cannot read it
FORMAT = "apcm-snapshot"
SUFFIX = safetensors_io.SUFFIX
# Temp files that safetensors.save_file (used by older versions) left on a crash.
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
BankArrays = dict[str, np.ndarray]
Banks = dict[str, tuple[dict[str, Any], BankArrays]]


class SnapshotCorrupt(FailedPrecondition):
    """A snapshot file is unreadable, truncated or fails its checksum."""


@dataclass
class SnapshotInfo:
    """What a snapshot holds, read from its metadata.

    ``valid`` is True only after the checksum verified; ``error`` says why not.
    """

    name: str
    created_at: float = 0.0
    size_bytes: int = 0
    wal_sequence: int = 0
    model_hash: str = ""
    banks: list[str] = field(default_factory=list)
    valid: bool = False
    codec_kind: str = ""
    wal_segment: int = 0
    error: str = ""
    # set by the writer: banks whose slot arrays were taken unchanged from the previous
    # snapshot file, and whether an automatic snapshot was skipped (nothing changed)
    reused_banks: list[str] = field(default_factory=list)
    unchanged: bool = False
    # banks whose slot arrays are in a bank file, by its digest (``bankfiles``)
    bank_files: dict[str, str] = field(default_factory=dict)


def snapshot_path(directory: Path, name: str) -> Path:
    """Path of snapshot ``name`` (validated: no separators, no ``..``)."""
    return Path(directory) / f"{validate_snapshot_name(name)}{SUFFIX}"


def default_name(created_at: float, wal_sequence: int) -> str:
    """Sortable, unique-enough default name, e.g. ``snap-20261125T204427.123Z-s42``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created_at))
    millis = int((created_at % 1) * 1000)
    return f"snap-{stamp}.{millis:03d}Z-s{wal_sequence}"


def write_snapshot(
    directory: Path,
    name: str,
    *,
    banks: Banks,
    wal_sequence: int,
    wal_segment: int,
    model_hash: str,
    codec_kind: str,
    created_at: float | None = None,
    bank_files: dict[str, str] | None = None,
    bank_file_bytes: int = 0,
) -> SnapshotInfo:
    """Write one snapshot atomically; never leaves a partial file under its final name.

    Args:
        directory: snapshot folder (created if missing).
        name: snapshot name (validated).
        banks: ``{bank: (config JSON dict, {array name: ndarray})}``, a private copy.
        wal_sequence: last log sequence number the copy contains.
        wal_segment: first log segment whose records may be missing from the copy.
        model_hash: content hash of the codec the codes belong to.
        codec_kind: ``"pca"`` or ``"idrp"``.
        created_at: Unix seconds (default: now).
        bank_files: banks whose slot arrays are in an existing bank file, by its
            digest; their entry in ``banks`` holds only the ``bankfiles.IN_SNAPSHOT``
            arrays.
        bank_file_bytes: the other banks whose slot arrays hold at least this many
            bytes are written to bank files first (0: none, every bank in the file).

    Raises:
        AlreadyExists: a snapshot of that name exists.
        ValueError: a ``bank_files`` bank with more arrays than the counters.
    """
    directory = Path(directory)
    path = snapshot_path(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise AlreadyExists(f"snapshot {name!r} already exists", field="name")
    created_at = time.time() if created_at is None else created_at
    tensors: dict[str, np.ndarray] = {}
    shared = {b: d for b, d in (bank_files or {}).items() if b in banks}
    for bank, (_, arrays) in banks.items():
        validate_bank_name(bank)
        if bank in shared:
            if set(arrays) - set(bankfiles.IN_SNAPSHOT):
                raise ValueError(f"bank {bank!r} is in a bank file but brings slot arrays")
        elif bank_file_bytes > 0:
            own, rest = bankfiles.split(arrays)
            if sum(a.nbytes for a in rest.values()) >= bank_file_bytes:
                shared[bank] = bankfiles.write(directory, rest)
                arrays = own
        for array_name, arr in arrays.items():
            if "/" in array_name:
                raise ValueError(f"array name {array_name!r} contains '/'")
            tensors[f"bank/{bank}/{array_name}"] = safetensors_io.little_endian(arr)
    metadata = {
        "format": FORMAT,
        "schema_version": SCHEMA_WITH_BANK_FILES if shared else SCHEMA_VERSION,
        "codec_kind": codec_kind,
        "model_hash": model_hash,
        "wal_sequence": str(int(wal_sequence)),
        "wal_segment": str(int(wal_segment)),
        "created_at": repr(float(created_at)),
        "banks": json.dumps({b: cfg for b, (cfg, _) in banks.items()}, sort_keys=True),
    }
    if shared:
        metadata["bank_files"] = json.dumps(shared, sort_keys=True)
    metadata["checksum"] = safetensors_io.checksum(metadata, tensors)
    buffers = safetensors_io.encode(sorted(tensors.items()), metadata, metadata_first=False)
    atomic_write(path, lambda tmp: safetensors_io.save(tmp, buffers))
    return _info_from_metadata(path, metadata, valid=True)


def read_snapshot(path: Path) -> tuple[SnapshotInfo, Banks]:
    """Load and verify one snapshot.

    Returns:
        Its info (``valid=True``) and ``{bank: (config, {array: ndarray})}``.

    Raises:
        SnapshotCorrupt: unreadable, truncated, wrong format or checksum mismatch.
    """
    path = Path(path)
    name = path.name[: -len(SUFFIX)]
    try:
        metadata, tensors = safetensors_io.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotCorrupt(f"snapshot {name!r} is unreadable or truncated: {e}") from e
    if metadata.get("format") != FORMAT:
        raise SnapshotCorrupt(f"snapshot {name!r} is not an ApCM snapshot")
    if metadata.get("schema_version") not in (SCHEMA_VERSION, SCHEMA_WITH_BANK_FILES):
        raise SnapshotCorrupt(
            f"snapshot {name!r} has schema version {metadata.get('schema_version')!r}; "
            f"this server reads versions {SCHEMA_VERSION} and {SCHEMA_WITH_BANK_FILES}"
        )
    stored = metadata.pop("checksum", "")
    actual = safetensors_io.checksum(metadata, tensors)
    if stored != actual:
        raise SnapshotCorrupt(
            f"snapshot {name!r} fails its checksum (stored {stored or 'none'}, "
            f"computed {actual}): the file is damaged"
        )
    try:
        configs = json.loads(metadata["banks"])
        info = _info_from_metadata(path, metadata, valid=True)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SnapshotCorrupt(f"snapshot {name!r} has malformed metadata: {e}") from e
    for bank, cfg in configs.items():
        try:
            validate_bank_name(bank)
        except InvalidArgument as e:
            raise SnapshotCorrupt(f"snapshot {name!r}: {e.message}") from e
        if not isinstance(cfg, dict) or cfg.get("name", bank) != bank:
            raise SnapshotCorrupt(f"snapshot {name!r}: bank {bank!r} has a mismatched config")
    banks: Banks = {b: (cfg, {}) for b, cfg in configs.items()}
    for key, arr in tensors.items():
        prefix, bank, array_name = key.split("/", 2)
        if prefix != "bank" or bank not in banks:
            raise SnapshotCorrupt(f"snapshot {name!r} has an unexpected tensor {key!r}")
        banks[bank][1][array_name] = arr
    for bank, digest in info.bank_files.items():
        if bank not in banks:
            raise SnapshotCorrupt(f"snapshot {name!r} names a bank file for bank {bank!r}, "
                                  "which it does not hold")
        try:
            shared = bankfiles.read(path.parent, digest)
        except bankfiles.BankFileError as e:
            raise SnapshotCorrupt(f"snapshot {name!r}, bank {bank!r}: {e}") from e
        arrays = banks[bank][1]
        if set(shared) & set(arrays):
            raise SnapshotCorrupt(f"snapshot {name!r}, bank {bank!r}: arrays "
                                  f"{sorted(set(shared) & set(arrays))} are in both files")
        arrays.update(shared)
    return info, banks


def map_bank_arrays(path: Path, banks: set[str]) -> dict[str, BankArrays]:
    """Read-only memory maps of the arrays of ``banks`` in a snapshot file: no copy, the
    pages are read as a new snapshot file is written from them.

    Raises:
        OSError, ValueError: the file is gone or its header is inconsistent.
    """
    base, _, specs = safetensors_io.read_header(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, BankArrays] = {b: {} for b in banks}
    wanted = {}
    for key, spec in specs.items():
        prefix, bank, _ = key.split("/", 2)
        if prefix == "bank" and bank in out:
            wanted[key] = spec
    for key, arr in safetensors_io.views(mapped, base, wanted).items():
        _, bank, array_name = key.split("/", 2)
        out[bank][array_name] = arr
    return out


def inspect_snapshot(path: Path, verify: bool = True) -> SnapshotInfo:
    """Info of one snapshot; with ``verify`` the checksum is checked (reads the whole file)."""
    path = Path(path)
    if verify:
        try:
            return read_snapshot(path)[0]
        except SnapshotCorrupt as e:
            info = _header_info(path)
            info.valid, info.error = False, e.message
            return info
    return _header_info(path)


def _header_info(path: Path) -> SnapshotInfo:
    name = path.name[: -len(SUFFIX)]
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
        return _info_from_metadata(path, metadata, valid=False)
    except Exception as e:  # a damaged header: list it by file time, marked invalid
        st = path.stat()
        return SnapshotInfo(name=name, created_at=st.st_mtime, size_bytes=st.st_size,
                            error=f"unreadable: {e}")


def _info_from_metadata(path: Path, metadata: dict[str, str], valid: bool) -> SnapshotInfo:
    """The info of the snapshot file at ``path``; its size counts the bank files it names."""
    shared = json.loads(metadata.get("bank_files", "{}"))
    if not isinstance(shared, dict) or not all(isinstance(d, str) for d in shared.values()):
        raise ValueError("bank_files is not a map of bank names to digests")
    return SnapshotInfo(
        name=path.name[: -len(SUFFIX)],
        created_at=float(metadata.get("created_at", 0.0)),
        size_bytes=path.stat().st_size + bankfiles.size(path.parent, list(shared.values())),
        wal_sequence=int(metadata.get("wal_sequence", 0)),
        model_hash=metadata.get("model_hash", ""),
        banks=sorted(json.loads(metadata.get("banks", "{}"))),
        valid=valid,
        codec_kind=metadata.get("codec_kind", ""),
        wal_segment=int(metadata.get("wal_segment", 0)),
        bank_files=shared,
    )


class SnapshotDirectory:
    """The snapshot folder: listing (newest first), verification cache, keep-K pruning.

    Verifying reads a whole file, so results are cached per (name, size, mtime), and
    the (size, mtime) of every bank file the snapshot names.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[tuple[int, int] | None, ...], SnapshotInfo]] = {}

    def path(self, name: str) -> Path:
        return snapshot_path(self.directory, name)

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return [p.name[: -len(SUFFIX)] for p in self.directory.iterdir()
                if p.name.endswith(SUFFIX) and not p.name.startswith(".")]

    def info(self, name: str, verify: bool = True) -> SnapshotInfo:
        """Info of snapshot ``name``. Raises ``NotFound`` if absent."""
        path = self.path(name)
        try:
            path.stat()
        except FileNotFoundError as e:
            raise NotFound(f"snapshot {name!r} does not exist", field="name") from e
        cached = self._cache.get(name)
        if cached is not None and cached[0] == self._stamp(path, cached[1]):
            return cached[1]
        info = inspect_snapshot(path, verify=verify)
        if verify:
            self._cache[name] = (self._stamp(path, info), info)
        return info

    def _stamp(self, path: Path, info: SnapshotInfo) -> tuple[tuple[int, int] | None, ...]:
        """(size, mtime) of the snapshot file and of each bank file it names (None: gone)."""
        stamps: list[tuple[int, int] | None] = []
        for digest in ["", *info.bank_files.values()]:
            try:
                st = (bankfiles.path(self.directory, digest) if digest else path).stat()
                stamps.append((st.st_size, st.st_mtime_ns))
            except (OSError, bankfiles.BankFileError):
                stamps.append(None)
        return tuple(stamps)

    def remember(self, info: SnapshotInfo) -> None:
        """Cache a snapshot this process just wrote and verified by construction."""
        path = self.path(info.name)
        self._cache[info.name] = (self._stamp(path, info), info)

    def newest_first(self, verify: bool = True) -> list[SnapshotInfo]:
        """Every snapshot, newest first (by creation time, then name)."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.info(name, verify=verify))
            except NotFound:
                continue  # deleted while listing
        return sorted(infos, key=lambda i: (i.created_at, i.name), reverse=True)

    def remove_partial_files(self) -> list[str]:
        """Delete temp files of snapshot writes a crash interrupted; returns their names."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir() if p.is_file() and (
            (p.name.startswith(".") and f"{SUFFIX}.tmp-" in p.name)
            or _SAFETENSORS_TMP.match(p.name))]
        for p in stale:
            log.warning("removing %s, left by a snapshot write that did not finish", p.name)
            p.unlink()
        return [p.name for p in stale] + bankfiles.remove_partial_files(self.directory)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest snapshots, then the bank files no
        remaining snapshot names; returns the deleted snapshot names."""
        if keep < 1:
            return []
        listed = self.newest_first(verify=False)
        doomed = [i.name for i in listed[keep:]]
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
            self._cache.pop(name, None)
            log.info("deleted old snapshot %s (keeping the newest %d)", name, keep)
        if doomed:
            fsync_dir(self.directory)
        kept = listed[:keep]
        if any(i.error.startswith("unreadable") for i in kept):
            # a snapshot whose header cannot be read may name any bank file: keep them all
            log.warning("bank files not collected: a snapshot's header is unreadable")
        else:
            bankfiles.collect(self.directory, {d for i in kept for d in i.bank_files.values()})
        return doomed

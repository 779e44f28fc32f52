"""Snapshot files: every bank in one checksummed safetensors file.

Tensors are named ``bank/<bank name>/<array>`` (codes, occupancy, counters,
sequences, keys and payloads as uint8 data + int64 offsets, ...). String
metadata holds the schema version, the codec kind and content hash, the last
write-ahead-log sequence the file contains, the first log segment it does not
cover, the creation time, each bank's config as JSON, and a SHA-256 over the
metadata and every tensor's name, dtype, shape and bytes — a flipped bit or a
truncated file fails verification instead of loading silently.

The caller copies the state under the store's locks; this module writes the
copy outside them (``atomic_write``: temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import contextlib
import hashlib
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
from . import safetensors_io

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
FORMAT = "apcm-snapshot"
SUFFIX = ".safetensors"
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


def snapshot_path(directory: Path, name: str) -> Path:
    """Path of snapshot ``name`` (validated: no separators, no ``..``)."""
    return Path(directory) / f"{validate_snapshot_name(name)}{SUFFIX}"


def default_name(created_at: float, wal_sequence: int) -> str:
    """Sortable, unique-enough default name, e.g. ``snap-20261125T204427.123Z-s42``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created_at))
    millis = int((created_at % 1) * 1000)
    return f"snap-{stamp}.{millis:03d}Z-s{wal_sequence}"


def _checksum(metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(metadata, sort_keys=True).encode("utf-8"))
    for name in sorted(tensors):
        arr = tensors[name]
        h.update(f"\n{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        if arr.nbytes:
            h.update(arr.data.cast("B"))
    return "sha256:" + h.hexdigest()


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

    Raises:
        AlreadyExists: a snapshot of that name exists.
    """
    directory = Path(directory)
    path = snapshot_path(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise AlreadyExists(f"snapshot {name!r} already exists", field="name")
    created_at = time.time() if created_at is None else created_at
    tensors: dict[str, np.ndarray] = {}
    for bank, (_, arrays) in banks.items():
        validate_bank_name(bank)
        for array_name, arr in arrays.items():
            if "/" in array_name:
                raise ValueError(f"array name {array_name!r} contains '/'")
            tensors[f"bank/{bank}/{array_name}"] = safetensors_io.little_endian(arr)
    metadata = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "codec_kind": codec_kind,
        "model_hash": model_hash,
        "wal_sequence": str(int(wal_sequence)),
        "wal_segment": str(int(wal_segment)),
        "created_at": repr(float(created_at)),
        "banks": json.dumps({b: cfg for b, (cfg, _) in banks.items()}, sort_keys=True),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    buffers = safetensors_io.encode(sorted(tensors.items()), metadata, metadata_first=False)
    atomic_write(path, lambda tmp: safetensors_io.save(tmp, buffers))
    return _info_from_metadata(name, metadata, path.stat().st_size, valid=True)


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
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise SnapshotCorrupt(
            f"snapshot {name!r} has schema version {metadata.get('schema_version')!r}; "
            f"this server reads version {SCHEMA_VERSION}"
        )
    stored = metadata.pop("checksum", "")
    actual = _checksum(metadata, tensors)
    if stored != actual:
        raise SnapshotCorrupt(
            f"snapshot {name!r} fails its checksum (stored {stored or 'none'}, "
            f"computed {actual}): the file is damaged"
        )
    try:
        configs = json.loads(metadata["banks"])
        info = _info_from_metadata(name, metadata, path.stat().st_size, valid=True)
    except (KeyError, ValueError) as e:
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
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
        return _info_from_metadata(name, metadata, size, valid=False)
    except Exception as e:  # a damaged header: list it by file time, marked invalid
        return SnapshotInfo(name=name, created_at=path.stat().st_mtime, size_bytes=size,
                            error=f"unreadable: {e}")


def _info_from_metadata(
    name: str, metadata: dict[str, str], size: int, valid: bool
) -> SnapshotInfo:
    return SnapshotInfo(
        name=name,
        created_at=float(metadata.get("created_at", 0.0)),
        size_bytes=size,
        wal_sequence=int(metadata.get("wal_sequence", 0)),
        model_hash=metadata.get("model_hash", ""),
        banks=sorted(json.loads(metadata.get("banks", "{}"))),
        valid=valid,
        codec_kind=metadata.get("codec_kind", ""),
        wal_segment=int(metadata.get("wal_segment", 0)),
    )


class SnapshotDirectory:
    """The snapshot folder: listing (newest first), verification cache, keep-K pruning.

    Verifying reads a whole file, so results are cached per (name, size, mtime).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int], SnapshotInfo]] = {}

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
            st = path.stat()
        except FileNotFoundError as e:
            raise NotFound(f"snapshot {name!r} does not exist", field="name") from e
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = inspect_snapshot(path, verify=verify)
        if verify:
            self._cache[name] = (stamp, info)
        return info

    def remember(self, info: SnapshotInfo) -> None:
        """Cache a snapshot this process just wrote and verified by construction."""
        st = self.path(info.name).stat()
        self._cache[info.name] = ((st.st_size, st.st_mtime_ns), info)

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
        return [p.name for p in stale]

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest snapshots; returns the deleted names."""
        if keep < 1:
            return []
        doomed = [i.name for i in self.newest_first(verify=False)[keep:]]
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
            self._cache.pop(name, None)
            log.info("deleted old snapshot %s (keeping the newest %d)", name, keep)
        if doomed:
            fsync_dir(self.directory)
        return doomed

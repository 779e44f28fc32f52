"""Large banks' slot arrays in files of their own, shared by the snapshots that hold them.

A snapshot keeps a bank whose slot arrays reach a size (``snapshot_bank_file_bytes``)
in ``snapshots/banks/<hex digest>.safetensors``: every array of the bank but its
access counters, named by the SHA-256 of their names, dtypes, shapes and bytes.
The snapshot file itself holds the bank's config, its counters (``IN_SNAPSHOT``,
which reads change) and the digest. A later snapshot in which the bank's slots are
unchanged names the same file, so an unchanged bank costs its counters (16 bytes
a slot), not a rewrite; a bank file never changes once written.

Order on disk: a bank file is durable (temp, fsync, rename, fsync dir) before any
snapshot names it, and is deleted (``collect``) only when no snapshot file names
it, so a crash at any point leaves every snapshot readable; at worst a file no
snapshot names, which the next collection deletes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write, fsync_dir
from . import safetensors_io

log = logging.getLogger(__name__)

DIRECTORY = "banks"
FORMAT = "apcm-bank-arrays"
SCHEMA_VERSION = "1"
# what reads change: kept in each snapshot file, so a read-only bank shares the rest
IN_SNAPSHOT = ("counts", "count_clock")
_DIGEST_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")
Arrays = dict[str, np.ndarray]


class BankFileError(ValueError):
    """A bank file is missing, unreadable, or does not hold the digest it is named by."""


def split(arrays: Arrays) -> tuple[Arrays, Arrays]:
    """(what stays in the snapshot file, what a bank file would hold) of a bank's arrays."""
    own = {k: v for k, v in arrays.items() if k in IN_SNAPSHOT}
    return own, {k: v for k, v in arrays.items() if k not in IN_SNAPSHOT}


def path(snapshot_dir: Path, digest: str) -> Path:
    """The file of ``digest`` ("sha256:<64 hex>"; anything else is refused).

    Raises:
        BankFileError: not a digest of that form (a crafted name cannot leave the folder).
    """
    hexdigest = digest[len(_DIGEST_PREFIX):] if digest.startswith(_DIGEST_PREFIX) else ""
    if len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
        raise BankFileError(f"bank file digest {digest!r} is not sha256:<64 hex digits>")
    return Path(snapshot_dir) / DIRECTORY / f"{hexdigest}{safetensors_io.SUFFIX}"


def write(snapshot_dir: Path, arrays: Arrays) -> str:
    """Stores a bank's arrays (``split``'s second part) in their file; returns the
    digest that names it. A file of that digest already there holds the same bytes
    (a bank unchanged since an earlier run, or restored): it is kept, not rewritten."""
    tensors = {k: safetensors_io.little_endian(v) for k, v in arrays.items()}
    metadata = {"format": FORMAT, "schema_version": SCHEMA_VERSION}
    digest = safetensors_io.checksum(metadata, tensors)
    target = path(snapshot_dir, digest)
    if target.exists():
        return digest
    target.parent.mkdir(parents=True, exist_ok=True)
    buffers = safetensors_io.encode(sorted(tensors.items()),
                                    {**metadata, "checksum": digest}, metadata_first=False)
    atomic_write(target, lambda tmp: safetensors_io.save(tmp, buffers))
    return digest


def read(snapshot_dir: Path, digest: str) -> Arrays:
    """The arrays of the bank file named ``digest``, verified against it.

    Raises:
        BankFileError: missing, unreadable, or its bytes do not hash to ``digest``.
    """
    target = path(snapshot_dir, digest)
    try:
        metadata, tensors = safetensors_io.load(target)
    except FileNotFoundError as e:
        raise BankFileError(f"bank file {DIRECTORY}/{target.name} is missing") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BankFileError(f"bank file {DIRECTORY}/{target.name} is unreadable or "
                            f"truncated: {e}") from e
    metadata.pop("checksum", None)
    actual = safetensors_io.checksum(metadata, tensors)
    if metadata.get("format") != FORMAT or actual != digest:
        raise BankFileError(f"bank file {DIRECTORY}/{target.name} fails its checksum "
                            f"(computed {actual}): the file is damaged")
    return tensors


def size(snapshot_dir: Path, digests: list[str]) -> int:
    """Bytes of the bank files of ``digests`` that exist."""
    total = 0
    for digest in digests:
        with contextlib.suppress(OSError, BankFileError):
            total += path(snapshot_dir, digest).stat().st_size
    return total


def collect(snapshot_dir: Path, named: set[str]) -> list[str]:
    """Deletes every bank file whose digest is not in ``named`` (the digests the
    snapshot files on disk name); returns the deleted file names."""
    folder = Path(snapshot_dir) / DIRECTORY
    if not folder.is_dir():
        return []
    keep = set()
    for digest in named:
        with contextlib.suppress(BankFileError):
            keep.add(path(snapshot_dir, digest).name)
    doomed = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
              and p.name.endswith(safetensors_io.SUFFIX) and p.name not in keep]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        log.info("deleted bank file %s/%s: no snapshot names it", DIRECTORY, p.name)
    if doomed:
        fsync_dir(folder)
    return [p.name for p in doomed]


def remove_partial_files(snapshot_dir: Path) -> list[str]:
    """Deletes temp files of bank-file writes a crash interrupted; returns their names."""
    folder = Path(snapshot_dir) / DIRECTORY
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".")
             and f"{safetensors_io.SUFFIX}.tmp-" in p.name]
    for p in stale:
        log.warning("removing %s/%s, left by a bank-file write that did not finish",
                    DIRECTORY, p.name)
        p.unlink()
    return [p.name for p in stale]

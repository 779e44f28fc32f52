"""Replay of the write-ahead log at start-up: every segment, in order, checked.

A torn tail (past what the log acknowledged, see ``walmark``) is cut off, damage a
snapshot covers is skipped, anything else that would drop an acknowledged write (a
bad record mid-log or before the acknowledged end, a missing segment) stops
start-up; see ``replay``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition
from ..fsutil import fsync_dir
from .walformat import SEGMENT_END, BadRecord, WalRecord, iter_segment
from .walmark import AckMark, read_mark
from .walsegments import list_segments, segment_path

log = logging.getLogger(__name__)


class WalCorruptError(FailedPrecondition):
    """A record before the end of the log fails its checks; replay refuses to skip it."""


class WalGapError(FailedPrecondition):
    """Logged sequences are missing (a segment was deleted); replay refuses to guess."""


@dataclass
class ReplayResult:
    """What ``replay`` did: last sequence seen, records applied, bytes cut off a torn tail."""

    last_seq: int = 0
    applied: int = 0
    truncated_bytes: int = 0
    segments: list[Path] = field(default_factory=list)
    skipped_segments: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def replay(
    directory: Path,
    model_hash: str,
    after_seq: int,
    apply: Callable[[WalRecord], None],
    *,
    covered_below: int = 0,
    allow_loss: bool = False,
) -> ReplayResult:
    """Apply every logged record with ``seq > after_seq``, in log order.

    A bad tail of the last segment that starts at or past its acknowledgement
    mark is a torn write and is truncated away: it was never acknowledged (a
    segment without a mark: a tail cut short or followed only by zeros). A bad
    record before the mark destroyed acknowledged writes: ``WalCorruptError``
    naming them, or with ``allow_loss`` cut off with an error log. Damage in a
    segment below ``covered_below`` (all its records are in the snapshot) is
    logged and skipped. Any other bad record stops replay with
    ``WalCorruptError`` — skipping it would silently drop an acknowledged memory.
    Missing sequences (after ``after_seq``, between records, or a segment that
    the one before it names) raise ``WalGapError`` unless ``allow_loss``.

    Raises:
        WalCorruptError: a record in the middle of the log is damaged.
        WalGapError: logged sequences are missing.
        FailedPrecondition: the log was written for another model.
    """
    result = ReplayResult(last_seq=after_seq)
    segments = list_segments(directory)
    seen = {i for i, _ in segments}
    expected = after_seq + 1
    link: int | None = None
    for n, (index, path) in enumerate(segments):
        last_segment = n == len(segments) - 1
        result.segments.append(path)
        link = None
        records = 0

        def check_header(header: dict[str, Any], path: Path = path) -> None:
            logged_hash = header.get("model_hash")
            if logged_hash != model_hash:
                raise FailedPrecondition(
                    f"write-ahead log {path} was written for model {logged_hash}, but the "
                    f"served model is {model_hash}; serve model {logged_hash} or move the "
                    "data directory aside"
                )

        try:
            for _, record in iter_segment(path, check_header, fields_after=after_seq):
                if record.kind == SEGMENT_END:
                    link = int(record.fields["next_segment"])
                    continue
                records += 1
                result.last_seq = max(result.last_seq, record.seq)
                if record.seq <= after_seq:
                    continue
                if record.first_seq > expected:
                    _gap(result, f"sequences {expected}..{record.first_seq - 1} (before "
                                 f"{path.name})", allow_loss)
                expected = record.seq + 1
                apply(record)
                result.applied += 1
        except BadRecord as bad:
            if index < covered_below:
                log.warning(
                    "write-ahead log %s is damaged at byte %d (%s); SKIPPING it: the "
                    "snapshot being loaded holds all of its records", path, bad.offset,
                    bad.reason)
                result.skipped_segments.append((path, bad.reason))
                continue
            mark = read_mark(path) if last_segment else None
            acknowledged = mark is not None and mark.records > 0 and bad.offset < mark.offset
            if acknowledged and bad.reaches_eof:
                assert mark is not None
                _acknowledged_lost(directory, path, bad, mark, records, result, allow_loss)
            elif acknowledged or not last_segment or (
                    mark is None and (bad.complete or not bad.reaches_eof)):
                raise WalCorruptError(
                    f"write-ahead log {path} is corrupt at byte {bad.offset}: {bad.reason}; "
                    f"replay stopped after sequence {result.last_seq} (records after it "
                    "would be lost if skipped: restore the file or move it aside "
                    "deliberately)"
                ) from bad
            else:
                _cut_torn_tail(directory, path, bad, result, mark)
            if bad.offset == 0:
                seen.discard(index)
                seen.add(-index)  # it existed, empty: a link to it is not a gap
    if link is not None and link not in seen and -link not in seen:
        _gap(result, f"segment {segment_path(directory, link).name}, named by the end of "
                     f"{result.segments[-1].name} (sequences after {result.last_seq})",
             allow_loss)
    return result


def _gap(result: ReplayResult, what: str, allow_loss: bool) -> None:
    result.missing.append(what)
    message = (f"write-ahead log is missing {what}: acknowledged writes were lost (a log "
               "segment was deleted or moved)")
    if not allow_loss:
        raise WalGapError(message + "; put the segment back, or start with "
                          "--allow-empty-start to accept the loss")
    log.error("%s; continuing WITHOUT them because allow_empty_start", message)


def _acknowledged_lost(directory: Path, path: Path, bad: BadRecord, mark: AckMark,
                       records: int, result: ReplayResult, allow_loss: bool) -> None:
    """A bad record before the segment's acknowledged end: refuse, or cut and say what
    was lost."""
    first, last, count = result.last_seq + 1, mark.last_seq, mark.records - records
    if count == 1 and first == last:
        lost, verb = f"acknowledged sequence {last}", "is"
    else:
        lost = f"{count} record{'s' if count != 1 else ''} (acknowledged sequences " \
               f"{first}..{last})"
        verb = "is" if count == 1 else "are"
    where = (f"write-ahead log {path} is damaged at byte {bad.offset} ({bad.reason}), "
             f"before its acknowledged end at byte {mark.offset}")
    if not allow_loss:
        raise WalCorruptError(
            f"{where}: {lost} {verb} lost; replay stopped after sequence "
            f"{result.last_seq}. Restore the file, or start with --allow-empty-start to "
            "accept the loss (the damaged bytes are then cut off)")
    log.error("%s; LOSING %s because allow_empty_start", where, lost)
    result.missing.append(lost)
    _truncate(directory, path, bad, result)


def _cut_torn_tail(directory: Path, path: Path, bad: BadRecord, result: ReplayResult,
                   mark: AckMark | None) -> None:
    size = path.stat().st_size
    if mark is not None:
        why = (f"it lies past the acknowledged end at byte {mark.offset} (sequence "
               f"{mark.last_seq}): never acknowledged")
    else:
        why = ("the segment has no acknowledgement mark; a tail cut short or followed "
               "only by zeros is taken as never acknowledged")
    log.warning(
        "write-ahead log %s: torn final write at byte %d (%s); dropping %d bytes after "
        "sequence %d: %s", path, bad.offset, bad.reason, size - bad.offset,
        result.last_seq, why,
    )
    _truncate(directory, path, bad, result)


def _truncate(directory: Path, path: Path, bad: BadRecord, result: ReplayResult) -> None:
    result.truncated_bytes += path.stat().st_size - bad.offset
    if bad.offset == 0:
        # Crashed while creating the segment: no record was ever in it.
        path.unlink()
        fsync_dir(directory)
    else:
        with open(path, "r+b") as f:
            f.truncate(bad.offset)
            f.flush()
            os.fsync(f.fileno())

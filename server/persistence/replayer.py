"""Applies replayed log records to the store, merging runs of writes.

A run of consecutive ``write`` records to one bank becomes one
``apply_record`` call: one lock round trip, one tensor scatter and one norm
computation per run instead of per record (most records hold one item). The
result is the same: ``MemoryBank.apply_write`` handles items in order at
consecutive write clocks, and a later item wins a repeated slot, exactly as
applying the records one by one does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ApcmError, FailedPrecondition
from ..memory.lexical import is_text
from .walformat import WalRecord

MAX_RUN_ITEMS = 8192


class BatchingApplier:
    """``apply(record)`` for ``wal.replay``; call ``flush()`` after the last record.

    Args:
        store: the ``MemoryStore`` (``apply_record``, ``last_seq``).
        max_items: largest merged write.
    """

    def __init__(self, store: Any, max_items: int = MAX_RUN_ITEMS) -> None:
        self.store = store
        self.max_items = max_items
        self._run: list[WalRecord] = []
        self._items = 0

    def __call__(self, record: WalRecord) -> None:
        if record.kind == "import_bank":
            raise FailedPrecondition(
                f"write-ahead log sequence {record.seq} records a bank moved here by the "
                "sharded cluster mode this version replaced (docs/cluster.md): recover this "
                "data directory with the release that wrote it and snapshot it first")
        if record.kind != "write":
            self.flush()
            self._apply(record.first_seq, record.seq, record.kind, record.bank, record.fields)
            return
        if self._run and self._run[0].bank != record.bank:
            self.flush()
        self._run.append(record)
        self._items += record.count
        if self._items >= self.max_items:
            self.flush()

    def flush(self) -> None:
        """Apply the pending run of writes, if any."""
        run, self._run, self._items = self._run, [], 0
        if not run:
            return
        try:
            fields = {
                "slots": np.concatenate([r.fields["slots"] for r in run]),
                "codes": np.concatenate([r.fields["codes"] for r in run]),
                "keys": [k for r in run for k in r.fields["keys"]],
                "payloads": [p for r in run for p in r.fields["payloads"]],
                "sequences": np.concatenate([_sequences(r) for r in run]),
            }
            if any("text" in r.fields for r in run):  # older records lack the text marks
                fields["text"] = np.concatenate([
                    np.asarray(r.fields["text"], dtype=np.uint8) if "text" in r.fields
                    else np.array([is_text(bytes(p)) for p in r.fields["payloads"]],
                                  dtype=np.uint8) for r in run])
            if any("items" in r.fields for r in run):  # staged for a bank's own codec
                parts, rows, offset = [], [], 0
                for r in run:
                    if "items" in r.fields:
                        parts.append(np.asarray(r.fields["items"]))
                        rows.append(offset + np.arange(len(parts[-1]), dtype=np.int64))
                    offset += r.count
                fields["items"] = np.concatenate(parts)
                fields["item_rows"] = np.concatenate(rows)
            if any("metadata" in r.fields for r in run):  # only some records carry it
                fields["metadata"] = [m for r in run
                                      for m in r.fields.get("metadata", [b""] * r.count)]
        except (KeyError, ValueError) as e:
            raise FailedPrecondition(
                f"write-ahead log records {run[0].first_seq}..{run[-1].seq} (writes on bank "
                f"{run[0].bank!r}) cannot be replayed: {e}") from e
        self._apply(run[0].first_seq, run[-1].seq, "write", run[0].bank, fields)

    def _apply(self, first: int, seq: int, kind: str, bank: str, fields: dict[str, Any]) -> None:
        try:
            self.store.apply_record(seq, kind, bank, fields)
        except ApcmError as e:
            raise FailedPrecondition(
                f"write-ahead log sequences {first}..{seq} ({kind} on bank {bank!r}) "
                f"cannot be replayed: {e.message}"
            ) from e


def _sequences(record: WalRecord) -> np.ndarray:
    if "sequences" in record.fields:  # version-1 records
        return np.asarray(record.fields["sequences"], dtype=np.int64)
    return np.arange(record.first_seq, record.seq + 1, dtype=np.int64)

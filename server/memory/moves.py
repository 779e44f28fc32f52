"""Banks that move between servers: exported whole for a move, adopted or imported
(logged as one ``import_bank`` record) on the receiving server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
)
from . import indexing
from .bank import MemoryBank
from .export import export_copy, from_export
from .storebase import StoreBase


class BankMoves(StoreBase):
    """The store's side of a bank move (see ``cluster``)."""

    def export_bank(self, name: str, frozen: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
        """One bank's (config, arrays) with its text marks, as a snapshot holds it, for
        a move. ``frozen``: see ``export.export_copy``. Raises ``NotFound``."""
        with self._locked(name) as bank:
            copy = export_copy(bank, frozen=frozen)
            text_slots = self.texts.of(bank).text_slots()
        config, arrays = copy.pack()
        flags = np.zeros(len(arrays["occupied"]), dtype=np.uint8)
        flags[text_slots] = 1
        return config, {**arrays, "text_flags": flags}

    def adopt_bank(self, bank: MemoryBank, text_flags: np.ndarray | None = None) -> None:
        """Adds a bank built elsewhere (a bank moved in from another server), unlogged.

        The caller makes it durable by a snapshot before anyone may use it. Its
        records from now on are replayed after that snapshot, so its
        ``applied_seq`` restarts at this store's sequence; ``last_seq`` moves past
        the bank's slot sequences so new memories stay younger than moved ones.

        Raises:
            AlreadyExists: a bank of that name is here.
        """
        newest = int(bank.sequences.max()) if bank.capacity else 0
        with self.lock, self.seq_lock:
            if bank.name in self._banks:
                raise AlreadyExists(f"bank {bank.name!r} already exists", field="name")
            self.last_seq = max(self.last_seq, newest)
            bank.applied_seq = self.last_seq
            self.texts.load(bank, text_flags)  # None: derived from the payloads
            bank.index_config = self.index_config  # this server's, not the sender's
            self._banks = {**self._banks, bank.name: bank}
        with bank.lock:
            indexing.maybe_start(bank)

    def bank_from_export(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> MemoryBank:
        """A bank rebuilt from ``export.export`` output made elsewhere (a move), with
        this store's codec settings; not added to the store. It keeps writable
        ``arrays`` as its storage (they must not be used elsewhere).

        Raises:
            FailedPrecondition: its codes do not match this store's codec, or the arrays
                are inconsistent.
        """
        if int(config["code_dim"]) != self.code_dim or config["code_dtype"] != self.code_dtype:
            raise FailedPrecondition(
                f"bank {config.get('name')!r} holds {config['code_dtype']} codes of dim "
                f"{config['code_dim']}; this server's codec uses {self.code_dtype} of dim "
                f"{self.code_dim}")
        return from_export(
            config, arrays, scale=self.scale, device=self.device,
            max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
            metric=self.metric, scorer=self.scorer, adopt_arrays=True,
            index_config=self.index_config)

    def import_bank(self, bank: MemoryBank, commit: Callable[[int], dict[str, Any]],
                    text_flags: np.ndarray | None = None,
                    sync: Callable[[], None] | None = None) -> bool:
        """Adds a bank moved in from another server, logged as one ``import_bank`` record.

        ``commit(seq)`` names the bank's (already durable) bytes after sequence ``seq``
        and returns the record's fields; it runs under the store's locks, so it must
        be cheap (a rename). ``sync()``, called with no lock held before the record is
        waited for, makes that name durable (a folder fsync). The
        record covers the sequences up to the bank's newest slot sequence, so new
        memories stay younger than moved ones and the log has no gap. Returns after
        the record is durable; False (nothing logged, like ``adopt_bank``) when no log
        is attached: the caller makes the bank durable another way.

        Raises:
            AlreadyExists: a bank of that name is here.
            WalError: the log failed (the bank is in memory; ``abandon_bank`` it).
        """
        if self._log is None:
            self.adopt_bank(bank, text_flags)
            return False
        newest = int(bank.sequences.max()) if bank.sequences.numel() else 0
        self.texts.load(bank, text_flags)  # nobody sees the bank yet: no lock
        with self.lock, self.seq_lock:
            if bank.name in self._banks:
                raise AlreadyExists(f"bank {bank.name!r} already exists", field="name")
            end = max(self.last_seq + 1, newest)
            record = self._prepare("import_bank", bank.name, commit(end), end - self.last_seq)
            self._append(end, record)
            self.last_seq = end
            bank.applied_seq = end
            self._banks = {**self._banks, bank.name: bank}
        with bank.lock:
            indexing.maybe_start(bank)
        if sync is not None:
            sync()
        self._wait(end)
        return True

    def apply_import(self, seq: int, bank: MemoryBank,
                     text_flags: np.ndarray | None = None) -> None:
        """Re-applies an ``import_bank`` record (WAL replay; skipped like ``apply_record``).

        Raises:
            FailedPrecondition: a bank of that name exists (corrupt log).
        """
        self.texts.load(bank, text_flags)
        with self.lock:
            if seq <= self.last_seq:
                return
            if bank.name in self._banks:
                raise FailedPrecondition(f"replay: imported bank {bank.name!r} already exists")
            bank.applied_seq = seq
            with self.seq_lock:
                self._banks = {**self._banks, bank.name: bank}
                self.last_seq = seq
        with bank.lock:
            indexing.maybe_start(bank)

    def abandon_bank(self, bank: MemoryBank) -> None:
        """Takes back an ``adopt_bank`` that never became durable (unlogged, like it)."""
        with bank.lock, self.lock:
            if self._banks.get(bank.name) is bank:
                self._banks = {n: b for n, b in self._banks.items() if n != bank.name}
            bank.retired = True

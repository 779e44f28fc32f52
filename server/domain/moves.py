"""The domain side of a bank move between servers (``apcm.v1.ClusterService``):
export, receive, rebuild and install, through the same store and log as every
other mutation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..memory.bank import MemoryBank
from ..memory.results import BankStats
from ..memory.store import MemoryStore


class BankMoves:
    """Mixed into ``MemoryService``, which provides ``store`` and ``persistence``."""

    store: MemoryStore
    persistence: Any

    # Names are taken as given, not through ``bank_name``: a move names a bank exactly.
    def has_bank(self, name: str) -> bool:
        """Whether this server holds a bank called ``name`` now."""
        return self.store.has(name)

    def require_bank(self, name: str) -> None:
        """Raises ``NotFound`` unless this server holds a bank called ``name``."""
        self.store.get(name)

    def export_bank(self, name: str, *, frozen: bool = False
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The bank's (config, arrays) as a snapshot holds it, for a move; ``frozen``:
        see ``MemoryBank.export_copy``. Raises ``NotFound``."""
        return self.store.export_bank(name, frozen=frozen)

    def receive_bank(self, name: str, total_bytes: int) -> Any:
        """An import file for ``total_bytes`` of bank ``name`` moving here (``Incoming``
        of ``persistence.imports``: write, finish, then ``install_bank`` or discard).

        Raises:
            ResourceExhausted: the bank would not fit the memory limit.
        """
        self.store.check_room(total_bytes, f"bank {name!r} moved here")
        return self.persistence.imports.incoming(total_bytes)

    def bank_from_export(self, config: dict[str, Any],
                         arrays: dict[str, np.ndarray]) -> MemoryBank:
        """A bank rebuilt from another server's ``export_bank``, not yet installed.

        Raises:
            FailedPrecondition: it does not fit this server's codec.
        """
        return self.store.bank_from_export(config, arrays)

    def install_bank(self, bank: MemoryBank, incoming: Any,
                     text_flags: np.ndarray | None = None) -> BankStats:
        """Makes a bank moved here durable and visible: an ``import_bank`` log record
        naming ``incoming``'s fsynced file (a snapshot when the server has no log).
        Nobody sees the bank before that; if it fails the bank is not installed.

        Raises:
            AlreadyExists: a bank of that name is here.
        """
        persistence = self.persistence
        try:
            logged = self.store.import_bank(
                bank, lambda seq: persistence.imports.commit(incoming, seq), text_flags,
                sync=persistence.imports.sync)
            if not logged:
                persistence.snapshot()  # no log: durable before anyone sees it
        except BaseException:
            self.store.abandon_bank(bank)
            raise
        return self.store.describe(bank.name)

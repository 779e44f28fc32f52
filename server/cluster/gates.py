"""Per-bank gates: a moving bank takes no writes, an importing bank takes no calls.

Every bank-scoped call a server handles itself passes ``admit``. ``pause`` blocks
new mutations of one bank and waits until the admitted ones have finished (they
are durable by then), so the copy a move takes holds every acknowledged write;
``seal`` then blocks every call and waits for reads too, so the bank can be
dropped without a call finding it gone: later calls hear "moved, retry".
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from .errors import ShardUnavailable


class BankBusy(ShardUnavailable):
    """The bank is moving, being imported or moved away; retry (UNAVAILABLE)."""


class BankGates:
    """Args:
        has_bank: whether this server holds a bank now.
        describe_shard: how messages name a shard.
        shard_id: this server's shard, named by the ``BankBusy`` it raises.
    """

    def __init__(self, has_bank: Callable[[str], bool],
                 describe_shard: Callable[[int], str] = lambda s: f"shard {s}",
                 shard_id: int = 0) -> None:
        self.has_bank = has_bank
        self.describe_shard = describe_shard
        self.shard_id = shard_id
        self._cond = threading.Condition()
        self._active: dict[str, list[int]] = {}  # bank -> [mutations, all calls] in flight
        self._blocked: dict[str, tuple[bool, str]] = {}  # bank -> (reads blocked too, why)
        self.moved_to: dict[str, int] = {}  # banks this process handed over, and to whom

    @contextlib.contextmanager
    def admit(self, bank: str, mutating: bool) -> Iterator[None]:
        """Runs one call on ``bank``; raises ``BankBusy`` while the bank is blocked for it."""
        with self._cond:
            blocked = self._blocked.get(bank)
            if blocked is not None and (mutating or blocked[0]):
                raise self._busy(blocked[1])
            if bank in self.moved_to and not self.has_bank(bank):
                raise self._busy(f"bank {bank!r} moved to "
                                 f"{self.describe_shard(self.moved_to[bank])}; retry")
            counts = self._active.setdefault(bank, [0, 0])
            counts[0] += mutating
            counts[1] += 1
        try:
            yield
        finally:
            with self._cond:
                counts[0] -= mutating
                counts[1] -= 1
                if not counts[1]:
                    del self._active[bank]
                self._cond.notify_all()

    def _busy(self, why: str) -> BankBusy:
        return BankBusy(why, shard=self.shard_id)

    def _wait(self, bank: str, which: int, deadline: float, timeout_s: float) -> None:
        while self._active.get(bank, (0, 0))[which]:
            left = deadline - time.monotonic()
            if left <= 0:
                del self._blocked[bank]
                raise self._busy(f"bank {bank!r}: calls in flight did not finish in "
                                 f"{timeout_s:g} s; try the move again")
            self._cond.wait(left)

    def pause(self, bank: str, why: str, timeout_s: float) -> None:
        """Refuses new mutations of ``bank`` and waits for the admitted ones to finish.

        Raises:
            BankBusy: the bank is already blocked (another move), or the admitted
                mutations did not finish within ``timeout_s`` (the bank is resumed).
        """
        with self._cond:
            if bank in self._blocked:
                raise self._busy(self._blocked[bank][1])
            self._blocked[bank] = (False, why)
            self._wait(bank, 0, time.monotonic() + timeout_s, timeout_s)

    def seal(self, bank: str, why: str, timeout_s: float) -> None:
        """After ``pause``: refuses every call and waits for the reads in flight too."""
        with self._cond:
            self._blocked[bank] = (True, why)
            self._wait(bank, 1, time.monotonic() + timeout_s, timeout_s)

    def hide(self, bank: str, why: str) -> None:
        """Refuses every call on ``bank`` (it is being installed) until ``resume``."""
        with self._cond:
            if bank in self._blocked:
                raise self._busy(self._blocked[bank][1])
            self._blocked[bank] = (True, why)

    def resume(self, bank: str) -> None:
        with self._cond:
            self._blocked.pop(bank, None)

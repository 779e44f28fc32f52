"""What every part of the store shares: its banks, locks, sequence numbers and log.

The lock discipline is described in ``store``; this module holds the state and the
helpers that follow it (``_locked``, ``_shared``, ``_all_locked``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..code_dtypes import CODE_DTYPES
from ..errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)
from .bank import MemoryBank
from .bankcodec import STAGING_SLACK
from .codecstage import CodecFitter, Staging
from .eviction import make_policy, validate_half_life
from .ivf import IndexConfig
from .lexical import Bm25Params
from .names import shorten
from .results import BankStats
from .scoring import CodeScorer
from .texts import TextIndexes


class MutationLog(Protocol):
    """Where mutations go before they are acknowledged (the write-ahead log)."""

    def prepare(self, kind: str, bank: str, fields: dict[str, Any], count: int = 1) -> Any:
        """Encodes a record of ``count`` sequences; called before ``store.seq_lock``."""

    def append(self, seq: int, record: Any) -> None:
        """Buffers a prepared record as sequences ``seq - count + 1 .. seq``; called with
        the bank lock and ``store.seq_lock`` held, so it must be cheap. Raising leaves
        the mutation unapplied and its sequence unused."""

    def wait_durable(self, seq: int) -> None:
        """Blocks until every record up to ``seq`` is durable; called without locks."""


@dataclass
class StoreState:
    """A consistent copy of every bank, as plain Python and numpy values.

    Attributes:
        last_seq: last sequence number reflected in the banks.
        banks: name -> (config, arrays), as produced by ``MemoryBank.export``.
    """

    last_seq: int
    banks: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)
    # bank -> ``MemoryBank.stamp()`` at its copy (filled by ``export_state``)
    stamps: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # banks copied without some arrays, which are unchanged since the earlier copy
    # ``export_state`` was given: the caller takes those from it
    partial: set[str] = field(default_factory=set)


class StoreBase:
    """All banks of one server, for one codec (code dim, dtype and int8 scale).

    Args:
        code_dim: m of the codec.
        code_dtype: "float32", "float16" or "int8".
        scale: the codec's int8 per-dimension scale [m] (None otherwise).
        metric: the codec's similarity weights [m] for cosine search (None: plain).
        scorer: the codec's ``CodeScorer`` for packed (uint8) codes, else None.
        device: where banks live.
        max_capacity: largest bank capacity.
        max_payload_bytes: largest payload per memory.
        max_key_length: longest key.
        default_policy: policy of banks created without one.
        default_half_life: half-life (in writes) of "lfu_decay" banks created without one.
        log: the mutation log, or None (no durability).
        memory_limit_bytes: bytes all banks may hold (preallocated slots, keys and
            payloads); None for no limit. Checked by ``create_bank`` and by writes that
            add payload bytes; restores and replay are not refused.
        max_banks: most banks at once (None for no limit).
        index_config: when banks build an approximate index (None: never).
        fitter: how banks fit codecs of their own (``bankcodec``); None: they keep
            the served model.
    """

    def __init__(
        self,
        *,
        code_dim: int,
        code_dtype: str,
        scale: torch.Tensor | None,
        device: torch.device,
        max_capacity: int,
        max_payload_bytes: int,
        max_key_length: int,
        default_policy: str,
        default_half_life: float,
        log: MutationLog | None = None,
        metric: torch.Tensor | None = None,
        memory_limit_bytes: int | None = None,
        max_banks: int | None = None,
        scorer: CodeScorer | None = None,
        index_config: IndexConfig | None = None,
        bm25: Bm25Params | None = None,
        fitter: CodecFitter | None = None,
    ) -> None:
        if code_dtype not in CODE_DTYPES:
            raise ValueError(f"unknown code dtype {code_dtype!r}")
        self.code_dim = int(code_dim)
        self.code_dtype = code_dtype
        self.scale = scale.detach().float().cpu() if scale is not None else None
        self.metric = metric.detach().float().cpu() if metric is not None else None
        self.scorer = scorer
        self.index_config = index_config or IndexConfig()
        self.fitter = fitter if fitter is not None and fitter.threshold > 0 else None
        self.device = torch.device(device)
        self.max_capacity = int(max_capacity)
        self.max_payload_bytes = int(max_payload_bytes)
        self.max_key_length = int(max_key_length)
        self.memory_limit_bytes = memory_limit_bytes
        self.max_banks = max_banks
        make_policy(default_policy, default_half_life)  # fail fast on bad settings
        validate_half_life(default_half_life)
        self.default_policy = default_policy
        self.default_half_life = float(default_half_life)
        self.lock = threading.RLock()
        self.seq_lock = threading.Lock()
        self.last_seq = 0
        self._log = log
        self._banks: dict[str, MemoryBank] = {}
        # each bank's BM25 index of its text memories, kept in step under the bank lock
        self.texts = TextIndexes(bm25)
        # what the memory limit is checked against: this store's banks, or (a cluster
        # pod's shard stores) every store of the pod
        self.limit_usage: Callable[[], int] = self.usage_bytes
        # called with a bank's name once a new index of it is swapped in (persistence
        # snapshots it then, so a restart finds the index instead of training again)
        self.index_listeners: list[Callable[[str], None]] = []

    def index_built(self, bank: str) -> None:
        """Tells the ``index_listeners`` that ``bank`` has a new index (no lock held)."""
        for listener in self.index_listeners:
            listener(bank)

    def set_log(self, log: MutationLog | None) -> None:
        with self.lock, self.seq_lock:
            self._log = log

    def _next_seq(self, n: int = 1) -> int:
        """Reserves ``n`` sequence numbers (``seq_lock`` held); returns the first."""
        first = self.last_seq + 1
        self.last_seq += n
        return first

    def _prepare(self, kind: str, bank: str, fields: dict[str, Any], count: int = 1) -> Any:
        log = self._log
        return None if log is None else log.prepare(kind, bank, fields, count)

    def _append(self, seq: int, record: Any) -> None:
        if self._log is not None:
            if record is None:
                raise FailedPrecondition("the log was attached during this mutation; retry")
            self._log.append(seq, record)

    def _wait(self, seq: int) -> None:
        log = self._log
        if log is not None:
            log.wait_durable(seq)

    def _new_bank(self, name: str, capacity: int, policy: str, half_life: float) -> MemoryBank:
        bank = MemoryBank(
            name, capacity, code_dim=self.code_dim, code_dtype=self.code_dtype,
            scale=self.scale, device=self.device, policy=make_policy(policy, half_life),
            max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
            metric=self.metric, scorer=self.scorer, index_config=self.index_config)
        self.start_staging(bank)
        return bank

    def start_staging(self, bank: MemoryBank, arrays: dict[str, np.ndarray] | None = None
                      ) -> None:
        """Lets a bank stage items for a codec of its own, or for a refit of the one it
        has (with the staged items of a copy, if ``arrays`` has them)."""
        fitter = self.fitter
        if fitter is None:
            return
        bank.codec_threshold = fitter.threshold
        limit = int(fitter.threshold * STAGING_SLACK)
        bank.staging = Staging.restore(fitter.input_dim, limit, arrays or {})

    def _lookup(self, name: str) -> MemoryBank:
        bank = self._banks.get(name)  # copy-on-write dict: no lock needed
        if bank is None:
            raise NotFound(f"bank {shorten(name)} does not exist", field="bank")
        return bank

    def usage_bytes(self) -> int:
        """Bytes the memory limit counts: every bank's full capacity of slots (reserved
        at creation, although its tensors grow only as it fills), keys, metadata,
        payloads, IVF lists and lexical index (no locks: an estimate while writes run)."""
        return sum(b.reserved_bytes() + b.payload_bytes + self.texts.of(b).nbytes()
                   for b in self._banks.values())

    def _stats(self, bank: MemoryBank) -> BankStats:
        """``bank.stats()`` with the bank's lexical index, which the store keeps, counted
        in its memory and reserved bytes (caller holds the bank's lock)."""
        stats = bank.stats()
        lexical = self.texts.of(bank).nbytes()
        return dataclasses.replace(stats, memory_bytes=stats.memory_bytes + lexical,
                                   reserved_bytes=stats.reserved_bytes + lexical)

    def check_room(self, adding: int, what: str) -> None:
        """Raises ``ResourceExhausted`` unless ``adding`` more bytes fit the memory limit."""
        self._check_memory(adding, what)

    def _check_memory(self, adding: int, what: str) -> None:
        limit = self.memory_limit_bytes
        if limit is None or adding <= 0:
            return
        used = self.limit_usage()
        if used + adding > limit:
            raise ResourceExhausted(
                f"{what} needs {adding} more bytes, but the banks hold {used} of the "
                f"server's memory_limit_bytes of {limit} ({limit - used} left): free "
                "memory (DropBank, ClearBank, DeleteSlots) or ask the operator to raise "
                "--memory-limit-bytes", limit="memory_limit_bytes")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[MemoryBank]:
        """Holds the lock of the bank now called ``name``, retrying if the bank was
        dropped or replaced while this thread waited for its lock."""
        while True:
            bank = self._lookup(name)
            with bank.lock:
                if not bank.retired:
                    yield bank
                    return

    @contextlib.contextmanager
    def _shared(self, name: str) -> Iterator[MemoryBank]:
        """Like ``_locked`` but holds the bank's lock shared (reads)."""
        while True:
            bank = self._lookup(name)
            with bank.lock.shared():
                if not bank.retired:
                    yield bank
                    return

    @contextlib.contextmanager
    def _all_locked(self) -> Iterator[list[tuple[str, MemoryBank]]]:
        """Holds every bank lock (sorted by name), then the store lock, with no bank
        created or dropped in between (retries if one was)."""
        while True:
            banks = sorted(self._banks.items())
            with contextlib.ExitStack() as stack:
                for _, bank in banks:
                    stack.enter_context(bank.lock)
                stack.enter_context(self.lock)
                if sorted(self._banks.items()) == banks:
                    yield banks
                    return

    def has(self, name: str) -> bool:
        """Whether a bank called ``name`` is here now."""
        return name in self._banks  # copy-on-write dict: no lock needed

    def get(self, name: str) -> MemoryBank:
        """The bank called ``name`` (hold its ``lock`` to use it). Raises ``NotFound``."""
        return self._lookup(name)

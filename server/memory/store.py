"""The memory store: every bank of the server, sequence numbers, and the mutation log.

Lock discipline. Three kinds of lock; a thread holding one never waits for one
listed above it, so there is no deadlock, and only a bank's own lock is ever
held over slow work:

1. ``bank.lock`` of the bank an operation touches, held for the whole operation:
   a readers-writer lock (``memory.rwlock``). Mutations, exports and stats hold it
   exclusively; reads hold it shared, so reads of one bank scan it at the same
   time, and a slow read delays only that bank's writers. A waiting writer holds
   new readers back, and readers that queued behind a writer go before the next
   one, so neither side starves. A read changes only access counters, after its
   scan, under the bank's ``counter_lock`` (innermost, held for a few tensor ops,
   never while waiting for another lock).
2. ``store.lock`` guards changes to the bank dict (create, drop, restore). It is
   held only for a dict copy and a log append, never while waiting for a bank.
   The dict is copy-on-write, so looking a bank up takes no lock at all.
3. ``store.seq_lock`` guards ``last_seq``; a mutation holds it while it takes its
   sequence numbers and appends its (already encoded) record, so log order ==
   sequence order.

A bank's index build (``memory.indexing``) runs in its own thread and takes only
that bank's lock: shared while it copies the codes, exclusive for the short swap,
none while it trains; writes meanwhile keep the live index exact and journal their
slots for the new one.

A thread that looked a bank up and then waited for its lock re-checks
``bank.retired`` (set under that lock by drop and restore) and retries the
lookup, so it never writes into a dropped or replaced bank.

A mutation validates, appends its record to the log (buffered), then changes
memory, all under its bank lock; then, with every lock released, it waits until
its record is durable (``log.wait_durable``) before returning, so a client is
answered only for durable writes and concurrent writers share one fsync (group
commit). Access counters are not logged; snapshots persist them.

Snapshots copy one bank at a time (``export_state``): the store-wide sequence
``S`` is read with the bank dict, then each bank is copied under its own lock
with ``bank.applied_seq``, the sequence of its last applied mutation (>= every
sequence of that bank up to ``S``). Replay skips a record if its sequence is at
most ``S``, or at most its bank's ``applied_seq``, so the copy plus the log is
exactly the live state although the banks were copied at different moments.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..code_dtypes import CODE_DTYPES
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from . import indexing
from .bank import BankStats, MemoryBank, ReadResult, SlotWrite
from .eviction import make_policy, validate_half_life
from .hybrid import fused_read
from .ivf import IndexConfig
from .lexical import LexicalIndex, is_text
from .metadata import decode_metadata, encode_metadata, validate_metadata
from .names import shorten, validate_bank_name
from .scoring import CodeScorer


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


class MemoryStore:
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
    ) -> None:
        if code_dtype not in CODE_DTYPES:
            raise ValueError(f"unknown code dtype {code_dtype!r}")
        self.code_dim = int(code_dim)
        self.code_dtype = code_dtype
        self.scale = scale.detach().float().cpu() if scale is not None else None
        self.metric = metric.detach().float().cpu() if metric is not None else None
        self.scorer = scorer
        self.index_config = index_config or IndexConfig()
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
        self._lexical: weakref.WeakKeyDictionary[MemoryBank, LexicalIndex] = \
            weakref.WeakKeyDictionary()

    def set_log(self, log: MutationLog | None) -> None:
        with self.lock, self.seq_lock:
            self._log = log

    # ------------------------------------------------------------------ helpers
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

    def lexical(self, bank: MemoryBank) -> LexicalIndex:
        """The lexical index of a bank (empty until it holds text memories)."""
        index = self._lexical.get(bank)
        if index is None:
            index = self._lexical.setdefault(bank, LexicalIndex())
        return index

    def _index_texts(self, b: MemoryBank, slots: list[int], payloads: list[bytes | None],
                     text: list[bool] | None) -> None:
        """After a write: slot j holds a text memory iff ``text[j]`` (None: data without
        text marks, see ``lexical.is_text``)."""
        index = self.lexical(b)
        for j, slot in enumerate(slots):
            flag = text[j] if text is not None else is_text(payloads[j])
            index.set(slot, payloads[j] if flag else None)

    def _load_texts(self, b: MemoryBank, flags: np.ndarray | None) -> None:
        """A bank's index from its text marks [capacity] (None: derived from payloads).

        Reads the payload column's arrays directly: ``payload_of`` per slot costs
        ~4 us, 0.4 s for a bank of 100k memories moved in or recovered.
        """
        occupied = np.flatnonzero(b.occupied.cpu().numpy())
        if flags is not None:
            flags = np.asarray(flags)
            occupied = occupied[occupied < len(flags)]
            occupied = occupied[flags[occupied] != 0]
        col = b.payloads
        occupied = occupied[occupied < col.length.shape[0]]
        lengths = col.length[occupied]
        slots = occupied[lengths > 0]
        raw = col.data[:col.used].tobytes()
        docs = {s: raw[a:a + n] for s, a, n in zip(
            slots.tolist(), col.start[slots].tolist(), col.length[slots].tolist(), strict=True)}
        if flags is None:
            docs = {s: p for s, p in docs.items() if is_text(p)}
        self.lexical(b).load(docs)

    def export_bank(self, name: str, frozen: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
        """One bank's (config, arrays) with its text marks, as a snapshot holds it, for
        a move. ``frozen``: see ``MemoryBank.export_copy``. Raises ``NotFound``."""
        with self._locked(name) as bank:
            copy = bank.export_copy(frozen=frozen)
            text_slots = self.lexical(bank).text_slots()
        config, arrays = copy.pack()
        flags = np.zeros(len(arrays["occupied"]), dtype=np.uint8)
        flags[text_slots] = 1
        return config, {**arrays, "text_flags": flags}

    def _wait(self, seq: int) -> None:
        log = self._log
        if log is not None:
            log.wait_durable(seq)

    def _new_bank(self, name: str, capacity: int, policy: str, half_life: float) -> MemoryBank:
        return MemoryBank(
            name, capacity, code_dim=self.code_dim, code_dtype=self.code_dtype,
            scale=self.scale, device=self.device, policy=make_policy(policy, half_life),
            max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
            metric=self.metric, scorer=self.scorer, index_config=self.index_config)

    def _lookup(self, name: str) -> MemoryBank:
        bank = self._banks.get(name)  # copy-on-write dict: no lock needed
        if bank is None:
            raise NotFound(f"bank {shorten(name)} does not exist", field="bank")
        return bank

    def usage_bytes(self) -> int:
        """Bytes the memory limit counts: every bank's full capacity of slots (reserved
        at creation, although its tensors grow only as it fills), keys, metadata and
        payloads (no locks: an estimate while writes run)."""
        return sum(b.reserved_bytes() + b.payload_bytes for b in self._banks.values())

    def check_room(self, adding: int, what: str) -> None:
        """Raises ``ResourceExhausted`` unless ``adding`` more bytes fit the memory limit."""
        self._check_memory(adding, what)

    def _check_memory(self, adding: int, what: str) -> None:
        limit = self.memory_limit_bytes
        if limit is None or adding <= 0:
            return
        used = self.usage_bytes()
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

    # ------------------------------------------------------------------ banks
    def create_bank(
        self,
        name: str,
        capacity: int,
        policy: str | None = None,
        half_life: float | None = None,
        exist_ok: bool = False,
    ) -> BankStats:
        """Creates an empty bank (or, with ``exist_ok``, returns the existing one's stats).

        Raises:
            InvalidArgument: bad name, capacity outside 1..max_capacity, unknown policy.
            AlreadyExists: the bank exists and ``exist_ok`` is false.
        """
        validate_bank_name(name)
        try:
            capacity = operator.index(capacity)
        except TypeError as e:
            raise InvalidArgument(f"capacity must be an integer, got {capacity!r}",
                                  field="capacity") from e
        if not 1 <= capacity <= self.max_capacity:
            raise InvalidArgument(
                f"capacity must be between 1 and {self.max_capacity}, got {capacity}",
                field="capacity")
        policy = policy or self.default_policy
        half_life = half_life or self.default_half_life
        make_policy(policy, half_life)
        if policy == "lfu_decay":
            validate_half_life(half_life)
        existing = self._banks.get(name)
        if existing is None:
            self._check_new_bank(name, capacity)
            bank = self._new_bank(name, capacity, policy, half_life)  # allocate unlocked
            with self.lock:
                # checked again: a concurrent create may have taken the room meanwhile
                if name not in self._banks:
                    self._check_new_bank(name, capacity)
                existing = self._banks.get(name)
                if existing is None:
                    record = self._prepare("create_bank", name, {
                        "capacity": bank.capacity, "policy": bank.policy.name,
                        "half_life": bank.policy.half_life})
                    with self.seq_lock:
                        self._append(self.last_seq + 1, record)
                        seq = self._next_seq()
                    bank.applied_seq = seq
                    self._banks = {**self._banks, name: bank}
                    stats = bank.stats()  # nobody else can hold the new bank's lock yet
        if existing is not None:
            if not exist_ok:
                raise AlreadyExists(f"bank {shorten(name)} already exists", field="name")
            with existing.lock:
                return existing.stats()
        self._wait(seq)
        return stats

    def _check_new_bank(self, name: str, capacity: int) -> None:
        if self.max_banks is not None and len(self._banks) >= self.max_banks:
            raise ResourceExhausted(
                f"the server already has {len(self._banks)} banks, its max_banks limit: "
                "drop a bank or ask the operator to raise --max-banks", limit="max_banks")
        slot = MemoryBank.slot_bytes(self.code_dim, self.code_dtype)
        self._check_memory(capacity * slot,
                           f"a bank of {capacity} slots ({slot} bytes each)")

    def drop_bank(self, name: str) -> None:
        """Removes a bank and its memories. Raises ``NotFound``."""
        record = self._prepare("drop_bank", name, {})
        with self._locked(name) as bank, self.lock, self.seq_lock:
            self._append(self.last_seq + 1, record)
            seq = self._next_seq()
            self._banks = {n: b for n, b in self._banks.items() if n != name}
            bank.retired = True
        self._wait(seq)

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
            self._load_texts(bank, text_flags)  # None: derived from the payloads
            bank.index_config = self.index_config  # this server's, not the sender's
            self._banks = {**self._banks, bank.name: bank}
        with bank.lock:
            indexing.maybe_start(bank)

    def bank_from_export(self, config: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> MemoryBank:
        """A bank rebuilt from ``MemoryBank.export`` output made elsewhere (a move), with
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
        return MemoryBank.from_export(
            config, arrays, scale=self.scale, device=self.device,
            max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
            metric=self.metric, scorer=self.scorer, adopt_arrays=True,
            index_config=self.index_config)

    def import_bank(self, bank: MemoryBank, commit: Callable[[int], dict[str, Any]],
                    text_flags: np.ndarray | None = None) -> bool:
        """Adds a bank moved in from another server, logged as one ``import_bank`` record.

        ``commit(seq)`` makes the bank's bytes durable under sequence ``seq`` and returns
        the record's fields (which name them); it runs under the store's locks. The
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
        self._load_texts(bank, text_flags)  # nobody sees the bank yet: no lock
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
        self._wait(end)
        return True

    def apply_import(self, seq: int, bank: MemoryBank,
                     text_flags: np.ndarray | None = None) -> None:
        """Re-applies an ``import_bank`` record (WAL replay; skipped like ``apply_record``).

        Raises:
            FailedPrecondition: a bank of that name exists (corrupt log).
        """
        self._load_texts(bank, text_flags)
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

    def get(self, name: str) -> MemoryBank:
        """The bank called ``name`` (hold its ``lock`` to use it). Raises ``NotFound``."""
        return self._lookup(name)

    def has(self, name: str) -> bool:
        """Whether a bank called ``name`` is here now."""
        return name in self._banks  # copy-on-write dict: no lock needed

    def describe(self, name: str) -> BankStats:
        with self._locked(name) as bank:
            return bank.stats()

    # ------------------------------------------------------------------ write / read
    def write(
        self,
        bank: str,
        codes: torch.Tensor,
        keys: list[str | None],
        payloads: list[bytes | None],
        metadata: list[dict[str, str] | None] | None = None,
        text: list[bool] | None = None,
    ) -> list[SlotWrite]:
        """Stores each code [n, m] (code dtype) in its own slot; see ``MemoryBank``.

        Args:
            bank: bank name.
            codes: [n, m] codes in the store's code dtype.
            keys: [] or n keys (None / "" for none); an existing key is overwritten in place.
            payloads: [] or n payloads (None / b"" for none).
            metadata: None, [] or n string maps (None / {} for none), size-bounded.
            text: None, or n flags: memory j's payload is its text (it joins the bank's
                lexical index).

        Returns:
            One ``SlotWrite`` per code, in order.
        """
        with self._locked(bank) as b:
            keys, payloads = b.validate_write(codes, keys, payloads)
            added = sum(len(p) for p in payloads if p) + sum(len(k.encode()) for k in keys if k)
            self._check_memory(added, f"this write's {added} bytes of payloads and keys")
            n = codes.shape[0]
            if metadata and len(metadata) != n:
                raise InvalidArgument(f"got {len(metadata)} metadata maps for {n} memories",
                                      field="metadata")
            metas = [validate_metadata(m) for m in metadata] if metadata else None
            # planning only compares new sequences with the bank's, which are all below
            # last_seq + 1 (and cannot change while we hold its lock): no store lock needed
            slots = b.plan_write(keys, self.last_seq + 1)
            fields = {
                "slots": np.asarray(slots, dtype=np.int64),
                "codes": codes.detach().cpu().numpy().copy(),
                "keys": [k or "" for k in keys],
                "payloads": [p or b"" for p in payloads],
            }
            if metas and any(metas):  # absent from older records and metadata-less writes
                fields["metadata"] = [encode_metadata(m) for m in metas]
            flags = [bool(t) for t in text] if text else [False] * n
            if len(flags) != n:
                raise InvalidArgument(f"got {len(flags)} text flags for {n} memories",
                                      field="texts")
            fields["text"] = np.asarray(flags, dtype=np.uint8)  # absent: older records
            record = self._prepare("write", bank, fields, count=n)
            with self.seq_lock:
                first = self.last_seq + 1
                sequences = list(range(first, first + n))
                self._append(sequences[-1], record)
                self._next_seq(n)
            result = b.apply_write(slots, codes, keys, payloads, sequences, metas)
            self._index_texts(b, slots, payloads, flags)
            b.applied_seq = sequences[-1]
        self._wait(sequences[-1])
        return result

    def read(
        self,
        bank: str,
        latents: torch.Tensor,
        top_k: int = 1,
        temperature: float = 1.0,
        min_score: float | None = None,
        soft: bool = False,
        count_access: bool = True,
        where: dict[str, str] | None = None,
        nprobe: int = 0,
    ) -> ReadResult:
        """Cosine recall of queries [Q, m] float32 (latent space); see ``MemoryBank.read``.
        Holds the bank's lock shared: reads of one bank run at the same time."""
        with self._shared(bank) as b:
            return b.read(latents, top_k=top_k, temperature=temperature, min_score=min_score,
                          soft=soft, count_access=count_access, where=where, nprobe=nprobe)

    def build_index(self, bank: str) -> bool:
        """(Re)builds a bank's index now, in this thread (see ``indexing.build``)."""
        return indexing.build(self._lookup(bank))

    def has_texts(self, bank: str) -> bool:
        """Whether a bank holds text memories (its lexical index is not empty)."""
        return len(self.lexical(self._lookup(bank))) > 0

    def read_fused(self, bank: str, latents: torch.Tensor, queries: list[str], mode: str,
                   **options: Any) -> ReadResult:
        """A "lexical" or "hybrid" read of text queries; see ``hybrid.fused_read``.

        The lexical index is rebuilt (if writes changed it) before the bank lock is
        taken, so a rebuild never stalls the bank's writers.
        """
        self.lexical(self._lookup(bank)).refresh()
        with self._locked(bank) as b:
            return fused_read(b, self.lexical(b), latents, queries, mode=mode, **options)

    # ------------------------------------------------------------------ delete / clear
    def delete(self, bank: str, slots: list[int], keys: list[str]) -> tuple[int, list[str]]:
        """Frees slots by index and/or key.

        Returns:
            (number of occupied slots freed, requested keys that were not in the bank).

        Raises:
            InvalidArgument: a slot index outside the bank.
        """
        seq = None
        with self._locked(bank) as b:
            freed, missing = b.resolve_delete(list(slots), list(keys))
            if freed:
                record = self._prepare("delete", bank,
                                       {"slots": np.asarray(freed, dtype=np.int64)})
                with self.seq_lock:
                    self._append(self.last_seq + 1, record)
                    seq = self._next_seq()
                b.free(freed)
                self.lexical(b).remove(freed)
                b.applied_seq = seq
        if seq is not None:
            self._wait(seq)
        return len(freed), missing

    def clear(self, bank: str) -> BankStats:
        """Frees every slot of a bank; the bank and its totals remain."""
        with self._locked(bank) as b:
            record = self._prepare("clear", bank, {})
            with self.seq_lock:
                self._append(self.last_seq + 1, record)
                seq = self._next_seq()
            b.clear()
            self.lexical(b).clear()
            b.applied_seq = seq
            stats = b.stats()
        self._wait(seq)
        return stats

    # ------------------------------------------------------------------ state
    def export_state(self, earlier: dict[str, tuple[int, int, int]] | None = None
                     ) -> StoreState:
        """A copy of every bank that, with the log after ``last_seq``, is the live state.

        Banks are copied one at a time under their own lock (see the module
        docstring), so a snapshot never stalls the banks it is not copying.

        Args:
            earlier: stamps of an earlier copy the caller still has (a snapshot file).
                A bank whose slots are unchanged since (same identity and version) is
                copied without its slot arrays: only its config, and its access
                counters if reads changed them; it is listed in ``partial``.
        """
        with self.lock, self.seq_lock:
            banks, last_seq = sorted(self._banks.items()), self.last_seq
        copies: list[tuple[str, Any, list[int] | None]] = []
        stamps, partial = {}, set()
        for name, bank in banks:
            # a bank dropped since is still copied whole: its drop record follows S
            with bank.lock:
                stamp = bank.stamp()
                old = (earlier or {}).get(name)
                if old is not None and old[:2] == stamp[:2]:
                    # unchanged slots, so unchanged text marks: both come from the file
                    copies.append((name, bank.export_counters(old[2] != stamp[2]), None))
                    partial.add(name)
                else:
                    copies.append((name, bank.export_copy(), self.lexical(bank).text_slots()))
            stamps[name] = stamp
        out = {}
        for name, copy, text_slots in copies:
            config, arrays = copy.pack()
            if text_slots is not None:
                # slot arrays end at the last occupied slot; text slots are occupied
                flags = np.zeros(len(arrays["occupied"]), dtype=np.uint8)
                flags[text_slots] = 1
                arrays = {**arrays, "text_flags": flags}
            out[name] = (config, arrays)
        return StoreState(last_seq, out, stamps, partial)

    def stamps(self) -> dict[str, tuple[int, int, int]]:
        """``MemoryBank.stamp()`` of every bank (no locks: a change in flight may be
        missed, never invented)."""
        return {name: bank.stamp() for name, bank in self._banks.items()}

    def load_state(self, state: StoreState) -> None:
        """Replaces every bank with ``state`` (restore / recovery).

        ``last_seq`` becomes the larger of the current and the state's, so sequence
        numbers stay monotonic across a restore. Writers that were waiting for a
        replaced bank's lock retry on the new bank.

        Raises:
            FailedPrecondition: the state's codes do not match this store's codec.
        """
        banks = {}
        for name, (config, arrays) in state.banks.items():
            if int(config["code_dim"]) != self.code_dim or config["code_dtype"] != self.code_dtype:
                raise FailedPrecondition(
                    f"bank {name!r} holds {config['code_dtype']} codes of dim "
                    f"{config['code_dim']}; the served codec uses {self.code_dtype} of dim "
                    f"{self.code_dim}")
            banks[name] = MemoryBank.from_export(
                config, arrays, scale=self.scale, device=self.device,
                max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
                metric=self.metric, scorer=self.scorer, index_config=self.index_config)
            self._load_texts(banks[name], arrays.get("text_flags"))  # older: derived
        with self._all_locked() as old, self.seq_lock:
            for _, bank in old:
                bank.retired = True
            self._banks = banks
            # never backwards: mutations that finished while this waited for their bank
            # locks used numbers above a last_seq the caller may have read earlier
            self.last_seq = max(self.last_seq, int(state.last_seq))
        for bank in banks.values():  # banks restored without a stored index
            with bank.lock:
                indexing.maybe_start(bank)

    def apply_record(self, seq: int, kind: str, bank: str, fields: dict[str, Any]) -> None:
        """Re-applies one logged mutation (WAL replay): deterministic, never logged.

        Records the state already reflects are skipped: those with ``seq <= last_seq``
        (the snapshot's sequence) and those a bank's own copy holds
        (``seq <= bank.applied_seq``), so replaying a log over a snapshot that
        overlaps it is safe.

        Raises:
            FailedPrecondition: the record does not fit the current state (corrupt log).
        """
        with self.lock:
            if seq <= self.last_seq:
                return
            if kind == "create_bank":
                if bank in self._banks:
                    raise FailedPrecondition(f"replay: bank {bank!r} already exists")
                new = self._new_bank(
                    bank, int(fields["capacity"]), str(fields["policy"]),
                    float(fields["half_life"]) or self.default_half_life)
                new.applied_seq = seq
                self._banks = {**self._banks, bank: new}
                with self.seq_lock:
                    self.last_seq = seq
                return
            if kind not in ("drop_bank", "write", "delete", "clear"):
                raise FailedPrecondition(f"replay: unknown record kind {kind!r}")
            b = self._banks.get(bank)
            if b is None:
                raise FailedPrecondition(f"replay: {kind} on missing bank {bank!r}")
            with b.lock, self.seq_lock:
                if seq > b.applied_seq:
                    self._replay(b, kind, fields)
                    b.applied_seq = seq
                    if kind == "drop_bank":
                        self._banks = {n: x for n, x in self._banks.items() if n != bank}
                        b.retired = True
                self.last_seq = seq

    def _replay(self, b: MemoryBank, kind: str, fields: dict[str, Any]) -> None:
        if kind == "write":
            sequences = np.asarray(fields["sequences"], dtype=np.int64)
            # a merged run of write records may start inside what the bank's copy holds
            new = np.flatnonzero(sequences > b.applied_seq)
            if new.size == 0:
                return
            codes = torch.from_numpy(np.array(fields["codes"])[new])  # copy: may be read-only
            if codes.dtype != b.torch_dtype or tuple(codes.shape[1:]) != (b.code_dim,):
                raise FailedPrecondition("replay: write record codes do not match the bank")
            keys, payloads = fields["keys"], fields["payloads"]
            metas = fields.get("metadata")
            slots = [int(fields["slots"][i]) for i in new]
            kept = [bytes(payloads[i]) or None for i in new]
            b.apply_write(slots, codes, [keys[i] or None for i in new], kept,
                          sequences[new].tolist(),
                          [decode_metadata(metas[i]) for i in new] if metas else None)
            text = fields.get("text")  # absent from older records
            self._index_texts(b, slots, kept,
                              [bool(text[i]) for i in new] if text is not None else None)
        elif kind == "delete":
            freed = [int(s) for s in fields["slots"]]
            b.free(freed)
            self.lexical(b).remove(freed)
        elif kind == "clear":
            b.clear()
            self.lexical(b).clear()

    # defined last: inside the class body, the name ``list`` shadows the builtin
    def list(self) -> list[BankStats]:
        """Stats of every bank, sorted by name."""
        banks = sorted(self._banks.items())
        out = []
        for _, bank in banks:
            with bank.lock:
                out.append(bank.stats())
        return out

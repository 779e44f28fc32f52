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

import json
import operator

import numpy as np
import torch

from ..errors import (
    AlreadyExists,
    InvalidArgument,
    ResourceExhausted,
)
from . import bankcodec, indexing, listing
from .bank import DEFAULT_READ, MemoryBank
from .codecstage import CodecChanged, OwnCodec
from .eviction import make_policy, validate_half_life
from .fusion import MAX_CONTEXT
from .hybrid import DEFAULT_FUSION, Fusion, fused_read
from .listing import ListedMemory
from .metadata import encode_metadata, validate_metadata
from .names import shorten, validate_bank_name
from .options import ReadOptions
from .recovery import StoreRecovery
from .results import BankStats, ReadResult, SlotWrite
from .storebase import MutationLog, StoreState

__all__ = ["MemoryStore", "MutationLog", "StoreState"]


class MemoryStore(StoreRecovery):
    """All banks of one server, for one codec; constructed like ``StoreBase``."""

    def create_bank(
        self,
        name: str,
        capacity: int,
        policy: str | None = None,
        half_life: float | None = None,
        exist_ok: bool = False,
        context: int = 0,
    ) -> BankStats:
        """Creates an empty bank (or, with ``exist_ok``, returns the existing one's stats).

        ``context``: context recall of the bank's text reads by default (``fusion``).

        Raises:
            InvalidArgument: bad name, capacity outside 1..max_capacity, unknown policy,
                context outside 0..MAX_CONTEXT.
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
        if not 0 <= context <= MAX_CONTEXT:
            raise InvalidArgument(f"context must be between 0 and {MAX_CONTEXT}, got "
                                  f"{context}", field="context")
        policy = policy or self.default_policy
        half_life = half_life or self.default_half_life
        make_policy(policy, half_life)
        if policy == "lfu_decay":
            validate_half_life(half_life)
        existing = self._banks.get(name)
        if existing is None:
            self._check_new_bank(name, capacity)
            bank = self._new_bank(name, capacity, policy, half_life)  # allocate unlocked
            bank.context = int(context)
            with self.lock:
                # checked again: a concurrent create may have taken the room meanwhile
                if name not in self._banks:
                    self._check_new_bank(name, capacity)
                existing = self._banks.get(name)
                if existing is None:
                    record = self._prepare("create_bank", name, {
                        "capacity": bank.capacity, "policy": bank.policy.name,
                        "half_life": bank.policy.half_life, "context": bank.context})
                    with self.seq_lock:
                        self._append(self.last_seq + 1, record)
                        seq = self._next_seq()
                    bank.applied_seq = seq
                    self._banks = {**self._banks, name: bank}
                    stats = self._stats(bank)  # nobody else can hold the new bank's lock yet
        if existing is not None:
            if not exist_ok:
                raise AlreadyExists(f"bank {shorten(name)} already exists", field="name")
            with existing.lock:
                return self._stats(existing)
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

    def describe(self, name: str) -> BankStats:
        """A bank's stats; the lock is held shared, so a scrape never waits for reads
        (only the counters, which reads change, need ``counter_lock``)."""
        with self._shared(name) as bank, bank.counter_lock:
            return self._stats(bank)

    def page(self, bank: str, offset: int, limit: int) -> tuple[int, list[ListedMemory]]:
        """A page of a bank's memories, newest first (``listing.page``); lock shared."""
        with self._shared(bank) as b, b.counter_lock:
            return listing.page(b, offset, limit)

    def write(
        self,
        bank: str,
        codes: torch.Tensor,
        keys: list[str | None],
        payloads: list[bytes | None],
        metadata: list[dict[str, str] | None] | None = None,
        text: list[bool] | None = None,
        items: np.ndarray | None = None,
        generation: int | None = None,
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
            items: None, or the n float items [n, d] the codes encode (a bank on the
                served model stages them for a codec of its own, ``bankcodec``).
            generation: the bank's ``codec_generation`` the codes were encoded for
                (None: not checked).

        Returns:
            One ``SlotWrite`` per code, in order.

        Raises:
            CodecChanged: the bank is at another codec generation (encode again).
        """
        with self._locked(bank) as b:
            if generation is not None and generation != b.codec_generation:
                raise CodecChanged(b.name)
            keys, payloads = b.validate_write(codes, keys, payloads)
            n = codes.shape[0]
            assert not metadata or len(metadata) == n, (n, len(metadata))
            metas = [validate_metadata(m) for m in metadata] if metadata else None
            encoded = [encode_metadata(m) for m in metas] if metas and any(metas) else None
            flags = [bool(t) for t in text] if text else [False] * n
            assert len(flags) == n, (n, len(flags))
            staged, stage, staging_bytes = 0, None, 0
            if items is not None and b.staging is not None:
                staged, staging_bytes = b.staging.room(n), b.staging.added_bytes(n)
            self._check_write_room(keys, payloads, encoded, flags, staging_bytes)
            # planning only compares new sequences with the bank's, which are all below
            # last_seq + 1 (and cannot change while we hold its lock): no store lock needed
            slots = b.plan_write(keys, self.last_seq + 1)
            fields = {
                "slots": np.asarray(slots, dtype=np.int64),
                "codes": codes.detach().cpu().numpy().copy(),
                "keys": [k or "" for k in keys],
                "payloads": [p or b"" for p in payloads],
            }
            if encoded:  # absent from older records and metadata-less writes
                fields["metadata"] = encoded
            fields["text"] = np.asarray(flags, dtype=np.uint8)  # absent: older records
            if staged:  # replay stages them again
                assert items is not None
                stage = np.ascontiguousarray(items[:staged], dtype=np.float32)
                fields["items"] = stage
            record = self._prepare("write", bank, fields, count=n)
            with self.seq_lock:
                first = self.last_seq + 1
                sequences = list(range(first, first + n))
                self._append(sequences[-1], record)
                self._next_seq(n)
            result = b.apply_write(slots, codes, keys, payloads, sequences, metas)
            self.texts.written(b, slots, payloads, flags)
            if stage is not None and b.staging is not None:
                b.staging.add(slots, sequences, stage)
            b.applied_seq = sequences[-1]
            indexing.maybe_start(b, self.index_built)
            if self.fitter is not None:
                bankcodec.fit_in_background(b, self.fitter, self.swap_codec)
        self._wait(sequences[-1])
        return result

    def fit_pending(self) -> None:
        """Starts the fit of every bank that staged enough items before a restart."""
        if self.fitter is None:
            return
        for bank in list(self._banks.values()):
            with bank.lock:
                bankcodec.fit_in_background(bank, self.fitter, self.swap_codec)

    def fit_codec(self, bank: str) -> bool:
        """Fits and swaps in a bank's own codec now, in this thread, if it has staged
        enough items (``bankcodec.fit_now``)."""
        b = self._lookup(bank)
        if self.fitter is None:
            return False
        with b.lock:
            if not bankcodec.wants_fit(b, self.fitter.threshold):
                return False
            b.codec_fitting = True
        try:
            return bankcodec.fit_now(b, self.fitter, self.swap_codec)
        finally:
            b.codec_fitting = False

    def swap_codec(self, bank: MemoryBank, own: OwnCodec, generation: int) -> bool:
        """Installs a bank's freshly fitted codec (step 3 of ``bankcodec``): every
        occupied slot re-encoded, one ``codec`` record logged. False (nothing changed)
        if the bank was dropped, replaced or swapped since the fit began."""
        assert self.fitter is not None
        seq = None
        with bank.lock:
            if bank.retired or bank.codec_generation != generation or bank.staging is None:
                return False
            slots, wire = bankcodec.recode(bank, own.codec, self.fitter)
            config, arrays = own.codec.state()
            fields: dict = {f"codec.{k}": v for k, v in arrays.items()}
            fields.update({
                "config": json.dumps(config), "fitted_on": own.fitted_on,
                "fitted_at": own.fitted_at, "held_out_mse": own.held_out_mse,
                "replaced_mse": own.replaced_mse, "slots": slots.astype(np.int64),
                "codes": wire.cpu().numpy()})
            record = self._prepare("codec", bank.name, fields)
            with self.seq_lock:
                self._append(self.last_seq + 1, record)
                seq = self._next_seq()
            bankcodec.install(bank, own, slots, wire)
            self.start_staging(bank)
            bank.applied_seq = seq
            indexing.maybe_start(bank, self.index_built)
        self._wait(seq)
        self.index_built(bank.name)  # its listeners snapshot the bank: restarts skip the fit
        return True

    def _check_write_room(self, keys: list[str | None], payloads: list[bytes | None],
                          metadata: list[bytes] | None, text: list[bool],
                          staging: int = 0) -> None:
        """Charges a write's bytes against the memory limit before it is logged: keys,
        payloads, metadata, the lexical index's own copy of each text (its token
        ids and matrix are counted once the next lexical read builds them), and the
        rows the bank's staging grows by."""
        parts = {
            "staged items": staging,
            "payloads": sum(len(p) for p in payloads if p),
            "keys": sum(len(k.encode()) for k in keys if k),
            "metadata": sum(len(m) for m in metadata) if metadata else 0,
            "lexical index": sum(len(p) for p, t in zip(payloads, text, strict=True)
                                 if t and p),
        }
        added = sum(parts.values())
        what = ", ".join(f"{v} of {k}" for k, v in parts.items() if v)
        self._check_memory(added, f"this write ({what} bytes)")

    def read(self, bank: str, latents: torch.Tensor,
             options: ReadOptions = DEFAULT_READ, generation: int | None = None
             ) -> ReadResult:
        """Cosine recall of queries [Q, m] float32 (latent space); see ``MemoryBank.read``.
        Holds the bank's lock shared: reads of one bank run at the same time.

        Raises:
            CodecChanged: the latents were encoded for another ``generation`` of the
                bank's codec.
        """
        with self._shared(bank) as b:
            _check_generation(b, generation)
            return b.read(latents, options)

    def build_index(self, bank: str) -> bool:
        """(Re)builds a bank's index now, in this thread (see ``indexing.build``)."""
        built = indexing.build(self._lookup(bank))
        if built:
            self.index_built(bank)
        return built

    def has_texts(self, bank: str) -> bool:
        """Whether a bank holds text memories (its lexical index is not empty)."""
        return len(self.texts.of(self._lookup(bank))) > 0

    def read_fused(self, bank: str, latents: torch.Tensor, queries: list[str], mode: str,
                   options: ReadOptions = DEFAULT_READ,
                   fusion: Fusion = DEFAULT_FUSION, generation: int | None = None
                   ) -> ReadResult:
        """A "lexical" or "hybrid" read of text queries (or "dense" with context); see
        ``hybrid.fused_read``.

        The lexical index is rebuilt (if writes changed it) before the bank lock is
        taken, so a rebuild never stalls the bank's writers.
        """
        self.texts.of(self._lookup(bank)).refresh()
        with self._shared(bank) as b:
            _check_generation(b, generation)
            return fused_read(b, self.texts.of(b), latents, queries, mode=mode, options=options,
                              fusion=fusion)

    def delete(self, bank: str, slots: list[int], keys: list[str], *,
               sequences: list[int] | None = None,
               dry_run: bool = False) -> tuple[int, list[str]]:
        """Frees slots by index and/or key.

        Args:
            sequences: one per slot: free it only while it holds that write sequence
                (checked under the bank lock, so a concurrent write is never freed).
            dry_run: count what would be freed, free nothing.

        Returns:
            (number of occupied slots freed, requested keys that were not in the bank).

        Raises:
            InvalidArgument: a slot index outside the bank.
        """
        seq = None
        with self._locked(bank) as b:
            freed, missing = b.resolve_delete(list(slots), list(keys), sequences)
            if freed and not dry_run:
                record = self._prepare("delete", bank,
                                       {"slots": np.asarray(freed, dtype=np.int64)})
                with self.seq_lock:
                    self._append(self.last_seq + 1, record)
                    seq = self._next_seq()
                b.free(freed)
                self.texts.of(b).remove(freed)
                b.applied_seq = seq
        if seq is not None:
            self._wait(seq)
        return len(freed), missing

    def set_metadata(self, bank: str, slot: int, sequence: int,
                     metadata: dict[str, str] | None) -> bool:
        """Replaces one memory's metadata, logged like any mutation; False (and nothing
        changed) when ``slot`` no longer holds the memory of write ``sequence``.

        Raises:
            InvalidArgument: metadata over the bounds (``metadata.validate_metadata``).
        """
        meta = validate_metadata(metadata)
        with self._locked(bank) as b:
            if not b.holds(slot, sequence):
                return False
            record = self._prepare("metadata", bank, {
                "slots": np.asarray([slot], dtype=np.int64),
                "metadata": [encode_metadata(meta)]})
            with self.seq_lock:
                self._append(self.last_seq + 1, record)
                seq = self._next_seq()
            b.replace_metadata(slot, meta)
            b.applied_seq = seq
        self._wait(seq)
        return True

    def clear(self, bank: str) -> BankStats:
        """Frees every slot of a bank; the bank and its totals remain."""
        with self._locked(bank) as b:
            record = self._prepare("clear", bank, {})
            with self.seq_lock:
                self._append(self.last_seq + 1, record)
                seq = self._next_seq()
            b.clear()
            self.texts.of(b).clear()
            b.applied_seq = seq
            stats = self._stats(b)
        self._wait(seq)
        return stats

    def list(self) -> list[BankStats]:
        """Stats of every bank, sorted by name."""
        banks = sorted(self._banks.items())
        out = []
        for _, bank in banks:
            with bank.lock.shared(), bank.counter_lock:  # see ``describe``
                out.append(self._stats(bank))
        return out


def _check_generation(bank: MemoryBank, generation: int | None) -> None:
    if generation is not None and generation != bank.codec_generation:
        raise CodecChanged(bank.name)

"""A memory bank: the paper's slot memory ``M`` [capacity, m] of codes, with counters.

State per slot: the code (in the codec's code dtype), an ``occupied`` flag (separate
from the counters: a counter reset to 0 does not mean "free"), the access count and
the write clock of its last update (lazy decay, see ``eviction``), the write
sequence number (age), the inverse L2 norm of the *dequantised* code (so cosine
search is one matrix product), and optionally a key and an opaque payload.

Write (the paper's): each code goes to the slot of its key if the key exists
(replaced, counter reset), else to the first free slot (lowest index), else to the
policy's victim (see ``eviction``). A new memory's count is the policy's initial
count (0 under "lfu", one access under "lfu_decay").

Read (the paper's): cosine similarity of each query with every occupied slot, a
softmax with temperature T over the occupied slots gives the weights, hits are the
top-k by score (optionally filtered by ``min_score``). Only the best slot ``i*`` of
each query has its counter incremented (the paper's ``AFF_ctrl[i*] += 1``; the
other top-k hits are not counted), and only if ``i*`` is returned (passes
``min_score``). Reading an empty bank returns no hits, not an error.

Lock discipline: ``bank.lock`` is a readers-writer lock (``rwlock``). Every
mutation, export and stats call assumes the caller holds it exclusively (``with
bank.lock``); ``read`` assumes it is held shared (``with bank.lock.shared()``), so
reads of one bank scan it at the same time. The only state a read changes, the
access counters (``counts``, ``count_clock``, ``reads_total``), it changes after its
scan under the short ``counter_lock``; writers need not take that lock, since no
reader is inside while they hold ``lock`` exclusively. Methods validate everything
before mutating, so a rejected request leaves no trace.

Memory grows with what is stored: the per-slot tensors hold ``rows`` slots, grown
geometrically (``ROW_GROWTH``) up to ``capacity`` when a write needs a slot beyond
them (slots at or past ``rows`` are free). Keys, payloads and metadata live in ``columns`` (one
arena each, no Python object per memory).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ..code_dtypes import CODE_DTYPES
from ..errors import FailedPrecondition, InvalidArgument
from .columns import ByteColumn, KeyIndex
from .eviction import Policy, VictimQueue, make_policy
from .ivf import IndexConfig, InvertedLists, IvfIndex
from .metadata import decode_metadata, encode_metadata
from .names import validate_key
from .rwlock import ReadWriteLock
from .scoring import CodeScorer

# Rows scanned at a time by a read on CPU: small enough that the float32 copy of an
# int8/float16 chunk and its scores stay in cache, large enough to amortise per-call
# overhead (measured by ``apcm bench read``).
READ_CHUNK_ROWS = 4096
# Rows a codec's scorer decodes at once: its unpacking makes int64 temporaries of
# ~12 KB per row, so 1,024 rows stay in cache; 4,096 measured 4x slower per row.
_SCORER_CHUNK_ROWS = 1024
# Rows per int8 x int8 matmul call of a single-query int8 read (3 MB at m = 192: the
# second and third limb read the chunk from cache).
_INT8_CHUNK_ROWS = 16384
# Lookup-table scoring costs per code and query (0.37 us here), a decode per code
# (1.6 us) shared by every query of the read: above this many queries, decode.
LUT_MAX_QUERIES = 4
_SCORE_SPAN_FLOATS = 1 << 18  # scores post-processed at once on CPU (1 MB)
_MIN_EXP_SUM = 1e-30
_FREE_SCAN_ROWS = 65536
EXHAUSTIVE = -1  # a read's ``nprobe`` that scans every slot even when the bank is indexed
INITIAL_ROWS = 1024  # slots a new bank allocates
# Rows grow by this factor when a write needs more: at most 12.5% (~6% on average)
# of the per-slot tensors are spare, at the price of ~9 copies of each row over a
# fill (a memcpy: negligible next to the writes themselves).
ROW_GROWTH = 1.125
_SLOT_TENSORS = ("codes", "occupied", "counts", "count_clock", "sequences", "inv_norms")
_uids = itertools.count(1)

@dataclass(frozen=True)
class SlotWrite:
    """What one written code did (the proto's ``WrittenSlot``)."""

    slot: int
    key: str | None
    evicted: bool
    evicted_key: str | None
    sequence: int
    replaced: bool


@dataclass
class Hit:
    """One recalled memory.

    Attributes:
        code: the stored code [m] in the code dtype (a copy; safe outside the lock).
    """

    slot: int
    key: str | None
    score: float
    weight: float
    sequence: int
    payload: bytes | None
    code: torch.Tensor
    metadata: dict[str, str] | None = None


@dataclass
class QueryResult:
    hits: list[Hit] = field(default_factory=list)


@dataclass
class ReadResult:
    """One ``QueryResult`` per query; ``soft`` is the softmax-weighted mix of the
    dequantised codes [Q, m] float32 (latent space; with a scorer, its search space
    [Q, search_dim]), or None when not requested or the bank is empty."""

    results: list[QueryResult]
    soft: torch.Tensor | None = None


@dataclass
class _Scan:
    """What one pass over the bank found for queries [Q, m]."""

    top_scores: torch.Tensor  # [Q, k] cosine, best first
    top_slots: torch.Tensor  # [Q, k] int64
    exp_sum: torch.Tensor  # [Q] sum over occupied slots of exp((score - shift) / T)
    shift: torch.Tensor | float  # [Q, 1], or one shift for all queries
    soft_sum: torch.Tensor | None  # [Q, m] sum of exp(...) * code (before the int8 scale)


@dataclass(frozen=True)
class BankStats:
    name: str
    capacity: int
    occupied: int
    policy: str
    half_life: float
    code_dim: int
    code_dtype: str
    evictions_total: int
    writes_total: int
    reads_total: int
    counter_min: float
    counter_max: float
    counter_mean: float
    memory_bytes: int
    payload_bytes: int
    reserved_bytes: int = 0
    index: IndexStats | None = None


@dataclass(frozen=True)
class IndexStats:
    """A bank's approximate index (``DescribeBank``'s ``index``).

    Attributes:
        state: "none" (reads scan), "training" (the first index is being built;
            reads scan), "ready" or "retraining" (reads search the index; a
            replacement is being built).
        lists: inverted lists (centroids); 0 without an index.
        trained_at: occupied slots the centroids were trained on.
        nprobe: lists a read probes by default.
        slots: slots in the lists (== occupied when ready).
        threshold: occupied slots from which the bank is indexed (0: never).
    """

    state: str
    lists: int
    trained_at: int
    nprobe: int
    slots: int
    threshold: int


class MemoryBank:
    """Slots of codes on one device. Not thread-safe by itself: hold ``lock``.

    Args:
        name: validated bank name.
        capacity: number of slots.
        code_dim: m.
        code_dtype: "float32", "float16" or "int8".
        scale: per-dimension int8 step [m] (the codec's ``quantizer.scale``), else None.
        device: where codes live.
        metric: per-dimension weights [m] applied to latents before cosine (the codec's
            ``similarity_weights``), else None.
        scorer: maps queries and codes to vectors whose cosine is the score (codecs
            with packed codes, e.g. ``uint8``); then ``scale`` and ``metric`` are unused
            and reads take latents of width ``scorer.query_dim``.
        policy: eviction policy.
        max_payload_bytes: largest payload per memory.
        max_key_length: longest key.
        index_config: when the bank builds an approximate index (None: never).
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        code_dim: int,
        code_dtype: str,
        scale: torch.Tensor | None,
        device: torch.device,
        policy: Policy,
        max_payload_bytes: int,
        max_key_length: int,
        metric: torch.Tensor | None = None,
        scorer: CodeScorer | None = None,
        index_config: IndexConfig | None = None,
    ) -> None:
        self.name = name
        self.capacity = int(capacity)
        self.code_dim = int(code_dim)
        self.code_dtype = code_dtype
        self.torch_dtype = CODE_DTYPES[code_dtype]
        self.device = torch.device(device)
        self.scale = scale.float().to(self.device) if code_dtype == "int8" and scale is not None \
            else None
        if code_dtype == "int8" and self.scale is None:
            raise ValueError("int8 banks need the quantiser's per-dimension scale")
        if code_dtype == "uint8" and scorer is None:
            raise ValueError("uint8 (packed) banks need the codec's scorer")
        self.scorer = scorer
        self.query_dim = scorer.query_dim if scorer is not None else self.code_dim
        self.metric = metric.float().to(self.device) if metric is not None else None
        # what a normalised (weighted) query is multiplied by to score raw codes
        fold = [t for t in (self.scale, self.metric) if t is not None]
        self._query_fold = fold[0] * fold[1] if len(fold) == 2 else (fold[0] if fold else None)
        self.policy = policy
        self.max_payload_bytes = max_payload_bytes
        self.max_key_length = max_key_length
        self.lock = ReadWriteLock()
        self.counter_lock = threading.Lock()  # access counters, taken by readers
        # set (under ``lock``) when the bank is dropped or replaced by a restore, so a
        # thread that looked it up before and then waited for its lock can notice
        self.retired = False
        # identity and change counters, so a snapshot can tell an unchanged bank
        self.uid = next(_uids)
        self.version = 0  # bumped by every mutation of slots
        self.counter_version = 0  # bumped when reads count accesses

        self._allocate(min(self.capacity, INITIAL_ROWS))
        self.keys = ByteColumn(self.rows)
        self.payloads = ByteColumn(self.rows)
        self.metadata = ByteColumn(self.rows)  # ``encode_metadata`` JSON
        self._key_index = KeyIndex(self.keys)
        self._meta_index: dict[tuple[str, str], set[int]] = {}
        self._occupied_count = 0
        self._high = 0  # one past the highest slot ever occupied since the last clear
        self._free_hint = 0  # every slot below it is occupied
        self.write_clock = 0
        # sequence of the last logged mutation applied here (snapshots copy banks one
        # at a time, so replay skips a bank's records up to its own copy)
        self.applied_seq = 0
        self.writes_total = 0
        self.evictions_total = 0
        self.reads_total = 0
        # the approximate index (see ``ivf`` and ``indexing``), kept exact by every
        # mutation below; ``index_epoch`` changes when a clear or restore makes an
        # index built from an earlier copy useless, and ``index_journal`` collects the
        # slots written or freed while a background build works from a copy
        self.index_config = index_config or IndexConfig()
        self.index: IvfIndex | None = None
        self.index_training = False
        self.index_epoch = 0
        self.index_journal: set[int] | None = None

    def _allocate(self, rows: int) -> None:
        """Fresh zeroed per-slot tensors of ``rows`` slots."""
        dev = self.device
        self.codes = torch.zeros(rows, self.code_dim, dtype=self.torch_dtype, device=dev)
        self.occupied = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(rows, dtype=torch.float64, device=dev)
        self.count_clock = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.sequences = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.inv_norms = torch.zeros(rows, dtype=torch.float32, device=dev)

    @property
    def rows(self) -> int:
        """Slots the per-slot tensors hold now (<= capacity)."""
        return int(self.occupied.shape[0])

    def rows_for(self, slot_end: int) -> int:
        """Rows the tensors would hold to store slots below ``slot_end`` (geometric)."""
        rows = max(self.rows, 1)
        while rows < slot_end:
            rows = max(rows + 1, int(rows * ROW_GROWTH))
        return min(max(rows, self.rows), self.capacity)

    def _grow(self, slot_end: int) -> None:
        rows = self.rows_for(slot_end)
        if rows <= self.rows:
            return
        old = self.rows
        for name in _SLOT_TENSORS:
            t = getattr(self, name)
            # Only ``occupied`` must be valid past the old rows: slots at or above
            # ``_high`` are never scanned, exported or ranked (they are free), so the
            # rest stay untouched pages, which are not resident until written.
            new = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
            new[:old] = t
            if name == "occupied":
                new[old:] = False
            setattr(self, name, new)
        for col in (self.keys, self.payloads, self.metadata):
            col.grow(rows)
        if self.index is not None:
            self.index.lists.grow(rows)

    # ------------------------------------------------------------------ queries
    @property
    def occupied_count(self) -> int:
        return self._occupied_count

    def slot_of(self, key: str) -> int | None:
        return self._key_index.get(key.encode())

    def key_of(self, slot: int) -> str | None:
        raw = self.keys.get(slot) if 0 <= slot < self.rows else None
        return raw.decode() if raw is not None else None

    def payload_of(self, slot: int) -> bytes | None:
        return self.payloads.get(slot) if 0 <= slot < self.rows else None

    def metadata_of(self, slot: int) -> dict[str, str] | None:
        raw = self.metadata.get(slot) if 0 <= slot < self.rows else None
        return decode_metadata(raw) if raw is not None else None

    def mean_entry_bytes(self) -> tuple[float, float]:
        """Mean UTF-8 bytes of a key and mean bytes of a payload over occupied slots."""
        n = max(self._occupied_count, 1)
        return self.keys.live / n, self.payloads.live / n

    def effective_counts(self) -> torch.Tensor:
        """[rows] float64 access counts at the current write clock."""
        return self.policy.effective(self.counts, self.count_clock, self.write_clock)

    def stats(self) -> BankStats:
        if self._occupied_count:
            eff = self.effective_counts()[self.occupied]
            cmin, cmax, cmean = float(eff.min()), float(eff.max()), float(eff.mean())
        else:
            cmin = cmax = cmean = 0.0
        return BankStats(
            name=self.name, capacity=self.capacity, occupied=self._occupied_count,
            policy=self.policy.name, half_life=self.policy.half_life, code_dim=self.code_dim,
            code_dtype=self.code_dtype, evictions_total=self.evictions_total,
            writes_total=self.writes_total, reads_total=self.reads_total,
            counter_min=cmin, counter_max=cmax, counter_mean=cmean,
            memory_bytes=self.memory_bytes(), payload_bytes=self.payloads.live,
            reserved_bytes=self.reserved_bytes(), index=self.index_stats(),
        )

    def index_stats(self) -> IndexStats:
        index, cfg = self.index, self.index_config
        if index is None:
            state = "training" if self.index_training else "none"
        else:
            state = "retraining" if self.index_training else "ready"
        return IndexStats(state=state, lists=index.k if index else 0,
                          trained_at=index.trained_at if index else 0, nprobe=cfg.nprobe,
                          slots=len(index.lists) if index else 0, threshold=cfg.threshold)

    @staticmethod
    def slot_bytes(code_dim: int, code_dtype: str) -> int:
        """Bytes per slot of the per-slot tensors: its code and counters."""
        code = code_dim * torch.empty((), dtype=CODE_DTYPES[code_dtype]).element_size()
        return code + 1 + 8 + 8 + 8 + 4  # occupied, counts, count_clock, sequences, inv_norms

    @property
    def payload_bytes(self) -> int:
        return self.payloads.live

    def memory_bytes(self) -> int:
        """Bytes held now, payloads aside: per-slot tensors of ``rows`` slots, the
        key and metadata columns and the payload column's overhead (its arena slack
        and index arrays), and the key index. Grows with what is stored."""
        tensors = sum(getattr(self, n).numel() * getattr(self, n).element_size()
                      for n in _SLOT_TENSORS)
        columns = self.keys.nbytes() + self.metadata.nbytes() + self.payloads.nbytes()
        index = self.index.nbytes() if self.index is not None else 0
        return tensors + columns - self.payloads.live + self._key_index.nbytes() + index

    def reserved_bytes(self) -> int:
        """What the server's memory limit counts for this bank besides payloads: every
        slot of ``capacity`` (a bank may always fill up) plus keys and metadata."""
        slots = self.capacity * self.slot_bytes(self.code_dim, self.code_dtype)
        return slots + self.keys.live + self.metadata.live

    # ------------------------------------------------------------------ write
    def validate_write(
        self, codes: torch.Tensor, keys: list[str | None], payloads: list[bytes | None]
    ) -> tuple[list[str | None], list[bytes | None]]:
        """Checks a write; returns keys and payloads normalised to one per code.

        Args:
            codes: [n, m] in the bank's code dtype, n >= 1.
            keys: [] (no keys) or n entries, None or "" meaning no key.
            payloads: [] (none) or n entries, None or b"" meaning no payload.
        """
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 \
                or codes.shape[1] != self.code_dim or codes.shape[0] < 1:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)
            raise InvalidArgument(
                f"codes must have shape [n >= 1, {self.code_dim}], got {shape}", field="codes")
        if codes.dtype != self.torch_dtype:
            raise InvalidArgument(
                f"codes must be {self.code_dtype}, got {str(codes.dtype).replace('torch.', '')}",
                field="codes")
        if codes.is_floating_point() and not bool(torch.isfinite(codes).all()):
            raise InvalidArgument("codes contain NaN or infinity", field="codes")
        n = codes.shape[0]
        keys = list(keys) if keys else [None] * n
        payloads = list(payloads) if payloads else [None] * n
        if len(keys) != n:
            raise InvalidArgument(f"got {len(keys)} keys for {n} memories", field="keys")
        if len(payloads) != n:
            raise InvalidArgument(f"got {len(payloads)} payloads for {n} memories",
                                  field="payloads")
        keys = [validate_key(k, self.max_key_length) if k else None for k in keys]
        given = [k for k in keys if k is not None]
        if len(set(given)) != len(given):
            raise InvalidArgument("a key appears more than once in one write", field="keys")
        for p in payloads:
            if p is not None and not isinstance(p, bytes | bytearray | memoryview):
                raise InvalidArgument("payloads must be bytes", field="payloads")
            if p is not None and len(p) > self.max_payload_bytes:
                raise InvalidArgument(
                    f"payload of {len(p)} bytes exceeds the limit of {self.max_payload_bytes}",
                    field="payloads")
        return keys, [bytes(p) if p else None for p in payloads]

    def plan_write(self, keys: list[str | None], first_sequence: int) -> list[int]:
        """Slot for each code of a validated write, in order (does not mutate the bank).

        Args:
            keys: one per code (None for none).
            first_sequence: sequence number the first code will get (the rest follow).
        """
        n = len(keys)
        free = self._first_free(n)
        queue = None
        if n > len(free):
            rank = self.policy.rank(self.counts, self.count_clock)
            if self._occupied_count < self.rows:
                rank = rank.masked_fill(~self.occupied, math.inf)
            # each item consumes at most one pre-selected slot (evicts it, or overwrites
            # it in place by key), so n candidates always suffice
            queue = VictimQueue(self.policy, rank, self.sequences,
                                min(self._occupied_count, n))
        key_slot: dict[str, int | None] = {}
        slot_key: dict[int, str | None] = {}
        slots: list[int] = []
        next_free = 0
        for j, key in enumerate(keys):
            slot = (key_slot[key] if key in key_slot else self.slot_of(key)) \
                if key is not None else None
            if slot is None:
                if next_free < len(free):
                    slot, next_free = free[next_free], next_free + 1
                else:
                    assert queue is not None
                    slot = queue.pop()
            old = slot_key[slot] if slot in slot_key else self.key_of(slot)
            if old is not None:
                key_slot[old] = None
            if key is not None:
                key_slot[key] = slot
            slot_key[slot] = key
            if queue is not None:
                queue.written(slot, self.write_clock + j + 1, first_sequence + j)
            slots.append(slot)
        return slots

    def apply_write(
        self,
        slots: list[int],
        codes: torch.Tensor,
        keys: list[str | None],
        payloads: list[bytes | None],
        sequences: list[int],
        metadata: list[dict[str, str] | None] | None = None,
    ) -> list[SlotWrite]:
        """Stores code j in ``slots[j]`` in order (later items win a repeated slot).

        Used by ``write`` (after ``plan_write``) and by WAL replay, so both derive
        evictions, keys and counters the same way. Item j is written at write clock
        ``write_clock + j + 1``.

        Args:
            slots: n slot indices.
            codes: [n, m] validated codes.
            keys, payloads: n entries each (None for none).
            sequences: n write sequence numbers.
            metadata: None, or n validated string maps (None for none).
        """
        n = len(slots)
        self._grow(max(slots) + 1)
        slot_t = torch.tensor(slots, dtype=torch.int64, device=self.device)
        was_occupied = self.occupied[slot_t].tolist()
        seen: set[int] = set()
        out = []
        for j, slot in enumerate(slots):
            key, payload = keys[j], payloads[j]
            occupied_before = was_occupied[j] or slot in seen
            raw = key.encode() if key is not None else None
            other = self._key_index.get(raw) if raw is not None else None
            if other is not None and other != slot:  # replay of an inconsistent log
                raise FailedPrecondition(f"key {key!r} is already at slot {other}")
            old_raw = self.keys.get(slot)
            old_key = old_raw.decode() if old_raw is not None else None
            replaced = key is not None and key == old_key
            evicted = occupied_before and not replaced
            if old_raw is not None:
                self._key_index.remove(old_raw)
            self.keys.set(slot, raw)
            if raw is not None:
                self._key_index.add(raw, slot)
            self.payloads.set(slot, payload)
            self._set_metadata(slot, metadata[j] if metadata else None)
            if not occupied_before:
                self._occupied_count += 1
            self.evictions_total += int(evicted)
            seen.add(slot)
            out.append(SlotWrite(slot, key, evicted, old_key if evicted else None,
                                 sequences[j], replaced))

        last = {slot: j for j, slot in enumerate(slots)}
        dst = torch.tensor(list(last.keys()), dtype=torch.int64, device=self.device)
        src = torch.tensor(list(last.values()), dtype=torch.int64, device=self.device)
        new = codes.to(self.device)[src]
        self.codes[dst] = new
        z = self.search_vectors(new)
        inv = _inverse(z.norm(dim=1))
        self.inv_norms[dst] = inv
        self.occupied[dst] = True
        self.sequences[dst] = torch.tensor(sequences, dtype=torch.int64, device=self.device)[src]
        self.counts[dst] = self.policy.initial_count
        self.count_clock[dst] = self.write_clock + 1 + src
        self.write_clock += n
        self.writes_total += n
        self.version += 1
        self._high = max(self._high, max(slots) + 1)
        self._index_written(dst, z * inv[:, None])
        return out

    # ------------------------------------------------------------------ index upkeep
    def _index_written(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Keeps the index exact after slots [n] got codes with unit search rows [n, d]."""
        if self.index is not None:
            self.index.place(slots.cpu().numpy(), rows.cpu())
        if self.index_journal is not None:
            self.index_journal.update(slots.tolist())
        from . import indexing  # indexing imports this module
        indexing.maybe_start(self)

    def _index_freed(self, slots: list[int]) -> None:
        if self.index is not None:
            for s in slots:
                self.index.lists.remove(s)
        if self.index_journal is not None:
            self.index_journal.update(slots)

    def _index_cleared(self) -> None:
        """A cleared bank drops its index: centroids trained on what it held would
        not fit what it holds next; it is retrained once it crosses the threshold."""
        self.index = None
        self.index_journal = None
        self.index_epoch += 1

    def search_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [n, m] -> the vectors [n, d] float32 a read's cosine compares the query
        with (dequantised or decoded by the scorer, times the similarity weights);
        divided by their norm they are a slot's unit search row."""
        z = self._dequantize(codes)
        return z * self.metric if self.metric is not None else z

    def search_rows(self, codes: torch.Tensor, inv_norms: torch.Tensor) -> torch.Tensor:
        """Unit search rows [n, d] of codes [n, m] with their inverse norms [n]."""
        return self.search_vectors(codes) * inv_norms[:, None]

    def _set_metadata(self, slot: int, meta: dict[str, str] | None) -> None:
        """Replaces a slot's metadata, keeping the (key, value) -> slots index in step."""
        old = self.metadata_of(slot)
        for item in (old or {}).items():
            slots = self._meta_index.get(item)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._meta_index[item]
        self.metadata.set(slot, encode_metadata(meta) if meta else None)
        for item in (meta or {}).items():
            self._meta_index.setdefault(item, set()).add(slot)

    def _filter_mask(self, where: dict[str, str]) -> tuple[torch.Tensor, int]:
        """Occupied slots whose metadata has every (key, value) of ``where``: a bool
        mask [rows] and its count."""
        matched: set[int] | None = None
        for item in where.items():
            slots = self._meta_index.get(item, set())
            matched = set(slots) if matched is None else matched & slots
            if not matched:
                break
        mask = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        if matched:
            mask[torch.tensor(sorted(matched), dtype=torch.int64, device=self.device)] = True
        return mask, len(matched or ())

    def cosines_of(self, latent: torch.Tensor, slots: list[int]) -> list[float]:
        """Cosine, exactly as a read scores it, of one query latent [query_dim] with the
        given occupied slots (hybrid recall needs it for memories the dense cut missed)."""
        if not slots:
            return []
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        z = self._dequantize(self.codes[idx])
        q = latent.to(self.device, torch.float32)[None]
        if self.scorer is not None:
            q = self.scorer.queries(q)
        if self.metric is not None:
            z, q = z * self.metric, q * self.metric
        q = q[0] / q[0].norm().clamp_min(1e-30)
        return ((z @ q) * self.inv_norms[idx]).tolist()

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        if self.scorer is not None:
            return self.scorer.codes(codes)
        z = codes.float()
        return z * self.scale if self.scale is not None else z

    def _first_free(self, n: int) -> list[int]:
        """Up to ``n`` free slots, lowest index first (slots past ``rows`` are free)."""
        need = min(n, self.capacity - self._occupied_count)
        found: list[int] = []
        start, rows = self._free_hint, self.rows
        while len(found) < need and start < rows:
            end = min(rows, start + _FREE_SCAN_ROWS)
            idx = torch.nonzero(~self.occupied[start:end]).flatten()
            if not found:
                self._free_hint = start + int(idx[0]) if idx.numel() else end
            found.extend((idx[: need - len(found)] + start).tolist())
            start = end
        start = max(start, rows)
        found.extend(range(start, start + need - len(found)))
        return found

    # ------------------------------------------------------------------ read
    def read(
        self,
        latents: torch.Tensor,
        top_k: int = 1,
        temperature: float = 1.0,
        min_score: float | None = None,
        soft: bool = False,
        count_access: bool = True,
        where: dict[str, str] | None = None,
        nprobe: int = 0,
    ) -> ReadResult:
        """The paper's read, batched, with top-k, min_score and the soft read.

        A bank with an index (``ivf``) answers with it unless the read is soft or
        ``nprobe`` is ``EXHAUSTIVE``: each query's ``nprobe`` nearest lists are
        gathered and their slots scored exactly like the scan scores them, so hits
        differ from the scan's only by memories outside the probed lists. An
        approximate read's softmax weights are normalised over the probed candidates,
        not over the whole bank. Where too few candidates survive (fewer than top_k
        after the ``where`` filter), that query is scanned.

        Args:
            latents: queries [Q, m] float32 in latent (dequantised) space.
            top_k: hits per query (clamped to the occupied count), >= 1.
            temperature: softmax temperature over cosine scores, > 0.
            min_score: drop hits with a lower cosine score.
            soft: also return the softmax-weighted mix of codes [Q, m] float32.
            count_access: increment the counter of each query's returned best hit.
            where: metadata equality filter, applied before top-k: only memories whose
                metadata holds every (key, value) are scored, ranked and weighted.
            nprobe: lists an indexed read probes (0: the bank's default, ``EXHAUSTIVE``:
                scan every slot, as an unindexed bank does).
        """
        q = self._validate_read(latents, top_k, temperature, min_score)
        if nprobe < EXHAUSTIVE:
            raise InvalidArgument(f"nprobe must be >= 0 (or {EXHAUSTIVE}: exhaustive), got "
                                  f"{nprobe}", field="nprobe")
        n_q = q.shape[0]
        allowed, n_allowed = None, self._occupied_count
        if where:
            allowed, n_allowed = self._filter_mask(where)
        if n_allowed == 0:
            return ReadResult([QueryResult() for _ in range(n_q)], None)
        k = min(top_k, n_allowed)
        index = self.index
        if index is not None and not soft and nprobe != EXHAUSTIVE:
            scan = self._probe(index, q, k, temperature, nprobe or self.index_config.nprobe,
                               allowed, n_allowed)
        else:
            scan = self._scan(q, k, temperature, soft, shift=None, allowed=allowed)
        if bool((scan.exp_sum < _MIN_EXP_SUM).any()):
            # exp((s - 1) / T) underflowed (tiny T, all scores far below 1): rescan,
            # shifting each query by its best score, which makes every sum >= 1
            scan = self._scan(q, k, temperature, soft, shift=scan.top_scores[:, :1],
                              allowed=allowed)
        top_scores, top_slots = scan.top_scores, scan.top_slots
        top_weights = torch.exp((top_scores - scan.shift) / temperature) / scan.exp_sum[:, None]
        mix = None
        if scan.soft_sum is not None:
            mix = scan.soft_sum / scan.exp_sum[:, None]
            mix = mix * self.scale if self.scale is not None else mix
        keep = top_scores >= min_score if min_score is not None else \
            torch.ones_like(top_scores, dtype=torch.bool)
        if count_access:
            best = top_slots[:, 0][keep[:, 0]]
            if best.numel():
                with self.counter_lock:  # readers share ``lock``: counters need their own
                    self.policy.add_access(self.counts, self.count_clock, best,
                                           self.write_clock)
                    self.reads_total += int(best.numel())
                    self.counter_version += 1
        hit_codes = self.codes[top_slots].cpu()
        return ReadResult(self._hits(top_slots, top_scores, top_weights, keep, hit_codes), mix)

    def _validate_read(self, latents: torch.Tensor, top_k: int, temperature: float,
                       min_score: float | None) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 2 \
                or latents.shape[1] != self.query_dim or latents.shape[0] < 1:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise InvalidArgument(
                f"queries must have shape [Q >= 1, {self.query_dim}], got {shape}",
                field="query")
        if top_k < 1:
            raise InvalidArgument(f"top_k must be >= 1, got {top_k}", field="top_k")
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidArgument(f"temperature must be > 0, got {temperature}",
                                  field="temperature")
        if min_score is not None and math.isnan(min_score):
            raise InvalidArgument("min_score is NaN", field="min_score")
        q = latents.to(self.device, torch.float32)
        if not bool(torch.isfinite(q).all()):
            raise InvalidArgument("queries contain NaN or infinity", field="query")
        return q

    def _scan(self, q: torch.Tensor, k: int, temperature: float, soft: bool,
              shift: torch.Tensor | None, allowed: torch.Tensor | None = None) -> _Scan:
        """One pass over slots ``[0, high)``: scores, top-k and softmax sums, fused per span.

        Cosine of query q and slot i is ``(q/|q| * scale) . code_i * inv_norm_i`` (the
        int8 scale folds into the query), so int8/float16 codes are converted to
        float32 one cache-sized chunk at a time, never as a float copy of the bank.
        Scores of a span of rows (about 1 MB) are then post-processed at once, which
        keeps the number of small tensor ops per read low. Softmax sums use
        ``exp((s - shift) / T)`` with shift 1 (the largest possible cosine) unless a
        per-query ``shift`` [Q, 1] is given, so no separate max pass is needed.

        Args:
            q: queries [Q, m] float32.
            k: hits per query, 1 <= k <= occupied.
            soft: also accumulate the softmax-weighted sum of codes (one chunk per span,
                because it needs the converted chunk again).
            allowed: bool mask [capacity] of the (occupied) slots to consider, or None
                for every occupied slot.
        """
        q = self._fold(self._unit_queries(q))
        n_q, rows, m = q.shape[0], self._high, q.shape[1]
        convert = self.torch_dtype != torch.float32
        if self.device.type != "cpu":
            chunk = span = 1 << 18
        else:
            span = max(READ_CHUNK_ROWS, _SCORE_SPAN_FLOATS // n_q // READ_CHUNK_ROWS
                       * READ_CHUNK_ROWS)
            chunk = READ_CHUNK_ROWS if convert else span
            if self.scorer is not None:
                chunk = _SCORER_CHUNK_ROWS
        lut_dots = self._lut_dots(q, soft)
        if lut_dots is not None:
            chunk = span  # no decoded block to keep in cache
        if soft or n_q > 1:
            # one chunk per span: soft needs the converted chunk again, and a [Q, c]
            # product is only a contiguous slice of the [Q, span] scores when c == span
            span = chunk
        span, chunk = min(span, rows), min(chunk, rows)
        full = self._occupied_count == rows and allowed is None  # no hole to mask
        live = self.occupied if allowed is None else allowed
        shift_t: torch.Tensor | float = 1.0 if shift is None else shift
        limbs = _int8_limbs(q[0]) if (n_q == 1 and not soft and self.scale is not None
                                      and lut_dots is None
                                      and self.device.type == "cpu" and _int_mm_works()) \
            else None
        if limbs is not None:
            chunk = min(_INT8_CHUNK_ROWS, span)
            dots = torch.empty(len(limbs), span, 1, dtype=torch.int32)
        block_buf = torch.empty(chunk * m, device=self.device) \
            if convert and limbs is None and self.scorer is None else None
        score_buf = torch.empty(span * n_q, device=self.device)
        exp_sum = torch.zeros(n_q, dtype=torch.float32, device=self.device)
        soft_sum = torch.zeros(n_q, m, device=self.device) if soft else None
        cand_scores, cand_slots = [], []
        for s0 in range(0, rows, span):
            width = min(span, rows - s0)
            scores = score_buf[: n_q * width].view(n_q, width)
            for i in range(s0, s0 + width, chunk):
                c = min(chunk, s0 + width - i)
                block = self.codes[i:i + c]
                if limbs is not None:
                    for j, (limb, _) in enumerate(limbs):
                        torch._int_mm(block, limb, out=dots[j, i - s0:i - s0 + c])
                    continue
                if lut_dots is not None:
                    scores[:, i - s0:i - s0 + c] = lut_dots(q, block)
                    continue
                if self.scorer is not None:  # unpack and decode one chunk at a time
                    block = self.scorer.codes(block)
                elif block_buf is not None:
                    block = block_buf[: c * m].view(c, m).copy_(block)
                torch.mm(q, block.T, out=scores[:, i - s0:i - s0 + c])
            if limbs is not None:
                torch.mul(dots[0, :width].view(1, width), limbs[0][1], out=scores)
                for j in range(1, len(limbs)):
                    scores.add_(dots[j, :width].view(1, width), alpha=limbs[j][1])
            scores.mul_(self.inv_norms[s0:s0 + width])
            if not full:
                scores.masked_fill_(~live[s0:s0 + width], -math.inf)
            top = torch.topk(scores, min(k, width), dim=1)
            cand_scores.append(top.values)
            cand_slots.append(top.indices + s0)
            weights = scores.sub_(shift_t).div_(temperature).exp_()  # scores are not reused
            exp_sum += weights.sum(dim=1)
            if soft_sum is not None:
                soft_sum.addmm_(weights, block)  # span == chunk: block is the whole span
        values, slots = torch.cat(cand_scores, dim=1), torch.cat(cand_slots, dim=1)
        top = torch.topk(values, k, dim=1)
        return _Scan(top.values, torch.gather(slots, 1, top.indices), exp_sum, shift_t,
                     soft_sum)

    def _lut_dots(self, q: torch.Tensor, soft: bool) -> Callable[..., torch.Tensor] | None:
        """The scorer's ``dots`` (scores straight from packed codes) when it applies to
        this read: not for a soft read, which needs the decoded rows themselves, nor
        for many queries at once, which share one decode of each chunk."""
        dots = getattr(self.scorer, "dots", None)
        if dots is None or soft or q.shape[0] > LUT_MAX_QUERIES \
                or dots(q, self.codes[:0]) is None:
            return None
        return cast(Callable[..., torch.Tensor], dots)

    def _unit_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [Q, query_dim] -> unit vectors [Q, d] of the search space."""
        if self.scorer is not None:
            q = self.scorer.queries(q)
        if self.metric is not None:
            q = q * self.metric
        return q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def _fold(self, q: torch.Tensor) -> torch.Tensor:
        """Unit queries [Q, d] -> what raw (int8 / weighted) codes are multiplied by."""
        return q * self._query_fold if self._query_fold is not None else q

    def _probe(self, index: IvfIndex, q: torch.Tensor, k: int, temperature: float,
               nprobe: int, allowed: torch.Tensor | None, n_allowed: int) -> _Scan:
        """Top-k and softmax sums of queries [Q, query_dim] over each query's candidates:
        the slots of its ``nprobe`` nearest lists (or, under a filter matching no more
        slots than a probe would gather, every allowed slot: exact and cheaper).
        A query with fewer than k candidates is scanned instead."""
        unit = self._unit_queries(q)
        folded = self._fold(unit)
        mask = allowed.cpu().numpy() if allowed is not None else None
        expected = nprobe * max(1, len(index.lists)) // max(1, index.k)
        scores_out, slots_out, sums, shifts = [], [], [], []
        for i in range(q.shape[0]):
            if mask is not None and n_allowed <= expected:
                cand = np.flatnonzero(mask)
            else:
                cand = index.probe(unit[i].cpu(), nprobe)
                if mask is not None:
                    cand = cand[mask[cand]]
            if cand.size < k:
                scan = self._scan(q[i:i + 1], k, temperature, False, shift=None,
                                  allowed=allowed)
                scores_out.append(scan.top_scores[0])
                slots_out.append(scan.top_slots[0])
                sums.append(scan.exp_sum[0])
                shifts.append(torch.ones((), device=self.device))  # the scan's shift
                continue
            idx = torch.from_numpy(cand).to(self.device)
            scores = self._score_slots(folded[i], idx)
            top = torch.topk(scores, k)
            best = top.values[0]
            scores_out.append(top.values)
            slots_out.append(idx[top.indices])
            sums.append(scores.sub_(best).div_(temperature).exp_().sum())
            shifts.append(best)  # so the sum has a term equal to 1: it cannot underflow
        return _Scan(torch.stack(scores_out), torch.stack(slots_out), torch.stack(sums),
                     torch.stack(shifts)[:, None], None)

    def _score_slots(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Cosine of one folded query [m] with slots idx [c], computed as ``_scan`` does
        (same conversion of the codes, same query, times the slot's inverse norm)."""
        dots = self._lut_dots(q[None], soft=False)
        if dots is not None:  # straight from the packed codes, like the scan
            scores = dots(q[None], self.codes.index_select(0, idx))[0]
            return scores.mul_(self.inv_norms.index_select(0, idx))
        out = torch.empty(idx.shape[0], device=self.device)
        step = _SCORER_CHUNK_ROWS if self.scorer is not None else READ_CHUNK_ROWS
        for i in range(0, idx.shape[0], step):
            at = idx[i:i + step]
            block = self.codes.index_select(0, at)
            block = self.scorer.codes(block) if self.scorer is not None else block.float()
            torch.mv(block, q, out=out[i:i + at.shape[0]])
        return out.mul_(self.inv_norms.index_select(0, idx))

    def _hits(self, slots: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor,
              keep: torch.Tensor, codes: torch.Tensor) -> list[QueryResult]:
        seqs = self.sequences[slots].tolist()
        slots_l, scores_l, weights_l, keep_l = (slots.tolist(), scores.tolist(),
                                                weights.tolist(), keep.tolist())
        results = []
        for i, query_codes in enumerate(codes.unbind(0)):
            rows = query_codes.unbind(0)  # one call, not one indexing op per hit
            hits = [Hit(s, self.key_of(s), scores_l[i][j], weights_l[i][j], seqs[i][j],
                        self.payloads.get(s), rows[j], self.metadata_of(s))
                    for j, s in enumerate(slots_l[i]) if keep_l[i][j]]
            results.append(QueryResult(hits))
        return results

    # ------------------------------------------------------------------ delete / clear
    def resolve_delete(self, slots: list[int], keys: list[str]) -> tuple[list[int], list[str]]:
        """Occupied slots to free (sorted, unique) and the keys that are not in the bank.

        Raises:
            InvalidArgument: a slot index outside ``[0, capacity)`` or an invalid key.
        """
        for s in slots:
            if not 0 <= int(s) < self.capacity:
                raise InvalidArgument(
                    f"slot {s} is out of range for a bank of capacity {self.capacity}",
                    field="slots")
        chosen = {int(s) for s in slots}
        missing = []
        for key in keys:
            validate_key(key, self.max_key_length)
            slot = self.slot_of(key)
            if slot is None:
                missing.append(key)
            else:
                chosen.add(slot)
        if not chosen:
            return [], missing
        idx = torch.tensor(sorted(s for s in chosen if s < self.rows), dtype=torch.int64,
                           device=self.device)
        return idx[self.occupied[idx]].tolist(), missing

    def free(self, slots: list[int]) -> None:
        """Frees occupied ``slots`` (from ``resolve_delete`` or a WAL record)."""
        if not slots:
            return
        for s in slots:
            raw = self.keys.get(s)
            if raw is not None:
                self._key_index.remove(raw)
            self._set_metadata(s, None)
        at = np.asarray(slots, dtype=np.int64)
        self.keys.free(at)
        self.payloads.free(at)
        idx = torch.from_numpy(at).to(self.device)
        self._occupied_count -= int(self.occupied[idx].sum())
        self._reset_slots(idx)
        self._free_hint = min(self._free_hint, min(slots))
        self.version += 1
        self._index_freed(slots)

    def clear(self) -> None:
        """Frees every slot; totals and the write clock continue."""
        for col in (self.keys, self.payloads, self.metadata):
            col.clear()
        self._key_index.clear()
        self._meta_index.clear()
        self._reset_slots(slice(None))
        self._occupied_count = self._high = self._free_hint = 0
        self.version += 1
        self._index_cleared()

    def _reset_slots(self, idx: torch.Tensor | slice) -> None:
        for name in _SLOT_TENSORS:
            getattr(self, name)[idx] = 0

    # ------------------------------------------------------------------ export / import
    def export(self) -> tuple[dict, dict[str, np.ndarray]]:
        """A consistent copy as (config, arrays) of plain Python / numpy values."""
        return self.export_copy().pack()

    def export_copy_config(self) -> dict[str, Any]:
        return {
            "name": self.name, "capacity": self.capacity, "policy": self.policy.name,
            "half_life": self.policy.half_life, "code_dim": self.code_dim,
            "code_dtype": self.code_dtype, "evictions_total": self.evictions_total,
            "writes_total": self.writes_total, "reads_total": self.reads_total,
            "write_clock": self.write_clock, "applied_seq": self.applied_seq,
        }

    def export_copy(self, frozen: bool = False) -> BankCopy:
        """What ``export`` needs, copied under the bank lock (held exclusively): the
        per-slot tensors up to the last occupied slot (memcpy), and views of the key,
        payload and metadata arenas (compacted first if they hold dead bytes).

        ``frozen``: the caller keeps every mutation of the bank out until it is done
        with the copy (a move pauses its writes), so only the access counters, which
        reads change, are copied; the other tensors are views.
        """
        config = self.export_copy_config()
        n = self._slot_end()
        tensors = {name: getattr(self, name)[:n].cpu() for name in _SLOT_TENSORS}
        for name in tensors:
            if not frozen or name in ("counts", "count_clock"):
                tensors[name] = tensors[name].clone()
        tensors["occupied"] = tensors["occupied"].to(torch.uint8)
        if self.index is not None:  # optional arrays: older readers ignore them
            config["ivf_trained_at"] = self.index.trained_at
            tensors["ivf_centroids"] = self.index.centroids.cpu().clone()
            tensors["ivf_assign"] = torch.from_numpy(self.index.lists.assign[:n].copy())
        columns = {prefix: col.packed(n) for prefix, col in (
            ("payload", self.payloads), ("key", self.keys), ("metadata", self.metadata))}
        return BankCopy(config, tensors, columns)

    def _slot_end(self) -> int:
        """One past the last occupied slot (numpy: torch.nonzero lists every slot)."""
        occupied = self.occupied[:self._high].cpu().numpy()
        return int(occupied.size - np.argmax(occupied[::-1])) if occupied.any() else 0

    def stamp(self) -> tuple[int, int, int]:
        """(identity, slot version, counter version): equal stamps mean equal state."""
        return self.uid, self.version, self.counter_version

    def export_counters(self, counters: bool) -> BankCopy:
        """Like ``export_copy`` for a bank whose slots have not changed since an earlier
        copy: only the config and (if ``counters``) the access counters."""
        config = self.export_copy_config()
        tensors = {}
        if counters:
            occupied = torch.nonzero(self.occupied).flatten()
            n = int(occupied[-1]) + 1 if occupied.numel() else 0
            tensors = {name: getattr(self, name)[:n].cpu().clone()
                       for name in ("counts", "count_clock")}
        return BankCopy(config, tensors, {})

    @classmethod
    def from_export(
        cls,
        config: dict,
        arrays: dict[str, np.ndarray],
        *,
        scale: torch.Tensor | None,
        device: torch.device,
        max_payload_bytes: int,
        max_key_length: int,
        metric: torch.Tensor | None = None,
        scorer: CodeScorer | None = None,
        adopt_arrays: bool = False,
        index_config: IndexConfig | None = None,
    ) -> MemoryBank:
        """Rebuilds a bank from ``export()`` output (e.g. a snapshot).

        An index stored with it (``ivf_*`` arrays) is loaded if it fits the slots;
        without one, a bank above the index threshold is indexed once the caller
        starts it (``indexing.maybe_start``).

        Arrays cover slots ``[0, n)`` with ``n <= capacity`` (older snapshots: all of
        ``capacity``); trailing free slots are not kept, later writes grow the bank.
        ``adopt_arrays``: the arrays are the caller's to give away (a bank received
        in a move): writable ones of the right dtype become the bank's storage
        without a copy.
        """
        capacity = int(config["capacity"])
        policy = make_policy(str(config["policy"]), float(config["half_life"]))
        bank = cls(str(config["name"]), capacity, code_dim=int(config["code_dim"]),
                   code_dtype=str(config["code_dtype"]), scale=scale, device=device,
                   policy=policy, max_payload_bytes=max_payload_bytes,
                   max_key_length=max_key_length, metric=metric, scorer=scorer,
                   index_config=index_config)
        for name in ("occupied", "payload_data", "key_data"):
            if name not in arrays:
                raise FailedPrecondition(f"bank {bank.name!r}: array {name} is missing")
        n = int(arrays["occupied"].shape[0])
        if n > capacity:
            raise FailedPrecondition(f"bank {bank.name!r}: {n} slots exceed its capacity "
                                     f"{capacity}")
        expected: dict[str, tuple[int, ...]] = {"codes": (n, bank.code_dim)}
        for name in ("occupied", "counts", "count_clock", "sequences", "inv_norms"):
            expected[name] = (n,)
        for name in ("payload_offsets", "key_offsets"):
            expected[name] = (n + 1,)
        if "metadata_data" in arrays and "metadata_offsets" in arrays:  # older: none
            expected["metadata_offsets"] = (n + 1,)
        for name, shape in expected.items():
            if name not in arrays:
                raise FailedPrecondition(f"bank {bank.name!r}: array {name} is missing")
            if tuple(arrays[name].shape) != shape:
                raise FailedPrecondition(
                    f"bank {bank.name!r}: array {name} has shape {arrays[name].shape}, "
                    f"expected {shape}")
        if arrays["codes"].dtype != np.dtype(bank.code_dtype):
            raise FailedPrecondition(
                f"bank {bank.name!r}: codes are {arrays['codes'].dtype}, expected "
                f"{bank.code_dtype}")
        occupied = np.flatnonzero(arrays["occupied"])
        keep = int(occupied[-1]) + 1 if occupied.size else 0  # trailing free slots go
        dtypes = {"occupied": bool, "counts": np.float64, "count_clock": np.int64,
                  "sequences": np.int64, "inv_norms": np.float32}
        fits = keep <= bank.rows
        for name in _SLOT_TENSORS:
            # np.array copies: snapshot arrays may be read-only views of a mapped file
            src = arrays[name][:keep]
            if not (adopt_arrays and src.flags.writeable and src.flags.aligned
                    and src.dtype == np.dtype(dtypes.get(name, src.dtype))):
                src = np.array(src, dtype=dtypes.get(name))
            t = torch.from_numpy(src).to(device=bank.device)
            if name == "codes":
                t = t.to(bank.torch_dtype)
            if fits:
                getattr(bank, name)[:keep] = t
            else:
                setattr(bank, name, t)
        rows = bank.rows
        bank.keys = ByteColumn.from_packed(arrays["key_data"], arrays["key_offsets"][:keep + 1],
                                           rows)
        bank.payloads = ByteColumn.from_packed(arrays["payload_data"],
                                               arrays["payload_offsets"][:keep + 1], rows)
        if "metadata_offsets" in expected:
            bank.metadata = ByteColumn.from_packed(
                arrays["metadata_data"], arrays["metadata_offsets"][:keep + 1], rows)
            for s in bank.metadata.slots().tolist():
                for item in (bank.metadata_of(s) or {}).items():
                    bank._meta_index.setdefault(item, set()).add(s)
        bank._key_index = KeyIndex(bank.keys)
        bank._key_index.rebuild()
        bank._occupied_count = int(occupied.size)
        bank._high = keep
        bank.index = bank._stored_index(config, arrays, occupied, keep)
        for attr in ("evictions_total", "writes_total", "reads_total", "write_clock"):
            setattr(bank, attr, int(config[attr]))
        # snapshots older than per-bank sequences were consistent at one store-wide
        # sequence, which the store's replay rule already covers
        bank.applied_seq = int(config.get("applied_seq", 0))
        return bank


    def _stored_index(self, config: dict, arrays: dict[str, np.ndarray], occupied: np.ndarray,
                      keep: int) -> IvfIndex | None:
        """The index a snapshot holds, if any and if it fits the slots (occupied: the
        occupied slot ids). An index that does not fit is dropped, not an error: the
        bank is re-indexed from its codes in the background."""
        centroids, assign = arrays.get("ivf_centroids"), arrays.get("ivf_assign")
        if centroids is None or assign is None or "ivf_trained_at" not in config:
            return None
        d = self.scorer.search_dim if self.scorer is not None else self.code_dim
        if centroids.ndim != 2 or centroids.shape[1] != d or centroids.shape[0] < 1 \
                or assign.shape != (arrays["occupied"].shape[0],):
            return None
        k = int(centroids.shape[0])
        assign = np.array(assign[:keep], dtype=np.int32)
        listed = np.flatnonzero(assign >= 0)
        if assign.size and (int(assign.max()) >= k or listed.shape != occupied.shape
                            or not np.array_equal(listed, occupied)):
            return None
        lists = InvertedLists.from_assignment(assign, k, self.rows)
        return IvfIndex(torch.from_numpy(np.array(centroids, dtype=np.float32)), lists,
                        int(config["ivf_trained_at"]))


@dataclass
class BankCopy:
    """A bank's state copied under its lock: per-slot tensors [n] and, per column
    ("payload", "key", "metadata"), (uint8 data, int64 offsets [n + 1])."""

    config: dict
    tensors: dict[str, torch.Tensor]
    columns: dict[str, tuple[np.ndarray, np.ndarray]]

    def pack(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {name: t.numpy() for name, t in self.tensors.items()}
        for prefix, (data, offsets) in self.columns.items():
            arrays[f"{prefix}_data"], arrays[f"{prefix}_offsets"] = data, offsets
        return self.config, arrays


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """1 / norm, and 0 for zero vectors (which score 0 against everything)."""
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def _int8_limbs(q: torch.Tensor, n: int = 3) -> list[tuple[torch.Tensor, float]]:
    """Splits a float query [m] into int8 limbs: ``q ~= sum_j scale_j * limb_j``.

    Three limbs of 8 bits leave a residual below float32 rounding, and each dot with
    int8 codes is exact in int32, so ``sum_j scale_j * (codes @ limb_j)`` is as exact as
    a float32 product, while reading the int8 bank directly (no float conversion).

    Returns:
        (limb [m, 1] int8, scale) pairs; all-zero limbs are left out.
    """
    rest = q.detach().cpu().double().numpy()  # numpy: cheaper than torch ops on [m]
    limbs = []
    for _ in range(n):
        step = float(np.abs(rest).max()) / 127.0
        if step == 0.0:
            break
        digits = np.clip(np.rint(rest / step), -127, 127)
        limbs.append((torch.from_numpy(digits.astype(np.int8).reshape(-1, 1)), step))
        rest = rest - digits * step
    return limbs or [(torch.zeros(q.shape[0], 1, dtype=torch.int8), 0.0)]


@functools.cache
def _int_mm_works() -> bool:
    """Whether this torch build has a CPU int8 x int8 -> int32 matmul (a private op)."""
    try:
        a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
        b = torch.tensor([[4], [5], [-6]], dtype=torch.int8)
        return int(torch._int_mm(a, b)[0, 0]) == -24
    except (AttributeError, RuntimeError, NotImplementedError):
        return False

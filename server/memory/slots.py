"""A bank's storage: per-slot tensors and byte columns, the state every other part
of a bank works on.

State per slot: the code (in the codec's code dtype), an ``occupied`` flag (separate
from the counters: a counter reset to 0 does not mean "free"), the access count and
the write clock of its last update (lazy decay, see ``eviction``), the write
sequence number (age), the inverse L2 norm of the *dequantised* code (so cosine
search is one matrix product), and optionally a key, an opaque payload and
metadata (``columns``: one arena each, no Python object per memory).

Memory grows with what is stored: the per-slot tensors hold ``rows`` slots, grown
geometrically (``ROW_GROWTH``) up to ``capacity`` when a write needs a slot beyond
them (slots at or past ``rows`` are free).
"""

from __future__ import annotations

import itertools
import threading

import torch

from ..code_dtypes import CODE_DTYPES
from .codecstage import OwnCodec, Staging
from .columns import ByteColumn, KeyIndex
from .eviction import Policy
from .ivf import IndexConfig, IvfIndex
from .metadata import MetadataIndex, decode_metadata, encode_metadata
from .rwlock import ReadWriteLock
from .scoring import WIRE_LAYOUT, CodeScorer

INITIAL_ROWS = 1024  # slots a new bank allocates
# Rows grow by this factor when a write needs more: at most 12.5% (~6% on average)
# of the per-slot tensors are spare, at the price of ~9 copies of each row over a
# fill (a memcpy: negligible next to the writes themselves).
ROW_GROWTH = 1.125
# Rows converted between code layouts at once (their unpacked cells, int32 [rows, d],
# stay near 100 MB at d = 384).
CONVERT_ROWS = 65536
SLOT_TENSORS = ("codes", "occupied", "counts", "count_clock", "sequences", "inv_norms")
_uids = itertools.count(1)


class BankSlots:
    """Slots of codes on one device (see ``bank.MemoryBank`` for what uses them).

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
        self.set_scorer(scorer)
        self.metric = metric.float().to(self.device) if metric is not None else None
        # what a normalised (weighted) query is multiplied by to score raw codes
        fold = [t for t in (self.scale, self.metric) if t is not None]
        self.query_fold = fold[0] * fold[1] if len(fold) == 2 else (fold[0] if fold else None)
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
        self._meta_index = MetadataIndex()
        self._occupied_count = 0
        self.high = 0  # one past the highest slot ever occupied since the last clear
        self._free_hint = 0  # every slot below it is occupied
        self.write_clock = 0
        # sequence of the last logged mutation applied here (snapshots copy banks one
        # at a time, so replay skips a bank's records up to its own copy)
        self.applied_seq = 0
        # context recall of its text reads by default (neighbours each side, 0: off)
        self.context = 0
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
        # the bank's own codec (``bankcodec``): None while it uses the served model,
        # which it stages float items for until it fits; ``codec_generation`` counts
        # its swaps, so an encode made for another generation is noticed
        self.own_codec: OwnCodec | None = None
        self.staging: Staging | None = None
        self.codec_generation = 0
        self.codec_fitting = False
        self.codec_threshold = 0  # staged items at which it fits (0: it never does)
        self.codec_declined = 0  # fits not clearly better than its codec then

    def set_scorer(self, scorer: CodeScorer | None) -> None:
        """Scores stored codes with ``scorer`` (codes must be converted by the caller)."""
        self.scorer = scorer
        self.query_dim = scorer.query_dim if scorer is not None else self.code_dim

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
        for name in SLOT_TENSORS:
            t = getattr(self, name)
            # Only ``occupied`` must be valid past the old rows: slots at or above
            # ``high`` are never scanned, exported or ranked (they are free), so the
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
                      for n in SLOT_TENSORS)
        columns = self.keys.nbytes() + self.metadata.nbytes() + self.payloads.nbytes()
        index = self.index.nbytes() if self.index is not None else 0
        return (tensors + columns - self.payloads.live + self._key_index.nbytes() + index
                + self.staging_bytes)

    @property
    def staging_bytes(self) -> int:
        return self.staging.nbytes if self.staging is not None else 0

    def reserved_bytes(self) -> int:
        """What the server's memory limit counts for this bank besides payloads (and
        its lexical index, which the store keeps): every slot of ``capacity`` (a bank
        may always fill up), keys, metadata and the IVF index's lists and centroids."""
        slots = self.capacity * self.slot_bytes(self.code_dim, self.code_dtype)
        index = self.index.nbytes() if self.index is not None else 0
        return slots + self.keys.live + self.metadata.live + index + self.staging_bytes

    @property
    def code_layout(self) -> str:
        """The bit layout ``codes`` holds (``WIRE_LAYOUT`` unless the scorer has its own)."""
        return self.scorer.layout if self.scorer is not None else WIRE_LAYOUT

    def stored_codes(self, codes: torch.Tensor, layout: str = WIRE_LAYOUT) -> torch.Tensor:
        """Codes [n, m] in ``layout`` (by default as clients and logs carry them) -> as
        this bank stores them, converted ``CONVERT_ROWS`` at a time."""
        scorer = self.scorer
        if scorer is None or layout == scorer.layout:
            return codes
        return torch.cat([scorer.to_stored(codes[i:i + CONVERT_ROWS], layout)
                          for i in range(0, codes.shape[0], CONVERT_ROWS)]) \
            if codes.shape[0] else codes

    def wire_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes [n, m] -> as the codec makes them (what a hit hands a client)."""
        return self.scorer.from_stored(codes) if self.scorer is not None else codes

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
        self._meta_index.replace(slot, self.metadata_of(slot), meta)
        self.metadata.set(slot, encode_metadata(meta) if meta else None)

    def filter_mask(self, where: dict[str, str]) -> tuple[torch.Tensor, int]:
        """Occupied slots whose metadata has every (key, value) of ``where``: a bool
        mask [rows] and its count."""
        matched = self._meta_index.matching(where)
        mask = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        if matched:
            mask[torch.tensor(sorted(matched), dtype=torch.int64, device=self.device)] = True
        return mask, len(matched)

    def slots_matching(self, where: dict[str, str]) -> set[int]:
        """Occupied slots whose metadata has every (key, value) of ``where``."""
        return self._meta_index.matching(where)

    def slots_with_key(self, key: str) -> set[int]:
        """Occupied slots whose metadata has ``key``, whatever its value."""
        return self._meta_index.with_key(key)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        if self.scorer is not None:
            return self.scorer.codes(codes)
        z = codes.float()
        return z * self.scale if self.scale is not None else z

    def _reset_slots(self, idx: torch.Tensor | slice) -> None:
        for name in SLOT_TENSORS:
            getattr(self, name)[idx] = 0

    def stamp(self) -> tuple[int, int, int]:
        """(identity, slot version, counter version): equal stamps mean equal state."""
        return self.uid, self.version, self.counter_version

    def restore_columns(self, keys: ByteColumn, payloads: ByteColumn,
                        metadata: ByteColumn | None, *, occupied: int, high: int) -> None:
        """Installs key, payload and metadata columns rebuilt from an export (``export``)
        with the indexes over them; ``occupied`` slots, all below ``high``."""
        self.keys, self.payloads = keys, payloads
        if metadata is not None:
            self.metadata = metadata
            for s in metadata.slots().tolist():
                self._meta_index.replace(s, None, self.metadata_of(s))
        self._key_index = KeyIndex(self.keys)
        self._key_index.rebuild()
        self._occupied_count = occupied
        self.high = high



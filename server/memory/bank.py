"""A memory bank: the paper's slot memory ``M`` [capacity, m] of codes, with counters.

Storage (codes, counters, keys, payloads, metadata) is ``slots.BankSlots``; the
scan and the index probe are ``scan``, scoring per code kind ``scorers``, counting
and hit building ``readout``, export and import ``export``.

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
reader is inside while they hold ``lock`` exclusively. Methods check everything
before mutating, so a rejected request leaves no trace.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import FailedPrecondition, InvalidArgument
from . import readout
from .eviction import VictimQueue
from .names import validate_key
from .options import EXHAUSTIVE, ReadOptions
from .results import BankStats, CodecStats, IndexStats, QueryResult, ReadResult, SlotWrite
from .scan import probe, scan
from .slots import BankSlots

_MIN_EXP_SUM = 1e-30
_FREE_SCAN_ROWS = 65536
DEFAULT_READ = ReadOptions()


class MemoryBank(BankSlots):
    """The paper's bank: writes, reads, deletes over its slots. Not thread-safe by
    itself: hold ``lock``. Constructed like ``BankSlots``."""

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
            context=self.context, codec=self.codec_stats(),
        )

    def codec_stats(self) -> CodecStats:
        own, staged = self.own_codec, self.staging
        n = staged.count if staged is not None else 0
        if own is not None:
            return CodecStats("own", own.codec.model_hash, own.fitted_on, own.fitted_at,
                              n, self.codec_threshold, self.codec_declined,
                              own.held_out_mse, own.replaced_mse)
        if staged is None:
            return CodecStats("served")
        return CodecStats("fitting" if self.codec_fitting else "staging", staged=n,
                          threshold=self.codec_threshold, declined=self.codec_declined)

    def index_stats(self) -> IndexStats:
        index, cfg = self.index, self.index_config
        if index is None:
            state = "training" if self.index_training else "none"
        else:
            state = "retraining" if self.index_training else "ready"
        return IndexStats(state=state, lists=index.k if index else 0,
                          trained_at=index.trained_at if index else 0, nprobe=cfg.nprobe,
                          slots=len(index.lists) if index else 0, threshold=cfg.threshold)

    # ------------------------------------------------------------------ write
    def validate_write(
        self, codes: torch.Tensor, keys: list[str | None], payloads: list[bytes | None]
    ) -> tuple[list[str | None], list[bytes | None]]:
        """Checks a write's keys and payloads against the bank's limits; returns them
        normalised to one per code. The codes and the counts were validated by the
        domain layer (asserted here).

        Args:
            codes: [n, m] in the bank's code dtype, n >= 1.
            keys: [] (no keys) or n entries, None or "" meaning no key.
            payloads: [] (none) or n entries, None or b"" meaning no payload.
        """
        assert codes.dim() == 2 and codes.shape[0] >= 1 and codes.shape[1] == self.code_dim \
            and codes.dtype == self.torch_dtype, (tuple(codes.shape), codes.dtype)
        n = codes.shape[0]
        keys = list(keys) if keys else [None] * n
        payloads = list(payloads) if payloads else [None] * n
        assert len(keys) == n and len(payloads) == n, (n, len(keys), len(payloads))
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
        new = self.stored_codes(codes.to(self.device)[src])
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
        self.high = max(self.high, max(slots) + 1)
        self._index_written(dst, z * inv[:, None])
        return out

    # ------------------------------------------------------------------ index upkeep
    def _index_written(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Keeps the index exact after slots [n] got codes with unit search rows [n, d]."""
        if self.index is not None:
            self.index.place(slots.cpu().numpy(), rows.cpu())
        if self.index_journal is not None:
            self.index_journal.update(slots.tolist())

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
    def read(self, latents: torch.Tensor, options: ReadOptions = DEFAULT_READ) -> ReadResult:
        """The paper's read, batched, with top-k, min_score and the soft read
        (``bank.lock`` held shared; ``options`` validated by the caller).

        A bank with an index (``ivf``) answers with it unless the read is soft or
        ``nprobe`` is ``EXHAUSTIVE``: each query's ``nprobe`` nearest lists are
        gathered and their slots scored exactly like the scan scores them, so hits
        differ from the scan's only by memories outside the probed lists. An
        approximate read's softmax weights are normalised over the probed candidates,
        not over the whole bank. Where too few candidates survive (fewer than top_k
        after the ``where`` filter), that query is scanned.

        Args:
            latents: queries [Q, query_dim] float32 in latent (dequantised) space.
            options: see ``ReadOptions``.
        """
        o = options
        o.check()
        assert latents.dim() == 2 and latents.shape[0] >= 1 \
            and latents.shape[1] == self.query_dim, tuple(latents.shape)
        q = latents.to(self.device, torch.float32)
        n_q = q.shape[0]
        allowed, n_allowed = None, self._occupied_count
        if o.where:
            allowed, n_allowed = self.filter_mask(o.where)
        if n_allowed == 0:
            return ReadResult([QueryResult() for _ in range(n_q)], None)
        k = min(o.top_k, n_allowed)
        index = self.index
        if index is not None and not o.soft and o.nprobe != EXHAUSTIVE:
            found = probe(self, index, q, k, o.temperature, o.nprobe or self.index_config.nprobe,
                          allowed, n_allowed)
        else:
            found = scan(self, q, k, o.temperature, o.soft, shift=None, allowed=allowed)
        if bool((found.exp_sum < _MIN_EXP_SUM).any()):
            # exp((s - 1) / T) underflowed (tiny T, all scores far below 1): rescan,
            # shifting each query by its best score, which makes every sum >= 1
            found = scan(self, q, k, o.temperature, o.soft, shift=found.top_scores[:, :1],
                         allowed=allowed)
        top_scores, top_slots = found.top_scores, found.top_slots
        top_weights = torch.exp((top_scores - found.shift) / o.temperature) \
            / found.exp_sum[:, None]
        mix = None
        if found.soft_sum is not None:
            mix = found.soft_sum / found.exp_sum[:, None]
            mix = mix * self.scale if self.scale is not None else mix
        keep = (top_scores >= o.min_score if o.min_score is not None
                else torch.ones_like(top_scores, dtype=torch.bool)).tolist()
        if o.count_access:
            readout.count_best(self, [int(s) for s, kept in
                                      zip(top_slots[:, 0].tolist(), keep, strict=True)
                                      if kept[0]])
        slots, scores, weights = ([[v for v, kept in zip(row, keep_row, strict=True) if kept]
                                   for row, keep_row in zip(t.tolist(), keep, strict=True)]
                                  for t in (top_slots, top_scores, top_weights))
        return ReadResult(readout.build_hits(self, slots, scores, weights,
                                             payloads=o.payloads), mix)

    # ------------------------------------------------------------------ delete / clear
    def resolve_delete(self, slots: list[int], keys: list[str],
                       sequences: list[int] | None = None) -> tuple[list[int], list[str]]:
        """Occupied slots to free (sorted, unique) and the keys that are not in the bank.

        Args:
            sequences: optional, one per ``slots`` entry: that slot counts only while it
                holds the memory of this write sequence (a rewritten slot is left alone).

        Raises:
            InvalidArgument: a slot index outside ``[0, capacity)``, an invalid key, or
                ``sequences`` not matching ``slots`` in length.
        """
        if sequences is not None and len(sequences) != len(slots):
            raise InvalidArgument(f"sequences has {len(sequences)} entries for {len(slots)} "
                                  "slots; give one per slot (or none)", field="sequences")
        for s in slots:
            if not 0 <= int(s) < self.capacity:
                raise InvalidArgument(
                    f"slot {s} is out of range for a bank of capacity {self.capacity}",
                    field="slots")
        chosen = {int(s) for s in slots}
        if sequences is not None:
            chosen = {int(s) for s, q in zip(slots, sequences, strict=True)
                      if int(s) < self.rows and int(self.sequences[int(s)]) == int(q)}
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

    def holds(self, slot: int, sequence: int) -> bool:
        """Whether ``slot`` still holds the memory of write ``sequence``."""
        return (0 <= slot < self.rows and bool(self.occupied[slot])
                and int(self.sequences[slot]) == sequence)

    def replace_metadata(self, slot: int, meta: dict[str, str] | None) -> None:
        """Sets an occupied slot's metadata (from ``MemoryStore.set_metadata`` or a WAL
        record); the memory, its counters and its write sequence stay."""
        self._set_metadata(slot, meta)
        self.version += 1

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
        self._occupied_count = self.high = self._free_hint = 0
        self.version += 1
        self._index_cleared()


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """1 / norm, and 0 for zero vectors (which score 0 against everything)."""
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))

"""Eviction policies of a memory bank: which slot a write takes when the bank is full.

``lfu`` is the paper's policy: evict the slot with the least access count; ties go
to the oldest write (smallest sequence number). A written memory starts at count 0.
Its pathology: the newest memory has count 0, so it is the *first* one the next
write evicts — a full bank under pure writes keeps overwriting the same slot
(and, in one per-item batch, later items evict earlier ones). It is kept because it
is the paper's, and documented in ``docs/banks.md``.

``lfu_decay`` (the server's default) fixes this: counts decay exponentially with a
half-life measured in *writes to the bank*, and a new memory starts with a credit
of one access, so a fresh memory outranks old memories nobody reads any more.
Ties again go to the oldest write.

Decay is lazy and vectorised: each slot stores its count ``c`` and the bank's write
clock ``t`` at its last update; its effective count at clock ``now`` is
``c * 2 ** (-(now - t) / half_life)``. Uniform decay never reorders slots, so
victims are ranked by ``log2(c) + t / half_life`` (the log count at clock 0), which
needs no exponentials and cannot overflow.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

POLICIES = ("lfu", "lfu_decay")
# Half-lives a bank may be created with, in writes. Below the minimum a count is gone
# after one write (decay is then meaningless); above the maximum it never decays in
# any bank's lifetime. Both ends keep clock / half_life far from float64's limits.
MIN_HALF_LIFE = 1e-3
MAX_HALF_LIFE = 1e12


@dataclass(frozen=True)
class Policy:
    """An eviction policy.

    Attributes:
        name: "lfu" or "lfu_decay".
        half_life: decay half-life in bank writes (0 for "lfu": no decay).
        initial_count: the count a freshly written memory starts with.
    """

    name: str
    half_life: float
    initial_count: float

    @property
    def decays(self) -> bool:
        return self.half_life > 0

    def effective(self, counts: torch.Tensor, clocks: torch.Tensor, now: int) -> torch.Tensor:
        """Access counts at write clock ``now``.

        Args:
            counts: stored counts [n] float64.
            clocks: write clock of each count's last update [n] int64.
        """
        if not self.decays:
            return counts
        return counts * torch.exp2((clocks - now).double() / self.half_life)

    def rank(self, counts: torch.Tensor, clocks: torch.Tensor) -> torch.Tensor:
        """[n] float64 key, increasing with the effective count at any common clock.

        Under decay it is ``log2(c) + t / half_life``: the log2 of the count at a fixed
        reference clock 0, valid for comparisons at any time.
        """
        if not self.decays:
            return counts
        return clocks.to(torch.float64).div_(self.half_life).add_(torch.log2(counts))

    def new_rank(self, clock: int) -> float:
        """Rank of a memory written (fresh) at write clock ``clock``, as in ``rank``."""
        if not self.decays:
            return self.initial_count
        return math.log2(self.initial_count) + clock / self.half_life

    def add_access(
        self, counts: torch.Tensor, clocks: torch.Tensor, slots: torch.Tensor, now: int
    ) -> None:
        """Adds one access per entry of ``slots`` [k] int64 (repeats add up), in place."""
        if slots.numel() == 0:
            return
        if self.decays:
            unique = torch.unique(slots)
            counts[unique] = self.effective(counts[unique], clocks[unique], now)
            clocks[unique] = now
        counts.index_add_(0, slots, torch.ones(slots.numel(), dtype=counts.dtype,
                                                device=counts.device))


def validate_half_life(half_life: float) -> float:
    """Returns ``half_life`` if a new bank may use it, else raises ``InvalidArgument``.

    Only new banks are checked: a bank restored from an older snapshot or log keeps
    the half-life it was created with.
    """
    if not (math.isfinite(half_life) and MIN_HALF_LIFE <= half_life <= MAX_HALF_LIFE):
        raise InvalidArgument(
            f"half_life must be between {MIN_HALF_LIFE:g} and {MAX_HALF_LIFE:g} writes, "
            f"got {half_life:g}", field="half_life")
    return float(half_life)


def make_policy(name: str, half_life: float) -> Policy:
    """Builds a policy; ``half_life`` is ignored (stored as 0) for "lfu".

    Raises:
        InvalidArgument: unknown policy, or a half-life that is not a positive finite number.
    """
    if name == "lfu":
        return Policy("lfu", 0.0, 0.0)
    if name == "lfu_decay":
        if not (math.isfinite(half_life) and half_life > 0):
            raise InvalidArgument(
                f"half_life must be a positive number of writes, got {half_life}",
                field="half_life",
            )
        return Policy("lfu_decay", float(half_life), 1.0)
    raise InvalidArgument(f"unknown eviction policy {name!r}; use one of {POLICIES}",
                          field="policy")


def smallest(rank: torch.Tensor, sequences: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest ``(rank, sequence)`` pairs, in that order.

    Vectorised even when most ranks tie (e.g. every count is 0 under "lfu"):
    everything strictly below the k-th rank is taken, the rest come from the
    tie at the k-th rank by smallest sequence.

    Args:
        rank: [n] float64; +inf marks slots that are not candidates.
        sequences: [n] int64.
        k: 1 <= k <= number of finite-or-(-inf) ranks.
    """
    if k == 1:
        low = rank.min()
        tied = torch.where(rank == low, sequences, torch.iinfo(torch.int64).max)
        return [int(torch.argmin(tied))]
    threshold = torch.topk(rank, k, largest=False).values[-1]
    below = torch.nonzero(rank < threshold).flatten()
    order = sorted(zip(rank[below].tolist(), sequences[below].tolist(), below.tolist(),
                       strict=True))
    chosen = [slot for _, _, slot in order]
    tied = torch.where(rank == threshold, sequences, torch.iinfo(torch.int64).max)
    rest = torch.topk(tied, k - len(chosen), largest=False).indices
    return chosen + rest.tolist()


class VictimQueue:
    """Chooses eviction victims for the items of one write batch, one at a time.

    Memories written earlier in the same batch are candidates too (under "lfu" a
    later item can evict an earlier one — the paper's pathology, kept faithfully).

    Args:
        policy: the bank's policy.
        rank: [capacity] ranks of slots (``Policy.rank``), +inf for slots that are not
            candidates.
        sequences: [capacity] int64 write sequence numbers.
        k: how many existing slots to pre-select: at least the batch size (capped at the
            number of candidates), since each item evicts or overwrites at most one.
    """

    def __init__(self, policy: Policy, rank: torch.Tensor, sequences: torch.Tensor, k: int):
        self.policy = policy
        self._existing = smallest(rank, sequences, k) if k > 0 else []
        self._existing_rank = {s: (float(rank[s]), int(sequences[s])) for s in self._existing}
        self._pos = 0
        self._fresh: list[tuple[float, int, int]] = []
        self._current_seq: dict[int, int] = {}

    def written(self, slot: int, clock: int, sequence: int) -> None:
        """Records that this batch wrote ``slot`` at write clock ``clock``."""
        self._current_seq[slot] = sequence
        heapq.heappush(self._fresh, (self.policy.new_rank(clock), sequence, slot))

    def pop(self) -> int:
        """The slot the next item evicts."""
        while self._pos < len(self._existing) and self._existing[self._pos] in self._current_seq:
            self._pos += 1
        while self._fresh and self._current_seq[self._fresh[0][2]] != self._fresh[0][1]:
            heapq.heappop(self._fresh)
        if self._pos < len(self._existing):
            slot = self._existing[self._pos]
            if not self._fresh or self._existing_rank[slot] <= self._fresh[0][:2]:
                self._pos += 1
                return slot
        if not self._fresh:
            raise RuntimeError("no eviction candidate left; k was too small")
        return heapq.heappop(self._fresh)[2]

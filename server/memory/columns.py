"""Per-slot byte strings of a bank (keys, payloads, metadata) without a Python object
per memory, and the key -> slot index over them.

``ByteColumn`` keeps every slot's bytes in one append-only numpy arena, addressed by
``start`` [rows] int64 and ``length`` [rows] int32. Replacing or freeing a value only
drops its length; the dead bytes are reclaimed by compaction (a gather into a *new*
arena in slot order) once they outweigh the live ones, so writes stay amortised O(1)
and the arena holds at most about twice the live bytes (it grows by 1/8 at a time).
Bytes below ``used`` are never rewritten in place, so a snapshot may keep a view of
them after the lock is released (export is a view plus a copy of the offsets: near
zero-copy).

``KeyIndex`` maps a key to its slot with an open-addressing table of slot numbers
(linear probing, CRC-32 of the UTF-8 key, load <= 1/2): 8-16 bytes per key instead of
the ~150 of a ``dict[str, int]`` entry with its string and int objects. Probes compare
the key against the key column, which is the only copy of the key's text.

Neither class is thread-safe: the bank's lock discipline applies.
"""

from __future__ import annotations

import zlib

import numpy as np

_MIN_ARENA = 4096
_GATHER_BYTES = 1 << 22  # bytes gathered per vectorised step of a compaction (4 MiB)
_EMPTY, _TOMBSTONE = -1, -2
_MIN_TABLE = 64


class ByteColumn:
    """One byte string (possibly empty, meaning "none") per slot ``[0, rows)``."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.data = np.empty(0, dtype=np.uint8)
        self.used = 0  # arena bytes written (live + dead)
        self.live = 0  # bytes of current values
        # allocated on the first value: a column nobody uses (no keys, no metadata)
        # costs nothing per slot
        self.start = np.zeros(0, dtype=np.int64)
        self.length = np.zeros(0, dtype=np.int32)
        self._ordered = True  # data[:used] is exactly the values in slot order

    def nbytes(self) -> int:
        """Bytes held: the arena as allocated plus the two index arrays."""
        return int(self.data.nbytes + self.start.nbytes + self.length.nbytes)

    def grow(self, rows: int) -> None:
        """Makes room for ``rows`` slots (new slots hold nothing)."""
        extra = rows - self.rows
        self.rows = max(rows, self.rows)
        if extra > 0 and self.length.shape[0]:
            self.start = np.concatenate([self.start, np.full(extra, self.used, np.int64)])
            self.length = np.concatenate([self.length, np.zeros(extra, np.int32)])

    def _index(self) -> None:
        if self.length.shape[0] < self.rows:
            self.start = np.full(self.rows, self.used, dtype=np.int64)
            self.length = np.zeros(self.rows, dtype=np.int32)

    def get(self, slot: int) -> bytes | None:
        if slot >= self.length.shape[0]:
            return None
        n = int(self.length[slot])
        if n == 0:
            return None
        a = int(self.start[slot])
        return self.data[a:a + n].tobytes()

    def equals(self, slot: int, value: bytes) -> bool:
        if slot >= self.length.shape[0]:
            return False
        n = int(self.length[slot])
        if n != len(value):
            return False
        a = int(self.start[slot])
        return self.data[a:a + n].tobytes() == value

    def set(self, slot: int, value: bytes | None) -> None:
        """Replaces slot's value (None or b"" for none)."""
        if not value and slot >= self.length.shape[0]:
            return
        self._index()
        self.live -= int(self.length[slot])
        n = len(value) if value else 0
        self.length[slot] = n
        if value:
            if self.used + n > self.data.shape[0]:
                self._reserve(self.used + n)
            self.data[self.used:self.used + n] = np.frombuffer(value, dtype=np.uint8)
            self.start[slot] = self.used
            self.used += n
            self.live += n
        self._ordered = False
        if self.used - self.live > max(self.live, _MIN_ARENA):
            self.compact()

    def free(self, slots: np.ndarray) -> None:
        """Drops the values of ``slots`` [k] int64 (unique)."""
        if slots.size and self.length.shape[0]:
            self.live -= int(self.length[slots].sum())
            self.length[slots] = 0
            self._ordered = False

    def clear(self) -> None:
        self.__init__(self.rows)  # type: ignore[misc]

    def _reserve(self, need: int) -> None:
        size = max(_MIN_ARENA, need, self.data.shape[0] + self.data.shape[0] // 8)
        new = np.empty(size, dtype=np.uint8)  # a new array: views handed out stay valid
        new[:self.used] = self.data[:self.used]
        self.data = new

    def compact(self) -> None:
        """Rewrites the live values in slot order into a new arena (dead bytes go)."""
        self._index()
        offsets = self._offsets()
        total = int(offsets[-1])
        new = np.empty(max(total, _MIN_ARENA), dtype=np.uint8)
        lengths = self.length.astype(np.int64)
        rows, s = self.rows, 0
        while s < rows:  # in steps of ~_GATHER_BYTES, so the index array stays small
            e = int(np.searchsorted(offsets, offsets[s] + _GATHER_BYTES, side="right"))
            e = min(max(e, s + 1), rows)
            n = int(offsets[e] - offsets[s])
            if n:
                lens = lengths[s:e]
                idx = np.repeat(self.start[s:e] - offsets[s:e], lens)
                idx += np.arange(offsets[s], offsets[e], dtype=np.int64)
                new[offsets[s]:offsets[e]] = self.data[idx]
            s = e
        self.data, self.used, self.live = new, total, total
        self.start = offsets[:-1].copy()
        self._ordered = True

    def _offsets(self) -> np.ndarray:
        offsets = np.zeros(self.rows + 1, dtype=np.int64)
        np.cumsum(self.length, out=offsets[1:])
        return offsets

    def packed(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots ``[0, rows)`` as (uint8 data, int64 offsets [rows + 1]), the snapshot
        layout. Compacts first if needed; ``data`` is a view of the arena, which is never
        rewritten in place (valid after the caller's lock is released)."""
        if not self.length.shape[0]:
            return np.zeros(0, dtype=np.uint8), np.zeros(rows + 1, dtype=np.int64)
        if not self._ordered:
            self.compact()
        end = int(self.start[rows]) if rows < self.rows else self.used
        offsets = np.empty(rows + 1, dtype=np.int64)
        offsets[:rows] = self.start[:rows]
        offsets[rows] = end
        return self.data[:end], offsets

    @classmethod
    def from_packed(cls, data: np.ndarray, offsets: np.ndarray, rows: int) -> ByteColumn:
        """A column of ``rows`` slots from (data, offsets [n + 1]) with n <= rows (copies
        the data once: the source may be a read-only view of a snapshot file)."""
        n = offsets.shape[0] - 1
        col = cls(rows)
        base, end = int(offsets[0]), int(offsets[-1])
        if end == base:
            return col
        col.data = np.array(np.asarray(data, dtype=np.uint8)[base:end])
        col.used = col.live = end - base
        col._index()
        col.start[:n] = offsets[:-1] - base
        col.start[n:] = col.used
        col.length[:n] = np.diff(offsets)
        return col

    def slots(self) -> np.ndarray:
        """Slots holding a value, ascending."""
        return np.flatnonzero(self.length)  # int64


def key_hash(key: bytes) -> int:
    return zlib.crc32(key)


def _crc32_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC32_TABLE = _crc32_table()


def key_hashes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``key_hash`` of many byte strings ``data[starts[i]:starts[i] + lengths[i]]`` at once.

    A restore rebuilds the index of every key; one ``zlib.crc32`` call per key took
    about as long as the rest of the rebuild. This runs the table-driven CRC-32 one
    byte position at a time over all keys instead (longest first, so the keys still
    going at position j are a prefix).

    Returns:
        [n] int64, equal to ``zlib.crc32`` of each string.
    """
    n = lengths.shape[0]
    order = np.argsort(-lengths.astype(np.int64), kind="stable")
    begin = starts[order].astype(np.int64)
    # going[j]: how many strings are longer than j bytes
    going = np.bincount(lengths.astype(np.int64), minlength=1)[::-1].cumsum()[::-1]
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    for j in range(1, going.shape[0]):
        live = int(going[j])
        c = crc[:live]
        byte = data[begin[:live] + (j - 1)].astype(np.uint32)
        crc[:live] = _CRC32_TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    out = np.empty(n, dtype=np.int64)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


class KeyIndex:
    """key (UTF-8 bytes) -> slot, for the keys held by ``column``."""

    def __init__(self, column: ByteColumn) -> None:
        self.column = column
        self.table = np.full(0, _EMPTY, dtype=np.int32)
        self.count = 0
        self._tombstones = 0

    def __len__(self) -> int:
        return self.count

    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def _probe(self, key: bytes) -> tuple[int, int]:
        """(position of key or -1, first reusable position)."""
        size = self.table.shape[0]
        if size == 0:
            return -1, -1
        mask, table, col = size - 1, self.table, self.column
        i = key_hash(key) & mask
        reusable = -1
        while True:
            s = int(table[i])
            if s == _EMPTY:
                return -1, (i if reusable < 0 else reusable)
            if s == _TOMBSTONE:
                if reusable < 0:
                    reusable = i
            elif col.equals(s, key):
                return i, reusable
            i = (i + 1) & mask

    def get(self, key: bytes) -> int | None:
        pos, _ = self._probe(key)
        return None if pos < 0 else int(self.table[pos])

    def add(self, key: bytes, slot: int) -> None:
        """Maps a key that is not in the index (its bytes already in ``column[slot]``)."""
        if 2 * (self.count + self._tombstones + 1) > self.table.shape[0]:
            self.rebuild()  # the column holds the new key already: it is inserted too
            return
        _, free = self._probe(key)
        if self.table[free] == _TOMBSTONE:
            self._tombstones -= 1
        self.table[free] = slot
        self.count += 1

    def remove(self, key: bytes) -> None:
        pos, _ = self._probe(key)
        if pos >= 0:
            self.table[pos] = _TOMBSTONE
            self.count -= 1
            self._tombstones += 1

    def clear(self) -> None:
        self.table = np.full(0, _EMPTY, dtype=np.int32)
        self.count = self._tombstones = 0

    def rebuild(self) -> None:
        """Re-inserts every key of the column (vectorised), sized for load 1/4 and
        without tombstones."""
        col = self.column
        slots = col.slots()
        size = _MIN_TABLE
        while size < 4 * len(slots):  # load <= 1/4 after a rebuild, <= 1/2 before the next
            size *= 2
        hashes = key_hashes(col.data, col.start[slots], col.length[slots])
        table = np.full(size, _EMPTY, dtype=np.int32)
        home = hashes & (size - 1)
        # Inserting keys in order of their home cell, linear probing puts key i at
        # max(home_i, position_{i-1} + 1): a running maximum, no probing loop. Each
        # key then sits in an unbroken run of full cells from its home, as a probe
        # expects. Only keys pushed past the table's end wrap around and probe.
        order = np.argsort(home, kind="stable")
        rank = np.arange(len(slots), dtype=np.int64)
        pos = np.maximum.accumulate(home[order] - rank) + rank if len(slots) else rank
        fits = pos < size
        table[pos[fits]] = slots[order[fits]]
        for i in order[~fits].tolist():
            p = int(home[i])
            while table[p] != _EMPTY:
                p = (p + 1) & (size - 1)
            table[p] = slots[i]
        self.table, self.count, self._tombstones = table, len(slots), 0

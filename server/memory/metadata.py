"""Per-memory string metadata (user, session, kind, source, ...): small and bounded,
validated once, stored as compact JSON bytes (in the write-ahead log, in snapshots
and in the bank's metadata column)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidArgument

MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256


def validate_metadata(meta: Any, field: str = "metadata") -> dict[str, str] | None:
    """A memory's metadata (or a read filter) checked against the size bounds; None if empty.

    Raises:
        InvalidArgument: not a str -> str mapping, too many entries, empty or long keys,
            long values.
    """
    if not meta:
        return None
    if not isinstance(meta, dict):
        raise InvalidArgument(f"{field} must be a string -> string map", field=field)
    if len(meta) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{field} has {len(meta)} entries; at most "
                              f"{MAX_METADATA_ENTRIES} are allowed", field=field)
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"{field} keys and values must be strings", field=field)
        if not 1 <= len(k) <= MAX_METADATA_KEY_CHARS:
            raise InvalidArgument(f"{field} key {k[:80]!r} must be 1-{MAX_METADATA_KEY_CHARS} "
                                  "characters", field=field)
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise InvalidArgument(f"{field} value of {k!r} is {len(v)} characters; at most "
                                  f"{MAX_METADATA_VALUE_CHARS} are allowed", field=field)
    return dict(meta)


def encode_metadata(meta: dict[str, str] | None) -> bytes:
    """A memory's metadata as compact JSON bytes (b"" for none): WAL and snapshots."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() if meta else b""


def decode_metadata(raw: bytes) -> dict[str, str] | None:
    return json.loads(bytes(raw).decode()) if raw else None


class MetadataIndex:
    """(key, value) -> the slots whose metadata holds it: what a read's ``where``
    filter looks up instead of decoding every slot's metadata."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], set[int]] = {}

    def replace(self, slot: int, old: dict[str, str] | None,
                new: dict[str, str] | None) -> None:
        for item in (old or {}).items():
            slots = self._slots.get(item)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._slots[item]
        for item in (new or {}).items():
            self._slots.setdefault(item, set()).add(slot)

    def matching(self, where: dict[str, str]) -> set[int]:
        """Slots whose metadata holds every (key, value) of ``where``."""
        matched: set[int] | None = None
        for item in where.items():
            slots = self._slots.get(item, set())
            matched = set(slots) if matched is None else matched & slots
            if not matched:
                break
        return matched or set()

    def with_key(self, key: str) -> set[int]:
        """Slots whose metadata has ``key`` (with any value)."""
        out: set[int] = set()
        for (k, _), slots in self._slots.items():
            if k == key:
                out |= slots
        return out

    def clear(self) -> None:
        self._slots.clear()

"""The logic of ``apcm mcp``'s tools over one ``MemoryClient``, free of MCP types.

What keeps a language model from hurting the user lives here, not in the schema
(a host may skip schema checks): ``recall`` drops hits below ``RECALL_MIN_SCORE``;
``forget`` deletes only a memory named by key or by id, or the one memory a query
matches above ``FORGET_MIN_SCORE``, and without ``confirm`` it only says what it
would delete. A memory picked from a read is deleted by (slot, write sequence),
checked under the bank lock, so a write that lands in that slot meanwhile is never
deleted in its place.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import (
    ApcmError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from .sync import MemoryClient
from .types import Memory

# Cosine of query and memory under the shipped all-MiniLM-L6-v2 text model: queries
# about nothing stored topped out at 0.25, questions about a stored fact at >= 0.46.
RECALL_MIN_SCORE = 0.35
# A question about a fact scored 0.46-0.80 against it, the fact's own words ~0.97;
# a deletion by query needs the memory nearly restated.
FORGET_MIN_SCORE = 0.7
MAX_TOP_K = 50
DEFAULT_BANK_CAPACITY = 10_000
# The server's bounds (server/domain/recall.py, server/memory/metadata.py,
# server/memory/names.py, Settings.max_key_length and max_bank_capacity); a test
# checks they agree.
MAX_TEXT_CHARS = 16_384
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
MAX_KEY_CHARS = 256
MAX_BANK_CAPACITY = 4_194_304
BANK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ID_PATTERN = r"^[0-9]{1,19}:[0-9]{1,20}$"


class ToolFailure(Exception):
    """A failed call, with a sentence telling the model what to do (made a tool error)."""


def explain(error: ApcmError, target: str) -> str:
    """An ApCM client error as advice for a language model."""
    msg = str(error)
    if isinstance(error, (UnavailableError, DeadlineExceededError)):
        return (f"The memory server at {target} is unreachable ({type(error).__name__}). "
                "Memory is unavailable right now: continue without it, and tell the user "
                "that memory could not be reached if it matters.")
    if isinstance(error, NotFoundError):
        return (f"Not found: {msg}. Call list_banks to see the banks that exist, call "
                "create_bank to make one, or leave `bank` out to use the default bank.")
    if isinstance(error, InvalidArgumentError):
        return f"The arguments were rejected: {msg}. Fix them and call the tool again."
    if isinstance(error, FailedPreconditionError):
        return f"The memory server cannot do this: {msg}. Do not retry this call."
    return f"The memory server refused the call: {msg}."


def memory_id(slot: int, sequence: int) -> str:
    """The id a tool shows for a memory: its slot and write sequence (``"12:345"``)."""
    return f"{slot}:{sequence}"


def parse_id(value: str) -> tuple[int, int]:
    if not re.fullmatch(ID_PATTERN, value):
        raise ToolFailure(f"`id` {value[:40]!r} is not a memory id: pass the `id` exactly as "
                          "recall or forget returned it, such as '12:345'.")
    slot, sequence = value.split(":")
    return int(slot), int(sequence)


def _hit(h: Memory) -> dict[str, Any]:
    hit: dict[str, Any] = {"id": memory_id(h.slot, h.sequence), "text": h.text, "key": h.key,
                           "similarity": round(h.score, 4), "metadata": h.metadata}
    if h.context:
        hit["before"] = [c.text for c in h.context if c.offset < 0]
        hit["after"] = [c.text for c in h.context if c.offset > 0]
    return hit


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ToolFailure(f"`{name}` must be between {low:g} and {high:g}, got {value:g}; "
                          "fix it and call the tool again.")


class AgentMemory:
    """The tools' logic over one ``MemoryClient`` (no MCP types; easy to test)."""

    def __init__(self, client: MemoryClient, target: str) -> None:
        self.client = client
        self.target = target

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApcmError as e:
            raise ToolFailure(explain(e, self.target)) from e

    def remember(self, text: str, bank: str | None = None, key: str | None = None,
                 metadata: dict[str, str] | None = None) -> dict[str, Any]:
        written = self._call(self.client.remember, text, bank=bank,
                             keys=[key] if key else None, metadata=metadata)[0]
        return {"stored": True, "id": memory_id(written.slot, written.sequence),
                "key": written.key, "replaced": written.replaced,
                "evicted_key": written.evicted_key if written.evicted else None}

    def recall(self, query: str, bank: str | None = None, top_k: int = 5,
               filter: dict[str, str] | None = None,  # noqa: A002
               mode: str | None = None, context: int | None = None,
               min_score: float = RECALL_MIN_SCORE) -> list[dict[str, Any]]:
        """Hits best first, each with its id and similarity; none below ``min_score``."""
        _check_range("top_k", top_k, 1, MAX_TOP_K)
        _check_range("min_score", min_score, -1.0, 1.0)
        hits = self._call(self.client.recall, query, bank=bank, top_k=int(top_k),
                          filter=filter, mode=mode, context=context, min_score=min_score)
        return [_hit(h) for h in hits]

    def forget(self, key: str | None = None, query: str | None = None,
               bank: str | None = None, id: str | None = None,  # noqa: A002
               confirm: bool = False) -> dict[str, Any]:
        """Deletes (``confirm``) or shows (default) the one memory named or matched."""
        if sum(bool(v) for v in (key, query, id)) != 1:
            raise ToolFailure("Give exactly one of `key` (the memory's key), `id` (as recall "
                              "returned it) or `query` (a restatement of the memory).")
        if key:
            return self._forget_key(key, bank, confirm)
        if id:
            slot, sequence = parse_id(id)
            return self._forget_exact({"id": id}, slot, sequence, bank, confirm)
        assert query is not None
        target = self._match(query, bank)
        return self._forget_exact(target, target.pop("slot"), target.pop("sequence"), bank,
                                  confirm)

    def _forget_key(self, key: str, bank: str | None, confirm: bool) -> dict[str, Any]:
        found = self._call(self.client.delete_slots, bank or "", keys=[key], dry_run=True)
        if found.deleted == 0:
            raise ToolFailure(f"No memory has the key {key!r}, so nothing was deleted. Use "
                              "recall to find the memory, then forget it by its id.")
        if not confirm:
            return _preview({"key": key}, f"key={key!r}")
        gone = self._call(self.client.delete_slots, bank or "", keys=[key])
        return {"deleted": gone.deleted, "memories": [{"key": key}]}

    def _forget_exact(self, target: dict[str, Any], slot: int, sequence: int,
                      bank: str | None, confirm: bool) -> dict[str, Any]:
        args = {"bank": bank or "", "slots": [slot], "sequences": [sequence]}
        if not confirm:
            if self._call(self.client.delete_slots, dry_run=True, **args).deleted == 0:
                raise _gone(target["id"])
            return _preview(target, f"id={target['id']!r}")
        if self._call(self.client.delete_slots, **args).deleted == 0:
            raise _gone(target["id"])
        return {"deleted": 1, "memories": [target]}

    def _match(self, query: str, bank: str | None) -> dict[str, Any]:
        """The one memory ``query`` restates (cosine >= FORGET_MIN_SCORE), with slot and
        sequence; a failure naming the candidates otherwise."""
        hits = self._call(self.client.recall, query, bank=bank, top_k=3, mode="dense")
        strong = [h for h in hits if h.score >= FORGET_MIN_SCORE]
        if len(strong) == 1:
            return {**_hit(strong[0]), "slot": strong[0].slot, "sequence": strong[0].sequence}
        shown = "; ".join(f"id {memory_id(h.slot, h.sequence)} (similarity {h.score:.2f}): "
                          f"{h.text[:80]!r}" for h in (strong or hits))
        if strong:
            raise ToolFailure(f"{len(strong)} memories match that query closely, so nothing "
                              f"was deleted. Forget one of them by its id: {shown}.")
        best = f"the best scored {hits[0].score:.2f}" if hits else "the bank is empty"
        raise ToolFailure(
            f"No memory clearly matches that query (forgetting by query needs similarity "
            f"{FORGET_MIN_SCORE:.2f} or more; {best}), so nothing was deleted."
            + (f" If one of these is meant, forget it by its id: {shown}." if hits else ""))

    def create_bank(self, name: str, capacity: int = DEFAULT_BANK_CAPACITY) -> dict[str, Any]:
        _check_range("capacity", capacity, 1, MAX_BANK_CAPACITY)
        existing = {b.name: b for b in self._call(self.client.list_banks)}
        if name in existing:
            b = existing[name]
            return {"created": False, "name": name, "capacity": b.capacity,
                    "memories": b.occupied}
        b = self._call(self.client.create_bank, name, int(capacity), exist_ok=True)
        return {"created": True, "name": name, "capacity": b.capacity, "memories": b.occupied}

    def list_banks(self) -> list[dict[str, Any]]:
        banks = self._call(self.client.list_banks)
        return [{"name": b.name, "memories": b.occupied, "capacity": b.capacity}
                for b in banks]


def _preview(target: dict[str, Any], named: str) -> dict[str, Any]:
    return {"deleted": 0, "would_delete": [target],
            "next": f"Nothing was deleted yet. If this is the memory to forget, call forget "
                    f"again with {named} and confirm=true."}


def _gone(memory: str) -> ToolFailure:
    return ToolFailure(f"Memory {memory} is no longer there (deleted, or its slot was "
                       "rewritten since it was recalled), so nothing was deleted. Call recall "
                       "again to get its current id.")

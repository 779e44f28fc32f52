"""A bank's lexical (BM25) index over the texts of its text memories, on ``bm25s``.

Which memories are indexed: those whose payload *is* their text, i.e. written as
texts without explicit payloads (``MemoryService.write``); the store marks them in
the write-ahead log (``text`` field of a write record) and in snapshots (the
bank's ``text_flags`` array). Data written before those marks existed is read
with a fallback: a non-empty payload that decodes as UTF-8 counts as text.

Keeping it current. ``bm25s`` indexes are static, so mutations (write, evict,
delete, clear; all under the bank lock) only edit the table ``slot -> payload``
here and bump a generation: O(1) per memory, no tokenising on the write path.
The first lexical query after a change rebuilds the index *outside* the bank
lock: it tokenises only texts it has not seen (token ids are cached per slot),
then builds the BM25 matrix from the cached ids (about 0.5 s per 10,000 short
texts on a 2-core box; reads between changes pay nothing). A rebuild is bounded
by the bank's size, and concurrent queries share one rebuild. A write that lands
while a query is being answered is seen by the next query; slots freed meanwhile
never come back, because the read keeps only slots the bank still holds.

The tokenizer is bm25s's (lower-case words, English stop words) with the
Snowball English stemmer (``PyStemmer``). Its vocabulary grows with every new
word; it is rebuilt from the live texts when it is much larger than they need.

BM25 parameters (``Bm25Params``): k1 = 0.9, b = 0.4 rather than the document
defaults 1.5 / 0.75. Memories are one to three sentences of uneven length: a
repeated word says little more than one occurrence (earlier saturation, lower
k1), and a short memory is not more relevant for being short (less length
normalisation, lower b). Chosen on the dialog, facts and FAQ sets of
``apcm bench hybrid`` together (see docs/agent-memory.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import bm25s
import numpy as np
from bm25s.tokenization import Tokenized, Tokenizer

# bm25s sets its logger to DEBUG on import: every index build would reach the server log
logging.getLogger("bm25s").setLevel(logging.WARNING)

try:  # the stemmer is a C extension; bm25s works (less well) without it
    import Stemmer

    def _stemmer() -> object | None:
        return Stemmer.Stemmer("english")
except ImportError:  # pragma: no cover - PyStemmer ships with the server extra
    def _stemmer() -> object | None:
        return None

_VOCAB_SLACK = 4  # rebuild the vocabulary when it is this many times the live one
_VOCAB_MIN = 50_000
# a vocabulary entry is a str key and an int in two dicts (the tokenizer's and the
# retriever's): an estimate, as Python objects have no exact size to add up cheaply
_VOCAB_ENTRY_BYTES = 200


def is_text(payload: bytes | None) -> bool:
    """The fallback for data without text marks: a non-empty UTF-8 payload."""
    if not payload:
        return False
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Bm25Params:
    """BM25's term saturation ``k1`` and length normalisation ``b`` (see the module)."""

    k1: float = 0.9
    b: float = 0.4


@dataclass(frozen=True)
class _Built:
    generation: int
    slots: np.ndarray  # [n] int64: document i of the retriever is slot slots[i]
    retriever: bm25s.BM25 | None  # None when there are no documents


@dataclass(frozen=True)
class Scores:
    """BM25 of Q queries over every indexed slot: ``values[q, i]`` is query q's score
    of slot ``slots[i]`` (0 where no query word is in the text)."""

    slots: np.ndarray  # [n] int64, ascending
    values: np.ndarray  # [Q, n] float32

    def of(self, q: int, slots: np.ndarray) -> np.ndarray:
        """Query q's scores [len(slots)] of the given slots (0 for slots not indexed)."""
        if not len(self.slots):
            return np.zeros(len(slots), dtype=np.float32)
        at = np.clip(np.searchsorted(self.slots, slots), 0, len(self.slots) - 1)
        return np.where(self.slots[at] == slots, self.values[q, at], 0.0).astype(np.float32)


class LexicalIndex:
    """BM25 over one bank's text memories; thread-safe (mutations under the bank lock,
    queries from any thread)."""

    def __init__(self, params: Bm25Params | None = None) -> None:
        self.params = params or Bm25Params()
        self._lock = threading.Lock()  # the table and generation: held only briefly
        self._build_lock = threading.Lock()  # the tokenizer, token cache and builds
        self._docs: dict[int, bytes] = {}
        self._generation = 0
        self._built = _Built(0, np.zeros(0, dtype=np.int64), None)
        self._tokenizer = self._new_tokenizer()
        self._tokens: dict[int, tuple[bytes, np.ndarray]] = {}
        self._doc_bytes = 0  # of the texts in _docs
        self._built_bytes = 0  # token ids, BM25 matrix and vocabulary of the last build

    @staticmethod
    def _new_tokenizer() -> Tokenizer:
        return Tokenizer(stopwords="en", stemmer=_stemmer())

    # -------------------------------------------------------------- mutations
    def __len__(self) -> int:
        return len(self._docs)

    def nbytes(self) -> int:
        """Bytes the index holds: its copy of the texts (exact, kept at every change)
        plus the token ids, BM25 matrix and vocabulary of the last build."""
        return self._doc_bytes + self._built_bytes

    def _drop(self, slot: int) -> bool:
        old = self._docs.pop(slot, None)
        if old is None:
            return False
        self._doc_bytes -= len(old)
        return True

    def set(self, slot: int, text: bytes | None) -> None:
        """Slot ``slot`` now holds ``text`` (UTF-8), or no text memory if None."""
        with self._lock:
            dropped = self._drop(slot)
            if text:
                self._docs[slot] = text
                self._doc_bytes += len(text)
            elif not dropped:
                return
            self._generation += 1

    def remove(self, slots: Iterable[int]) -> None:
        with self._lock:
            gone = [s for s in slots if self._drop(s)]
            if gone:
                self._generation += 1

    def clear(self) -> None:
        with self._lock:
            if self._docs:
                self._docs.clear()
                self._doc_bytes = 0
                self._generation += 1

    def load(self, docs: dict[int, bytes]) -> None:
        """Replaces the table (recovery, restore, a bank moved in)."""
        with self._lock:
            self._docs = {s: t for s, t in docs.items() if t}
            self._doc_bytes = sum(len(t) for t in self._docs.values())
            self._generation += 1

    def text_slots(self) -> list[int]:
        """Slots that hold a text memory (for snapshots)."""
        with self._lock:
            return sorted(self._docs)

    # -------------------------------------------------------------- queries
    def refresh(self) -> None:
        """Rebuilds the index if the table changed since the last build; call it
        without holding the bank lock."""
        self._current()

    def _current(self) -> _Built:
        with self._build_lock:
            with self._lock:
                if self._built.generation == self._generation:
                    return self._built
                generation, docs = self._generation, dict(self._docs)
            built = self._build(generation, docs)
            size = self._size_of(built)
            with self._lock:
                self._built = built
                self._built_bytes = size
            return built

    def _size_of(self, built: _Built) -> int:
        """Bytes of a build besides the texts (build lock held)."""
        tokens = sum(ids.nbytes for _, ids in self._tokens.values())
        vocab = len(self._tokenizer.get_vocab_dict()) * _VOCAB_ENTRY_BYTES
        matrix = 0
        if built.retriever is not None:
            matrix = sum(a.nbytes for a in built.retriever.scores.values()
                         if isinstance(a, np.ndarray))
        return built.slots.nbytes + tokens + vocab + matrix

    def _build(self, generation: int, docs: dict[int, bytes]) -> _Built:
        """Tokenises new texts (the build lock held) and builds the BM25 matrix."""
        if len(self._tokenizer.get_vocab_dict()) > max(
                _VOCAB_MIN, _VOCAB_SLACK * sum(len(t) for _, t in self._tokens.values())):
            self._tokenizer, self._tokens = self._new_tokenizer(), {}
        self._tokens = {s: v for s, v in self._tokens.items() if docs.get(s) is v[0]}
        todo = [s for s in docs if s not in self._tokens]
        if todo:
            ids = self._tokenizer.tokenize(
                [docs[s].decode("utf-8", errors="replace") for s in todo], update_vocab=True,
                show_progress=False, return_as="ids")
            for s, row in zip(todo, ids, strict=True):
                self._tokens[s] = (docs[s], np.asarray(row, dtype=np.int32))
        slots = np.fromiter(sorted(docs), dtype=np.int64, count=len(docs))
        if not len(slots):
            return _Built(generation, slots, None)
        retriever = bm25s.BM25(k1=self.params.k1, b=self.params.b)
        corpus = [self._tokens[int(s)][1].tolist() for s in slots]
        retriever.index(Tokenized(ids=corpus, vocab=self._tokenizer.get_vocab_dict()),
                        show_progress=False)
        return _Built(generation, slots, retriever)

    def scores(self, queries: list[str], allowed: np.ndarray) -> Scores:
        """BM25 of each query over every indexed slot that ``allowed`` (bool [capacity]:
        occupied and matching the read's filter) lets through; the others score 0."""
        built = self._current()
        if built.retriever is None:
            return Scores(built.slots, np.zeros((len(queries), 0), dtype=np.float32))
        keep = allowed[built.slots] if len(allowed) else np.zeros(len(built.slots), bool)
        with self._build_lock:  # the tokenizer's vocabulary is shared with builds
            ids = self._tokenizer.tokenize(queries, update_vocab=False, show_progress=False,
                                           return_as="ids")
        vocab_size = len(built.retriever.vocab_dict)
        values = np.zeros((len(queries), len(built.slots)), dtype=np.float32)
        for q, row in enumerate(ids):
            known = [t for t in row if t < vocab_size]
            if known:
                values[q] = np.where(keep, built.retriever.get_scores(known), 0.0)
        return Scores(built.slots, np.maximum(values, 0.0))

    def search(self, queries: list[str], allowed: np.ndarray, depth: int,
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The BM25 ranking of each query among the allowed slots, best first.

        Args:
            queries: Q texts.
            allowed: bool [capacity]: the slots that may be returned (occupied and
                matching the read's filter); filtering happens before the cut to depth.
            depth: most slots returned per query.

        Returns:
            Per query, (slots [n] int64, BM25 scores [n] float32) with n <= depth and
            every score > 0 (a memory sharing no word with the query is not ranked).
        """
        return [top(all_scores.slots, row, depth)
                for all_scores in (self.scores(queries, allowed),) for row in all_scores.values]


def top(slots: np.ndarray, scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The at most ``depth`` slots of positive score, best first."""
    n = min(depth, int(np.count_nonzero(scores > 0)))
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    best = np.argpartition(-scores, n - 1)[:n]
    best = best[np.argsort(-scores[best], kind="stable")]
    return slots[best], scores[best].astype(np.float32)

"""Texts to token ids, in runs of similar length, with the model's own fast tokenizer.

The sentence-transformers wrapper pads a whole batch to its longest text; a
remember of 64 memories of mixed length then spends most of the model's time
on padding. Here texts are sorted by token count and cut into runs of at most
``run_tokens`` padded tokens, a size each encoder picks for itself (see theirs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class Tokens:
    """The tokenizer of ``tokenizer.json``, truncating at ``max_length`` tokens."""

    def __init__(self, tokenizer_file: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # the file's own padding/truncation (128, fixed) is not what the model uses
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)

    def runs(self, texts: Sequence[str], run_tokens: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields ``(rows, ids, mask)``: indices into ``texts`` [b], token ids [b, L]
        int64 and attention mask [b, L] int64, longest texts first."""
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            width = int(lengths[order[start]])
            rows = order[start:start + max(1, run_tokens // max(width, 1))]
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = int(lengths[i])
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
            yield rows, ids, mask
            start += len(rows)


def mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
    """Token states [b, L, d] and mask [b, L] -> mean over real tokens [b, d] float32,
    L2-normalised if ``normalize``."""
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if normalize:
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float32, copy=False)

"""What a text request may cost, and how a text read is fused.

A text request's work is the embedder's, which is slow: one ``Read(texts)`` of
16 MB held it for minutes. So every request's texts are bounded together
(``max_request_text_bytes``, RESOURCE_EXHAUSTED past it, before any model work),
and they are embedded in chunks, checking the caller's deadline between chunks:
once it has passed nobody waits for the answer, and the rest is not embedded
(DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from ..memory.fusion import Fusion
from .params import ReadParams

EMBED_CHUNK = 64  # texts embedded between two deadline checks
MAX_TEXT_CHARS = 16_384  # one text to embed (MiniLM reads its first 256 tokens anyway)


def check_texts(texts: Sequence[str], max_batch: int, max_bytes: int, field: str) -> None:
    """Texts to embed: 1..max_batch non-empty strings of at most ``MAX_TEXT_CHARS``.

    Raises:
        InvalidArgument: no texts, too many, an empty or an overlong one.
        ResourceExhausted: more than ``max_bytes`` UTF-8 bytes together.
    """
    n = len(texts)
    if n == 0:
        raise InvalidArgument(f"{field} is empty; send at least one text", field=field)
    if n > max_batch:
        raise InvalidArgument(f"{field}: {n} texts exceed the maximum batch of {max_batch}",
                              field=field)
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise InvalidArgument(f"{field} must be non-empty strings", field=field)
        if len(t) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"a text of {len(t)} characters exceeds the limit of "
                                  f"{MAX_TEXT_CHARS}", field=field)
    check_text_bytes(texts, max_bytes, field)


def check_text_bytes(texts: Sequence[str], limit: int, field: str) -> None:
    """Raises ``ResourceExhausted`` if the texts' UTF-8 bytes exceed ``limit``."""
    total = 0
    for t in texts:
        total += len(t.encode("utf-8", errors="surrogatepass"))
        if total > limit:
            raise ResourceExhausted(
                f"{field}: this request's texts exceed {limit} bytes (max_request_text_bytes); "
                "send them in smaller requests", limit="max_request_text_bytes", field=field)


def check_deadline(deadline: float | None, what: str) -> None:
    """Raises ``DeadlineExceeded`` if ``deadline`` (``time.monotonic()``) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the call's deadline passed before {what}")


def embed_in_chunks(embed: Callable[[np.ndarray], np.ndarray], texts: Sequence[str],
                    deadline: float | None) -> np.ndarray:
    """``embed`` of the texts [B] in chunks, stopping once the deadline has passed."""
    parts = []
    for i in range(0, len(texts), EMBED_CHUNK):
        check_deadline(deadline, f"embedding text {i + 1} of {len(texts)}")
        part = np.array(list(texts[i:i + EMBED_CHUNK]), dtype=object)
        parts.append(np.asarray(embed(part), dtype=np.float32).reshape(len(part), -1))
    return np.concatenate(parts)


def fusion_of(params: ReadParams, bank_context: int) -> Fusion:
    """The fusion of a text read: the request's method and context, else the bank's."""
    context = params.context if params.context is not None else bank_context
    return Fusion(method=params.fusion or "convex", context=context)

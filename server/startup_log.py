"""What ``apcm serve`` logs while it starts: one line per stage with its duration,
and other libraries held at WARNING so their chatter does not bury those lines.

bm25s sets its own logger to DEBUG when imported, sentence-transformers logs each
model load at INFO and transformers draws a tqdm bar over its weights; a server's
log is read by operators and log shippers, not watched on a terminal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("apcm")

THIRD_PARTY = ("bm25s", "sentence_transformers", "transformers", "huggingface_hub",
               "urllib3", "filelock", "numba", "faiss", "matplotlib", "PIL", "httpx",
               "httpcore", "torch")


def configure_logging(level: str) -> None:
    """Our records at ``level``, third-party ones at WARNING (or above), no tqdm bars."""
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(quiet)
    # read by huggingface_hub (and so transformers) when first imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


@contextmanager
def stage(what: str) -> Iterator[dict[str, str]]:
    """Logs ``start-up: <what> (<seconds> s)`` once the block is done; the block may
    add detail by setting ``["detail"]`` on the yielded dict."""
    t0 = time.monotonic()
    note: dict[str, str] = {}
    yield note
    detail = f": {note['detail']}" if note.get("detail") else ""
    log.info("start-up: %s%s (%.2f s)", what, detail, time.monotonic() - t0)

"""Everything one server instance owns: codec, engine, banks, persistence, metrics.

The servicer reaches the domain only through this object, so the gRPC layer
stays a thin proto <-> domain translation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from apcm.server.codecs.base import Codec
from apcm.server.config import Settings
from apcm.server.domain.batching import KeyedBatcher
from apcm.server.domain.engine import Engine
from apcm.server.errors import FailedPrecondition
from apcm.server.memory.bank import ReadResult
from apcm.server.memory.store import MemoryStore
from apcm.server.metrics import Metrics

log = logging.getLogger(__name__)


class Runtime:
    """Components of a running server and its readiness flag."""

    def __init__(self, settings: Settings, codec: Codec, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.codec = codec
        self.engine = engine
        self.metrics = metrics
        self.ready = threading.Event()
        self.on_serving_change: Callable[[bool], None] = lambda serving: None
        self.store = MemoryStore(
            code_dim=codec.code_dim,
            code_dtype=codec.code_dtype,
            scale=codec.quantizer.scale,
            device=codec.device,
            max_capacity=settings.max_bank_capacity,
            max_payload_bytes=settings.max_payload_bytes,
            max_key_length=settings.max_key_length,
            default_policy=settings.default_policy,
            default_half_life=settings.default_half_life,
            metric=codec.similarity_weights,
        )
        self.persistence: Any = self._build_persistence()
        metrics.watch_banks(self.store.list)
        self._reads: KeyedBatcher | None = None
        if settings.batching:
            wait_s = settings.batch_max_wait_us / 1e6

            def observe(method: str, n: int) -> None:
                metrics.batch_size.labels(method).observe(n)

            engine.enable_batching(settings.batch_max_size, wait_s, observe)
            self._reads = KeyedBatcher(
                self._read_rows, max_batch=settings.batch_max_size, max_wait_s=wait_s,
                observe=lambda n: observe("Read", n),
            )

    def read(self, bank: str, latents: torch.Tensor, *, top_k: int, temperature: float,
             min_score: float | None, soft: bool, count_access: bool) -> ReadResult:
        """Recall from a bank; concurrent reads with equal parameters share one search."""
        if self._reads is None:
            return self.store.read(bank, latents, top_k=top_k, temperature=temperature,
                                   min_score=min_score, soft=soft, count_access=count_access)
        key = (bank, top_k, temperature, min_score, soft, count_access)
        rows = self._reads(key, latents.detach().cpu().numpy())
        soft_rows = [s for _, s in rows]
        return ReadResult(
            results=[r for r, _ in rows],
            soft=torch.stack(soft_rows) if soft and soft_rows[0] is not None else None,
        )

    def _read_rows(self, key: tuple, latents: np.ndarray) -> list[tuple[Any, Any]]:
        bank, top_k, temperature, min_score, soft, count_access = key
        result = self.store.read(
            bank, torch.from_numpy(latents).to(self.codec.device), top_k=top_k,
            temperature=temperature, min_score=min_score, soft=soft, count_access=count_access,
        )
        softs = list(result.soft) if result.soft is not None else [None] * len(result.results)
        return list(zip(result.results, softs, strict=True))

    def _build_persistence(self) -> Any:
        from apcm.server.persistence.manager import PersistenceManager

        return PersistenceManager(
            self.store, self.settings, self.codec.content_hash, self.codec.kind,
            metrics=self.metrics,
        )

    def recover(self) -> None:
        """Restore banks from disk, then make sure the default bank exists."""
        self.persistence.recover()
        self.persistence.start()
        s = self.settings
        self.store.create_bank(s.default_bank, s.default_bank_capacity, exist_ok=True)

    def require_ready(self) -> None:
        if not self.ready.is_set():
            raise FailedPrecondition("the server is not ready (starting, restoring or stopping)")

    def restore(self, name: str) -> Any:
        """Replace every bank with a snapshot; not serving while it runs."""
        self.ready.clear()
        self.on_serving_change(False)
        try:
            return self.persistence.restore(name)
        finally:
            self.ready.set()
            self.on_serving_change(True)

    def close(self) -> None:
        self.engine.close()
        if self._reads is not None:
            self._reads.close()
        try:
            self.persistence.close(final_snapshot=True)
        except Exception:
            log.exception("final snapshot failed")

"""``MemoryService``: the memory domain behind every RPC, on numpy and torch objects.

It owns, once each: request validation (through ``Engine`` for arrays, here for
the rest), batch-mean pooling, micro-batching, device placement, request limits,
readiness and the per-item metrics. The gRPC servicer only translates proto
messages to the arguments below and results back; the store and banks below it
keep their own invariants (keys, payload sizes, slot indices).

A Write goes ``service.write`` -> ``Engine`` (encode, quantise) -> ``store.write``;
a Read goes ``service.read`` -> ``Engine`` -> the read batcher -> ``store.read``
-> ``Engine`` (reconstructions), with the queries kept on the codec's device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codecs.base import Codec, ItemChecks
from ..config import Settings
from ..embedding.cache import EmbeddingCache
from ..embedding.embedder import Embedder, EmbedderSpec, resolve_spec
from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..memory.bank import MemoryBank
from ..memory.codecstage import CodecChanged
from ..memory.listing import ListedMemory
from ..memory.names import validate_bank_name, validate_snapshot_name
from ..memory.results import BankStats, ReadResult
from ..memory.scoring import CodeScorer
from ..metrics import Metrics
from ..startup_log import stage
from . import recall
from .bankcodecs import BankCodec
from .batching import KeyedBatcher, MicroBatcher, usable_cores
from .engine import Engine
from .limits import check_reply_size
from .params import MAX_TOP_K, ModelInfo, QueryHits, ReadParams, WrittenSlots
from .stores import BankStore, Replication, new_store

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = recall.MAX_TEXT_CHARS
MAX_PAGE = 200  # memories per listed page
# Encodes a write or read makes for a bank that keeps swapping codecs (a swap
# happens once per bank, so the second attempt all but always lands).
CODEC_RETRIES = 3


def _staged_items(bank: MemoryBank, inputs: np.ndarray | None,
                  per_item: bool) -> np.ndarray | None:
    """The float items a write's memories are (for a bank staging toward its own
    codec): each item, or the batch mean; None for codes, which are not staged."""
    if inputs is None or bank.staging is None:
        return None
    flat = inputs.reshape(inputs.shape[0], -1)
    return flat if per_item else flat.mean(axis=0, keepdims=True)


class MemoryService:
    """Codec, engine, banks, persistence and readiness of one server.

    Args:
        settings: the server's settings.
        codec: the served codec, already on its device.
        metrics: where per-item and per-bank metrics go.
        cluster: in cluster mode, the pod's node: its shards are the banks, its
            streams and object store the persistence.
    """

    def __init__(self, settings: Settings, codec: Codec, metrics: Metrics,
                 cluster: Replication | None = None) -> None:
        self.settings = settings
        self.codec = codec
        self.metrics = metrics
        self.engine = Engine(codec, settings.max_batch_size)
        self.on_serving_change: Callable[[bool], None] = lambda serving: None
        self._ready = threading.Event()
        self._pauses = 0  # restores in flight; serving resumes when the last one ends
        self._pause_lock = threading.Lock()
        self.cluster = cluster
        self.store: BankStore = cluster.store if cluster is not None else new_store(settings, codec)
        self.embedder: Embedder | None = None
        spec = resolve_spec(settings.embedder, codec.extra_metadata)
        if spec is not None:
            with stage("loaded the text embedder") as note:
                self.embedder = self._load_embedder(spec)
                note["detail"] = (f"{spec.describe()} on {self.codec.device} through "
                                  f"{self.embedder.backend}")

        def observe_cache(hits: int, misses: int) -> None:
            metrics.query_cache.labels("hit").inc(hits)
            metrics.query_cache.labels("miss").inc(misses)

        self._query_cache = EmbeddingCache(settings.query_cache_size, observe_cache)
        self._embed: Callable[[np.ndarray], Any] = self._embed_now
        self.persistence: Any = self._build_persistence()
        metrics.watch_banks(self.store.list)
        metrics.memory_limit.set(settings.effective_memory_limit_bytes)
        metrics.max_banks.set(settings.max_banks)
        self._reads: KeyedBatcher | None = None
        if settings.batching:
            wait_s = settings.batch_max_wait_us / 1e6

            def observe(method: str, n: int) -> None:
                metrics.batch_size.labels(method).observe(n)

            self.engine.enable_batching(settings.batch_max_size, wait_s, observe)
            if self.embedder is not None:
                self._embed = MicroBatcher(self._embed_now, max_batch=settings.batch_max_size,
                                           max_wait_s=wait_s, name="Embed",
                                           observe=lambda n: observe("Embed", n))
            self._reads = KeyedBatcher(
                self._read_batch, max_batch=settings.batch_max_size, max_wait_s=wait_s,
                observe=lambda n: observe("Read", n),
                lanes=settings.read_lanes or usable_cores(),
            )

    @staticmethod
    def check_settings(settings: Settings) -> None:
        """Raises ``ModelFileError`` for an ``--embedder`` JSON object that does not parse
        (checked before any model loads; "auto" is checked against the model later)."""
        if settings.embedder not in ("", "auto", "none"):
            resolve_spec(settings.embedder, {})

    def _load_embedder(self, spec: EmbedderSpec) -> Embedder:
        if spec.dim != self.codec.input_dim:
            raise FailedPrecondition(
                f"embedder {spec.model} makes {spec.dim}-d vectors, but model "
                f"{self.codec.name} takes {self.codec.input_dim} values per item")
        s = self.settings
        return Embedder(spec, str(self.codec.device), backend=s.embedder_backend,
                        threads=s.torch_threads,
                        cache_dir=Path(s.embedder_cache_dir) if s.embedder_cache_dir else None)

    def _embed_now(self, texts: np.ndarray) -> np.ndarray:
        assert self.embedder is not None
        return self.embedder.embed(texts)

    def embed(self, texts: Sequence[str], field: str = "texts",
              deadline: float | None = None) -> np.ndarray:
        """Texts [B] -> items [B, L, D] float32 by the model's embedder (micro-batched),
        in chunks, stopping once ``deadline`` (``time.monotonic()``) has passed.

        Raises:
            FailedPrecondition: the served model names no embedder (vectors only).
            InvalidArgument: no texts, too many, an empty or an overlong one.
            ResourceExhausted: more than ``max_request_text_bytes`` of text.
            DeadlineExceeded: the deadline passed (see ``recall``).
        """
        if self.embedder is None:
            raise FailedPrecondition(
                f"model {self.codec.name!r} serves vectors only: it names no text embedder "
                "(or the server runs with --embedder none). Send inputs or codes, or serve "
                "a text model such as model_weights/text-minilm.safetensors.")
        n = len(texts)
        recall.check_texts(texts, self.settings.max_batch_size,
                           self.settings.max_request_text_bytes, field)
        if field == "query":  # agents repeat questions; memories are written once
            vectors = self._query_cache.embed(
                texts, lambda missing: recall.embed_in_chunks(self._embed, missing, deadline))
        else:
            vectors = recall.embed_in_chunks(self._embed, texts, deadline)
        self._count("Embed", n)
        return np.asarray(vectors, dtype=np.float32).reshape(n, *self.codec.input_shape)

    def _build_persistence(self) -> Any:
        if self.cluster is not None:
            return self.cluster
        from ..persistence.manager import PersistenceManager

        return PersistenceManager(
            self.store, self.settings, self.codec.content_hash, self.codec.kind,
            metrics=self.metrics,
        )

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Restore banks from disk, make sure the default bank exists, warm up, serve."""
        with stage("recovered the banks") as note:
            report = self.persistence.recover()
            banks = self.store.list()
            if report is None:  # a cluster pod: its shards catch up in ``start``
                note["detail"] = "joined the cluster"
            else:
                note["detail"] = (
                    f"{len(banks)} banks, {sum(b.occupied for b in banks)} memories from "
                    f"{report.snapshot or 'no snapshot'} + {report.replayed} log records in "
                    f"{self.settings.data_dir}")
        self.persistence.start()
        self.store.fit_pending()
        s = self.settings
        if self.cluster is None:  # a cluster's owner of the shard creates it
            self.store.create_bank(s.default_bank, s.default_bank_capacity, exist_ok=True)
        with stage("warm-up round trip"):
            self._warm_up()
        self._set_ready(True)

    def _warm_up(self) -> None:
        """One compress/decompress round trip; refuses to serve a codec that fails it."""
        x = np.zeros((2, *self.codec.input_shape), dtype=np.float32)
        codes = self.engine.compress(x)
        out = self.engine.decompress(codes)
        if out.shape != x.shape or not np.isfinite(out).all():
            raise FailedPrecondition("warm-up round trip failed: codec output is malformed")
        scorer: CodeScorer | None = self.codec.scorer
        if scorer is not None:  # compiles the lookup-table kernel now, not on a first read
            scorer.dots(torch.zeros(1, scorer.search_dim), torch.as_tensor(codes).cpu())

    def stop_serving(self) -> None:
        self._set_ready(False)

    def _set_ready(self, serving: bool) -> None:
        if serving:
            self._ready.set()
        else:
            self._ready.clear()
        if self.cluster is not None:
            self.cluster.set_serving(serving)
        self.on_serving_change(serving)

    def close(self) -> None:
        self._set_ready(False)
        self.engine.close()
        if isinstance(self._embed, MicroBatcher):
            self._embed.close()
        if self._reads is not None:
            self._reads.close()
        try:
            self.persistence.close(final_snapshot=True)
        except Exception:
            log.exception("final snapshot failed")

    # -- model ---------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        c = self.codec
        return ModelInfo(
            name=c.name, kind=c.kind, input_shape=c.input_shape, code_dim=c.code_dim,
            code_dtype=c.code_dtype, bytes_per_code=c.bytes_per_code, input_bytes=c.input_bytes,
            compression_ratio=c.compression_ratio, model_hash=c.content_hash,
            device=str(c.device), max_batch_size=self.settings.max_batch_size,
            max_message_bytes=self.settings.max_message_bytes, max_top_k=MAX_TOP_K,
            max_bank_capacity=self.settings.max_bank_capacity,
            max_payload_bytes=self.settings.max_payload_bytes,
            max_key_length=self.settings.max_key_length,
            memory_limit_bytes=self.store.memory_limit_bytes or 0,
            max_banks=self.settings.max_banks,
            embedder=self.embedder.spec.describe() if self.embedder is not None else "",
        )

    def compress(self, inputs: np.ndarray) -> np.ndarray:
        """Items [B, L, D] -> codes [B, m] in the code dtype."""
        inputs = self.engine.check_inputs(inputs)
        codes = self.engine.compress(inputs)
        self._count("Compress", inputs.shape[0])
        return codes

    def compress_checked(self, inputs: np.ndarray) -> tuple[np.ndarray, ItemChecks | None]:
        """``compress`` plus the codec's per-item domain checks (None if it has none)."""
        inputs = self.engine.check_inputs(inputs)
        codes = self.engine.compress(inputs)
        checks = self._check_items(inputs, "Compress", codes)
        self._count("Compress", inputs.shape[0])
        return codes, checks

    def _check_items(self, inputs: np.ndarray, method: str,
                     codes: np.ndarray | torch.Tensor | None = None,
                     engine: Engine | None = None) -> ItemChecks | None:
        checks = (engine or self.engine).check_items(inputs, codes)
        if checks is not None:
            self.metrics.observe_checks(method, checks.in_domain_percentile, checks.flagged)
        return checks

    def decompress(self, codes: np.ndarray) -> np.ndarray:
        """Codes [B, m] -> items [B, L, D] float32."""
        codes = self.engine.check_codes(codes)
        outputs = self.engine.decompress(codes)
        self._count("Decompress", codes.shape[0])
        return outputs

    # -- write / read --------------------------------------------------------------------
    def write(
        self,
        bank: str,
        *,
        inputs: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
        per_item: bool = False,
        keys: Sequence[str] = (),
        payloads: Sequence[bytes] = (),
        metadata: Sequence[dict[str, str] | None] = (),
        deadline: float | None = None,
    ) -> WrittenSlots:
        """Store items (encoded), codes or texts, as their batch mean or one memory each.

        Args:
            bank: bank name ("" for the default bank).
            inputs: items [B, L, D], or
            codes: codes [B, m] in the code dtype, or
            texts: B texts, embedded by the model's embedder (exactly one of the three).
                Each text is kept as its memory's payload unless payloads are given (in
                mean mode the texts, joined by newlines, are the one payload).
            per_item: one memory per item instead of the paper's batch mean.
            keys, payloads, metadata: none, or one per memory written ("" / b"" / {} for
                none); metadata is a small string -> string map usable as a read filter.
            deadline: the caller's (``time.monotonic()``): texts stop being embedded
                once it has passed.

        Returns:
            the written slots, with the codec's checks of each input item (inputs and
            texts only).
        """
        name = self.bank_name(bank)
        self.store.get(name)  # NOT_FOUND before any model work
        text_flags: list[bool] | None = None
        if texts is not None:
            if inputs is not None or codes is not None:
                raise InvalidArgument("content: set one of inputs, codes or texts",
                                      field="content")
            inputs = self.embed(texts, deadline=deadline)
            if not payloads:  # the payload is the text: it joins the lexical index
                payloads = [t.encode() for t in texts] if per_item \
                    else ["\n".join(texts).encode()]
                text_flags = [True] * len(payloads)
        if (inputs is None) == (codes is None):
            raise InvalidArgument("content: set one of inputs, codes or texts", field="content")
        if inputs is not None:
            inputs = self.engine.check_inputs(inputs)
        else:
            assert codes is not None
            codes = self.engine.check_codes(codes)
        for _ in range(CODEC_RETRIES):
            b = self.store.get(name)
            generation, engine = b.codec_generation, self._engine_of(b)
            stored = self._codes_to_store(engine, inputs, codes, per_item)
            checks = None
            if inputs is not None and codes is None:
                # per item, the stored codes are the items' codes: checks reuse them
                checks = self._check_items(inputs, "Write", stored if per_item else None,
                                           engine)
            n = stored.shape[0]
            for field, given in (("payloads", payloads), ("keys", keys),
                                 ("metadata", metadata)):
                if given and len(given) != n:
                    raise InvalidArgument(
                        f"{field}: {len(given)} given, but this write fills {n} slot(s) "
                        f"({'one per item' if per_item else 'the batch mean is one memory'})",
                        field=field,
                    )
            try:
                written = self.store.write(
                    name, stored, [k or None for k in keys] or [None] * n,
                    [p or None for p in payloads] or [None] * n,
                    [m or None for m in metadata] or None, text=text_flags,
                    items=_staged_items(b, inputs, per_item), generation=generation)
                break
            except CodecChanged:  # the bank swapped to its own codec meanwhile
                continue
        else:
            raise Unavailable(f"bank {name!r} kept changing codecs during this write; retry")
        self._count("Write", n)
        m = self.metrics
        m.bank_writes.labels(name).inc(n)
        evicted = sum(1 for w in written if w.evicted)
        if evicted:
            m.bank_evictions.labels(name).inc(evicted)
        out = WrittenSlots(written)
        out.checks = checks
        return out

    def _engine_of(self, bank: MemoryBank) -> Engine:
        """The engine of the codec a bank's codes are in: its own, or the served one."""
        own = bank.own_codec
        return own.codec.engine if own is not None and isinstance(own.codec, BankCodec) \
            else self.engine

    def _latents(self, engine: Engine, inputs: np.ndarray | None,
                 codes: np.ndarray | None) -> torch.Tensor:
        """Latents of validated items, or of codes of the served model, in ``engine``'s
        codec (a bank's own codec re-encodes what the served model's codes decode to)."""
        if inputs is not None:
            return engine.encode_latent(inputs)
        assert codes is not None
        if engine is self.engine:
            return engine.codes_to_latent(codes)
        return engine.encode_latent(self.engine.decompress(codes))

    def _codes_to_store(self, engine: Engine, inputs: np.ndarray | None,
                        codes: np.ndarray | None, per_item: bool) -> torch.Tensor:
        """The codes a write stores, from validated items or codes."""
        if codes is not None and per_item and engine is self.engine:
            return torch.from_numpy(codes.copy()).to(self.codec.device)
        latents = self._latents(engine, inputs, codes)
        if not per_item:
            latents = latents.mean(dim=0, keepdim=True)
        stored = engine.latent_to_codes(latents)
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise InvalidArgument("the inputs encode to NaN or infinite codes (values out of "
                                  "the model's range)", field="inputs")
        return stored

    def read(
        self,
        bank: str,
        params: ReadParams,
        *,
        inputs: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
        include_reconstruction: bool = False,
        include_payloads: bool = False,
        deadline: float | None = None,
    ) -> list[QueryHits]:
        """Recall from a bank for each query (items, codes or texts); see
        ``MemoryBank.read``. ``params.where`` filters by metadata before top-k; text
        reads fuse as ``recall.fusion_of`` says (``deadline``: as ``write``'s).

        Raises:
            ResourceExhausted: the reply would exceed ``max_message_bytes``; refused
                before any search work.
        """
        name = self.bank_name(bank)
        b = self.store.get(name)
        mode = params.mode
        if texts is not None:
            if inputs is not None or codes is not None:
                raise InvalidArgument("query: set one of inputs, codes or texts", field="query")
            inputs = self.embed(texts, "query", deadline)
            if mode is None:
                mode = "hybrid" if self.store.has_texts(name) else "dense"
        elif mode not in (None, "dense"):
            raise InvalidArgument(f"mode {mode} ranks by the query's words: send the query "
                                  "as texts, or use mode dense", field="mode")
        if (inputs is None) == (codes is None):
            raise InvalidArgument("query: set one of inputs, codes or texts", field="query")
        if inputs is not None:
            inputs = self.engine.check_inputs(inputs)
            n_queries = inputs.shape[0]
        else:
            assert codes is not None
            codes = self.engine.check_codes(codes)
            n_queries = codes.shape[0]
        check_reply_size(b, n_queries, params, input_bytes=self.codec.input_bytes,
                         limit=self.settings.max_message_bytes,
                         include_reconstruction=include_reconstruction,
                         include_payloads=include_payloads)
        fusion = recall.fusion_of(params, b.context)
        for _ in range(CODEC_RETRIES):
            b = self.store.get(name)
            generation, engine = b.codec_generation, self._engine_of(b)
            latents = self._latents(engine, inputs, codes)
            recall.check_deadline(deadline, "the search")
            try:
                if mode in ("hybrid", "lexical") or fusion.context:
                    result = self.store.read_fused(
                        name, latents, list(texts or [""] * n_queries), mode or "dense",
                        params.options(payloads=include_payloads), fusion,
                        generation=generation)
                else:
                    result = self._search(name, latents, params, include_payloads, generation)
            except CodecChanged:  # the bank swapped to its own codec meanwhile
                continue
            recon: list[np.ndarray] = []
            if include_reconstruction:
                hit_codes = [h.code for r in result.results for h in r.hits]
                if hit_codes:
                    # hits hold codes as the bank stores them; their codec decodes them
                    recon = list(engine.decode_codes(b.wire_codes(torch.stack(hit_codes))))
            soft = engine.decode_soft(result.soft) if result.soft is not None else None
            if b.codec_generation == generation:  # else hit codes may be re-encoded ones
                break
        else:
            raise Unavailable(f"bank {name!r} kept changing codecs during this read; retry")
        self._count("Read", latents.shape[0])
        out, cursor = [], 0
        for q, r in enumerate(result.results):
            n = len(r.hits)
            out.append(QueryHits(
                hits=r.hits,
                reconstructions=recon[cursor:cursor + n] if include_reconstruction else None,
                soft_reconstruction=soft[q] if soft is not None and n else None,
            ))
            cursor += n
        return out

    def _search(self, bank: str, latents: torch.Tensor, p: ReadParams,
                payloads: bool, generation: int) -> ReadResult:
        """Concurrent reads of one bank with equal parameters (and codec) share one
        search."""
        if self._reads is None:
            return self.store.read(bank, latents, p.options(payloads=payloads), generation)
        rows = self._reads((bank, p, payloads, generation), latents)
        soft_rows = [s for _, s in rows]
        return ReadResult(
            results=[r for r, _ in rows],
            soft=torch.stack(soft_rows) if p.soft and soft_rows[0] is not None else None,
        )

    def _read_batch(self, key: tuple[str, ReadParams, bool, int],
                    latents: torch.Tensor) -> list[tuple[Any, Any]]:
        bank, p, payloads, generation = key
        result = self.store.read(bank, latents, p.options(payloads=payloads), generation)
        softs = list(result.soft) if result.soft is not None else [None] * len(result.results)
        return list(zip(result.results, softs, strict=True))

    # -- banks ---------------------------------------------------------------------------
    def bank_name(self, name: str) -> str:
        """The bank a request names; the empty name means the default bank.

        Raises:
            InvalidArgument: not a valid bank name (checked before any lookup, so an
                error message never carries an unbounded name).
        """
        return validate_bank_name(name or self.settings.default_bank)

    def create_bank(self, name: str, capacity: int, *, policy: str | None = None,
                    half_life: float | None = None, exist_ok: bool = False,
                    context: int = 0) -> BankStats:
        return self.store.create_bank(name, capacity, policy=policy, half_life=half_life,
                                      exist_ok=exist_ok, context=context)

    def list_banks(self) -> list[BankStats]:
        return self.store.list()

    def describe_bank(self, name: str) -> BankStats:
        return self.store.describe(self.bank_name(name))

    def delete_slots(self, bank: str, slots: Sequence[int], keys: Sequence[str], *,
                     sequences: Sequence[int] | None = None,
                     dry_run: bool = False) -> tuple[int, list[str]]:
        return self.store.delete(self.bank_name(bank), list(slots), list(keys),
                                 sequences=None if sequences is None else list(sequences),
                                 dry_run=dry_run)

    def list_memories(self, bank: str, offset: int = 0,
                      limit: int = 50) -> tuple[int, list[ListedMemory]]:
        """``(memories in the bank, a page of them newest first)``.

        Raises:
            InvalidArgument: ``offset`` < 0 or ``limit`` outside 1..MAX_PAGE.
        """
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, got {offset}", field="offset")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be in [1, {MAX_PAGE}], got {limit}",
                                  field="limit")
        return self.store.page(self.bank_name(bank), offset, limit)

    def set_metadata(self, bank: str, slot: int, sequence: int,
                     metadata: dict[str, str] | None) -> bool:
        """Replaces one memory's metadata if ``slot`` still holds write ``sequence``."""
        return self.store.set_metadata(self.bank_name(bank), slot, sequence, metadata)

    def clear_bank(self, name: str) -> BankStats:
        return self.store.clear(self.bank_name(name))

    def drop_bank(self, name: str) -> None:
        name = validate_bank_name(name)
        self.store.drop_bank(name)
        self.metrics.forget_bank(name)

    # -- snapshots -----------------------------------------------------------------------
    def create_snapshot(self, name: str | None) -> Any:
        if name is not None:
            validate_snapshot_name(name)
        return self.persistence.snapshot(name)

    def list_snapshots(self) -> list[Any]:
        return self.persistence.list_snapshots()

    def restore_snapshot(self, name: str) -> Any:
        """Replace every bank with a snapshot; not serving while any restore runs."""
        validate_snapshot_name(name)
        with self._pause_lock:
            self._pauses += 1
            self._set_ready(False)
        try:
            return self.persistence.restore(name)
        finally:
            with self._pause_lock:
                self._pauses -= 1
                if self._pauses == 0:
                    self._set_ready(True)

    def _count(self, method: str, n: int) -> None:
        self.metrics.items.labels(method).inc(n)

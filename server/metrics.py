"""Prometheus metrics on an injected registry, served on their own HTTP port.

Labels are bounded: the RPC method, the status code, the direction, and bank
names (operator-created, capped by the number of banks) — never slots or keys.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
    5, 10,
)
IN_DOMAIN_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    """Every metric the server exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "apcm_requests", "RPCs finished, by method and status code", ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "apcm_request_duration_seconds", "RPC handling time", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "apcm_requests_in_flight", "RPCs being handled now", ["method"], registry=r
        )
        self.items = Counter(
            "apcm_items_processed", "Items (vectors, codes, queries) processed", ["method"],
            registry=r,
        )
        self.message_bytes = Counter(
            "apcm_message_bytes", "Serialized message bytes", ["method", "direction"], registry=r
        )
        self.model_info = Gauge(
            "apcm_model_info", "The served codec (value is always 1)",
            ["name", "kind", "hash", "device", "code_dim", "code_dtype", "ratio"], registry=r,
        )
        self.serving = Gauge("apcm_serving", "1 when health is SERVING, else 0", registry=r)
        self.memory_limit = Gauge(
            "apcm_memory_limit_bytes", "Bytes all banks may hold (--memory-limit-bytes)",
            registry=r,
        )
        self.max_banks = Gauge("apcm_max_banks", "Most banks that may exist (--max-banks)",
                               registry=r)
        self._banks = _BankCollector()
        r.register(self._banks)
        self.bank_evictions = Counter(
            "apcm_bank_evictions", "Memories evicted to make room", ["bank"], registry=r
        )
        self.bank_writes = Counter(
            "apcm_bank_writes", "Slots written", ["bank"], registry=r
        )
        self.snapshot_last_success = Gauge(
            "apcm_snapshot_last_success_timestamp_seconds", "Unix time of the last good snapshot",
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "apcm_snapshot_duration_seconds", "Time to write a snapshot",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )
        self.snapshot_failures = Counter(
            "apcm_snapshot_failures", "Snapshots that failed", registry=r
        )
        self.wal_bytes = Gauge("apcm_wal_bytes", "Size of the write-ahead log", registry=r)
        self.wal_healthy = Gauge(
            "apcm_wal_healthy",
            "1 while the write-ahead log can make writes durable, 0 after an I/O error",
            registry=r,
        )
        self.wal_fsync = Histogram(
            "apcm_wal_fsync_duration_seconds", "Time of one write-ahead-log fsync",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_domain = Histogram(
            "apcm_item_in_domain_percentile_ratio",
            "Per-item NLL percentile against the model's validation set (models with a "
            "density only; near 1 = unlike the training data)", ["method"],
            buckets=IN_DOMAIN_BUCKETS, registry=r,
        )
        self.out_of_domain = Counter(
            "apcm_items_out_of_domain", "Items the model flagged as out of its domain",
            ["method"], registry=r,
        )
        self.query_cache = Counter(
            "apcm_query_embedding_cache", "Query texts looked up in the embedding cache, by "
            "result (hit: the embedder was skipped)", ["result"], registry=r,
        )
        self.batch_size = Histogram(
            "apcm_batch_size", "Items per model call (after micro-batching)", ["method"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # -- hooks used by persistence and the store -----------------------------------
    def observe_checks(self, method: str, percentiles: Any, flagged: Any) -> None:
        """Per-item in-domain percentiles [B] and out-of-domain flags [B] of a request."""
        hist = self.in_domain.labels(method)
        for p in percentiles.tolist():
            hist.observe(p)
        n = int(flagged.sum())
        if n:
            self.out_of_domain.labels(method).inc(n)

    def observe_snapshot(self, duration_s: float, ok: bool) -> None:
        if ok:
            self.snapshot_duration.observe(duration_s)
            self.snapshot_last_success.set_to_current_time()
        else:
            self.snapshot_failures.inc()

    def set_wal_bytes(self, n: int) -> None:
        self.wal_bytes.set(n)

    def set_wal_healthy(self, ok: bool) -> None:
        self.wal_healthy.set(1 if ok else 0)

    def observe_fsync(self, duration_s: float) -> None:
        self.wal_fsync.observe(duration_s)

    def set_model(self, codec: Any) -> None:
        self.model_info.labels(
            name=codec.name, kind=codec.kind, hash=codec.content_hash[:16],
            device=str(codec.device),
            code_dim=str(codec.code_dim), code_dtype=codec.code_dtype,
            ratio=f"{codec.compression_ratio:g}",
        ).set(1)

    def watch_banks(self, source: Callable[[], list[Any]]) -> None:
        """Report bank capacity/occupancy from ``source()`` (bank stats) at scrape time."""
        self._banks.source = source

    def forget_bank(self, name: str) -> None:
        for metric in (self.bank_evictions, self.bank_writes):
            with contextlib.suppress(KeyError):
                metric.remove(name)

    # -- HTTP endpoint ---------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port (``port`` 0 picks a free one)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _BankCollector(Collector):
    """Bank gauges read when Prometheus scrapes, not on every write: describing a
    bank walks its slots, which is too slow for the write path of a large bank."""

    def __init__(self) -> None:
        self.source: Callable[[], list[Any]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        capacity = GaugeMetricFamily("apcm_bank_capacity_slots", "Slots of each bank",
                                     labels=["bank"])
        occupied = GaugeMetricFamily("apcm_bank_occupied_slots", "Occupied slots of each bank",
                                     labels=["bank"])
        used = GaugeMetricFamily(
            "apcm_memory_used_bytes",
            "Bytes the memory limit counts for all banks: every slot of their capacity "
            "(reserved, although banks allocate slots as they fill), keys, metadata and "
            "payloads (counted against apcm_memory_limit_bytes)")
        banks = GaugeMetricFamily("apcm_banks", "Banks that exist now")
        lists = GaugeMetricFamily(
            "apcm_index_lists", "Inverted lists of each bank's approximate index (0: none, "
            "reads scan every slot)", labels=["bank"])
        indexed = GaugeMetricFamily("apcm_index_slots", "Slots in each bank's index lists",
                                    labels=["bank"])
        trained = GaugeMetricFamily(
            "apcm_index_trained_at_slots", "Occupied slots each bank's index was trained on",
            labels=["bank"])
        building = GaugeMetricFamily(
            "apcm_index_building", "1 while a bank's index is being (re)built in the "
            "background", labels=["bank"])
        own = GaugeMetricFamily(
            "apcm_bank_codec_own", "1 when a bank's codes are in a codec fitted to its own "
            "memories, 0 while it uses the served model", labels=["bank"])
        staged = GaugeMetricFamily(
            "apcm_bank_codec_staged_items", "Items each bank has staged toward its next "
            "codec fit", labels=["bank"])
        declined = GaugeMetricFamily(
            "apcm_bank_codec_declined_fits", "Fits of each bank's codec not clearly better "
            "on held-out items than the codec it had", labels=["bank"])
        stats = self.source() if self.source is not None else []
        for s in stats:
            capacity.add_metric([s.name], s.capacity)
            occupied.add_metric([s.name], s.occupied)
            ix = getattr(s, "index", None)
            if ix is not None:
                lists.add_metric([s.name], ix.lists)
                indexed.add_metric([s.name], ix.slots)
                trained.add_metric([s.name], ix.trained_at)
                building.add_metric([s.name], int(ix.state in ("training", "retraining")))
            codec = getattr(s, "codec", None)
            if codec is not None:
                own.add_metric([s.name], int(codec.state == "own"))
                staged.add_metric([s.name], codec.staged)
                declined.add_metric([s.name], codec.declined)
        used.add_metric([], sum(s.reserved_bytes + s.payload_bytes for s in stats))
        banks.add_metric([], len(stats))
        yield capacity
        yield occupied
        yield used
        yield banks
        yield lists
        yield indexed
        yield trained
        yield building
        yield own
        yield staged
        yield declined

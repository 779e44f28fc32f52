"""Durability costs: acknowledged writes/s by WAL mode; snapshot/restore vs raw disk I/O.

Part 1 — writes/s. The server runs in its own process (``server_process``) and is
driven through the real client by 1 and ``--writers`` concurrent threads, each
sending one-item ``Write`` calls with a key and a 64-byte payload, for
``--seconds`` per cell; ``fsync`` (one fsync per group of concurrent writes)
against ``off`` (written to the OS, never fsynced). The same cells are measured
in-process against ``MemoryStore`` + WAL, which isolates the log's own cost
from the RPC's.

Part 2 — snapshot and restore of one bank of ``--slots`` slots (every slot
holding a code, a key and a payload), against a raw write + fsync and a raw
read of the same number of bytes on the same disk (``--dir``). Reads are cold:
the file's pages are dropped from the page cache first (``posix_fadvise``).
Goal (issue 5): snapshot and restore within 2x of raw I/O.

Part 3 — recovery speed. ``--writers`` threads write ``--replay-items`` items
(``Write`` calls of 1 and of 64 items, key + payload) in-process into a store
with a WAL in ``off`` mode (its fastest); then a fresh store replays that log,
as start-up does. Goal (issue 13): replay items/s >= the rate at which the same
records were written. Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    add_model_arguments,
    describe_machine,
    machine,
    markdown_table,
    server_process,
    set_torch_threads,
)

RAW_GOAL = 2.0
MODES = ("fsync", "off")
# The server refreshes bank gauges on every Write in O(capacity); a modest bank keeps
# that from masking the log's cost (full slots are evicted, still one logged write each).
RPC_BANK_SLOTS = 65_536
PAYLOAD = b"p" * 64

WRITE_COLUMNS = [
    ("path", "path"), ("mode", "wal mode"), ("writers", "writers"),
    ("writes_per_s", "acked writes/s"), ("vs_off", "vs off"),
    ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("records_per_fsync", "writes per fsync"),
    ("fsync_p50_ms", "fsync p50 ms"),
]
DISK_COLUMNS = [
    ("op", "op"), ("content", "slots hold"), ("mb", "file MB"), ("seconds", "seconds"),
    ("bank_s", "bank copy / rebuild s"), ("file_s", "file s (checksum + I/O)"),
    ("raw_seconds", "raw I/O s"), ("ratio", "total / raw"), ("file_ratio", "file / raw"),
    ("goal_met", f"total within {RAW_GOAL:g}x"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dir", default="var",
                        help="directory on the disk to measure; a temp dir is made and removed "
                             "inside it (default: var, the server's default data dir)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measuring time per writes/s cell and round (default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which the WAL modes alternate (default 3)")
    parser.add_argument("--writers", type=int, default=16,
                        help="concurrent writers of the group-commit cell (default 16)")
    parser.add_argument("--slots", type=int, default=1_000_000,
                        help="slots of the snapshot/restore bank (default 1,000,000)")
    parser.add_argument("--replay-items", type=int, default=64_000,
                        help="items written, then replayed, per recovery-speed cell")
    parser.add_argument("--skip-rpc", action="store_true",
                        help="measure writes/s in-process only (no server process)")


# ----------------------------------------------------------------------------- writes


def _drive(write_one: Any, writers: int, seconds: float) -> tuple[int, float, list[float]]:
    """Run ``writers`` threads calling ``write_one(tid, i)`` for ``seconds``.

    Returns:
        (acknowledged writes, elapsed seconds, per-write latencies in seconds).
    """
    latencies: list[list[float]] = [[] for _ in range(writers)]
    start = threading.Barrier(writers + 1)
    stop = threading.Event()

    def run(tid: int) -> None:
        start.wait()
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            write_one(tid, i)
            latencies[tid].append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in range(writers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


class _FsyncTimer:
    """Receives the WAL's fsync timings (the ``metrics`` hook)."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def observe_fsync(self, seconds: float) -> None:
        self.durations.append(seconds)

    def set_wal_bytes(self, n: int) -> None:
        pass


def _store(codec: Any, capacity: int) -> Any:
    import torch

    from apcm.server.memory.store import MemoryStore

    return MemoryStore(code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                       scale=codec.quantizer.scale, device=torch.device("cpu"),
                       max_capacity=max(capacity, 1), max_payload_bytes=1024,
                       max_key_length=64, default_policy="lfu", default_half_life=1000.0,
                       scorer=codec.scorer)


def _codes(codec: Any, n: int, seed: int) -> Any:
    import torch

    z = torch.randn(n, codec.latent_dim, generator=torch.Generator().manual_seed(seed))
    return codec.quantizer.quantize(z)


class InProcessTarget:
    """``MemoryStore.write`` with a WAL in ``mode``: the log's cost without the RPC's."""

    path = "in-process"

    def __init__(self, codec: Any, root: Path, mode: str) -> None:
        from apcm.server.persistence.wal import WriteAheadLog

        self.mode = mode
        self.timer = _FsyncTimer()
        self.wal = WriteAheadLog(Path(tempfile.mkdtemp(prefix=f"wal-{mode}-", dir=root)),
                                 codec.content_hash, mode=mode, metrics=self.timer)
        self.wal.open()
        self.store = _store(codec, RPC_BANK_SLOTS)
        self.store.set_log(self.wal)
        self.store.create_bank("bench", RPC_BANK_SLOTS)
        self.code = _codes(codec, 1, 0)

    def writer(self, tag: str) -> tuple[Any, Any]:
        def write_one(tid: int, i: int) -> None:
            self.store.write("bench", self.code, [f"{tag}-{tid}-{i}"], [PAYLOAD])

        return write_one, lambda: None

    def close(self) -> None:
        self.wal.close()


class RpcTarget:
    """One-item ``Write`` calls through the real client to a server process in ``mode``."""

    path = "gRPC"

    def __init__(self, address: str, mode: str) -> None:
        from apcm.client import MemoryClient

        self.address, self.mode, self.timer = address, mode, None
        with MemoryClient(address, timeout=30.0, retries=0) as admin:
            info = admin.model_info()
            admin.create_bank("bench", RPC_BANK_SLOTS, exist_ok=True)
        dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[info.code_dtype]
        self.code = np.ones((1, info.code_dim), dtype=dtype)

    def writer(self, tag: str) -> tuple[Any, Any]:
        from apcm.client import MemoryClient

        clients: dict[int, Any] = {}

        def write_one(tid: int, i: int) -> None:
            if tid not in clients:
                clients[tid] = MemoryClient(self.address, timeout=30.0, retries=0)
            clients[tid].write(codes=self.code, bank="bench", mode="per_item",
                               keys=[f"{tag}-{tid}-{i}"], payloads=[PAYLOAD])

        return write_one, lambda: [c.close() for c in clients.values()]

    def close(self) -> None:
        pass


def measure_writes(targets: list[Any], writer_counts: list[int], seconds: float,
                   rounds: int) -> list[dict[str, Any]]:
    """Acknowledged writes/s per (target, writers); modes alternate within every round.

    A shared disk's fsync latency drifts by several x within minutes, so each
    round measures every mode back to back and the totals are summed per cell.
    """
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    for writers in writer_counts:
        for rnd in range(rounds):
            for target in targets:
                cell = cells.setdefault((target.path, target.mode, writers),
                                        {"n": 0, "s": 0.0, "lat": [], "fsync": []})
                fn, done = target.writer(f"w{writers}-r{rnd}")
                f0 = len(target.timer.durations) if target.timer else 0
                n, elapsed, lat = _drive(fn, writers, seconds)
                done()
                cell["n"] += n
                cell["s"] += elapsed
                cell["lat"] += lat
                if target.timer:
                    cell["fsync"] += target.timer.durations[f0:]
    rows = []
    for (path, mode, writers), c in cells.items():
        lat_ms = np.asarray(c["lat"]) * 1e3
        fs = c["fsync"]
        rows.append({
            "path": path, "mode": mode, "writers": writers, "writes_per_s": c["n"] / c["s"],
            "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)),
            "records_per_fsync": c["n"] / len(fs) if mode == "fsync" and fs else None,
            "fsync_p50_ms": float(np.median(fs) * 1e3) if fs else None,
        })
    off = {(r["path"], r["writers"]): r["writes_per_s"] for r in rows if r["mode"] == "off"}
    for r in rows:
        r["vs_off"] = r["writes_per_s"] / off[(r["path"], r["writers"])]
    return rows


# ----------------------------------------------------------------------------- disk


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` from memory and fsync them, as one file."""
    data = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data.data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_read(path: Path) -> float:
    """Seconds to read a whole file into memory, its pages dropped from the cache first."""
    _drop_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        data = f.read()
    elapsed = time.perf_counter() - t0
    assert len(data) == path.stat().st_size
    return elapsed


def fill_bank(codec: Any, slots: int, with_keys: bool) -> Any:
    """A store with one full bank of ``slots`` memories (optionally keys and payloads)."""
    store = _store(codec, slots)
    store.create_bank("bench", slots)
    step = 8192
    for first in range(0, slots, step):
        n = min(step, slots - first)
        keys = [f"key-{first + j}" for j in range(n)] if with_keys else []
        store.write("bench", _codes(codec, n, first), keys, [PAYLOAD] * n if with_keys else [])
    return store


def snapshot_vs_raw(codec: Any, root: Path, slots: int, with_keys: bool) -> list[dict[str, Any]]:
    """Snapshot and restore of ``slots`` slots vs raw write/read of the same bytes.

    Raw I/O is measured before and after the snapshot and averaged, since the
    disk's speed drifts. The bank's own share (copying it out under the locks,
    rebuilding it from arrays) is reported apart from the file's share.
    """
    from apcm.server.config import Settings
    from apcm.server.memory.store import StoreState
    from apcm.server.persistence.manager import PersistenceManager
    from apcm.server.persistence.snapshot import read_snapshot

    data_dir = Path(tempfile.mkdtemp(prefix="snap-", dir=root))
    store = fill_bank(codec, slots, with_keys)
    settings = Settings(data_dir=str(data_dir), snapshot_interval_s=0.0, snapshot_keep=2)
    manager = PersistenceManager(store, settings, codec.content_hash, codec.kind)
    export_s = _timed(store.export_state)
    nbytes = 0
    raw_path = data_dir / "raw.bin"
    size_hint = slots * (codec.bytes_per_code + 40 + (80 if with_keys else 0))
    raw_w = [raw_write(raw_path, size_hint)]
    t0 = time.perf_counter()
    info = manager.snapshot("bench")
    snapshot_s = time.perf_counter() - t0
    path = manager.snapshots.path(info.name)
    nbytes = info.size_bytes
    raw_w.append(raw_write(raw_path, nbytes))
    raw_r = [raw_read(raw_path)]

    _drop_cache(path)
    fresh = _store(codec, slots)
    t0 = time.perf_counter()
    _, banks = read_snapshot(path)
    read_s = time.perf_counter() - t0
    fresh.load_state(StoreState(info.wal_sequence, banks))
    restore_s = time.perf_counter() - t0
    raw_r.append(raw_read(raw_path))
    assert fresh.describe("bench").occupied == slots
    shutil.rmtree(data_dir)
    # the first raw write used an estimated size: scale it to the snapshot's bytes
    raw_w[0] *= nbytes / size_hint
    raw_write_s, raw_read_s = float(np.mean(raw_w)), float(np.mean(raw_r))
    content = "codes + key + 64 B payload" if with_keys else "codes only"
    return [
        {"op": "snapshot", "content": content, "mb": nbytes / 1e6, "seconds": snapshot_s,
         "bank_s": export_s, "file_s": snapshot_s - export_s, "raw_seconds": raw_write_s,
         "ratio": snapshot_s / raw_write_s, "file_ratio": (snapshot_s - export_s) / raw_write_s,
         "goal_met": snapshot_s <= RAW_GOAL * raw_write_s},
        {"op": "restore", "content": content, "mb": nbytes / 1e6, "seconds": restore_s,
         "bank_s": restore_s - read_s, "file_s": read_s, "raw_seconds": raw_read_s,
         "ratio": restore_s / raw_read_s, "file_ratio": read_s / raw_read_s,
         "goal_met": restore_s <= RAW_GOAL * raw_read_s},
    ]


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- main


def _codec(args: argparse.Namespace, root: Path) -> tuple[Any, str, str]:
    """The served model, or — when it is not built yet — a PCA of sklearn digits at 8:1."""
    from apcm.server.codecs.base import load_codec, save_codec

    if Path(args.model).exists():
        return load_codec(args.model), args.model, args.model
    import torch
    from sklearn.datasets import load_digits

    from apcm.server.codecs.pca import PCACodec

    digits = torch.from_numpy((load_digits().images / 16.0).astype(np.float32))
    codec = PCACodec.fit(digits, 8, "float32", name="digits-pca-8to1")
    path = root / "digits-pca.safetensors"
    save_codec(codec, path, {"data": "sklearn digits"})
    return codec, str(path), f"{args.model} absent: PCA of sklearn digits, m=8 float32 (8:1)"


REPLAY_COLUMNS = [
    ("items_per_write", "items per write"), ("records", "log records"),
    ("write_items_per_s", "written items/s"), ("replay_items_per_s", "replayed items/s"),
    ("ratio", "replay / write"), ("goal_met", "replay >= write"),
]


def replay_vs_write(codec: Any, root: Path, items: int, writers: int, batch: int,
                    rounds: int) -> dict[str, Any]:
    """Median items/s of writing ``items`` (``batch`` per call) and of replaying them."""
    from apcm.server.config import Settings
    from apcm.server.persistence.manager import PersistenceManager

    per_writer = max(1, items // writers // batch)
    total = per_writer * writers * batch
    write_rates, replay_rates = [], []
    for r in range(rounds):
        data = Path(tempfile.mkdtemp(prefix=f"replay-{batch}-{r}-", dir=root))
        settings = Settings(data_dir=str(data), snapshot_interval_s=0.0, wal_mode="off",
                            snapshot_wal_bytes=0).validated()
        store = _store(codec, total)
        mgr = PersistenceManager(store, settings, codec.content_hash, codec.kind)
        mgr.recover()
        mgr.start()
        store.create_bank("bench", total)
        codes = _codes(codec, batch, r)

        def write(tid: int, store: Any = store, codes: Any = codes, r: int = r) -> None:
            for i in range(per_writer):
                keys = [f"{r}-{tid}-{i}-{j}" for j in range(batch)]
                store.write("bench", codes, keys, [PAYLOAD] * batch)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(writers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        write_rates.append(total / (time.perf_counter() - t0))
        mgr.close(final_snapshot=False)
        fresh = _store(codec, total)
        t0 = time.perf_counter()
        report = PersistenceManager(fresh, settings, codec.content_hash,
                                    codec.kind).recover()
        replay_rates.append(total / (time.perf_counter() - t0))
        assert fresh.last_seq == store.last_seq, "replay lost records"
        shutil.rmtree(data, ignore_errors=True)
    w, p = float(np.median(write_rates)), float(np.median(replay_rates))
    return {"items_per_write": batch, "records": report.replayed,
            "write_items_per_s": round(w), "replay_items_per_s": round(p),
            "ratio": round(p / w, 2), "goal_met": p >= w}


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_torch_threads(args.torch_threads)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="apcm-bench-durability-", dir=args.dir))
    try:
        codec, model_path, model_note = _codec(args, root)
        writer_counts = sorted({1, args.writers})
        with contextlib.ExitStack() as stack:
            targets: list[Any] = []
            for mode in MODES:
                target = InProcessTarget(codec, root, mode)
                stack.callback(target.close)
                targets.append(target)
            if not args.skip_rpc:
                for mode in MODES:
                    address = stack.enter_context(server_process(
                        model_path, args.device, args.torch_threads, wal_mode=mode,
                        data_dir=tempfile.mkdtemp(prefix=f"rpc-{mode}-", dir=root),
                        snapshot_interval_s=0.0))
                    targets.append(RpcTarget(address, mode))
            write_rows = measure_writes(targets, writer_counts, args.seconds, args.rounds)
        replay_rows = [replay_vs_write(codec, root, args.replay_items, args.writers, batch,
                                       args.rounds) for batch in (1, 64)]
        disk_rows = [row for with_keys in (False, True)
                     for row in snapshot_vs_raw(codec, root, args.slots, with_keys)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = machine()
    m["disk_dir"] = str(Path(args.dir).resolve())
    m["load_average"] = os.getloadavg()
    print(f"# Durability benchmark\n\nMachine: {describe_machine(m)}; load average "
          f"{m['load_average'][0]:.1f}; disk under {m['disk_dir']}\nModel: {model_note} "
          f"(code {codec.code_dim} x {codec.code_dtype})\n")
    print("## Acknowledged writes/s (1 item per Write, key + 64-byte payload)\n")
    print(markdown_table(write_rows, WRITE_COLUMNS))
    print(f"\n## Snapshot / restore of {args.slots:,} slots vs raw I/O of the same bytes\n")
    print("snapshot = copy under the locks + SHA-256 + write + fsync + rename; restore = cold "
          "read + checksum verify + rebuild the bank; raw = one write + fsync / one cold read "
          "of as many bytes, same disk.\n")
    print(markdown_table(disk_rows, DISK_COLUMNS))
    print(f"\n## Recovery speed: replaying the log vs writing it ({args.writers} writers, "
          "wal off, in-process)\n")
    print(markdown_table(replay_rows, REPLAY_COLUMNS))
    return {"benchmark": "durability", "machine": m, "model": model_note,
            "code_dim": codec.code_dim, "code_dtype": codec.code_dtype,
            "writes": write_rows, "snapshot": disk_rows, "replay": replay_rows}

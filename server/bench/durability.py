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
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from apcm.server.bench.common import (
    add_model_arguments,
    describe_machine,
    machine,
    markdown_table,
    server_process,
    set_torch_threads,
)

RAW_GOAL = 2.0
# The server refreshes bank gauges on every Write in O(capacity); a modest bank keeps
# that from masking the log's cost (full slots are evicted, still one logged write each).
RPC_BANK_SLOTS = 65_536
PAYLOAD = b"p" * 64

WRITE_COLUMNS = [
    ("path", "path"), ("mode", "wal mode"), ("writers", "writers"),
    ("writes_per_s", "acked writes/s"), ("vs_off", "vs off"),
    ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("records_per_fsync", "writes per fsync"),
]
DISK_COLUMNS = [
    ("op", "op"), ("seconds", "seconds"), ("raw_seconds", "raw I/O seconds"),
    ("ratio", "ratio"), ("mb_per_s", "MB/s"), ("goal_met", f"within {RAW_GOAL:g}x"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dir", default=None,
                        help="directory on the disk to measure (default: a temp dir under "
                             "the current directory)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per writes/s cell (default 3)")
    parser.add_argument("--writers", type=int, default=16,
                        help="concurrent writers of the group-commit cell (default 16)")
    parser.add_argument("--slots", type=int, default=1_000_000,
                        help="slots of the snapshot/restore bank (default 1,000,000)")
    parser.add_argument("--skip-rpc", action="store_true",
                        help="measure writes/s in-process only (no server process)")


# ----------------------------------------------------------------------------- writes


def _drive(write_one: Any, writers: int, seconds: float) -> tuple[int, list[float]]:
    """Run ``writers`` threads calling ``write_one(tid, i)`` for ``seconds``."""
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
    return int(len(flat) / elapsed), flat


def _row(path: str, mode: str, writers: int, rate: int, lat: list[float],
         per_fsync: float | None) -> dict[str, Any]:
    arr = np.asarray(lat) * 1e3
    return {"path": path, "mode": mode, "writers": writers, "writes_per_s": rate,
            "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "records_per_fsync": per_fsync}


class _FsyncCounter:
    def __init__(self) -> None:
        self.fsyncs = 0

    def observe_fsync(self, seconds: float) -> None:
        self.fsyncs += 1

    def set_wal_bytes(self, n: int) -> None:
        pass


def _store(codec: Any, capacity: int) -> Any:
    import torch

    from apcm.server.store import MemoryStore

    return MemoryStore(code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                       scale=codec.quantizer.scale, device=torch.device("cpu"),
                       max_capacity=max(capacity, 1), max_payload_bytes=1024,
                       max_key_length=64, default_policy="lfu", default_half_life=1000.0)


def _codes(codec: Any, n: int, seed: int) -> Any:
    import torch

    z = torch.randn(n, codec.code_dim, generator=torch.Generator().manual_seed(seed))
    return codec.quantizer.quantize(z)


def inprocess_writes(codec: Any, root: Path, mode: str, writers: int,
                     seconds: float) -> dict[str, Any]:
    """Acknowledged writes/s of ``MemoryStore.write`` with the WAL in ``mode``."""
    from apcm.server.persistence.wal import WriteAheadLog

    directory = Path(tempfile.mkdtemp(prefix=f"wal-{mode}-", dir=root))
    counter = _FsyncCounter()
    wal = WriteAheadLog(directory, codec.content_hash, mode=mode, metrics=counter)
    wal.open()
    store = _store(codec, 1_000_000)
    store.set_log(wal)
    store.create_bank("bench", 1_000_000)
    code = _codes(codec, 1, 0)
    before = counter.fsyncs
    rate, lat = _drive(
        lambda tid, i: store.write("bench", code, [f"{tid}-{i}"], [PAYLOAD]), writers, seconds)
    fsyncs = counter.fsyncs - before
    wal.close()
    shutil.rmtree(directory)
    return _row("in-process", mode, writers, rate, lat,
                len(lat) / fsyncs if mode == "fsync" and fsyncs else None)


def rpc_writes(model: str, device: str, root: Path, mode: str, writer_counts: list[int],
               seconds: float, threads: int) -> list[dict[str, Any]]:
    """Acknowledged writes/s through the real client against a server process."""
    from apcm.client import MemoryClient

    data_dir = tempfile.mkdtemp(prefix=f"rpc-{mode}-", dir=root)
    rows = []
    with server_process(model, device, threads, wal_mode=mode, data_dir=data_dir,
                        max_bank_capacity=4_000_000) as address:
        with MemoryClient(address, timeout=30.0, retries=0) as admin:
            info = admin.model_info()
            admin.create_bank("bench", RPC_BANK_SLOTS, exist_ok=True)
        dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[info.code_dtype]
        code = np.ones((1, info.code_dim), dtype=dtype)
        for writers in writer_counts:
            clients = [MemoryClient(address, timeout=30.0, retries=0) for _ in range(writers)]

            def write_one(tid: int, i: int, clients: list[Any] = clients,
                          tag: int = writers) -> None:
                clients[tid].write(codes=code, bank="bench", mode="per_item",
                                   keys=[f"{tag}-{tid}-{i}"], payloads=[PAYLOAD])

            rate, lat = _drive(write_one, writers, seconds)
            for c in clients:
                c.close()
            rows.append(_row("gRPC", mode, writers, rate, lat, None))
    shutil.rmtree(data_dir, ignore_errors=True)
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
    buf = bytearray(path.stat().st_size)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)
    return time.perf_counter() - t0


def fill_bank(codec: Any, slots: int) -> Any:
    """A store with one full bank of ``slots`` memories (keys and 64-byte payloads)."""
    store = _store(codec, slots)
    store.create_bank("bench", slots)
    step = 8192
    for first in range(0, slots, step):
        n = min(step, slots - first)
        store.write("bench", _codes(codec, n, first), [f"key-{first + j}" for j in range(n)],
                    [PAYLOAD] * n)
    return store


def snapshot_vs_raw(codec: Any, root: Path, slots: int) -> tuple[list[dict[str, Any]], dict]:
    """Snapshot and restore of ``slots`` slots vs raw write/read of the same bytes."""
    from apcm.server.config import Settings
    from apcm.server.persistence.manager import PersistenceManager
    from apcm.server.persistence.snapshot import read_snapshot

    data_dir = Path(tempfile.mkdtemp(prefix="snap-", dir=root))
    t0 = time.perf_counter()
    store = fill_bank(codec, slots)
    fill_s = time.perf_counter() - t0
    settings = Settings(data_dir=str(data_dir), snapshot_interval_s=0.0, snapshot_keep=2)
    manager = PersistenceManager(store, settings, codec.content_hash, codec.kind)
    export_s = _timed(store.export_state)
    t0 = time.perf_counter()
    info = manager.snapshot("bench")
    snapshot_s = time.perf_counter() - t0
    path = manager.snapshots.path(info.name)
    nbytes = info.size_bytes

    _drop_cache(path)
    fresh = _store(codec, slots)
    t0 = time.perf_counter()
    _, banks = read_snapshot(path)
    read_s = time.perf_counter() - t0
    from apcm.server.store import StoreState

    fresh.load_state(StoreState(info.wal_sequence, banks))
    restore_s = time.perf_counter() - t0
    assert fresh.describe("bench").occupied == slots

    raw_path = data_dir / "raw.bin"
    raw_w = raw_write(raw_path, nbytes)
    raw_r = raw_read(raw_path)
    shutil.rmtree(data_dir)
    mb = nbytes / 1e6
    rows = [
        {"op": "snapshot (copy + checksum + write + fsync)", "seconds": snapshot_s,
         "raw_seconds": raw_w, "ratio": snapshot_s / raw_w, "mb_per_s": mb / snapshot_s,
         "goal_met": snapshot_s <= RAW_GOAL * raw_w},
        {"op": "restore (cold read + verify + rebuild bank)", "seconds": restore_s,
         "raw_seconds": raw_r, "ratio": restore_s / raw_r, "mb_per_s": mb / restore_s,
         "goal_met": restore_s <= RAW_GOAL * raw_r},
    ]
    detail = {"slots": slots, "snapshot_bytes": nbytes, "fill_seconds": fill_s,
              "export_seconds": export_s, "read_and_verify_seconds": read_s,
              "rebuild_seconds": restore_s - read_s,
              "raw_write_mb_per_s": mb / raw_w, "raw_read_mb_per_s": mb / raw_r}
    return rows, detail


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- main


def _codec(args: argparse.Namespace, root: Path) -> tuple[Any, str, str]:
    """The served model, or — when it is not built yet — a PCA of sklearn digits at 8:1."""
    from apcm.server.codec import load_codec, save_codec

    if Path(args.model).exists():
        return load_codec(args.model), args.model, args.model
    import torch
    from sklearn.datasets import load_digits

    from apcm.server.pca_codec import PCACodec

    digits = torch.from_numpy((load_digits().images / 16.0).astype(np.float32))
    codec = PCACodec.fit(digits, 8, "float32", name="digits-pca-8to1")
    path = root / "digits-pca.safetensors"
    save_codec(codec, path, {"data": "sklearn digits"})
    return codec, str(path), f"{args.model} absent: PCA of sklearn digits, m=8 float32 (8:1)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_torch_threads(args.torch_threads)
    root = Path(tempfile.mkdtemp(prefix="apcm-bench-durability-", dir=args.dir or "."))
    try:
        codec, model_path, model_note = _codec(args, root)
        writer_counts = sorted({1, args.writers})
        write_rows: list[dict[str, Any]] = []
        for mode in ("fsync", "off"):
            for writers in writer_counts:
                write_rows.append(inprocess_writes(codec, root, mode, writers, args.seconds))
            if not args.skip_rpc:
                write_rows += rpc_writes(model_path, args.device, root, mode, writer_counts,
                                         args.seconds, args.torch_threads)
        off = {(r["path"], r["writers"]): r["writes_per_s"] for r in write_rows
               if r["mode"] == "off"}
        for r in write_rows:
            r["vs_off"] = r["writes_per_s"] / max(1, off[(r["path"], r["writers"])])
        disk_rows, detail = snapshot_vs_raw(codec, root, args.slots)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = machine()
    m["disk_dir"] = str(Path(args.dir or ".").resolve())
    m["load_average"] = os.getloadavg()
    print(f"# Durability benchmark\n\nMachine: {describe_machine(m)}; load average "
          f"{m['load_average'][0]:.1f}; disk under {m['disk_dir']}\nModel: {model_note} "
          f"(code {codec.code_dim} x {codec.code_dtype})\n")
    print("## Acknowledged writes/s (1 item per Write, key + 64-byte payload)\n")
    print(markdown_table(write_rows, WRITE_COLUMNS))
    print(f"\n## Snapshot / restore of {detail['slots']:,} slots "
          f"({detail['snapshot_bytes'] / 1e6:,.1f} MB) vs raw I/O of the same bytes\n")
    print(markdown_table(disk_rows, DISK_COLUMNS))
    print(f"\nexport (copy under the locks) {detail['export_seconds']:.3f} s; read + verify "
          f"{detail['read_and_verify_seconds']:.3f} s; rebuild bank from arrays "
          f"{detail['rebuild_seconds']:.3f} s; raw write "
          f"{detail['raw_write_mb_per_s']:.0f} MB/s, raw cold read "
          f"{detail['raw_read_mb_per_s']:.0f} MB/s")
    return {"benchmark": "durability", "machine": m, "model": model_note,
            "code_dim": codec.code_dim, "code_dtype": codec.code_dtype,
            "writes": write_rows, "snapshot": disk_rows, "snapshot_detail": detail}

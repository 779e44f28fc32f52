"""``apcm bench restart``: a large indexed bank across a restart, and the snapshots of
an unchanged bank (issue 23, item 5), in-process (``MemoryStore`` + persistence).

Data as in ``apcm bench index``: ``--memories`` MiniLM-like vectors (real sentence
embeddings plus noise) through the shipped default model (packed uint8 codes), one
bank, optional payloads. The bank's index is built (k-means), which snapshots the
bank at once; ``--tail`` more memories are written after that snapshot, and the
process "dies" without a final snapshot (the log is not closed cleanly either).

- **restart**: a fresh store recovers the data directory (snapshot read and
  verified, log replayed) and answers one indexed read: seconds from the start of
  recovery to that read's answer, against a raw read of the snapshot's files (the
  snapshot file and its bank file), both with the files dropped from the page cache
  first. Goal: <= 2x. The index must come back ready (the read is not a scan).
- **snapshots**: after the restart (and a snapshot that takes in the replayed
  tail), reads change only access counters and a snapshot is taken: the bytes of
  the files it created against the full snapshot's. Goal: no rewrite of the
  unchanged bank (its bank file is shared, untouched).

A snapshot is taken after the bulk load too, as the periodic one would be: a
running server's log reaches back only to its second-newest snapshot.

The exhaustive read and the k-means build time say what a restart cost before the
index survived it (reads were scans until the build finished again).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from apcm.server.config import Settings

from .common import describe_machine, machine, markdown_table, set_torch_threads
from .index import _noisy, _real, add_data_arguments

RESTART_GOAL = 2.0
COLUMNS = [("what", "measured"), ("seconds", "seconds"), ("mb", "MB"), ("note", "note")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memories", type=int, default=200_000,
                        help="memories in the bank (default 200,000)")
    parser.add_argument("--tail", type=int, default=1000,
                        help="memories written after the last snapshot, replayed from the "
                             "log at the restart (default 1,000)")
    parser.add_argument("--payload-bytes", type=int, default=0,
                        help="payload per memory (default 0)")
    add_data_arguments(parser)
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="a folder on the disk to measure (default: the temp folder)")
    parser.add_argument("--bank-file-bytes", type=int,
                        default=Settings.snapshot_bank_file_bytes,
                        help="--snapshot-bank-file-bytes of the server (default: the "
                             "server's, %(default)s; a smaller bank stays inside the "
                             "snapshot file, rewritten with it)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads (0: torch's default)")


def _store(codec: Any, capacity: int, payload_bytes: int) -> Any:
    import torch

    from apcm.server.memory.ivf import IndexConfig
    from apcm.server.memory.store import MemoryStore

    return MemoryStore(code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                       scale=codec.quantizer.scale, device=torch.device("cpu"),
                       max_capacity=capacity, max_payload_bytes=max(64, payload_bytes),
                       max_key_length=64, default_policy="lfu", default_half_life=1000.0,
                       metric=codec.similarity_weights, scorer=codec.scorer,
                       index_config=IndexConfig(threshold=capacity, background=False))


def _manager(codec: Any, store: Any, data: Path, bank_file_bytes: int) -> Any:
    from apcm.server.persistence.manager import PersistenceManager

    settings = Settings(data_dir=str(data), snapshot_interval_s=0.0, snapshot_wal_bytes=0,
                        wal_mode="off", snapshot_bank_file_bytes=bank_file_bytes).validated()
    return PersistenceManager(store, settings, codec.content_hash, codec.kind)


def _snapshot_files(mgr: Any, info: Any) -> list[Path]:
    from apcm.server.persistence import bankfiles

    return [mgr.snapshots.path(info.name)] + [
        bankfiles.path(mgr.snapshots.directory, d) for d in info.bank_files.values()]


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_read(paths: list[Path]) -> float:
    _drop_cache(paths)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from apcm.server.codecs.base import load_codec
    from apcm.server.memory.options import EXHAUSTIVE, ReadOptions

    set_torch_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    real, source = _real(args.embeddings)
    n, tail = args.memories, args.tail
    codec = load_codec(args.model)
    vectors = _noisy(real, n + tail + 8, args.noise, rng)
    codes = torch.cat([codec.compress(torch.from_numpy(vectors[i:i + 8192])[:, None, :])
                       for i in range(0, len(vectors), 8192)])
    queries = codec.encode_latent(torch.from_numpy(vectors[-8:])[:, None, :]).reshape(8, -1)
    payload = [b"p" * args.payload_bytes] if args.payload_bytes else []
    root = Path(tempfile.mkdtemp(prefix="apcm-bench-restart-", dir=args.dir))
    try:
        data = root / "data"
        store = _store(codec, n + tail, args.payload_bytes)
        mgr = _manager(codec, store, data, args.bank_file_bytes)
        mgr.recover()
        mgr.start()
        store.create_bank("bench", n + tail)
        for i in range(0, n, 8192):
            j = min(n, i + 8192)
            store.write("bench", codes[i:j], [], payload * (j - i))
        mgr.snapshot()  # a periodic one: a running server's log reaches back to it
        t0 = time.perf_counter()
        assert store.build_index("bench")
        build_s = time.perf_counter() - t0
        # compiles the scan kernels, as a server's warm-up does before it serves
        store.read("bench", queries[:1], ReadOptions(top_k=10, count_access=False))
        t0 = time.perf_counter()
        full = mgr.snapshot()
        full_s = time.perf_counter() - t0
        for i in range(n, n + tail, 512):
            j = min(n + tail, i + 512)
            store.write("bench", codes[i:j], [], payload * (j - i))
        lists = store.get("bench").index.k
        # dies here: no final snapshot; every acknowledged record is in the log's file
        files = _snapshot_files(mgr, full)
        nbytes = sum(p.stat().st_size for p in files)
        raw = [_raw_read(files)]
        _drop_cache(files)
        fresh = _store(codec, n + tail, args.payload_bytes)
        t0 = time.perf_counter()
        again = _manager(codec, fresh, data, args.bank_file_bytes)
        report = again.recover()
        recovered_s = time.perf_counter() - t0
        first = fresh.read("bench", queries[:1], ReadOptions(top_k=10))
        restart_s = time.perf_counter() - t0
        raw.append(_raw_read(files))
        state = fresh.describe("bench").index
        assert state.state == "ready" and state.lists == lists, state
        assert first.results[0].hits, "the first read found nothing"
        t0 = time.perf_counter()
        fresh.read("bench", queries[1:2], ReadOptions(top_k=10, nprobe=EXHAUSTIVE))
        scan_ms = (time.perf_counter() - t0) * 1e3
        again.start()
        absorbed = again.snapshot()  # the replayed tail changed the bank: written whole
        fresh.read("bench", queries, ReadOptions(top_k=10))  # counters change, slots do not
        shared = _snapshot_files(again, absorbed)[1:]
        before = {p: p.stat().st_mtime_ns for p in shared}
        folder = again.snapshots.directory
        existing = set(folder.rglob("*.safetensors"))
        t0 = time.perf_counter()
        delta = again.snapshot()
        delta_s = time.perf_counter() - t0
        assert not delta.unchanged and delta.reused_banks == ["bench"], delta
        shared_untouched = bool(shared) and all(
            p.stat().st_mtime_ns == t for p, t in before.items())
        delta_bytes = sum(p.stat().st_size for p in set(folder.rglob("*.safetensors"))
                          - existing)
        again.close(final_snapshot=False)
        mgr.close(final_snapshot=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raw_s = float(np.mean(raw))
    ratio = restart_s / raw_s
    full_bytes = nbytes
    rows = [
        {"what": "index build (k-means), before the first snapshot", "seconds": build_s,
         "mb": None, "note": f"{lists} lists: what a restart cost before (reads scanned)"},
        {"what": "exhaustive read (what reads were until then)", "seconds": scan_ms / 1e3,
         "mb": None, "note": ""},
        {"what": "full snapshot (bank file + snapshot file)", "seconds": full_s,
         "mb": full_bytes / 1e6, "note": f"{len(files)} files"},
        {"what": "raw cold read of those files", "seconds": raw_s, "mb": full_bytes / 1e6,
         "note": "mean of before and after the restart"},
        {"what": "restart: recover (read, verify, replay) + first indexed read",
         "seconds": restart_s, "mb": None,
         "note": f"recover {recovered_s:.3f} s, {report.replayed} log records replayed; "
                 f"index {state.state}, {state.lists} lists"},
        {"what": "snapshot after a restart and reads (counters only)", "seconds": delta_s,
         "mb": delta_bytes / 1e6,
         "note": "bank file shared, untouched" if shared_untouched else "bank file REWRITTEN"},
    ]
    goals = [
        {"goal": f"restart of a {n:,}-memory bank: first indexed read <= "
                 f"{RESTART_GOAL:g}x the raw read of its snapshot",
         "measured": f"{restart_s:.3f} s vs {raw_s:.3f} s ({ratio:.2f}x)",
         "met": ratio <= RESTART_GOAL},
        {"goal": "no full rewrite of an unchanged bank (counters-only snapshot)",
         "measured": f"{delta_bytes / 1e6:.2f} MB written vs {full_bytes / 1e6:.1f} MB full "
                     f"({delta_bytes / full_bytes:.3f}x); bank file "
                     f"{'untouched' if shared_untouched else 'rewritten'}",
         "met": shared_untouched and delta_bytes < full_bytes / 4},
    ]
    m = machine()
    m["load_average"] = os.getloadavg()
    data_note = (f"{n:,} + {tail:,} memories = real MiniLM embeddings from {source} "
                 f"+ N(0, {args.noise}^2) per dim; model {Path(args.model).name} "
                 f"({codec.code_dim} x {codec.code_dtype} codes), payloads "
                 f"{args.payload_bytes} B; in-process, disk under {Path(args.dir).resolve()}")
    print(f"{data_note}\n\n{markdown_table(rows, COLUMNS)}\n")
    for g in goals:
        print(f"- {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'NOT met'}")
    print(f"restart / raw read: {ratio:.2f}")
    print(f"machine: {describe_machine(m)}")
    return {"benchmark": "restart", "title": "A large bank across a restart; snapshots of an "
            "unchanged bank (issue 23)", "memories": n, "tail": tail, "data": data_note,
            "columns": [list(c) for c in COLUMNS], "rows": rows, "goals": goals,
            "ratio": ratio, "machine": m}

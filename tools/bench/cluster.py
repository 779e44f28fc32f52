"""Cluster costs: the forwarding hop, the SDK's direct routing, and moving a bank vs
copying its bytes.

Two shards and one single server run in their own processes on loopback, the
shards formed from a static peer list. Routing: p50 of the same DescribeBank and
Read sent to the bank's owner directly, to the other shard (which forwards it), to
a single server holding the same bank, and through the SDK's direct routing
(``routing="direct"``, given the other shard's address), alternating ``--rounds``
times so a shared machine's drift hits all alike. Goals (issue 15): the hop adds
<= 1 ms at p50; direct routing matches a single server.
Rebalance: a bank of ``--memories`` memories is put on the shard that does not
own it (calls marked as forwarded are served where they land), then moved with
``MoveBank`` (pause, stream, durable import = an fsynced file and one WAL record
on the owner, drop); compared in the same run with the same bytes sent over a
loopback TCP socket (plain, and also written to a file and fsynced on arrival);
goal: move speed >= 0.5 x the plain raw copy speed.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import tempfile
import threading
import time
from typing import Any

import numpy as np

from .common import (
    add_model_arguments,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    time_calls,
)

HOP_GOAL_MS = 1.0
SDK_GOAL_MS = 0.1  # "matches": within 0.1 ms at p50
MOVE_GOAL = 0.5
BATCH = 8192

COLUMNS = [("what", "measured"), ("direct", "direct / raw"), ("cluster", "forwarded / move"),
           ("difference", "difference"), ("ratio", "ratio")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--memories", type=int, default=100_000,
                        help="memories in the moved bank (default 100000)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="measuring time per side and round (default 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times direct and forwarded alternate (default 3)")
    parser.add_argument("--wal-mode", default="fsync", choices=("fsync", "interval", "off"),
                        help="the shards' write-ahead-log mode (default fsync: a move's "
                             "import is durable when acknowledged)")
    parser.add_argument("--moves", type=int, default=3,
                        help="moves (and raw copies) timed; the median counts (default 3)")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def raw_copy_seconds(data: bytes, to_file: str | None = None) -> float:
    """Seconds to send ``data`` over a loopback TCP connection and receive all of it
    (and, with ``to_file``, write it there and fsync it)."""
    server = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        out = open(to_file, "wb") if to_file else None  # noqa: SIM115
        with conn:
            buf = bytearray(1 << 20)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                received[0] += n
                if out is not None:
                    out.write(memoryview(buf)[:n])
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()

    t = threading.Thread(target=sink)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(data)
    t.join()
    seconds = time.perf_counter() - t0
    server.close()
    assert received[0] == len(data)
    return seconds


def _owned_by(shard: int, prefix: str) -> str:
    from apcm.server.cluster.placement import owner_of

    return next(f"{prefix}-{i}" for i in range(10_000) if owner_of(f"{prefix}-{i}", 2) == shard)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from apcm.client import MemoryClient
    from apcm.server.cluster.router import FORWARDED_HEADER
    from apcm.server.cluster.transfer import assemble
    from apcm.v1 import cluster_pb2, cluster_pb2_grpc, memory_pb2, memory_pb2_grpc
    from apcm.wire.tensors import to_proto

    ports = _free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    here = ((FORWARDED_HEADER, "bench"),)
    rng = np.random.default_rng(0)
    shard = {"max_batch_size": BATCH, "wal_mode": args.wal_mode, "peers": peers}
    with server_process(args.model, args.device, args.torch_threads, grpc_port=ports[0],
                        shard_id=0, **shard) as a0, \
            server_process(args.model, args.device, args.torch_threads, grpc_port=ports[1],
                           shard_id=1, **shard) as a1, \
            server_process(args.model, args.device, args.torch_threads,
                           max_batch_size=BATCH, wal_mode=args.wal_mode) as single, \
            MemoryClient(a0, timeout=600.0) as c0, MemoryClient(a1, timeout=600.0) as c1, \
            MemoryClient(single, timeout=600.0) as alone, \
            MemoryClient(a0, timeout=600.0, routing="direct") as sdk:
        for c in (c0, c1, alone):
            c.wait_until_serving(timeout=300)
        info = c0.model_info()
        dtype = np.dtype(info.code_dtype)

        def random_codes(n: int) -> np.ndarray:
            x = rng.standard_normal((n, info.code_dim)) * (40 if dtype.kind == "i" else 1)
            return x.astype(dtype)

        # -- the forwarding hop: the same calls to the owner (shard 1), via shard 0, to a
        # single server, and via the SDK's direct routing given shard 0's address
        small = _owned_by(1, "hop")
        q = random_codes(1)
        stored = random_codes(1000)
        for c in (c1, alone):
            c.create_bank(small, capacity=1024)
            c.write(codes=stored, bank=small, mode="per_item")
        sides = {"owner": c1, "forwarded": c0, "single": alone, "sdk": sdk}
        calls = {"describe": lambda c: c.describe_bank(small),
                 "read": lambda c: c.read(codes=q, bank=small, top_k=1)}
        samples: dict[tuple[str, str], list[float]] = {
            (k, side): [] for k in calls for side in sides}
        for each in sides.values():  # channels connected, the SDK's shard map fetched
            calls["describe"](each)
        for _ in range(args.rounds):
            for k in calls:
                for side in sides:
                    samples[k, side] += time_calls(
                        functools.partial(calls[k], sides[side]), min_time_s=args.seconds)
        p50 = {key: percentile_ms(v, 50) for key, v in samples.items()}

        # -- a big bank on shard 0 that shard 1 owns, moved there and back
        ch0, ch1 = grpc.insecure_channel(a0), grpc.insecure_channel(a1)
        options: Any = {0: ch0, 1: ch1}
        memory = {s: memory_pb2_grpc.MemoryServiceStub(c) for s, c in options.items()}
        cluster = {s: cluster_pb2_grpc.ClusterServiceStub(c) for s, c in options.items()}
        big = _owned_by(1, "big")
        memory[0].CreateBank(memory_pb2.CreateBankRequest(name=big, capacity=args.memories),
                             timeout=60, metadata=here)
        t0 = time.perf_counter()
        for start in range(0, args.memories, BATCH):
            n = min(BATCH, args.memories - start)
            memory[0].Write(memory_pb2.WriteRequest(
                bank=big, codes=to_proto(random_codes(n)), mode=memory_pb2.WRITE_MODE_PER_ITEM,
                payloads=[b"x" * 16] * n), timeout=600, metadata=here)
        fill_s = time.perf_counter() - t0
        moves, raws, synced, size = [], [], [], 0
        for _ in range(args.moves):
            _, data = assemble(cluster[0].ExportBank(
                cluster_pb2.ExportBankRequest(name=big), timeout=600))
            size = len(data)
            raws.append(raw_copy_seconds(data))
            with tempfile.TemporaryDirectory(prefix="apcm-bench-") as tmp:
                synced.append(raw_copy_seconds(data, os.path.join(tmp, "bank")))
            t0 = time.perf_counter()
            answer = cluster[0].MoveBank(cluster_pb2.MoveBankRequest(name=big), timeout=600)
            moves.append(time.perf_counter() - t0)
            assert answer.bytes == size and answer.bank.occupied == args.memories
            # put it back on shard 0 for the next round (not timed)
            _, data = assemble(cluster[1].ExportBank(
                cluster_pb2.ExportBankRequest(name=big), timeout=600))
            from apcm.server.cluster.transfer import chunks

            memory[1].DropBank(memory_pb2.DropBankRequest(name=big), timeout=600, metadata=here)
            cluster[0].ImportBank(chunks(big, data), timeout=600)
        ch0.close()
        ch1.close()
    move_s, raw_s, sync_s = (float(np.median(v)) for v in (moves, raws, synced))
    names = {"describe": "DescribeBank", "read": "Read top-1 (1000-memory bank)"}
    rows = []
    for k, what in names.items():
        rows.append({"what": f"{what} p50 ms: owner direct vs forwarded by another shard",
                     "direct": p50[k, "owner"], "cluster": p50[k, "forwarded"],
                     "difference": p50[k, "forwarded"] - p50[k, "owner"],
                     "ratio": p50[k, "forwarded"] / p50[k, "owner"]})
    for k, what in names.items():
        rows.append({"what": f"{what} p50 ms: single server vs SDK direct routing",
                     "direct": p50[k, "single"], "cluster": p50[k, "sdk"],
                     "difference": p50[k, "sdk"] - p50[k, "single"],
                     "ratio": p50[k, "sdk"] / p50[k, "single"]})
    rows += [
        {"what": f"bank of {args.memories} memories, {size / 1e6:.1f} MB: raw socket copy "
                 "vs move, MB/s",
         "direct": size / raw_s / 1e6, "cluster": size / move_s / 1e6,
         "difference": move_s - raw_s, "ratio": raw_s / move_s},
        {"what": "the same, raw copy also written to a file and fsynced: MB/s",
         "direct": size / sync_s / 1e6, "cluster": size / move_s / 1e6,
         "difference": move_s - sync_s, "ratio": sync_s / move_s},
    ]
    hop = p50["describe", "forwarded"] - p50["describe", "owner"]
    hop_read = p50["read", "forwarded"] - p50["read", "owner"]
    sdk_gap = p50["describe", "sdk"] - p50["describe", "single"]
    goals = [
        {"goal": f"a forwarded request p50 within {HOP_GOAL_MS} ms of a direct one (loopback)",
         "measured": f"DescribeBank {hop:+.3f} ms ({p50['describe', 'owner']:.3f} -> "
                     f"{p50['describe', 'forwarded']:.3f} ms); Read top-1 {hop_read:+.3f} ms",
         "met": hop <= HOP_GOAL_MS and hop_read <= HOP_GOAL_MS},
        {"goal": f"the SDK's direct routing matches a single server (p50 within "
                 f"{SDK_GOAL_MS} ms)",
         "measured": f"DescribeBank {sdk_gap:+.3f} ms ({p50['describe', 'single']:.3f} -> "
                     f"{p50['describe', 'sdk']:.3f} ms); Read top-1 "
                     f"{p50['read', 'sdk'] - p50['read', 'single']:+.3f} ms",
         "met": sdk_gap <= SDK_GOAL_MS},
        {"goal": f"moving a {args.memories}-memory bank >= {MOVE_GOAL} x raw loopback copy "
                 "speed of its bytes",
         "measured": f"{raw_s / move_s:.3f} x a plain socket copy ({move_s:.4f} s move vs "
                     f"{raw_s:.4f} s); {sync_s / move_s:.3f} x a socket copy written to a "
                     f"file and fsynced ({sync_s:.4f} s); {size} bytes",
         "met": raw_s / move_s >= MOVE_GOAL},
    ]
    result = {
        "benchmark": "cluster",
        "title": "Cluster: forwarding hop and bank moves",
        "machine": machine(),
        "model": {"path": args.model, "name": info.name, "code_dim": info.code_dim,
                  "code_dtype": info.code_dtype},
        "params": {"memories": args.memories, "seconds": args.seconds, "rounds": args.rounds,
                   "moves": args.moves, "fill_seconds": fill_s,
                   "wal_mode": args.wal_mode,
                   "servers": "2 shards and 1 single server, separate processes, loopback "
                              "TCP; a move's import writes and fsyncs the bank's file and "
                              "logs one WAL record on the owner",
                   "p50_ms": {f"{k}/{side}": v for (k, side), v in p50.items()},
                   "move_seconds": moves, "raw_copy_seconds": raws,
                   "raw_copy_fsync_seconds": synced},
        "columns": COLUMNS,
        "rows": rows,
        "goals": goals,
    }
    print(markdown_table(rows, COLUMNS))
    for g in goals:
        print(f"- {'MET' if g['met'] else 'NOT MET'}: {g['goal']} — {g['measured']}")
    return result

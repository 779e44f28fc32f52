"""Cluster costs: the forwarding hop, and moving a bank vs copying its bytes.

Two shards run in their own processes on loopback, formed from a static peer
list. Forwarding: p50 of the same Read sent to the bank's owner directly and to
the other shard (which forwards it), alternating ``--rounds`` times so a shared
machine's drift hits both alike; goal (issue 15): the hop adds <= 1 ms at p50.
Rebalance: a bank of ``--memories`` memories is put on the shard that does not
own it (calls marked as forwarded are served where they land), then moved with
``MoveBank`` (pause, export, stream, durable import = a snapshot on the owner,
drop); compared with sending the same number of bytes over a loopback TCP socket
in the same run; goal: move speed >= 0.5 x raw copy speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from typing import Any

import numpy as np

from apcm.tools.bench.common import (
    add_model_arguments,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    time_calls,
)

HOP_GOAL_MS = 1.0
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
    with server_process(args.model, args.device, args.torch_threads, grpc_port=ports[0],
                        peers=peers, shard_id=0, max_batch_size=BATCH) as a0, \
            server_process(args.model, args.device, args.torch_threads, grpc_port=ports[1],
                           peers=peers, shard_id=1, max_batch_size=BATCH) as a1, \
            MemoryClient(a0, timeout=600.0) as c0, MemoryClient(a1, timeout=600.0) as c1:
        c0.wait_until_serving(timeout=300)
        c1.wait_until_serving(timeout=300)
        info = c0.model_info()
        dtype = np.dtype(info.code_dtype)

        def random_codes(n: int) -> np.ndarray:
            x = rng.standard_normal((n, info.code_dim)) * (40 if dtype.kind == "i" else 1)
            return x.astype(dtype)

        # -- the forwarding hop: same Read, to the owner (shard 1) and via shard 0
        small = _owned_by(1, "hop")
        c1.create_bank(small, capacity=1024)
        c1.write(codes=random_codes(1000), bank=small, mode="per_item")
        q = random_codes(1)
        direct: list[float] = []
        forwarded: list[float] = []
        for _ in range(args.rounds):
            direct += time_calls(lambda: c1.read(codes=q, bank=small, top_k=1),
                                 min_time_s=args.seconds)
            forwarded += time_calls(lambda: c0.read(codes=q, bank=small, top_k=1),
                                    min_time_s=args.seconds)
        d50, f50 = percentile_ms(direct, 50), percentile_ms(forwarded, 50)

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
    rows = [
        {"what": "Read top-1 p50 ms (1000-memory bank)", "direct": d50, "cluster": f50,
         "difference": f50 - d50, "ratio": f50 / d50},
        {"what": f"bank of {args.memories} memories, {size / 1e6:.1f} MB: MB/s",
         "direct": size / raw_s / 1e6, "cluster": size / move_s / 1e6,
         "difference": move_s - raw_s, "ratio": raw_s / move_s},
        {"what": "the same, raw copy also written to a file and fsynced: MB/s",
         "direct": size / sync_s / 1e6, "cluster": size / move_s / 1e6,
         "difference": move_s - sync_s, "ratio": sync_s / move_s},
    ]
    goals = [
        {"goal": f"forwarded Read p50 within {HOP_GOAL_MS} ms of a direct one (loopback)",
         "measured": f"{f50 - d50:+.3f} ms ({d50:.3f} -> {f50:.3f} ms)",
         "met": f50 - d50 <= HOP_GOAL_MS},
        {"goal": f"moving a {args.memories}-memory bank >= {MOVE_GOAL} x raw loopback copy "
                 "speed of its bytes",
         "measured": f"{raw_s / move_s:.3f} x ({move_s:.3f} s move vs {raw_s:.4f} s raw copy "
                     f"of {size} bytes)",
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
                   "servers": "2 shards, separate processes, loopback TCP, WAL off; a move's "
                              "import writes and fsyncs a snapshot on the owner",
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

"""``apcm bench cluster``: cluster mode on NATS JetStream, measured against its goals.

In one run, on loopback: a single-process server with the fsync WAL (the baseline),
then 3 ``nats-server`` processes (JetStream R3, ``sync_interval: always``) and
``--pods`` ``apcm serve --cluster`` processes, the SDK as the client.

- **write p50**: ``--writes`` sequential one-memory writes through the bank's owner
  and through another pod (forwarded), vs the single server; goal <= 2x.
- **read spread**: ``--reads`` reads with ``consistency="eventual"`` over 32 banks,
  all sent to one pod; each pod's share of the reads it served (its replicas' own
  read counters); goal: each pod >= 25 % with 3 pods.
- **resharding pause**: with 8 writers (one bank each) and one bank of
  ``--large`` memories being written, a pod is added; per bank, the longest gap
  between two acknowledged writes while the cluster settles, minus the bank's
  median write time; goal p99 <= 100 ms, the large bank included.
- **failover**: the pod owning most shards is killed (``SIGKILL``) under the
  writers; per bank of its shards, the time from the kill to the first write
  acknowledged after it; goal <= 5 s; eventual reads of those banks through another
  pod meanwhile, goal 0 failures.
- **acknowledged writes lost**: every acknowledged write read back after each fault;
  goal 0.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import add_model_arguments, machine, markdown_table, percentile_ms, server_process

WRITE_GOAL = 2.0
SPREAD_GOAL = 0.25
PAUSE_GOAL_MS = 100.0
FAILOVER_GOAL_S = 5.0
COLUMNS = [("goal", "goal"), ("measured", "measured"), ("met", "met")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--pods", type=int, default=3, help="apcm pods (default 3)")
    parser.add_argument("--shards", type=int, default=16, help="cluster shards (default 16)")
    parser.add_argument("--writes", type=int, default=300,
                        help="sequential writes timed per side (default 300)")
    parser.add_argument("--reads", type=int, default=600,
                        help="eventual reads spread over the pods (default 600)")
    parser.add_argument("--large", type=int, default=300_000,
                        help="memories in the large bank written during the resize "
                             "(default 300000)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy the pods' and NATS servers' logs into this folder")


def _code_pool(address: str, n: int) -> np.ndarray:
    """``n`` distinct valid codes of the served model (random inputs, compressed)."""
    from apcm.client import MemoryClient

    rng = np.random.default_rng(0)
    with MemoryClient(address, timeout=120) as c:
        shape = c.model_info().input_shape
        parts = [c.compress(rng.standard_normal((512, *shape)).astype(np.float32))
                 for _ in range(-(-n // 512))]
    return np.concatenate(parts)[:n]


def _write_p50(address: str, bank: str, pool: np.ndarray, n: int) -> float:
    from apcm.client import MemoryClient

    samples = []
    with MemoryClient(address, timeout=30) as c:
        c.create_bank(bank, max(2 * n, 64), exist_ok=True)
        for i in range(n):
            t0 = time.perf_counter()
            c.write(codes=pool[i:i + 1], bank=bank, keys=[f"{bank}-{i}"], mode="per_item")
            samples.append(time.perf_counter() - t0)
    return percentile_ms(samples, 50)


def _pauses_ms(timeline: list[tuple[float, float, str]], start: float, end: float,
               at: dict[str, float] | None = None) -> dict[str, float]:
    """Per bank: the longest gap between acknowledged writes in [start, end], less the
    bank's median write time (what a write takes anyway); ``at`` gets when each gap
    began (monotonic)."""
    out = {}
    for bank in {b for _, _, b in timeline}:
        times = sorted(t for t, _, b in timeline if b == bank and start <= t <= end)
        took = sorted(d for _, d, b in timeline if b == bank)
        if len(times) < 2:
            out[bank] = float("inf")
            continue
        gap, began = max((b - a, a) for a, b in zip(times, times[1:], strict=False))
        out[bank] = max(gap - took[len(took) // 2], 0.0) * 1000
        if at is not None:
            at[bank] = began
    return out


def _jetstream_publish_p50(urls: str, n: int, payload_bytes: int) -> float:
    """The floor under a cluster write: one nats-py client publishing ``n`` messages
    of one write's size, one at a time, to an R3 stream of the same NATS servers."""
    import asyncio

    import nats
    from nats.js import api

    async def measure() -> float:
        nc = await nats.connect(urls.split(","))
        try:
            js = nc.jetstream()
            await js.add_stream(api.StreamConfig(name="BENCH_FLOOR", subjects=["bench.floor"],
                                                 num_replicas=3))
            body = bytes(payload_bytes)
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await js.publish("bench.floor", body)
                samples.append(time.perf_counter() - t0)
            await js.delete_stream("BENCH_FLOOR")
            return percentile_ms(samples, 50)
        finally:
            await nc.close()

    return asyncio.run(measure())


def _clock(monotonic: float | None) -> str:
    """A monotonic time as the wall clock the pods' logs use (HH:MM:SS.mmm)."""
    if monotonic is None:
        return "-"
    wall = time.time() - time.monotonic() + monotonic
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def _keep_logs(root: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for log in root.rglob("*.log"):
        shutil.copy(log, into / log.name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from apcm.client.errors import ApcmError
    from apcm.server.cluster.router import FORWARDED_HEADER
    from apcm.server.cluster.shardmap import shard_of
    from apcm.v1 import memory_pb2, memory_pb2_grpc

    from .cluster_pods import Pod, Writers, missing, settled
    from .nats_cluster import NatsCluster

    local = ((FORWARDED_HEADER, "bench"),)
    with server_process(args.model, args.device, threads=args.torch_threads,
                        wal_mode="fsync", embedder="none") as single:
        pool = _code_pool(single, 40_000 + args.writes * 2)
        single_p50 = _write_p50(single, "w", pool, args.writes)

    goals: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="apcm-bench-cluster-") as tmp:
        root = Path(tmp)
        nats = NatsCluster(root / "nats").start()
        pods: list[Pod] = []
        try:
            flags = {"cluster-shards": args.shards, "embedder": "none",
                     "torch-threads": args.torch_threads, "device": args.device,
                     "max-bank-capacity": max(args.large * 2, 1 << 20)}
            pods = [Pod(Path(args.model), root, f"pod-{i}", nats.urls, **flags)
                    for i in range(args.pods)]
            for p in pods:
                p.start()
            for p in pods:
                p.wait_serving()
            owners = settled(pods, replicas=2)
            # -- write p50 through the owner and through another pod
            bank = "w"
            owner = next(p for p in pods if p.address == owners[shard_of(bank, args.shards)])
            other = next(p for p in pods if p is not owner)
            direct_p50 = _write_p50(owner.address, bank, pool[args.writes:], args.writes)
            elsewhere = next(f"w-{i}" for i in range(10_000)
                             if owners[shard_of(f"w-{i}", args.shards)] != other.address)
            forwarded_p50 = _write_p50(other.address, elsewhere, pool[args.writes:],
                                       args.writes)
            floor_p50 = _jetstream_publish_p50(nats.urls, args.writes, 256)
            goals.append({"goal": f"write p50 with 3 replicas <= {WRITE_GOAL:g}x the "
                          "single-process fsync WAL",
                          "measured": f"{direct_p50:.2f} ms through the owner, "
                          f"{forwarded_p50:.2f} ms through another pod, vs "
                          f"{single_p50:.2f} ms single ({direct_p50 / single_p50:.2f}x, "
                          f"{forwarded_p50 / single_p50:.2f}x); a bare JetStream R3 "
                          f"publish of 256 B from nats-py: {floor_p50:.2f} ms",
                          "met": max(direct_p50, forwarded_p50) <= WRITE_GOAL * single_p50})
            # -- eventual reads spread over the pods
            spread_banks = [f"s-{i}" for i in range(32)]
            with pods[0].client() as c:
                for i, b in enumerate(spread_banks):
                    c.create_bank(b, 64, exist_ok=True)
                    c.write(codes=pool[i * 4:i * 4 + 4], bank=b,
                            keys=[f"{b}-{j}" for j in range(4)], mode="per_item")
            settled(pods, replicas=2)

            def served() -> dict[str, int]:
                out = dict.fromkeys((p.name for p in pods), 0)
                for p in pods:
                    with grpc.insecure_channel(p.address) as ch:
                        stub = memory_pb2_grpc.MemoryServiceStub(ch)
                        for b in spread_banks:
                            # a pod that does not hold the bank's shard refuses
                            with contextlib.suppress(grpc.RpcError):
                                out[p.name] += int(stub.DescribeBank(
                                    memory_pb2.DescribeBankRequest(name=b), timeout=10,
                                    metadata=local).reads_total)
                return out

            before = served()
            with pods[0].client(consistency="eventual") as c:
                for i in range(args.reads):
                    b = spread_banks[i % len(spread_banks)]
                    c.read(codes=pool[(i % 32) * 4:(i % 32) * 4 + 1], bank=b)
            after = served()
            shares = {n: (after[n] - before[n]) / args.reads for n in after}
            goals.append({"goal": f"eventual reads: each of {args.pods} pods serves >= "
                          f"{SPREAD_GOAL:.0%}",
                          "measured": ", ".join(f"{n} {s:.1%}" for n, s in shares.items()),
                          "met": min(shares.values()) >= SPREAD_GOAL})
            # -- a large bank, then a pod added under writers
            with pods[0].client(timeout=600) as c:
                c.create_bank("large", args.large + 50_000, exist_ok=True)  # no evictions
                t0 = time.perf_counter()
                for start in range(0, args.large, 5000):
                    n = min(5000, args.large - start)
                    rows = pool[np.arange(start, start + n) % len(pool)]
                    c.write(codes=rows, bank="large", mode="per_item",
                            keys=[f"large-{j}" for j in range(start, start + n)])
                fill_s = time.perf_counter() - t0
            banks = [f"r-{i}" for i in range(8)]
            with pods[0].client() as c:
                for b in banks:
                    c.create_bank(b, 1 << 16, exist_ok=True)
            writers = Writers(pods[0].address, [*banks, "large"],
                              pool[args.writes * 2:]).start()
            time.sleep(2)
            added = Pod(Path(args.model), root, f"pod-{args.pods}", nats.urls, **flags)
            resize_start = time.monotonic()
            added.start().wait_serving()
            pods.append(added)
            settled(pods, replicas=2, timeout=600)
            resize_end = time.monotonic() + 2
            time.sleep(2)
            began: dict[str, float] = {}
            pauses = _pauses_ms(writers.timeline, resize_start, resize_end, began)
            p99 = float(np.percentile(list(pauses.values()), 99))
            longest = max(pauses, key=lambda b: pauses[b])
            worst_at = _clock(began.get(longest))
            goals.append({"goal": f"adding a pod: write pause p99 per bank <= "
                          f"{PAUSE_GOAL_MS:g} ms, a {args.large}-memory bank included",
                          "measured": f"p99 {p99:.1f} ms over {len(pauses)} banks; large "
                          f"bank {pauses.get('large', float('nan')):.1f} ms; resize settled "
                          f"in {resize_end - 2 - resize_start:.1f} s; the longest began at "
                          f"{worst_at} ({longest}); per bank: "
                          + ", ".join(f"{b} {ms:.0f} ms at {_clock(began.get(b))}"
                                      for b, ms in sorted(pauses.items())),
                          "met": p99 <= PAUSE_GOAL_MS})
            # -- the owner of most shards killed under the writers
            owners = settled(pods, replicas=2)
            victim = max(pods[1:], key=lambda p: owners.count(p.address))
            victim_banks = [b for b in [*banks, "large"]
                            if owners[shard_of(b, args.shards)] == victim.address]
            survivor = next(p for p in pods if p is not victim and p is not pods[0])
            read_failures, reads = [0], [0]
            stop_reads = threading.Event()

            def reader() -> None:
                with survivor.client(consistency="eventual", retries=0) as c:
                    while not stop_reads.is_set():
                        for b in victim_banks:
                            reads[0] += 1
                            try:
                                c.describe_bank(b)
                            except ApcmError:
                                read_failures[0] += 1
                        time.sleep(0.02)

            reading = threading.Thread(target=reader, daemon=True)
            reading.start()
            killed = time.monotonic()
            victim.kill9()
            pods.remove(victim)
            time.sleep(FAILOVER_GOAL_S + 3)
            stop_reads.set()
            reading.join()
            writers.stop()
            back = {b: min((t for t, _, x in writers.timeline if x == b and t > killed),
                           default=float("inf")) - killed for b in victim_banks}
            worst = max(back.values(), default=0.0)
            goals.append({"goal": f"owner killed: its banks writable again in <= "
                          f"{FAILOVER_GOAL_S:g} s; reads served throughout",
                          "measured": f"{worst:.2f} s (worst of {len(back)} banks); "
                          f"{read_failures[0]} of {reads[0]} eventual reads failed",
                          "met": worst <= FAILOVER_GOAL_S and read_failures[0] == 0})
            with pods[0].client(timeout=300) as c:
                lost = missing(c, writers.acked)
            goals.append({"goal": "0 acknowledged writes lost (a pod added, an owner killed)",
                          "measured": f"{len(lost)} of {writers.total()} lost; "
                          f"{writers.failures} writes refused (never acknowledged)",
                          "met": not lost})
        finally:
            for p in pods:
                p.kill9()
            nats.stop()
            if args.logs is not None:
                _keep_logs(root, args.logs)
    rows = [{"goal": g["goal"], "measured": g["measured"], "met": "yes" if g["met"] else "NO"}
            for g in goals]
    print(markdown_table(rows, COLUMNS))
    return {
        "benchmark": "cluster",
        "title": "Cluster mode on NATS JetStream: writes, read spread, resize, failover",
        "machine": machine(),
        "params": {"pods": args.pods, "shards": args.shards, "writes": args.writes,
                   "reads": args.reads, "large": args.large, "large_fill_s": fill_s,
                   "model": args.model,
                   "setup": "3 nats-server (JetStream R3, sync_interval always) and the "
                            "pods as separate processes on loopback; baseline: one "
                            "process with the fsync WAL"},
        "columns": COLUMNS,
        "rows": rows,
        "goals": goals,
    }

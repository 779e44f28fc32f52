"""Concurrency scaling: N clients sending single-vector Compress, batching on vs off.

Two servers run side by side in their own processes, identical except for
``Settings.batching``; for each client count the load alternates between them
(``--rounds`` times), so both see the same machine. The clients are asyncio
coroutines in the benchmark process, each with its own channel (its own
connection), each sending its next request as soon as the previous answer
arrives (closed loop). Goal (issue 6): with 32 clients, batching on gives
>= 5x the unbatched throughput; p99 latency is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np

from .common import (
    DEFAULT_DATA,
    add_model_arguments,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    set_torch_threads,
)
from .rpc import bench_inputs

GOAL_CLIENTS = 32
GOAL_SPEEDUP = 5.0
COLUMNS = [
    ("clients", "clients"), ("batching", "batching"), ("rps", "requests/s"),
    ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("errors", "errors"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--clients", default="1,8,32,128",
                        help="comma-separated concurrent client counts (default 1,8,32,128)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per cell and round (default 3.0)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each measurement (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times the two servers alternate per client count (default 3)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="prepared embeddings to send (Gaussian inputs when absent)")


async def _load(address: str, clients: int, inputs: np.ndarray, warmup: float,
                seconds: float) -> tuple[int, list[float], int]:
    """Closed-loop load; returns (requests completed in the window, their latencies, errors)."""
    from apcm.client import AsyncMemoryClient
    from apcm.client.errors import ApcmError

    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        x = inputs[i % len(inputs)][None]
        async with AsyncMemoryClient(address, timeout=30.0, retries=0) as client:
            await client.compress(x)  # connect before the clock starts
            while (now := loop.time()) < end:
                t0 = time.perf_counter()
                try:
                    await client.compress(x)
                except ApcmError:
                    errors += 1
                    continue
                if now >= start:
                    latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(clients)))
    return len(latencies), latencies, errors


def _cell(address: str, clients: int, inputs: np.ndarray, args: argparse.Namespace) -> dict:
    done, latencies, errors = asyncio.run(_load(address, clients, inputs, args.warmup,
                                                args.seconds))
    return {"requests": done, "latencies": latencies, "errors": errors, "seconds": args.seconds}


def _summarise(clients: int, batching: bool, cells: list[dict]) -> dict[str, Any]:
    lat = [v for c in cells for v in c["latencies"]]
    seconds = sum(c["seconds"] for c in cells)
    return {
        "clients": clients, "batching": batching,
        "rps": sum(c["requests"] for c in cells) / seconds,
        "p50_ms": percentile_ms(lat, 50) if lat else None,
        "p99_ms": percentile_ms(lat, 99) if lat else None,
        "errors": sum(c["errors"] for c in cells), "requests": len(lat),
    }


def goals(rows: list[dict]) -> list[dict]:
    by = {(r["clients"], r["batching"]): r for r in rows}
    on, off = by.get((GOAL_CLIENTS, True)), by.get((GOAL_CLIENTS, False))
    if not (on and off):
        return []
    speedup = on["rps"] / off["rps"]
    return [{
        "goal": f"{GOAL_CLIENTS} clients: batching >= {GOAL_SPEEDUP:g}x the unbatched throughput",
        "measured": f"{speedup:.2f}x ({on['rps']:.0f} vs {off['rps']:.0f} requests/s; "
                    f"p99 {on['p99_ms']:.2f} vs {off['p99_ms']:.2f} ms)",
        "met": speedup >= GOAL_SPEEDUP,
    }]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apcm.client import MemoryClient
    from apcm.server.config import Settings

    counts = [int(c) for c in args.clients.split(",")]
    set_torch_threads(args.torch_threads)  # so machine() reports the servers' setting
    defaults = Settings()
    rows: list[dict] = []
    with server_process(args.model, args.device, args.torch_threads, batching=False) as off, \
            server_process(args.model, args.device, args.torch_threads, batching=True) as on:
        with MemoryClient(on) as c_on, MemoryClient(off) as c_off:
            c_on.wait_until_serving(120)
            c_off.wait_until_serving(120)
            info = c_on.model_info()
        inputs, source = bench_inputs(args.data, info.input_shape, 256)
        for clients in counts:
            cells: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.rounds):
                for batching, address in ((False, off), (True, on)):
                    cells[batching].append(_cell(address, clients, inputs, args))
            for batching in (False, True):
                rows.append(_summarise(clients, batching, cells[batching]))
            print(markdown_table(rows[-2:], COLUMNS).split("\n", 2)[2], flush=True)

    met = goals(rows)
    result = {
        "benchmark": "concurrency",
        "title": "Concurrency scaling: single-vector Compress, batching on vs off",
        "machine": machine(),
        "model": {"path": args.model, "name": info.name, "kind": info.kind,
                  "code_dim": info.code_dim, "code_dtype": info.code_dtype,
                  "device": info.device},
        "inputs": source,
        "params": {
            "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
            "clients": counts, "torch_threads": args.torch_threads,
            "server_workers": defaults.max_workers,
            "batch_max_size": defaults.batch_max_size,
            "batch_max_wait_us": defaults.batch_max_wait_us,
            "load": "asyncio closed loop, one channel per client, in the benchmark process; "
                    "servers in their own processes on loopback",
        },
        "columns": COLUMNS,
        "rows": rows,
        "goals": met,
    }
    print(markdown_table(rows, COLUMNS))
    for g in met:
        print(f"- {'MET' if g['met'] else 'NOT MET'}: {g['goal']} — {g['measured']}")
    return result

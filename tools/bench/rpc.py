"""RPC overhead: Compress/Decompress through gRPC vs the same codec called in-process.

The server runs in its own process on loopback and is reached through the
real client; the in-process side calls the codec the server loaded, from the
benchmark process. The two alternate ``--rounds`` times per cell, so drift in
a shared machine's load hits both sides alike. Goals (issue 6): gRPC
throughput >= 0.8 of in-process at batch >= 256; p50 round trip at batch 1
within 1 ms of the in-process call.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    DEFAULT_DATA,
    add_model_arguments,
    load_embeddings,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    set_torch_threads,
    time_calls,
)

RATIO_GOAL = 0.8
RATIO_GOAL_MIN_BATCH = 256
OVERHEAD_GOAL_MS = 1.0

COLUMNS = [
    ("op", "op"), ("batch", "batch"), ("inproc_vps", "in-process vectors/s"),
    ("rpc_vps", "gRPC vectors/s"), ("ratio", "gRPC / in-process"),
    ("inproc_p50_ms", "in-process p50 ms"), ("rpc_p50_ms", "gRPC p50 ms"),
    ("rpc_p99_ms", "gRPC p99 ms"), ("overhead_p50_ms", "p50 overhead ms"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batches", default="1,32,256,4096",
                        help="comma-separated batch sizes (default 1,32,256,4096)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="measuring time per side, cell and round (default 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times in-process and gRPC alternate per cell (default 3)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="prepared embeddings to send (Gaussian inputs when absent)")


def bench_inputs(path: str, shape: tuple[int, ...], n: int) -> tuple[np.ndarray, str]:
    """``n`` inputs [n, L, D] float32: real test-split embeddings tiled, else Gaussian."""
    if Path(path).exists():
        real = load_embeddings(path, "test")
        if tuple(real.shape[1:]) == tuple(shape):
            reps = -(-n // real.shape[0])
            return np.ascontiguousarray(np.tile(real, (reps, 1, 1))[:n]), f"{path}:test"
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *shape), dtype=np.float32), "gaussian"


def _measure(in_fn: Any, rpc_fn: Any, seconds: float, rounds: int) -> tuple[list, list]:
    in_d: list[float] = []
    rpc_d: list[float] = []
    for _ in range(rounds):
        in_d += time_calls(in_fn, min_time_s=seconds)
        rpc_d += time_calls(rpc_fn, min_time_s=seconds)
    return in_d, rpc_d


def _row(op: str, batch: int, in_d: list[float], rpc_d: list[float], max_diff: float) -> dict:
    inproc_vps = batch * len(in_d) / sum(in_d)
    rpc_vps = batch * len(rpc_d) / sum(rpc_d)
    return {
        "op": op, "batch": batch, "inproc_vps": inproc_vps, "rpc_vps": rpc_vps,
        "ratio": rpc_vps / inproc_vps,
        "inproc_p50_ms": percentile_ms(in_d, 50), "rpc_p50_ms": percentile_ms(rpc_d, 50),
        "rpc_p99_ms": percentile_ms(rpc_d, 99),
        "overhead_p50_ms": percentile_ms(rpc_d, 50) - percentile_ms(in_d, 50),
        "inproc_calls": len(in_d), "rpc_calls": len(rpc_d), "max_abs_diff": max_diff,
    }


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for op in sorted({r["op"] for r in rows}):
        big = [r for r in rows if r["op"] == op and r["batch"] >= RATIO_GOAL_MIN_BATCH]
        if big:
            worst = min(big, key=lambda r: r["ratio"])
            out.append({
                "goal": f"{op}: gRPC throughput >= {RATIO_GOAL} x in-process at batch >= "
                        f"{RATIO_GOAL_MIN_BATCH}",
                "measured": f"worst {worst['ratio']:.2f} (batch {worst['batch']})",
                "met": worst["ratio"] >= RATIO_GOAL,
            })
        one = [r for r in rows if r["op"] == op and r["batch"] == 1]
        if one:
            o = one[0]["overhead_p50_ms"]
            out.append({
                "goal": f"{op}: p50 round trip at batch 1 within {OVERHEAD_GOAL_MS} ms of "
                        "in-process",
                "measured": f"+{o:.3f} ms ({one[0]['rpc_p50_ms']:.3f} vs "
                            f"{one[0]['inproc_p50_ms']:.3f} ms)",
                "met": o <= OVERHEAD_GOAL_MS,
            })
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from apcm.client import MemoryClient
    from apcm.server.api.app import resolve_device
    from apcm.server.codecs.base import load_codec

    batches = [int(b) for b in args.batches.split(",")]
    set_torch_threads(args.torch_threads)
    codec = load_codec(args.model, resolve_device(args.device))
    inputs, source = bench_inputs(args.data, codec.input_shape, max(batches))
    code_np = np.dtype(codec.code_dtype)

    def in_compress(x: np.ndarray) -> np.ndarray:
        return codec.compress(torch.from_numpy(x)).cpu().numpy()

    def in_decompress(c: np.ndarray) -> np.ndarray:
        return codec.decompress(torch.from_numpy(c)).cpu().numpy()

    rows: list[dict] = []
    with server_process(args.model, args.device, args.torch_threads,
                        max_batch_size=max(8192, max(batches))) as addr, \
            MemoryClient(addr, timeout=120.0) as client:
        client.wait_until_serving(timeout=120)
        info = client.model_info()
        for batch in batches:
            x = inputs[:batch]
            codes = in_compress(x).astype(code_np)
            diff = float(np.abs(client.compress(x).astype(np.float64) - codes).max())
            in_d, rpc_d = _measure(lambda x=x: in_compress(x), lambda x=x: client.compress(x),
                                   args.seconds, args.rounds)
            rows.append(_row("Compress", batch, in_d, rpc_d, diff))
            diff = float(np.abs(client.decompress(codes) - in_decompress(codes)).max())
            in_d, rpc_d = _measure(lambda c=codes: in_decompress(c),
                                   lambda c=codes: client.decompress(c), args.seconds, args.rounds)
            rows.append(_row("Decompress", batch, in_d, rpc_d, diff))
            print(markdown_table(rows[-2:], COLUMNS).split("\n", 2)[2], flush=True)

    met = goals(rows)
    result = {
        "benchmark": "rpc",
        "title": "RPC overhead: gRPC vs in-process codec",
        "machine": machine(),
        "model": {"path": args.model, "name": info.name, "kind": info.kind,
                  "code_dim": info.code_dim, "code_dtype": info.code_dtype,
                  "input_shape": list(info.input_shape), "device": info.device,
                  "compression_ratio": info.compression_ratio},
        "inputs": source,
        "params": {"seconds": args.seconds, "rounds": args.rounds, "batches": batches,
                   "torch_threads": args.torch_threads,
                   "server": "separate process, loopback TCP, default settings"},
        "columns": COLUMNS,
        "rows": rows,
        "goals": met,
    }
    print(markdown_table(rows, COLUMNS))
    for g in met:
        print(f"- {'MET' if g['met'] else 'NOT MET'}: {g['goal']} — {g['measured']}")
    return result

"""Shared helpers of the benchmarks: machine description, timing, percentiles, servers.

Benchmarks measure side by side in one process, so ratios hold on a noisy
machine; every JSON result carries :func:`machine` so a number is never
separated from the hardware that produced it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apcm.server.config import DEFAULT_MODEL

DEFAULT_DATA = "data/text/minilm.safetensors"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, shared by the benchmarks that serve a codec."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="codec weights to benchmark (default: the shipped default model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the codec runs (auto: CUDA when present)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads of the server and the in-process side "
                             "(default 1: on a small or shared CPU, multi-threaded kernels "
                             "stall whenever one of their threads is descheduled; 0 keeps "
                             "torch's default)")


def set_torch_threads(n: int) -> None:
    """Apply ``--torch-threads`` (0: leave torch's default) in this process."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


# -- machine ---------------------------------------------------------------------------
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The hardware and software a benchmark ran on."""
    import grpc
    import torch

    cuda = torch.cuda.is_available()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # A shared machine's other load is part of the conditions of a number.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe_machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = (f"; load average {m['load_average_1m']:.1f} at the end"
            if m.get("load_average_1m") is not None else "")
    return (f"{m['cpu']}, {m['usable_cores']} usable cores (torch threads {m['torch_threads']})"
            f"{gpu}; python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}{load}")


# -- timing ----------------------------------------------------------------------------
def percentile_ms(samples_s: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of durations in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(samples_s, dtype=np.float64), q) * 1e3)


def time_calls(fn: Callable[[], Any], *, min_time_s: float, min_calls: int = 3,
               max_calls: int = 1_000_000, warmup: int = 2) -> list[float]:
    """Durations (seconds) of repeated ``fn()`` calls: at least ``min_calls`` and ``min_time_s``."""
    for _ in range(warmup):
        fn()
    durations: list[float] = []
    start = time.perf_counter()
    while len(durations) < max_calls and (
        len(durations) < min_calls or time.perf_counter() - start < min_time_s
    ):
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


# -- servers ---------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(model: str, device: str = "auto", **overrides: Any) -> Iterator[str]:
    """Start an in-process ApCM server on 127.0.0.1:0; yields its address.

    The server keeps no durable state (temporary data dir, WAL off, no periodic
    snapshots) so benchmarks measure serving, not disk; the durability
    benchmark measures the disk.
    """
    from prometheus_client import CollectorRegistry

    from apcm.server.api.app import build_server

    with tempfile.TemporaryDirectory(prefix="apcm-bench-") as data_dir:
        settings = _bench_settings(model, device, data_dir, overrides)
        server, port = build_server(settings, registry=CollectorRegistry())
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(grace=1.0)


def _bench_settings(model: str, device: str, data_dir: str, overrides: dict[str, Any]) -> Any:
    from apcm.server.config import Settings

    base: dict[str, Any] = dict(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, model=model, device=device,
        data_dir=data_dir, snapshot_interval_s=0.0, wal_mode="off", log_level="WARNING",
        shutdown_grace_s=1.0,
    )
    base.update(overrides)
    return Settings(**base).validated()


def _serve_child(model: str, device: str, threads: int, overrides: dict[str, Any],
                 conn: Any) -> None:
    """Entry point of :func:`server_process`'s child: serve until the parent says stop."""
    from prometheus_client import CollectorRegistry

    from apcm.server.api.app import build_server

    set_torch_threads(threads)
    with tempfile.TemporaryDirectory(prefix="apcm-bench-") as data_dir:
        settings = _bench_settings(model, device, data_dir, overrides)
        server, port = build_server(settings, registry=CollectorRegistry())
        server.start()
        conn.send(port)
        conn.recv()  # blocks until the parent asks us to stop (or dies: EOFError)
        server.stop(grace=1.0)


@contextlib.contextmanager
def server_process(model: str, device: str = "auto", threads: int = 0,
                   **overrides: Any) -> Iterator[str]:
    """Run an ApCM server (``build_server`` on port 0) in a child process; yields its address.

    Load generators are Python too: in one process they would share the GIL
    with the server's handler threads and measure their own contention, so
    servers under load run in their own process, as they do in production.
    ``threads``: torch intra-op threads of the server (0: torch's default).
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(model, device, threads, overrides, child),
                       daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("benchmark server did not start within 300 s")
        try:
            port = parent.recv()
        except EOFError as e:
            raise RuntimeError("benchmark server exited during start-up (see its stderr)") from e
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            parent.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def load_embeddings(path: str, split: str) -> np.ndarray:
    """One split [N, 1, 384] float32 of the prepared sentence embeddings."""
    from safetensors.numpy import load_file

    return load_file(path)[split]


# -- output ----------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a markdown table; ``columns`` are (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)

"""``apcm bench codec``: a codec file's encode/decode vs FAISS PQ at the same bytes, one thread.

Loads any codec file ``load_codec`` loads, fits FAISS PQ with the codec's bytes
per code on the training split, and times, on ONE CPU thread (torch and
OpenMP), batches of ``--batch`` items: our ``compress`` (encode), our
``decompress`` (decode), both back to back, FAISS ``sa_encode`` and
``sa_decode``; where the codec has them, also its per-item checks given the
codes (in-domain score and exact reconstruction error, what Compress and Write
add) and its Read-side decode (``scorer.codes``: codes to search vectors, run
on every bank chunk a Read scans). All are timed in turn within every
repetition, so machine noise hits all alike; ratios are of the medians, of
the minima (the least disturbed run on a shared machine), and of the median
CPU time of the calling thread (what the work costs, without the time other
processes hold the core). Goal (issue 11): our
encode + decode no slower than FAISS PQ encode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import DEFAULT_DATA, describe_machine, machine, markdown_table

COLUMNS = [
    ("op", "operation"), ("median_ms", "median ms / batch"), ("min_ms", "min ms"),
    ("items_per_s", "items/s (median)"), ("vs_pq_encode", "÷ FAISS PQ encode"),
    ("min_vs_pq_encode", "min ÷ FAISS PQ encode min"),
    ("cpu_median_ms", "median CPU ms"), ("cpu_vs_pq_encode", "CPU ÷ FAISS PQ encode CPU"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from apcm.server.config import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="codec weights file (default: the server's default model)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="items: .npy or .safetensors [default %(default)s]")
    parser.add_argument("--split", default="test", help="tensor of --data to time on")
    parser.add_argument("--train-data", default=None,
                        help="data FAISS PQ is fitted on (default: --data)")
    parser.add_argument("--train-key", default="train",
                        help="tensor of --train-data to fit PQ on (missing: --split, said so)")
    parser.add_argument("--batch", type=int, default=1024, help="items per call [default 1024]")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed repetitions of each operation [default 15]")
    parser.add_argument("--pq-iters", type=int, default=10,
                        help="k-means iterations of the PQ fit (does not change its speed)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def _items(path: str, key: str, d: int) -> np.ndarray | None:
    from ..evaluation.datasets import load_arrays

    arrays = load_arrays(path)
    if key not in arrays:
        return None
    return np.ascontiguousarray(arrays[key].reshape(-1, d).float().numpy())


def pq_spec(d: int, n_bytes: int) -> tuple[int, int]:
    """(sub-quantisers M, bits each) with M * bits = 8 * n_bytes and M dividing d.

    8-bit sub-codes when possible (FAISS' usual PQ), else the widest of 4..12 bits.
    """
    for nbits in (8, *range(12, 3, -1)):
        if (8 * n_bytes) % nbits == 0:
            m = 8 * n_bytes // nbits
            if m <= d and d % m == 0:
                return m, nbits
    raise ValueError(f"no PQ of {n_bytes} bytes on {d} dims")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    from apcm.server.codecs.base import load_codec

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    codec = load_codec(args.model, torch.device("cpu"))
    d, n_bytes = codec.input_dim, codec.bytes_per_code
    x = _items(args.data, args.split, d)
    if x is None:
        raise SystemExit(f"{args.data} has no tensor {args.split!r}")
    train = _items(args.train_data or args.data, args.train_key, d)
    fitted_on = f"{args.train_key} of {Path(args.train_data or args.data).name}"
    if train is None:
        train, fitted_on = x, f"{args.split} (no {args.train_key!r} tensor): timing only"
    batch = np.ascontiguousarray(np.resize(x, (args.batch, d)))  # repeats items if too few
    m, nbits = pq_spec(d, n_bytes)
    pq: Any = faiss.IndexPQ(d, m, nbits)
    pq.do_polysemous_training = False
    pq.pq.cp.niter = args.pq_iters
    pq.pq.cp.min_points_per_centroid = 1
    t0 = time.perf_counter()
    pq.train(np.ascontiguousarray(train, dtype=np.float32))
    pq_fit_s = time.perf_counter() - t0
    if int(pq.sa_code_size()) != n_bytes:
        raise AssertionError("PQ code size differs from the codec's")

    items = torch.from_numpy(batch).reshape(-1, *codec.input_shape)
    codes = codec.compress(items)
    pq_codes = pq.sa_encode(batch)
    ops = {
        "ours encode": lambda: codec.compress(items),
        "ours decode": lambda: codec.decompress(codes),
        "ours encode+decode": lambda: codec.decompress(codec.compress(items)),
        "FAISS PQ encode": lambda: pq.sa_encode(batch),
        "FAISS PQ decode": lambda: pq.sa_decode(pq_codes),
    }
    if codec.check_items(items[:1]) is not None:
        ops["ours per-item checks (codes given)"] = lambda: codec.check_items(items, codes)
    if codec.scorer is not None:
        ops["ours Read decode (scorer.codes)"] = lambda: codec.scorer.codes(codes)
    times: dict[str, list[float]] = {k: [] for k in ops}
    cpu: dict[str, list[float]] = {k: [] for k in ops}
    with torch.inference_mode():
        for fn in ops.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in ops.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append(time.thread_time() - start_cpu)
                times[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    low = {k: float(np.min(v)) for k, v in times.items()}
    # CPU time of this thread (everything runs on it: 1 torch and 1 OpenMP thread) leaves
    # out the time other processes hold the core, which wall-clock time on a shared
    # machine does not
    cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
    rows = [{
        "op": k, "median_ms": med[k] * 1e3, "min_ms": low[k] * 1e3,
        "items_per_s": args.batch / med[k], "vs_pq_encode": med[k] / med["FAISS PQ encode"],
        "min_vs_pq_encode": low[k] / low["FAISS PQ encode"],
        "cpu_median_ms": cpu_med[k] * 1e3,
        "cpu_vs_pq_encode": cpu_med[k] / cpu_med["FAISS PQ encode"],
    } for k in ops]
    ratios = {
        "ours_encode_plus_decode_over_pq_encode": med["ours encode+decode"]
        / med["FAISS PQ encode"],
        "ours_encode_plus_decode_over_pq_encode_min": low["ours encode+decode"]
        / low["FAISS PQ encode"],
        "ours_encode_plus_decode_over_pq_encode_cpu": cpu_med["ours encode+decode"]
        / cpu_med["FAISS PQ encode"],
        "ours_encode_over_pq_encode": med["ours encode"] / med["FAISS PQ encode"],
        "ours_decode_over_pq_encode": med["ours decode"] / med["FAISS PQ encode"],
        "ours_decode_over_pq_decode": med["ours decode"] / med["FAISS PQ decode"],
    }
    x_hat = codec.decompress(codes).reshape(len(batch), -1).numpy()
    pq_hat = pq.sa_decode(pq_codes)
    result: dict[str, Any] = {
        "benchmark": "codec",
        "title": "Codec encode/decode vs FAISS PQ at equal bytes (1 thread)",
        "machine": machine(),
        "model": {"file": Path(args.model).name, "kind": codec.kind,
                  "bytes_per_code": n_bytes, "hash": codec.content_hash[:12]},
        "inputs": {"data": f"{args.split} of {Path(args.data).name}", "batch": args.batch,
                   "repeats": args.repeats, "threads": 1,
                   "pq": f"PQ{m}x{nbits} ({n_bytes} B), fitted on {fitted_on} in "
                         f"{pq_fit_s:.1f} s, {args.pq_iters} k-means iters",
                   "mse_ours": float(np.mean((x_hat - batch) ** 2)),
                   "mse_pq": float(np.mean((pq_hat - batch) ** 2))},
        "columns": COLUMNS, "rows": rows, "ratios": ratios,
        "goals": [{
            "goal": "codec encode+decode no slower than FAISS PQ encode (1 thread, batch "
                    f"{args.batch})",
            "measured": f"{ratios['ours_encode_plus_decode_over_pq_encode']:.2f}x "
                        f"({med['ours encode+decode'] * 1e3:.1f} vs "
                        f"{med['FAISS PQ encode'] * 1e3:.1f} ms median; "
                        f"{ratios['ours_encode_plus_decode_over_pq_encode_min']:.2f}x of the "
                        f"minima, {low['ours encode+decode'] * 1e3:.1f} vs "
                        f"{low['FAISS PQ encode'] * 1e3:.1f} ms; CPU time "
                        f"{ratios['ours_encode_plus_decode_over_pq_encode_cpu']:.2f}x)",
            "met": ratios["ours_encode_plus_decode_over_pq_encode"] <= 1.0,
        }],
    }
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    r = result["ratios"]
    return "\n".join([
        f"{result['title']}: model {result['model']['file']} ({result['model']['kind']}, "
        f"{result['model']['bytes_per_code']} B/code), {result['inputs']['pq']}; "
        f"{describe_machine(result['machine'])}", "",
        markdown_table(result["rows"], COLUMNS), "",
        f"ratios: ours encode+decode / PQ encode = "
        f"{r['ours_encode_plus_decode_over_pq_encode']:.2f} (minima "
        f"{r['ours_encode_plus_decode_over_pq_encode_min']:.2f}, CPU time "
        f"{r['ours_encode_plus_decode_over_pq_encode_cpu']:.2f}); ours encode / PQ encode = "
        f"{r['ours_encode_over_pq_encode']:.2f}; ours decode / PQ encode = "
        f"{r['ours_decode_over_pq_encode']:.2f}; ours decode / PQ decode = "
        f"{r['ours_decode_over_pq_decode']:.2f}",
    ])

"""``apcm bench read``: Read latency of a memory bank vs FAISS ``IndexFlatIP``.

For each bank size the bank is filled with the same codes FAISS indexes (FAISS gets
the L2-normalised dequantised codes in float32, so both compute exact cosine
top-k). Each repetition times one ``MemoryStore.read`` and one FAISS search on the
same queries, alternating, so machine noise hits both alike; the ratio is ours /
FAISS of the medians. Also reported: bytes per slot of the bank (codes + metadata)
vs the raw code bytes, and how often both agree on the best slot.

Codes are random latents quantised like the codec's unless ``--model`` names an
existing weights file, whose code dim, dtype and int8 scale are then used. A model
with packed ``uint8`` codes (IDRP v2) is compared with FAISS indexes at the same
bytes per vector instead (:mod:`apcm.tools.bench.read_packed`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from apcm.server.memory.options import ReadOptions

from .common import machine

DEFAULT_SIZES = "10000,100000,1000000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated bank sizes (slots) [default %(default)s]")
    parser.add_argument("--code-dim", type=int, default=192,
                        help="m when no model file is used [default %(default)s]")
    parser.add_argument("--code-dtype", default="int8", choices=("float32", "float16", "int8"),
                        help="code dtype when no model file is used [default %(default)s]")
    parser.add_argument("--model", default="",
                        help="weights file whose code dim/dtype/scale to use (default: the "
                             "server's default model if present, else random codes)")
    parser.add_argument("--batches", default="1,32",
                        help="comma-separated query batch sizes [default %(default)s]")
    parser.add_argument("--top-k", type=int, default=10, help="hits per query [default 10]")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed repetitions per cell (fewer for 1M x 32) [default 30]")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch and FAISS alike (0: torch's default; "
                             "default 1, because on a small or shared CPU multi-threaded "
                             "kernels stall whenever one thread is descheduled)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--twins", default="sq,pq,flat",
                        help="packed models only: FAISS twins, of sq (scalar quantiser at the "
                             "same bytes), pq (PQ at the same bytes), flat (float32 over the "
                             "decoded vectors) [default %(default)s]")
    parser.add_argument("--train-size", type=int, default=20000,
                        help="packed models only: vectors the FAISS twins are trained on")
    parser.add_argument("--pq-iters", type=int, default=10,
                        help="packed models only: k-means iterations of the PQ twin")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def _codec(args: argparse.Namespace) -> tuple[Any, str]:
    """The model file's codec (None for random codes) and a description."""
    import torch

    from apcm.server.config import DEFAULT_MODEL

    path = Path(args.model or DEFAULT_MODEL)
    if not path.is_file():
        return None, "random codes"
    from apcm.server.codecs.base import load_codec

    return load_codec(path, torch.device("cpu")), f"model {path}"


def _code_space(args: argparse.Namespace, codec: Any) -> tuple[int, str, Any]:
    """(code_dim, code_dtype, int8 scale or None) of coordinate codes."""
    import torch

    if codec is not None:
        return codec.code_dim, codec.code_dtype, codec.quantizer.scale
    scale = torch.full((args.code_dim,), 3.0 / 127) if args.code_dtype == "int8" else None
    return args.code_dim, args.code_dtype, scale


def _fill(store: Any, n: int, step: Any, gen: Any, quantizer: Any) -> Any:
    """Writes n random codes into bank "bench"; returns them dequantised [n, m] float32.

    Latents are Gaussian with a spread of 40 int8 steps per dimension, like trained
    codes that use most of the int8 range.
    """
    import torch

    deq = []
    for i in range(0, n, 65536):
        z = torch.randn(min(65536, n - i), step.shape[0], generator=gen) * step * 40
        codes = quantizer.quantize(z)
        store.write("bench", codes, [], [])
        deq.append(quantizer.dequantize(codes))
    return torch.cat(deq)


def _percentiles(times: list[float]) -> tuple[float, float]:
    a = np.asarray(times) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    from apcm.server.codecs.quant import CodeQuantizer
    from apcm.server.memory.store import MemoryStore

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    codec, source = _codec(args)
    if codec is not None and codec.code_dtype == "uint8":
        from .read_packed import markdown as packed_markdown
        from .read_packed import run_packed

        result = run_packed(args, codec, source, threads)
        result.update({"cpu": _cpu_name(), "torch": torch.__version__,
                       "faiss": faiss.__version__, "machine": machine()})
        print()
        print(packed_markdown(result))
        return result
    code_dim, code_dtype, scale = _code_space(args, codec)
    quantizer = CodeQuantizer(code_dtype, scale)
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    for n in sizes:
        store = MemoryStore(code_dim=code_dim, code_dtype=code_dtype, scale=scale,
                            device=torch.device("cpu"), max_capacity=n, max_payload_bytes=0,
                            max_key_length=1, default_policy="lfu_decay",
                            default_half_life=1000.0)
        store.create_bank("bench", n)
        step = scale if scale is not None else torch.ones(code_dim)
        deq = _fill(store, n, step, gen, quantizer)
        index = faiss.IndexFlatIP(code_dim)
        index.add(torch.nn.functional.normalize(deq).numpy())
        del deq
        info = store.describe("bench")
        raw = code_dim * quantizer.itemsize
        for b in batches:
            reps = max(5, args.repeats // 4) if n * b >= 10_000_000 else args.repeats
            queries = [torch.randn(b, code_dim, generator=gen) * step for _ in range(reps + 1)]
            ours, theirs, agree = [], [], 0
            for i, q in enumerate(queries):
                t0 = time.perf_counter()
                res = store.read("bench", q, ReadOptions(top_k=args.top_k))
                t1 = time.perf_counter()
                _, ids = index.search(torch.nn.functional.normalize(q).numpy(), args.top_k)
                t2 = time.perf_counter()
                if i:  # the first round warms caches and allocators
                    ours.append(t1 - t0)
                    theirs.append(t2 - t1)
                agree += sum(int(r.hits[0].slot == ids[j, 0]) for j, r in enumerate(res.results))
            p50, p99 = _percentiles(ours)
            f50, f99 = _percentiles(theirs)
            rows.append({
                "slots": n, "batch": b, "top_k": args.top_k, "repeats": reps,
                "ours_p50_ms": p50, "ours_p99_ms": p99, "faiss_p50_ms": f50, "faiss_p99_ms": f99,
                "ratio_p50": p50 / f50, "ratio_p99": p99 / f99,
                "top1_agreement": agree / (b * len(queries)),
                "bank_bytes_per_slot": info.memory_bytes / n, "raw_code_bytes": raw,
                "bytes_ratio": info.memory_bytes / n / raw, "faiss_bytes_per_slot": 4 * code_dim,
            })
            print(_row(rows[-1]), flush=True)
        del store, index
    result = {
        "benchmark": "read", "code_dim": code_dim, "code_dtype": code_dtype, "source": source,
        "threads": threads, "cpu": _cpu_name(), "torch": torch.__version__,
        "faiss": faiss.__version__, "rows": rows,
    }
    print()
    print(markdown(result))
    return result


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['slots']:,} | {r['batch']} | {r['ours_p50_ms']:.2f} | {r['ours_p99_ms']:.2f} "
            f"| {r['faiss_p50_ms']:.2f} | {r['faiss_p99_ms']:.2f} | {r['ratio_p50']:.2f} "
            f"| {r['top1_agreement']:.3f} | {r['bank_bytes_per_slot']:.1f} "
            f"({r['bytes_ratio']:.3f}x of {r['raw_code_bytes']}) | {r['faiss_bytes_per_slot']} |")


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table with a one-line header of the setup."""
    head = (f"Read vs FAISS IndexFlatIP, m={result['code_dim']} {result['code_dtype']} "
            f"({result['source']}), {result['threads']} threads, {result['cpu']}\n\n"
            "| slots | Q | ours p50 ms | ours p99 ms | FAISS p50 ms | FAISS p99 ms "
            "| ratio p50 | top-1 agree | bank bytes/slot | FAISS bytes/slot |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    return "\n".join([head] + [_row(r) for r in result["rows"]])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

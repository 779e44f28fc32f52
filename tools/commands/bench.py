"""``apcm bench NAME``: benchmarks that measure ratios side by side in one run.

Each benchmark is a module ``apcm.tools.bench.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> dict``; every benchmark prints a
markdown table and accepts ``--json PATH``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path

BENCHMARKS = {
    "read": "Read latency vs bank size, against FAISS IndexFlatIP on the same codes "
            "(packed v2 codes: FAISS SQ/PQ at the same bytes and flat over the decoded)",
    "durability": "acknowledged writes/s by WAL mode; snapshot/restore vs raw disk I/O",
    "rpc": "Compress/Decompress through gRPC vs in-process, by batch size",
    "concurrency": "throughput and p99 with 1..128 concurrent clients, batching on/off",
    "recall": "recall@10 of Read over gRPC vs the decoded memories vs equal-bytes baselines, "
              "held-out sets in and out of domain",
    "hybrid": "evidence recall@10 of recall() on conversations by mode; hybrid vs dense speed",
    "text": "recall(text) p50 and remember rate vs Chroma's server with the embedding in its "
            "client (all-MiniLM-L6-v2), side by side",
    "cluster": "cluster mode on NATS JetStream: write p50 vs the fsync WAL, eventual-read "
               "spread, write pause while adding a pod, failover time, writes lost",
    "scale": "RAM per memory, concurrent reads of one bank and writes/s, vs a baseline revision",
    "index": "a bank's IVF index vs its exhaustive scan vs Chroma's HNSW server, same data",
    "codec": "a codec file's encode/decode vs FAISS PQ at equal bytes, 1 thread, batch 1024",
    "restart": "a large indexed bank across a restart (first indexed read vs a raw read of "
               "its snapshot) and the snapshots of an unchanged bank",
    "report": "turn benchmark JSON files into docs/BENCHMARKS.md with plots",
    "all": "run every benchmark with its defaults, then the report",
}


def _available() -> dict[str, str]:
    return {
        name: text for name, text in BENCHMARKS.items()
        if importlib.util.find_spec(f"apcm.tools.bench.{name}") is not None
    }


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="run a benchmark", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    benches = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, text in _available().items():
        p = benches.add_parser(name, help=text, description=text)
        importlib.import_module(f"apcm.tools.bench.{name}").add_arguments(p)
        if not any(a.dest == "json" for a in p._actions):
            p.add_argument("--json", default=None, help="also write the results to this file")
        p.set_defaults(func=run, bench_module=name)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"apcm.tools.bench.{args.bench_module}")
    results = module.run(args)
    if getattr(args, "json", None) and results is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0

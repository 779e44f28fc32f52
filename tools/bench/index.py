"""``apcm bench index``: a bank's IVF index against its exhaustive scan and against
Chroma's HNSW server, side by side in one run on the same data (issue 14).

Data: the shipped default model (packed uint8 codes) stores ``--memories``
MiniLM-like vectors. With fewer real sentence embeddings than memories, each
memory is a random real embedding plus Gaussian noise (``--noise`` per dim,
about cosine 0.9 to its source at 0.025), renormalised; queries are held-out real
embeddings plus the same noise. The output says so.

ApCM runs as a server process (``server_process``) and is read through the real
client with raw query vectors, one query per Read. Chroma 1.x runs as its own
server (``chroma run``) and is queried over HTTP with its client (cosine space,
its default HNSW settings). Both load generators are this process's threads.

- **recall@10**: of each reader against the exhaustive scan's top 10 (computed
  exactly in the scan's geometry from the decoded codes); Chroma's also against
  exact float search of the vectors it stores.
- **p50 / p99**: one reader, one query at a time. **reads/s**: ``--readers``
  threads for ``--seconds``.
- **server cores**: CPU seconds the server process (every thread) used per second
  of a throughput cell, from ``/proc``: how many cores the readers kept busy.
- **FAISS IVF-PQ**: ``IndexIVFFlat``'s coarse quantiser with PQ codes of the same
  192 bytes (``IndexIVFPQ``, 8-bit sub-quantisers, inner product on unit vectors),
  trained on the memories themselves as its users would, with as many lists as
  ApCM's index; in this process, one OpenMP thread, so no RPC is in its time.
  Codes scanned per read from FAISS's own counter; ApCM's from its list sizes.
- **bank bytes per memory**: ``DescribeBank.memory_bytes / occupied`` (no keys or
  payloads here), against the 192 code bytes; Chroma: its server's RSS growth
  over the insert, per memory.
- **writes/s**: one thread writing one memory per call into an indexed and an
  unindexed bank of the same memories, in-process (``MemoryStore``, no log), in
  alternating rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "model_weights" / "text-minilm.safetensors"
REAL_EMBEDDINGS = ROOT / "data" / "corpus" / "embeddings.safetensors"  # prepare_corpus.py
FIXTURE_EMBEDDINGS = ROOT / "tests" / "fixtures" / "text_v2_heldout.safetensors"
TOP_K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memories", type=int, default=100_000,
                        help="memories in the bank (default 100,000)")
    parser.add_argument("--queries", type=int, default=200,
                        help="queries for recall and latency (default 200)")
    parser.add_argument("--scan-queries", type=int, default=12,
                        help="queries timed for the exhaustive scan (slow; default 12)")
    parser.add_argument("--nprobe", default="8,16,32",
                        help="comma-separated nprobe values of the IVF reads (default 8,16,32)")
    parser.add_argument("--readers", type=int, default=8, help="concurrent readers (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds per throughput cell (default 5)")
    add_data_arguments(parser)
    parser.add_argument("--write-seconds", type=float, default=3.0,
                        help="seconds per write cell (default 3)")
    parser.add_argument("--no-chroma", action="store_true", help="skip Chroma")
    parser.add_argument("--faiss-nprobe", default="16,32,64,128,256",
                        help="nprobe values of the FAISS IVF-PQ twin ('' skips it)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads of the ApCM server (0: torch's default)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--noise``, ``--embeddings`` and ``--model``: the synthetic MiniLM-like memories
    and the codec of the benchmarks that build large banks (``index``, ``restart``)."""
    parser.add_argument("--noise", type=float, default=0.025,
                        help="per-dim Gaussian noise of synthetic memories (default 0.025)")
    parser.add_argument("--embeddings", default=str(REAL_EMBEDDINGS),
                        help="safetensors of real sentence embeddings [N, 384] per key "
                             "(default: data/corpus from scripts/prepare_corpus.py; the test "
                             "fixtures if absent)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="codec weights file")


# -- data --------------------------------------------------------------------------------
def _real(path: str) -> tuple[np.ndarray, str]:
    from safetensors.numpy import load_file

    source = path if Path(path).exists() else str(FIXTURE_EMBEDDINGS)
    arrays = load_file(source)
    x = np.concatenate([v.reshape(-1, 384) for k, v in sorted(arrays.items())
                        if v.dtype == np.float32 and v.size % 384 == 0])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    # named relative to the repository where it lies inside it: reports are committed
    at = Path(source).resolve()
    shown = str(at.relative_to(ROOT)) if at.is_relative_to(ROOT) else source
    return x.astype(np.float32), shown


def _noisy(src: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, src.shape[1]), dtype=np.float32)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        x = src[rng.integers(0, len(src), m)] + rng.normal(0, noise, (m, src.shape[1]))
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _top10(queries: np.ndarray, rows: Callable[[int, int], np.ndarray], n: int) -> np.ndarray:
    """Exact top-10 row ids [Q, 10] of unit queries against unit rows, in blocks."""
    best_s = np.full((len(queries), TOP_K), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), TOP_K), dtype=np.int64)
    for i in range(0, n, 32768):
        block = rows(i, min(n, i + 32768))
        s = queries @ block.T
        ids = np.argpartition(-s, TOP_K - 1, axis=1)[:, :TOP_K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, ids, 1)], axis=1)
        cand_i = np.concatenate([best_i, ids + i], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :TOP_K]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / TOP_K
                          for f, t in zip(found, truth, strict=True)]))


# -- load --------------------------------------------------------------------------------
def _latency(read: Callable[[int], list[int]], n: int) -> tuple[list[list[int]], list[float]]:
    read(0)  # warm-up
    found, times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        found.append(read(i))
        times.append(time.perf_counter() - t0)
    return found, times


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(make_reader: Callable[[], Callable[[int], Any]], readers: int,
                seconds: float, n_queries: int, pid: int | None = None,
                cores: list[float] | None = None) -> float:
    """Reads/s of ``readers`` threads; with ``pid``, appends that process's cores
    used meanwhile to ``cores``."""
    stop, counts = threading.Event(), [0] * readers
    fns = [make_reader() for _ in range(readers)]

    def loop(t: int) -> None:
        j = t
        while not stop.is_set():
            fns[t](j % n_queries)
            j += readers
            counts[t] += 1

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(readers)]
    cpu0 = _cpu_seconds(pid) if pid is not None else 0.0
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if pid is not None and cores is not None:
        cores.append((_cpu_seconds(pid) - cpu0) / wall)
    return sum(counts) / wall


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- chroma ------------------------------------------------------------------------------
@contextlib.contextmanager
def _chroma_server() -> Iterator[tuple[int, int]]:
    """``chroma run`` on a free port with a temporary path; yields (port, pid)."""
    beside = Path(sys.executable).parent / "chroma"  # the venv's, if not on PATH
    exe = str(beside) if beside.exists() else shutil.which("chroma") or "chroma"
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="apcm-bench-chroma-") as path:
        proc = subprocess.Popen([exe, "run", "--path", path, "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import chromadb

            for _ in range(300):
                try:
                    chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
                    break
                except Exception:
                    time.sleep(0.2)
            else:
                raise RuntimeError("the chroma server did not start within 60 s")
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _bench_chroma(memories: np.ndarray, queries: np.ndarray, truth_scan: np.ndarray,
                  truth_float: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import chromadb

    with _chroma_server() as (port, pid):
        client = chromadb.HttpClient(host="127.0.0.1", port=port)
        col = client.create_collection("bench", metadata={"hnsw:space": "cosine"})
        rss0 = _rss(pid)
        cores: list[float] = []
        batch = min(client.get_max_batch_size(), 5000)
        t0 = time.perf_counter()
        for i in range(0, len(memories), batch):
            j = min(len(memories), i + batch)
            col.add(ids=[str(k) for k in range(i, j)], embeddings=memories[i:j])
        insert_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss1 = _rss(pid)

        def reader() -> Callable[[int], list[int]]:
            c = chromadb.HttpClient(host="127.0.0.1", port=port).get_collection("bench")

            def read(i: int) -> list[int]:
                r = c.query(query_embeddings=queries[i:i + 1], n_results=TOP_K, include=[])
                return [int(x) for x in r["ids"][0]]
            return read

        found, times = _latency(reader(), len(queries))
        rate = _throughput(reader, args.readers, args.seconds, len(queries), pid, cores)
    return {"name": "Chroma HNSW (server, HTTP)", "cores": cores[0],
            "recall_vs_scan": _recall(found, truth_scan),
            "recall_vs_float": _recall(found, truth_float),
            "p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3), "reads_per_s": rate,
            "bytes_per_memory": (rss1 - rss0) / len(memories), "insert_s": insert_s,
            "bytes_note": "server RSS growth"}


# -- faiss -------------------------------------------------------------------------------
def _bench_faiss_ivfpq(memories: np.ndarray, queries: np.ndarray, truth_scan: np.ndarray,
                       truth_float: np.ndarray, lists: int, nprobes: list[int],
                       args: argparse.Namespace) -> list[dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(1)
    n, d = memories.shape
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, 192, 8, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(1).choice(n, min(n, max(64 * lists, 65_536)), replace=False)
    t0 = time.perf_counter()
    index.train(memories[np.sort(sample)])
    index.add(memories)
    print(f"FAISS IVF{lists},PQ192x8 trained and filled in {time.perf_counter() - t0:.1f} s",
          flush=True)
    stats: Any = getattr(faiss.cvar, "indexIVF_stats")  # noqa: B009 - not in the stubs
    rows = []
    for npb in nprobes:
        index.nprobe = npb

        def read(i: int) -> list[int]:
            return index.search(queries[i:i + 1], TOP_K)[1][0].tolist()

        read(0)
        stats.reset()
        found, times = _latency(read, len(queries))
        scanned = stats.ndis / (len(queries) + 1)  # and _latency's warm-up read
        cores: list[float] = []
        rate = _throughput(lambda: read, args.readers, args.seconds, len(queries),
                           os.getpid(), cores)
        p50 = float(np.percentile(times, 50) * 1e3)
        rows.append({"name": f"FAISS IVF-PQ192 nprobe={npb} (in process)",
                     "recall_vs_scan": _recall(found, truth_scan),
                     "recall_vs_float": _recall(found, truth_float), "p50_ms": p50,
                     "p99_ms": float(np.percentile(times, 99) * 1e3), "reads_per_s": rate,
                     "cores": cores[0], "codes_scanned": scanned,
                     "us_per_code": p50 * 1e3 / max(scanned, 1.0), "bytes_per_memory": None})
        print(rows[-1], flush=True)
    return rows


# -- apcm --------------------------------------------------------------------------------
def _writes(codec: Any, codes: Any, threshold: int, seconds: float, rounds: int = 2
            ) -> tuple[list[float], list[float], float, float]:
    """Writes/s into an indexed and an unindexed in-process bank of the same memories,
    and each bank's bytes per memory."""
    import torch

    from apcm.server.memory.ivf import IndexConfig
    from apcm.server.memory.store import MemoryStore

    stores = {}
    for name, cfg in (("indexed", IndexConfig(threshold=threshold, background=False)),
                      ("plain", IndexConfig(threshold=0))):
        store = MemoryStore(code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                            scale=codec.quantizer.scale, device=torch.device("cpu"),
                            max_capacity=4 * len(codes), max_payload_bytes=64,
                            max_key_length=64, default_policy="lfu", default_half_life=1000.0,
                            metric=codec.similarity_weights, scorer=codec.scorer.stored(),
                            index_config=cfg)
        store.create_bank("w", 4 * len(codes))
        for i in range(0, len(codes), 8192):
            store.write("w", codes[i:i + 8192], [], [])
        if name == "indexed":
            assert store.build_index("w")
        stores[name] = store
    # sizes before the write cells, which add different numbers of memories to each
    sizes = {name: s.describe("w") for name, s in stores.items()}
    rates: dict[str, list[float]] = {"indexed": [], "plain": []}
    for rnd in range(rounds):
        for name in (("indexed", "plain") if rnd % 2 == 0 else ("plain", "indexed")):
            store, n, t0 = stores[name], 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                store.write("w", codes[n % len(codes):n % len(codes) + 1], [], [])
                n += 1
            rates[name].append(n / (time.perf_counter() - t0))
    per = {name: i.memory_bytes / i.occupied for name, i in sizes.items()}
    return rates["indexed"], rates["plain"], per["indexed"], per["plain"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from apcm.client import MemoryClient
    from apcm.server.codecs.base import load_codec

    from .common import describe_machine, machine, markdown_table, server_process

    rng = np.random.default_rng(0)
    real, source = _real(args.embeddings)
    order = rng.permutation(len(real))
    held = real[order[:max(args.queries, 100)]]
    pool = real[order[max(args.queries, 100):]]
    n = args.memories
    memories = _noisy(pool, n, args.noise, rng)
    queries = _noisy(held, args.queries, args.noise, rng)
    data_note = (f"{n:,} memories = {len(pool):,} real MiniLM embeddings from {source} "
                 f"+ N(0, {args.noise}^2) per dim, renormalised (synthetic around real ones); "
                 f"{args.queries} queries = held-out real embeddings + the same noise")
    print(data_note, flush=True)
    codec = load_codec(args.model)
    t0 = time.perf_counter()
    codes = torch.cat([codec.compress(torch.from_numpy(memories[i:i + 8192])[:, None, :])
                       for i in range(0, n, 8192)])
    print(f"compressed in {time.perf_counter() - t0:.1f} s", flush=True)

    def scan_rows(i: int, j: int) -> np.ndarray:
        z = torch.cat([codec.scorer.codes(codes[a:min(j, a + 1024)])
                       for a in range(i, j, 1024)])
        return torch.nn.functional.normalize(z, dim=1).numpy()

    q_search = torch.nn.functional.normalize(
        codec.scorer.queries(codec.encode_latent(torch.from_numpy(queries)[:, None, :])
                             .reshape(len(queries), -1)), dim=1).numpy()
    truth_scan = _top10(q_search, scan_rows, n)
    truth_float = _top10(queries, lambda i, j: memories[i:j], n)
    rows: list[dict[str, Any]] = []
    nprobes = [int(x) for x in args.nprobe.split(",")]
    x_queries = queries[:, None, :]
    threshold = n  # one build once loaded (a growing bank retrains at 2x its last build)
    server = server_process(args.model, "cpu", args.torch_threads, embedder="none",
                            index_threshold=threshold, max_bank_capacity=max(4_194_304, n),
                            max_batch_size=8192)
    with server as address, MemoryClient(address, timeout=600.0) as client:
        server_pid = next(p.pid for p in multiprocessing.active_children() if p.pid)
        rss0 = _rss(server_pid)
        client.create_bank("bench", n)
        t0 = time.perf_counter()
        for i in range(0, n, 4096):  # raw vectors: the server compresses, as it ingests
            client.write(memories[i:i + 4096, None, :], mode="per_item", bank="bench")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while (index := client.describe_bank("bench").index) is None \
                or index.state != "ready":
            time.sleep(0.5)
        build_s = time.perf_counter() - t0
        info = client.describe_bank("bench")
        rss_per = (_rss(server_pid) - rss0) / n
        print(f"loaded in {load_s:.1f} s, index of {index.lists} lists ready "
              f"{build_s:.1f} s later", flush=True)

        def apcm_reader(**kw: Any) -> Callable[[], Callable[[int], list[int]]]:
            def make() -> Callable[[int], list[int]]:
                c = MemoryClient(address, timeout=600.0)

                def read(i: int) -> list[int]:
                    r = c.read(x_queries[i:i + 1], bank="bench", top_k=TOP_K,
                               count_access=False, **kw)
                    return [h.slot for h in r[0].hits]
                return read
            return make

        bytes_per = info.memory_bytes / info.occupied
        for npb in nprobes:
            found, times = _latency(apcm_reader(nprobe=npb)(), len(queries))
            cores: list[float] = []
            rate = _throughput(apcm_reader(nprobe=npb), args.readers, args.seconds,
                               len(queries), server_pid, cores)
            p50 = float(np.percentile(times, 50) * 1e3)
            scanned = min(npb, index.lists) * info.occupied / index.lists  # lists' mean size
            rows.append({"name": f"ApCM IVF nprobe={npb}",
                         "recall_vs_scan": _recall(found, truth_scan),
                         "recall_vs_float": _recall(found, truth_float),
                         "p50_ms": p50, "p99_ms": float(np.percentile(times, 99) * 1e3),
                         "reads_per_s": rate, "cores": cores[0], "codes_scanned": scanned,
                         "us_per_code": p50 * 1e3 / scanned, "bytes_per_memory": bytes_per})
            print(rows[-1], flush=True)
        found, times = _latency(apcm_reader(exhaustive=True)(), args.scan_queries)
        cores = []
        rate = _throughput(apcm_reader(exhaustive=True), args.readers, args.seconds,
                           args.scan_queries, server_pid, cores)
        p50 = float(np.percentile(times, 50) * 1e3)
        rows.append({"name": "ApCM exhaustive scan", "cores": cores[0],
                     "codes_scanned": info.occupied, "us_per_code": p50 * 1e3 / info.occupied,
                     "recall_vs_scan": _recall(found, truth_scan[:args.scan_queries]),
                     "recall_vs_float": _recall(found, truth_float[:args.scan_queries]),
                     "p50_ms": p50, "p99_ms": float(np.percentile(times, 99) * 1e3),
                     "reads_per_s": rate,
                     "bytes_per_memory": None})  # filled from the unindexed bank
        print(rows[-1], flush=True)
    chroma_note = ""
    if args.no_chroma:
        chroma_note = "Chroma skipped (--no-chroma)"
    else:
        try:
            import chromadb  # noqa: F401
        except ImportError:
            chroma_note = ("Chroma NOT measured: chromadb is not installed "
                           "(pip install -e '.[bench]')")
        if not chroma_note:
            rows.append(_bench_chroma(memories, queries, truth_scan, truth_float, args))
            print(rows[-1], flush=True)
    if chroma_note:
        print(chroma_note, flush=True)
    if args.faiss_nprobe:
        rows += _bench_faiss_ivfpq(memories, queries, truth_scan, truth_float, index.lists,
                                   [int(x) for x in args.faiss_nprobe.split(",")], args)
    w_ix, w_plain, b_ix, b_plain = _writes(codec, codes, threshold, args.write_seconds)
    rows[len(nprobes)]["bytes_per_memory"] = b_plain
    writes = {"indexed_per_s": w_ix, "plain_per_s": w_plain,
              "ratio": float(np.median(w_ix) / np.median(w_plain)),
              "bank_bytes_per_memory_indexed": b_ix, "bank_bytes_per_memory_plain": b_plain}
    m = machine()
    table = markdown_table(rows, COLUMNS)
    print(f"\n{data_note}\n{chroma_note}\n\n{table}\n")
    print(f"writes/s, one memory per call, in-process: indexed {np.median(w_ix):.0f} "
          f"{[round(x) for x in w_ix]}, unindexed {np.median(w_plain):.0f} "
          f"{[round(x) for x in w_plain]}: ratio {writes['ratio']:.2f} (goal >= 0.8)")
    print(f"bank bytes per memory: indexed {b_ix:.1f}, unindexed {b_plain:.1f}, code 192 "
          f"({b_ix / 192:.2f}x; goal <= 1.3x)")
    print(f"machine: {describe_machine(m)}")
    result = {"memories": n, "data": data_note, "chroma": chroma_note or "measured",
              "server_rss_per_memory": rss_per,
              "index_lists": index.lists, "load_s": load_s, "index_build_s": build_s,
              "readers": rows, "writes": writes, "machine": m}
    return with_report_fields(result)


COLUMNS = [("name", "reader"), ("recall_vs_scan", "recall@10 vs scan"),
           ("recall_vs_float", "recall@10 vs float exact"), ("p50_ms", "p50 ms"),
           ("p99_ms", "p99 ms"), ("reads_per_s", "reads/s, 8 readers"),
           ("cores", "cores used, 8 readers"), ("codes_scanned", "codes scanned/read"),
           ("us_per_code", "us per code scanned (p50)"), ("bytes_per_memory", "bytes/memory")]


def with_report_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Adds what ``apcm bench report`` renders: title, table and the issue's goals
    (measured at this run's size; the issue states the latency goal at 1M)."""
    rows, n = result["readers"], result["memories"]
    ivf = [r for r in rows if r["name"].startswith("ApCM IVF")]
    chroma = next((r for r in rows if r["name"].startswith("Chroma")), None)
    good = [r for r in ivf if r["recall_vs_scan"] >= 0.95]
    best = min(good, key=lambda r: r["p50_ms"]) if good else None
    w = result["writes"]
    goals = []
    if chroma is not None and best is not None:
        goals.append({"goal": f"{n:,} memories: IVF Read p50 <= Chroma HNSW's at recall@10 "
                              ">= 0.95 of the scan",
                      "measured": f"{best['name']}: {best['p50_ms']:.1f} ms (recall "
                                  f"{best['recall_vs_scan']:.3f}) vs {chroma['p50_ms']:.1f} ms",
                      "met": best["p50_ms"] <= chroma["p50_ms"]})
    if chroma is not None and best is not None:
        goals.append({"goal": f"{n:,} memories, 8 readers: IVF reads/s >= Chroma's",
                      "measured": f"{best['reads_per_s']:.1f} vs {chroma['reads_per_s']:.1f}",
                      "met": best["reads_per_s"] >= chroma["reads_per_s"]})
    if best is not None:
        goals.append({"goal": f"{n:,} memories: one server uses >= 1.6 cores under 8 readers",
                      "measured": f"{best['name']}: {best['cores']:.2f} cores",
                      "met": best["cores"] >= 1.6})
    faiss_rows = [r for r in rows if r["name"].startswith("FAISS IVF-PQ")]
    if best is not None and faiss_rows:
        # equal recall of the float exact top 10: each side's own geometry would favour it
        peer = [r for r in faiss_rows if r["recall_vs_float"] >= best["recall_vs_float"]]
        goal = (f"{n:,} memories: read p50 <= 1.5x FAISS IVF-PQ192's at equal recall@10 "
                "of the float exact search (ours through the server)")
        if peer:
            f = min(peer, key=lambda r: r["p50_ms"])
            goals.append({"goal": goal,
                          "measured": f"{best['p50_ms']:.2f} ms (recall "
                                      f"{best['recall_vs_float']:.3f}) vs {f['name']}: "
                                      f"{f['p50_ms']:.2f} ms (recall "
                                      f"{f['recall_vs_float']:.3f}): "
                                      f"{best['p50_ms'] / f['p50_ms']:.2f}x",
                          "met": best["p50_ms"] <= 1.5 * f["p50_ms"]})
        else:
            top = max(faiss_rows, key=lambda r: r["recall_vs_float"])
            goals.append({"goal": goal,
                          "measured": f"no FAISS row reaches our recall "
                                      f"{best['recall_vs_float']:.3f} (its best: "
                                      f"{top['recall_vs_float']:.3f} at {top['p50_ms']:.2f} ms)",
                          "met": True})
    if chroma is not None and "server_rss_per_memory" in result:
        ours = result["server_rss_per_memory"]
        goals.append({"goal": "server RSS growth per memory <= 1/3 of Chroma's",
                      "measured": f"{ours:.0f} B vs {chroma['bytes_per_memory']:.0f} B "
                                  f"({ours / chroma['bytes_per_memory']:.2f}x)",
                      "met": ours <= chroma["bytes_per_memory"] / 3})
        goals.append({"goal": "ingest of raw vectors through the client >= 4x Chroma's",
                      "measured": f"{n / result['load_s']:.0f}/s vs "
                                  f"{n / chroma['insert_s']:.0f}/s",
                      "met": chroma["insert_s"] >= 4 * result["load_s"]})
    per = w["bank_bytes_per_memory_indexed"]
    goals.append({"goal": "indexed bank bytes per memory <= 1.3x the 192 code bytes",
                  "measured": f"{per:.1f} B ({per / 192:.2f}x)", "met": per <= 1.3 * 192})
    goals.append({"goal": "writes/s into an indexed bank >= 0.8x an unindexed one",
                  "measured": f"{w['ratio']:.2f}x", "met": w["ratio"] >= 0.8})
    # one report section per size: the default's, and each other size's of its own
    name = "index" if n == 100_000 else f"index-{n // 1000}k"
    return {"benchmark": name,
            "title": f"Approximate index (IVF) vs scan vs Chroma and FAISS IVF-PQ, {n:,} "
                     "memories (issues 14, 23)",
            "columns": [list(c) for c in COLUMNS], "rows": rows, "goals": goals, **result}


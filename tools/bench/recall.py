"""Recall from memory: real sentence embeddings in a bank, held-out queries, vs FAISS.

Memories (default: the ``train``, ``val`` and out-of-domain ``ood`` splits of the
prepared all-MiniLM-L6-v2 embeddings, >= 10k vectors) are written into a fresh
bank through the real client, one slot each, with their texts as payloads.
Held-out queries (default: the ``test`` split) are sent one per ``Read`` as raw
embeddings (the server compresses them), top_k=10, payloads returned.

Ground truth is exact cosine search over the original float32 vectors. In the
same run the same memories and queries go through FAISS ``IndexFlatIP`` (exact,
float32), ``PQ`` and ``OPQ+PQ`` at the codec's bytes per vector, and through
two in-process references: cosine over the codec's own codes (what ``Read``
computes, minus the RPC) and a PCA codec with the same m and code dtype.

Caveat printed with the results: the default memories include the split the
codec was trained on; the queries never were.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from apcm.tools.bench.common import (
    DEFAULT_DATA,
    add_model_arguments,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    set_torch_threads,
)

K = 10
BANK = "recall-bench"
COLUMNS = [
    ("method", "method"), ("bytes_per_vector", "bytes/vector"),
    ("recall_at_10", "recall@10"), ("top1_in_top10", "top-1 in true top-10"),
    ("p50_ms", "p50 ms/query"), ("p99_ms", "p99 ms/query"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="prepared embeddings (scripts/prepare_text.py); texts are read "
                             "from texts.json beside it")
    parser.add_argument("--memories", default="train,val,ood",
                        help="splits written into the bank (default train,val,ood)")
    parser.add_argument("--queries", default="test", help="held-out query split (default test)")
    parser.add_argument("--max-queries", type=int, default=0,
                        help="use at most this many queries (0: all)")
    parser.add_argument("--pca-train", default="train",
                        help="split the equal-bytes PCA reference is fitted on (default train, "
                             "the codec's training split)")
    parser.add_argument("--pq-iters", type=int, default=10,
                        help="k-means iterations per PQ sub-quantizer (default 10)")
    parser.add_argument("--opq-iters", type=int, default=5,
                        help="OPQ rotation iterations (default 5)")


def load_split_texts(data: str, splits: list[str]) -> tuple[np.ndarray, list[str]]:
    """Vectors [N, 1, 384] float32 and their texts, splits concatenated in order."""
    from safetensors.numpy import load_file

    tensors = load_file(data)
    texts_path = Path(data).with_name("texts.json")
    texts = json.loads(texts_path.read_text()) if texts_path.exists() else {}
    vectors = np.concatenate([tensors[s] for s in splits])
    out: list[str] = []
    for s in splits:
        given = texts.get(s)
        out.extend(given if given and len(given) == len(tensors[s])
                   else [f"{s}[{i}]" for i in range(len(tensors[s]))])
    return vectors, out


def normalise(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_topk(db: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    """Indices [Q, k] of the k largest inner products, best first."""
    scores = q @ db.T
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, idx, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(idx, order, axis=1)


def recall_stats(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """recall@k (mean overlap / k) and how often the true nearest is among the k found."""
    k = truth.shape[1]
    overlap = [len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True)]
    top1 = [t[0] in set(f) for f, t in zip(found, truth, strict=True)]
    return {"recall_at_10": float(np.mean(overlap)) / k, "top1_in_top10": float(np.mean(top1))}


def _faiss_indexes(d: int, m_bytes: int, pq_iters: int, opq_iters: int) -> list[tuple[str, Any]]:
    """Flat, PQ and OPQ+PQ indexes (inner product) at ``m_bytes`` bytes per vector."""
    import faiss

    def pq() -> Any:
        index = faiss.IndexPQ(d, m_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        # Polysemous training only serves Hamming search, and is slow.
        index.do_polysemous_training = False  # type: ignore[attr-defined]
        index.pq.cp.niter = pq_iters
        return index

    out: list[tuple[str, Any]] = [("FAISS IndexFlatIP (float32, exact)", faiss.IndexFlatIP(d))]
    if d % m_bytes == 0:
        opq = faiss.OPQMatrix(d, m_bytes)
        opq.niter = opq_iters
        out += [(f"FAISS PQ{m_bytes}x8", pq()),
                (f"FAISS OPQ{m_bytes} + PQ{m_bytes}x8", faiss.IndexPreTransform(opq, pq()))]
    return out


def _faiss_rows(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, m_bytes: int,
                args: argparse.Namespace) -> list[dict]:
    import faiss

    if args.torch_threads > 0:
        faiss.omp_set_num_threads(args.torch_threads)
    rows = []
    for label, index in _faiss_indexes(db.shape[1], m_bytes, args.pq_iters, args.opq_iters):
        t0 = time.perf_counter()
        index.train(db)
        train_s = time.perf_counter() - t0
        index.add(db)
        found = index.search(queries, K)[1]
        lat: list[float] = []
        for i in range(len(queries)):
            t0 = time.perf_counter()
            index.search(queries[i:i + 1], K)
            lat.append(time.perf_counter() - t0)
        rows.append({"method": label, "bytes_per_vector": int(index.sa_code_size()),
                     **recall_stats(found, truth), "p50_ms": percentile_ms(lat, 50),
                     "p99_ms": percentile_ms(lat, 99), "train_s": train_s,
                     "where": "in-process"})
        print(markdown_table(rows[-1:], COLUMNS).split("\n", 2)[2], flush=True)
    return rows


def _reference_rows(codec: Any, memories: np.ndarray, queries: np.ndarray,
                    truth: np.ndarray, pca_train: np.ndarray) -> list[dict]:
    """Cosine over the codec's codes, over a PCA codec's (same m and dtype), and decoded."""
    import torch

    from apcm.server.codecs.pca import PCACodec

    # same bytes: packed uint8 codes of b bytes compare with int8 PCA of m = b dims
    pca_dtype = "int8" if codec.code_dtype == "uint8" else codec.code_dtype
    pca = PCACodec.fit(torch.from_numpy(pca_train), codec.code_dim, pca_dtype)
    rows = []
    cases = [(f"{codec.kind} codes, plain cosine in-process (the paper's read)", codec, False),
             ("PCA codes (same bytes), exact cosine in-process", pca, False)]
    if codec.similarity_weights is not None:
        cases.insert(1, (f"{codec.kind} codes under its similarity weights, in-process (what "
                         "Read does)", codec, True))
    for label, c, weighted in cases:
        with torch.inference_mode():
            mem = c.quantizer.dequantize(c.compress(torch.from_numpy(memories)))
            q = c.encode_latent(torch.from_numpy(queries).reshape(len(queries), -1))
            if weighted:
                mem, q = mem * c.similarity_weights, q * c.similarity_weights
        found = exact_topk(normalise(mem.cpu().numpy()), normalise(q.cpu().numpy()))
        rows.append({"method": f"{label} ({c.code_dtype} m={c.code_dim})",
                     "bytes_per_vector": c.bytes_per_code, **recall_stats(found, truth),
                     "where": "in-process"})
    # Diagnostic: is the neighbourhood lost by the code, or only by scoring in latent space?
    with torch.inference_mode():
        decoded = codec.decompress(codec.compress(torch.from_numpy(memories))).cpu().numpy()
    found = exact_topk(normalise(decoded), normalise(queries))
    rows.append({"method": f"{codec.kind} decoded memories vs raw queries, exact cosine "
                           "in-process (diagnostic)", "bytes_per_vector": codec.bytes_per_code,
                 **recall_stats(found, truth), "where": "in-process"})
    return rows


def _server_rows(args: argparse.Namespace, memories: np.ndarray, texts: list[str],
                 queries: np.ndarray, truth: np.ndarray) -> tuple[dict, dict]:
    from apcm.client import MemoryClient

    n = len(memories)
    with server_process(args.model, args.device, args.torch_threads) as address, \
            MemoryClient(address, timeout=120.0) as client:
        client.wait_until_serving(120)
        info = client.model_info()
        client.create_bank(BANK, n)
        slot_to_index = np.full(n, -1, dtype=np.int64)
        for start in range(0, n, 512):
            stop = min(start + 512, n)
            written = client.write(memories[start:stop], bank=BANK, mode="per_item",
                                   payloads=texts[start:stop])
            slot_to_index[[w.slot for w in written]] = np.arange(start, stop)
        bank = client.describe_bank(BANK)
        found = np.full((len(queries), K), -1, dtype=np.int64)
        payload_ok = 0
        lat: list[float] = []
        client.read(queries[:1], bank=BANK, top_k=K, payloads=True)  # warm-up
        for i in range(len(queries)):
            t0 = time.perf_counter()
            hits = client.read(queries[i:i + 1], bank=BANK, top_k=K, payloads=True)[0].hits
            lat.append(time.perf_counter() - t0)
            found[i, :len(hits)] = [slot_to_index[h.slot] for h in hits]
            payload_ok += bool(hits) and (hits[0].payload or b"").decode() == texts[found[i, 0]]
    row = {"method": f"ApCM Read over gRPC ({info.kind}, {info.code_dtype} m={info.code_dim})",
           "bytes_per_vector": info.bytes_per_code, **recall_stats(found, truth),
           "p50_ms": percentile_ms(lat, 50), "p99_ms": percentile_ms(lat, 99),
           "where": "gRPC, server in its own process"}
    memory = {
        "memories": n, "occupied": bank.occupied,
        "code_bytes_per_memory": info.bytes_per_code,
        "bank_bytes_per_memory": bank.memory_bytes / max(bank.occupied, 1),
        "payload_bytes_per_memory": bank.payload_bytes / max(bank.occupied, 1),
        "float32_bytes_per_memory": int(np.prod(info.input_shape)) * 4,
        "top_hit_payload_matches": payload_ok / len(queries),
        "model": {"name": info.name, "kind": info.kind, "code_dim": info.code_dim,
                  "code_dtype": info.code_dtype, "device": info.device,
                  "compression_ratio": info.compression_ratio},
    }
    return row, memory


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apcm.server.api.app import resolve_device
    from apcm.server.codecs.base import load_codec

    set_torch_threads(args.torch_threads)
    memories, texts = load_split_texts(args.data, args.memories.split(","))
    queries, _ = load_split_texts(args.data, args.queries.split(","))
    if args.max_queries:
        queries = queries[: args.max_queries]
    db_n, q_n = normalise(memories), normalise(queries)
    truth = exact_topk(db_n, q_n)
    print(f"{len(memories)} memories, {len(queries)} held-out queries", flush=True)

    read_row, memory = _server_rows(args, memories, texts, queries, truth)
    codec = load_codec(args.model, resolve_device(args.device))
    pca_train, _ = load_split_texts(args.data, args.pca_train.split(","))
    rows = [read_row, *_reference_rows(codec, memories, queries, truth, pca_train)]
    print(markdown_table(rows, COLUMNS), flush=True)
    rows += _faiss_rows(db_n, q_n, truth, codec.bytes_per_code, args)
    result = {
        "benchmark": "recall",
        "title": "Recall@10 from memory: real sentence embeddings, held-out queries",
        "machine": machine(),
        "model": {"path": args.model, **memory.pop("model")},
        "data": {"path": args.data, "memories": args.memories, "queries": args.queries,
                 "n_memories": len(memories), "n_queries": len(queries),
                 "note": "memories include the codec's training split; queries are held out"},
        "memory": memory,
        "params": {"k": K, "torch_threads": args.torch_threads, "pq_iters": args.pq_iters,
                   "opq_iters": args.opq_iters, "pca_train": args.pca_train,
                   "read": "one query per Read, raw embedding in (server compresses), "
                           "top_k=10, payloads returned"},
        "columns": COLUMNS,
        "rows": rows,
        "goals": [],
    }
    print(markdown_table(rows, COLUMNS))
    print(json.dumps(memory, indent=2))
    return result

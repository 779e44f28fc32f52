"""Hybrid recall: does the memory that answers an agent's question come back?

Quality: the conversation evaluation (``tests/fixtures/conversation_eval.json``,
built by ``scripts/build_conversation_eval.py`` from the FAQs Debian ships: each
FAQ a session, its answer paragraphs the memories, each question's evidence the
first paragraph of its answer) is written into a bank with ``remember``; every
question is asked with ``recall(top_k=10)`` in each mode. Evidence recall@10 is
reported for dense (through the server: the codes), exact float32 cosine over
the same MiniLM embeddings (in-process), BM25 alone (the server's lexical mode)
and hybrid (reciprocal-rank fusion, the server's default for text).

Speed, side by side in one run: ``recall`` p50 per mode on a bank of
``--bank-size`` text memories (hybrid vs dense); ``recall(text)`` over gRPC vs
embedding the same text in-process with sentence-transformers plus an
in-process exact search of the same bank's vectors; ``remember`` of 1,000 texts
in batches vs the in-process encode throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine, markdown_table, percentile_ms

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "conversation_eval.json"
TEXT_MODEL = ROOT / "model_weights" / "text-minilm.safetensors"
K = 10
MODES = ("dense", "lexical", "hybrid")


def load(path: Path = DATA) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def remember_all(client: Any, bank: str, memories: list[dict[str, Any]],
                 batch: int = 64) -> float:
    """Writes the memories (key = their id, metadata session); returns seconds taken."""
    client.create_bank(bank, max(len(memories), 1), exist_ok=True)
    t0 = time.perf_counter()
    for i in range(0, len(memories), batch):
        part = memories[i:i + batch]
        client.remember([m["text"] for m in part], bank=bank, keys=[str(m["id"]) for m in part],
                        metadata=[{"session": m["session"]} for m in part])
    return time.perf_counter() - t0


def evidence_recall(client: Any, bank: str, questions: list[dict[str, Any]], mode: str,
                    k: int = K, batch: int = 32) -> float:
    """Share of questions whose evidence memory is among ``recall``'s top k."""
    found = 0
    for i in range(0, len(questions), batch):
        part = questions[i:i + batch]
        results = client.recall([q["question"] for q in part], bank=bank, top_k=k, mode=mode)
        for q, hits in zip(part, results, strict=True):
            found += any(h.key == str(q["evidence"]) for h in hits)
    return found / max(len(questions), 1)


def _embedder() -> Any:
    from apcm.server.codecs.base import load_codec
    from apcm.server.embedding.embedder import Embedder, resolve_spec

    codec = load_codec(str(TEXT_MODEL), "cpu")
    spec = resolve_spec("auto", codec.extra_metadata)
    assert spec is not None
    return Embedder(spec, "cpu")


def float32_recall(embedder: Any, data: dict[str, Any], k: int = K) -> float:
    mem = embedder.embed([m["text"] for m in data["memories"]]).reshape(len(data["memories"]), -1)
    qs = embedder.embed([q["question"] for q in data["questions"]]).reshape(
        len(data["questions"]), -1)
    mem = mem / np.linalg.norm(mem, axis=1, keepdims=True)
    qs = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    top = np.argsort(-(qs @ mem.T), axis=1)[:, :k]
    ids = np.array([m["id"] for m in data["memories"]])
    return float(np.mean([q["evidence"] in ids[top[i]] for i, q in enumerate(data["questions"])]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(DATA), help="conversation evaluation JSON")
    parser.add_argument("--bank-size", type=int, default=10_000,
                        help="text memories in the latency bank (default 10000)")
    parser.add_argument("--queries", type=int, default=200,
                        help="recall calls timed per mode (default 200)")
    parser.add_argument("--skip-speed", action="store_true", help="quality only")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apcm.client import MemoryClient

    from .common import server_process

    data = load(Path(args.data))
    n_mem, n_q = len(data["memories"]), len(data["questions"])
    out: dict[str, Any] = {"benchmark": "hybrid", "machine": machine(),
                           "data": {"source": data["source"], "memories": n_mem,
                                    "questions": n_q}}
    embedder = _embedder()
    with server_process(str(TEXT_MODEL), "cpu", threads=0) as address, \
            MemoryClient(address, timeout=600) as client:
        remember_all(client, "conversations", data["memories"])
        quality = {m: evidence_recall(client, "conversations", data["questions"], m)
                   for m in MODES}
        quality["float32"] = float32_recall(embedder, data)
        out["quality"] = quality
        rows = [{"method": name, "recall": quality[key]} for key, name in (
            ("dense", "dense, ApCM codes"), ("float32", "dense, exact float32"),
            ("lexical", "BM25 alone"), ("hybrid", "hybrid (RRF k=60)"))]
        print(f"\nevidence recall@{K}: {n_q} questions over {n_mem} memories")
        print(markdown_table(rows, [("method", "method"), ("recall", f"recall@{K}")]))
        if not args.skip_speed:
            out["speed"] = _speed(client, embedder, data, args)
    return out


def _speed(client: Any, embedder: Any, data: dict[str, Any],
           args: argparse.Namespace) -> dict[str, Any]:
    texts = [m["text"] for m in data["memories"]]
    bank_texts = [f"{texts[i % len(texts)]} (#{i})" for i in range(args.bank_size)]
    questions = [q["question"] for q in data["questions"]]
    queries = [questions[i % len(questions)] for i in range(args.queries)]
    # remember throughput vs in-process encode, 1,000 texts in batches of 64
    sample = bank_texts[:1000]
    t0 = time.perf_counter()
    for i in range(0, len(sample), 64):
        embedder.embed(sample[i:i + 64])
    encode_s = time.perf_counter() - t0
    client.create_bank("speed", args.bank_size, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(0, len(sample), 64):
        client.remember(sample[i:i + 64], bank="speed")
    remember_s = time.perf_counter() - t0
    for i in range(len(sample), len(bank_texts), 64):
        client.remember(bank_texts[i:i + 64], bank="speed")
    vectors = embedder.embed(bank_texts).reshape(len(bank_texts), -1)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    timing: dict[str, list[float]] = {m: [] for m in MODES}
    timing["in-process"] = []
    client.recall(queries[0], bank="speed", top_k=K, mode="hybrid")  # builds the BM25 index
    for q in queries:
        for m in MODES:
            t = time.perf_counter()
            client.recall(q, bank="speed", top_k=K, mode=m)
            timing[m].append(time.perf_counter() - t)
        t = time.perf_counter()
        v = embedder.embed([q]).reshape(-1)
        np.argpartition(-(vectors @ (v / np.linalg.norm(v))), K)[:K]
        timing["in-process"].append(time.perf_counter() - t)
    p50 = {m: percentile_ms(s, 50) for m, s in timing.items()}
    speed = {
        "bank_size": args.bank_size, "p50_ms": p50,
        "hybrid_over_dense": p50["hybrid"] / p50["dense"],
        "recall_over_in_process": p50["hybrid"] / p50["in-process"],
        "dense_recall_over_in_process": p50["dense"] / p50["in-process"],
        "remember_texts_per_s": len(sample) / remember_s,
        "encode_texts_per_s": len(sample) / encode_s,
        "remember_over_encode": encode_s / remember_s,
    }
    print(f"\nrecall p50 on {args.bank_size} text memories (ms): "
          + ", ".join(f"{m} {v:.2f}" for m, v in p50.items()))
    print(markdown_table([{k: v for k, v in speed.items() if k not in ("p50_ms",)}],
                         [(k, k) for k in speed if k != "p50_ms"]))
    return speed

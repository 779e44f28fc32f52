"""Read recall through the real server vs search on the decoded vectors (IDRP v2).

For each held-out set (in-domain test, fortunes, licenses): the first 300 items are
queries, the rest the memories (written per item through gRPC). Ground truth is the
exact float32 cosine top-10 over the original vectors. Reported: recall@10 of the
server's Read, recall@10 of cosine search on the decoded memories (Decompress of
the stored codes), and the share of queries whose two top-10 sets are identical.

Usage: ``.venv/bin/python scripts/read_recall_v2.py [--model PATH] [--corpus DIR]``
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from prometheus_client import CollectorRegistry

from apcm.client import MemoryClient
from apcm.server.api.app import build_server
from apcm.server.config import Settings
from apcm.tools.training.transform import load_corpus

N_QUERIES = 300


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top10(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.argsort(-(unit(q) @ unit(db).T), axis=1)[:, :10]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_weights/text-minilm.safetensors")
    parser.add_argument("--corpus", default="data/corpus")
    args = parser.parse_args()
    splits = load_corpus(args.corpus)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=-1, model=args.model,
                            device="cpu", data_dir=data_dir, snapshot_interval_s=0.0,
                            default_bank_capacity=8192, max_batch_size=1024,
                            max_bank_capacity=8192).validated()
        server, _ = build_server(settings, registry=CollectorRegistry())
        server.start()
        try:
            with MemoryClient(f"127.0.0.1:{server.port}", timeout=300.0) as client:
                print("| set | memories | queries | Read R@10 (gRPC) | decoded-vector R@10 "
                      "| identical top-10 sets | Read ms/query |")
                print("|---|---|---|---|---|---|---|")
                for name in ("test", "fortunes", "licenses"):
                    x = splits.vectors[name].astype(np.float32)
                    q, db = x[:N_QUERIES], x[N_QUERIES:]
                    client.create_bank(name, capacity=8192)
                    codes = np.concatenate([client.compress(db[i:i + 1024].reshape(-1, 1, 384))
                                            for i in range(0, len(db), 1024)])
                    for i in range(0, len(codes), 1024):
                        client.write(codes=codes[i:i + 1024], bank=name, mode="per_item")
                    decoded = np.concatenate([client.decompress(codes[i:i + 1024])
                                              for i in range(0, len(codes), 1024)])
                    t0 = time.perf_counter()
                    res = client.read(q.reshape(-1, 1, 384), bank=name, top_k=10,
                                      count_access=False)
                    ms = (time.perf_counter() - t0) * 1000 / len(q)
                    served = np.array([[h.slot for h in r.hits] for r in res])
                    truth = top10(q, db)
                    dec = top10(q, decoded.reshape(len(db), -1))
                    same = np.mean([set(a) == set(b) for a, b in zip(served, dec, strict=True)])
                    print(f"| {name} | {len(db):,} | {len(q)} | {recall(served, truth):.3f} | "
                          f"{recall(dec, truth):.3f} | {same:.3f} | {ms:.2f} |", flush=True)
        finally:
            server.stop(grace=0.5)


if __name__ == "__main__":
    main()

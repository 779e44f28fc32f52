"""Hybrid recall: does the memory that answers an agent's question come back?

Quality, on three sets (``recall_sets``): the scripted multi-session dialogs of
``tools/evaluation/dialogs.py`` (one bank per conversation, one memory per
turn), the scripted bank of unrelated facts, and the FAQ evaluation
(``tests/fixtures/conversation_eval.json``, built by
``scripts/build_conversation_eval.py`` from the FAQs Debian ships: each FAQ a
session, its answer paragraphs the memories, each question's evidence the first
paragraph of its answer). Each set is written with ``remember`` and every
question asked with ``recall(top_k=10)``: evidence recall@5 and @10 by question
kind, context recall off and on, on a server with the old defaults (RRF k=60,
BM25 k1=1.5, b=0.75) and one with the new (convex fusion, BM25 0.9 / 0.4); plus
the share of stored texts recalled first with their own wording.

Speed, side by side in one run: ``recall`` p50 on a bank of ``--bank-size``
text memories for each setting (dense, lexical, hybrid RRF as before, hybrid
convex, hybrid convex with context), interleaved query by query; ``recall(text)``
over gRPC vs embedding the same text in-process plus an in-process exact search
of the same bank's vectors; ``remember`` of 1,000 texts in batches vs the
in-process encode throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine, markdown_table, percentile_ms

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "conversation_eval.json"
TEXT_MODEL = ROOT / "model_weights" / "text-minilm.safetensors"
K = 10


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


@dataclass
class RecallSet:
    """Banks of memories and questions about them, each question with its evidence key.

    Attributes:
        banks: bank name -> memories ``{"key", "text", "metadata"}`` in write order.
        questions: ``{"question", "bank", "evidence" (a key), "kind"}``.
    """

    name: str
    banks: dict[str, list[dict[str, Any]]]
    questions: list[dict[str, Any]]


def recall_sets(faq: Path = DATA) -> list[RecallSet]:
    """The three sets parameters are chosen on together: the scripted dialogs (one bank
    per conversation, one memory per turn, write order only), the scripted facts (one
    bank, random order) and the Debian FAQ sessions (one bank, metadata session)."""
    from ..evaluation.dialogs import dialogs, facts

    d = dialogs()
    banks: dict[str, list[dict[str, Any]]] = {}
    questions = []
    for c, conv in enumerate(d["conversations"]):
        bank = f"dialog-{c}"
        banks[bank] = [{"key": f"{c}:{t['id']}", "text": t["text"], "metadata": None}
                       for t in conv["turns"]]
        questions += [{"question": q["question"], "bank": bank, "kind": q["kind"],
                       "evidence": f"{c}:{q['evidence']}"} for q in conv["questions"]]
    out = [RecallSet("dialogs", banks, questions)]
    f = facts()
    out.append(RecallSet(
        "facts", {"facts": [{"key": str(m["id"]), "text": m["text"], "metadata": None}
                            for m in f["memories"]]},
        [{"question": q["question"], "bank": "facts", "kind": "fact",
          "evidence": str(q["evidence"])} for q in f["questions"]]))
    faq_data = load(faq)
    out.append(RecallSet(
        "faq", {"faq": [{"key": str(m["id"]), "text": m["text"],
                         "metadata": {"session": m["session"]}} for m in faq_data["memories"]]},
        [{"question": q["question"], "bank": "faq", "kind": "faq",
          "evidence": str(q["evidence"])} for q in faq_data["questions"]]))
    return out


def write_sets(client: Any, sets: list[RecallSet], batch: int = 64,
               context: int = 0) -> None:
    """Writes every set's banks (created with the given bank-level ``context``)."""
    for rs in sets:
        for bank, memories in rs.banks.items():
            client.create_bank(bank, max(len(memories), 1), exist_ok=True, context=context)
            for i in range(0, len(memories), batch):
                part = memories[i:i + batch]
                meta = [m["metadata"] or {} for m in part]
                client.remember([m["text"] for m in part], bank=bank,
                                keys=[m["key"] for m in part],
                                metadata=meta if any(meta) else None)


def recall_by_kind(client: Any, rs: RecallSet, ks: tuple[int, ...] = (5, 10), batch: int = 32,
                   **recall_args: Any) -> dict[str, dict[int, float]]:
    """Evidence recall@k of ``rs`` by question kind (and "all"), through ``recall``."""
    found: dict[str, dict[int, int]] = {}
    count: dict[str, int] = {}
    by_bank: dict[str, list[dict[str, Any]]] = {}
    for q in rs.questions:
        by_bank.setdefault(q["bank"], []).append(q)
    for bank, qs in by_bank.items():
        for i in range(0, len(qs), batch):
            part = qs[i:i + batch]
            results = client.recall([q["question"] for q in part], bank=bank, top_k=max(ks),
                                    **recall_args)
            for q, hits in zip(part, results, strict=True):
                keys = [h.key for h in hits]
                for kind in (q["kind"], "all"):
                    count[kind] = count.get(kind, 0) + 1
                    per = found.setdefault(kind, {k: 0 for k in ks})
                    for k in ks:
                        per[k] += q["evidence"] in keys[:k]
    return {kind: {k: per[k] / count[kind] for k in ks} for kind, per in found.items()}


def exact_copy_top1(client: Any, rs: RecallSet, n: int = 100, **recall_args: Any) -> float:
    """Share of ``n`` stored texts (spread over the set) recalled first with their own
    wording (``recall(text, top_k=1)``); duplicated texts count if any copy comes back."""
    pairs = [(bank, m) for bank, ms in rs.banks.items() for m in ms]
    step = max(1, len(pairs) // n)
    hits = 0
    picked = pairs[::step][:n]
    for bank, m in picked:
        same = {x["key"] for x in rs.banks[bank] if x["text"] == m["text"]}
        got = client.recall(m["text"], bank=bank, top_k=1, **recall_args)
        hits += bool(got) and got[0].key in same
    return hits / max(len(picked), 1)


def _embedder() -> Any:
    from apcm.server.codecs.base import load_codec
    from apcm.server.embedding.embedder import Embedder, resolve_spec

    codec = load_codec(str(TEXT_MODEL), "cpu")
    spec = resolve_spec("auto", codec.extra_metadata)
    assert spec is not None
    return Embedder(spec, "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(DATA), help="FAQ evaluation JSON")
    parser.add_argument("--bank-size", type=int, default=10_000,
                        help="text memories in the latency bank (default 10000)")
    parser.add_argument("--queries", type=int, default=200,
                        help="recall calls timed per setting (default 200)")
    parser.add_argument("--skip-speed", action="store_true", help="quality only")
    parser.add_argument("--skip-quality", action="store_true", help="speed only")
    parser.add_argument("--context", type=int, default=2,
                        help="neighbours each side for the context-on rows (default 2)")
    parser.add_argument("--embedder-backend", default="auto",
                        help="the servers' embedder backend (auto, onnx, torch, "
                             "sentence-transformers; default auto)")


# what `recall` did before issue 20 (RRF k=60 over BM25 with k1=1.5, b=0.75) and now
OLD = {"fusion": "rrf"}
OLD_BM25 = {"bm25_k1": 1.5, "bm25_b": 0.75}


def _quality(args: argparse.Namespace, sets: list[RecallSet], label: str,
             settings: dict[str, Any], recall_args: dict[str, Any]) -> dict[str, Any]:
    """Evidence recall@5/@10 by set and kind, context off and on, on one server."""
    from apcm.client import MemoryClient

    from .common import server_process

    out: dict[str, Any] = {}
    with server_process(str(TEXT_MODEL), "cpu", threads=0, max_batch_size=4096,
                        embedder_backend=args.embedder_backend, **settings) as address, \
            MemoryClient(address, timeout=600) as client:
        write_sets(client, sets)
        for context in (0, args.context):
            for rs in sets:
                row = recall_by_kind(client, rs, context=context, **recall_args)
                out[f"{rs.name}/context={context}"] = row
                kinds = ", ".join(f"{k} {v[5]:.3f}/{v[10]:.3f}" for k, v in row.items())
                print(f"{label:>4} {rs.name:8} context={context}: {kinds}", flush=True)
        out["exact_copy_top1"] = {rs.name: exact_copy_top1(client, rs, **recall_args)
                                  for rs in sets}
        print(f"{label:>4} exact copy top-1: {out['exact_copy_top1']}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apcm.client import MemoryClient

    from .common import server_process

    sets = recall_sets(Path(args.data))
    out: dict[str, Any] = {"benchmark": "hybrid", "machine": machine(),
                           "embedder_backend": args.embedder_backend,
                           "sets": {rs.name: {"banks": len(rs.banks),
                                              "memories": sum(map(len, rs.banks.values())),
                                              "questions": len(rs.questions)} for rs in sets}}
    if not args.skip_quality:
        out["quality"] = {"old": _quality(args, sets, "old", OLD_BM25, OLD),
                          "new": _quality(args, sets, "new", {}, {})}
        rows = []
        for name in out["quality"]["new"]:
            if name == "exact_copy_top1":
                continue
            old, new = out["quality"]["old"][name]["all"], out["quality"]["new"][name]["all"]
            rows.append({"set": name, "old5": old[5], "old10": old[10], "new5": new[5],
                         "new10": new[10]})
        print(f"\nevidence recall (old default: RRF k=60, BM25 1.5/0.75; new: convex, "
              f"BM25 0.9/0.4), context {args.context} where set")
        print(markdown_table(rows, [("set", "set / context"), ("old5", "old @5"),
                                    ("old10", "old @10"), ("new5", "new @5"),
                                    ("new10", "new @10")]))
    if not args.skip_speed:
        with server_process(str(TEXT_MODEL), "cpu", threads=0,
                            embedder_backend=args.embedder_backend) as address, \
                MemoryClient(address, timeout=600) as client:
            out["speed"] = _speed(client, _embedder(), load(Path(args.data)), args)
    return out


SPEED_SETTINGS: dict[str, dict[str, Any]] = {  # label -> recall arguments, side by side
    "dense": {"mode": "dense"},
    "lexical": {"mode": "lexical"},
    "hybrid rrf (old default)": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid convex (new default)": {"mode": "hybrid"},
    "hybrid convex, context 2": {"mode": "hybrid", "context": 2},
}


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
    timing: dict[str, list[float]] = {m: [] for m in SPEED_SETTINGS}
    timing["in-process"] = []
    client.recall(queries[0], bank="speed", top_k=K, mode="hybrid")  # builds the BM25 index
    for q in queries:  # interleaved, so load changes hit every setting alike
        for label, kwargs in SPEED_SETTINGS.items():
            t = time.perf_counter()
            client.recall(q, bank="speed", top_k=K, **kwargs)
            timing[label].append(time.perf_counter() - t)
        t = time.perf_counter()
        v = embedder.embed([q]).reshape(-1)
        np.argpartition(-(vectors @ (v / np.linalg.norm(v))), K)[:K]
        timing["in-process"].append(time.perf_counter() - t)
    p50 = {m: percentile_ms(s, 50) for m, s in timing.items()}
    new, old = p50["hybrid convex (new default)"], p50["hybrid rrf (old default)"]
    speed = {
        "bank_size": args.bank_size, "p50_ms": p50,
        "new_over_old": new / old,
        "context_over_new": p50["hybrid convex, context 2"] / new,
        "hybrid_over_dense": new / p50["dense"],
        "recall_over_in_process": new / p50["in-process"],
        "remember_texts_per_s": len(sample) / remember_s,
        "encode_texts_per_s": len(sample) / encode_s,
        "remember_over_encode": encode_s / remember_s,
    }
    print(f"\nrecall p50 on {args.bank_size} text memories (ms): "
          + ", ".join(f"{m} {v:.2f}" for m, v in p50.items()))
    print(markdown_table([{k: v for k, v in speed.items() if k not in ("p50_ms",)}],
                         [(k, k) for k in speed if k != "p50_ms"]))
    return speed

"""Chooses text recall's parameters on the dialog, facts and FAQ sets together.

Writes the three sets of ``apcm bench hybrid`` (``tools/bench/hybrid.recall_sets``)
into an in-process server once, embeds every question once, then calls the
store's text read (what ``recall`` runs) for each parameter setting: BM25 k1/b,
the fusion (RRF or the convex mix and its dense weight) and context recall
(window, lift, decay). Prints evidence recall@5/@10 per set and the mean of
the sets' recall@10, the figure parameters are chosen by (never one set alone).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python scripts/tune_recall.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import server_settings  # noqa: E402

from apcm.client import MemoryClient  # noqa: E402
from apcm.server.api.app import build_server  # noqa: E402
from apcm.server.memory.fusion import Fusion  # noqa: E402
from apcm.server.memory.lexical import Bm25Params  # noqa: E402
from apcm.server.memory.options import ReadOptions  # noqa: E402
from apcm.server.memory.texts import TextIndexes  # noqa: E402
from apcm.tools.bench.hybrid import TEXT_MODEL, RecallSet, recall_sets, write_sets  # noqa: E402


def evaluate(service: Any, sets: list[RecallSet], latents: dict[str, Any], mode: str,
             fusion: Fusion) -> dict[str, dict[str, float]]:
    store = service.store
    out: dict[str, dict[str, float]] = {}
    for rs in sets:
        found5 = found10 = 0
        kinds: dict[str, list[int]] = {}
        for bank, (qs, lat) in latents[rs.name].items():
            result = store.read_fused(bank, lat, [q["question"] for q in qs], mode,
                                      ReadOptions(top_k=10, count_access=False, payloads=False),
                                      fusion)
            for q, r in zip(qs, result.results, strict=True):
                keys = [h.key for h in r.hits]
                f5, f10 = q["evidence"] in keys[:5], q["evidence"] in keys[:10]
                found5 += f5
                found10 += f10
                kinds.setdefault(q["kind"], [0, 0, 0])
                k = kinds[q["kind"]]
                k[0] += f5
                k[1] += f10
                k[2] += 1
        n = len(rs.questions)
        out[rs.name] = {"r5": found5 / n, "r10": found10 / n,
                        **{f"{kind}@10": v[1] / v[2] for kind, v in kinds.items()},
                        **{f"{kind}@5": v[0] / v[2] for kind, v in kinds.items()}}
    return out


def set_bm25(service: Any, params: Bm25Params) -> None:
    store = service.store
    store.texts = TextIndexes(params)
    for name in store._banks:
        store.texts.load(store._banks[name], None)
        store.texts.of(store._banks[name]).refresh()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid")
    parser.add_argument("--json", default=None)
    parser.add_argument("--alphas", action="store_true",
                        help="only the dense weight, context off and on, at BM25 0.9 / 0.4")
    args = parser.parse_args()
    sets = recall_sets()
    with tempfile.TemporaryDirectory() as tmp:
        settings = server_settings(TEXT_MODEL, Path(tmp), default_bank_capacity=16,
                                   max_bank_capacity=100_000, wal_mode="off",
                                   max_batch_size=4096,
                                   max_request_text_bytes=16 * 1024 * 1024)
        srv, _ = build_server(settings, registry=CollectorRegistry())
        srv.start()
        service = srv.service
        t0 = time.perf_counter()
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=600) as client:
            write_sets(client, sets)
        print(f"wrote the sets in {time.perf_counter() - t0:.0f} s", flush=True)
        latents: dict[str, dict[str, Any]] = {}
        for rs in sets:
            per: dict[str, Any] = {}
            for bank in rs.banks:
                qs = [q for q in rs.questions if q["bank"] == bank]
                items = service.embed([q["question"] for q in qs], "query")
                per[bank] = (qs, service.engine.encode_latent(items))
            latents[rs.name] = per
        rows: list[dict[str, Any]] = []

        def run(label: str, mode: str, fusion: Fusion, k1: float, b: float) -> dict[str, Any]:
            res = evaluate(service, sets, latents, mode, fusion)
            mean = sum(r["r10"] for r in res.values()) / len(res)
            row = {"label": label, "k1": k1, "b": b, "context": fusion.context,
                   "lift": fusion.lift, "decay": fusion.decay, "mean10": round(mean, 4),
                   **{f"{s}@{k}": round(res[s][f"r{k}"], 4) for s in res for k in (5, 10)},
                   "kinds": {k: round(v, 3) for k, v in res["dialogs"].items() if "@" in k}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row

        if args.alphas:
            set_bm25(service, Bm25Params(0.9, 0.4))
            for w in (0.5, 0.6, 0.7, 0.8, 0.9):
                for ctx, lift in ((0, 0.0), (2, 0.3), (2, 0.4)):
                    run(f"convex {w}", "hybrid",
                        Fusion(dense_weight=w, context=ctx, lift=lift, decay=1.0), 0.9, 0.4)
            srv.stop(grace=0.5)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            return
        bm25_grid = [(1.5, 0.75), (1.2, 0.5), (0.9, 0.4), (0.9, 0.2), (0.6, 0.3)]
        fusions = [("rrf 60", Fusion(method="rrf")), ("rrf 5", Fusion(method="rrf", rrf_k=5))]
        fusions += [(f"convex {w}", Fusion(dense_weight=w)) for w in (0.5, 0.6, 0.7, 0.8, 0.9)]
        fusions += [("dense", Fusion(dense_weight=1.0)), ("bm25", Fusion(dense_weight=0.0))]
        if args.quick:
            bm25_grid, fusions = bm25_grid[:1], fusions[:1]
        for k1, b in bm25_grid:
            set_bm25(service, Bm25Params(k1, b))
            for name, fusion in fusions:
                run(name, "hybrid", fusion, k1, b)
        convex = [r for r in rows if r["label"].startswith("convex")]
        best = max(convex, key=lambda r: r["mean10"])
        print("best convex without context:", json.dumps(best), flush=True)
        lifts = (0.2, 0.3, 0.4, 0.5)
        for label in (best["label"], "rrf 60"):
            k1, b = (best["k1"], best["b"]) if label != "rrf 60" else (1.5, 0.75)
            set_bm25(service, Bm25Params(k1, b))
            base = dict(fusions)[label]
            for w in (1, 2):
                for lift in lifts:
                    for decay in ((1.0,) if w == 1 else (0.5, 1.0)):
                        run(label, "hybrid", replace(base, context=w, lift=lift, decay=decay),
                            k1, b)
        with_context = [r for r in rows if r["context"] and r["label"] == best["label"]]
        top = max(with_context, key=lambda r: r["mean10"])
        print("best convex with context:", json.dumps(top), flush=True)
        chosen = replace(dict(fusions)[best["label"]], context=top["context"], lift=top["lift"],
                         decay=top["decay"])
        for k1, b in bm25_grid:  # BM25 again, with context on
            set_bm25(service, Bm25Params(k1, b))
            run(best["label"], "hybrid", chosen, k1, b)
        srv.stop(grace=0.5)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""``apcm bench recall``: Read over gRPC vs search on the decoded memories vs the baselines.

Data: the prepared multi-source corpus (``scripts/prepare_corpus.py`` writes
``data/corpus/splits.safetensors``, what ``apcm eval`` reads, loaded the same
way): the in-domain held-out ``test`` split and the out-of-domain sources
(``fortunes``, ``licenses``, never trained on). In each set the first
``--queries`` items are the queries and the rest the memories, so no query is
its own memory. Ground truth is the exact float32 cosine top-10 over the
original memories.

Per set, in one run:

- **ApCM Read over gRPC**: a real server (own process) and the real client;
  memories are compressed with ``Compress``, written per item as codes, and
  queried one raw embedding per ``Read`` (top 10, access counts off);
- **the same codes, decoded**: ``Decompress`` of the stored codes, exact cosine
  search in-process; the share of queries whose Read top-10 *set* equals this
  one is reported (issue 11: Read must rank as well as the decoded memories);
- **every baseline at the same bytes** (:func:`apcm.tools.evaluation.report.budget_baselines`:
  PCA float32/float16/int8, FAISS PQ, OPQ+PQ, SQ8/6/4, RaBitQ, the water-filling
  transform coder, random rotation + uniform SQ), fitted on ``--train-key``
  (the codec's training split) only; decoded memories searched exactly, RaBitQ
  with its own search;
- with ``--fit-in-domain``, every baseline fitted again on each set's own
  memories, the way users of FAISS, Qdrant or LanceDB train a quantiser on the
  data they index;
- with ``--bank-codec-threshold N``, **a bank with its own codec**: a second server
  whose banks fit a codec once they stage N memories (``memory.bankcodec``); the
  raw memories are written through ``Write`` (the bank stages and fits them), its
  state once the fit has run (own codec, or declined), then the same Reads, and
  the mean cosine of each memory's reconstruction (a ``Read`` of the memory
  itself, top 1) with the original.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    add_model_arguments,
    machine,
    markdown_table,
    percentile_ms,
    server_process,
    set_torch_threads,
)

K = 10
DEFAULT_CORPUS = "data/corpus/splits.safetensors"
IN_DOMAIN = ("test",)
COLUMNS = [
    ("set", "set"), ("method", "method"), ("bytes_per_vector", "bytes/vector"),
    ("recall_at_10", "recall@10"), ("mean_cosine", "mean cosine"),
    ("same_top10_as_decoded", "same top-10 set as decoded"),
    ("p50_ms", "p50 ms/query"), ("p99_ms", "p99 ms/query"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", default=DEFAULT_CORPUS,
                        help="prepared corpus splits (scripts/prepare_corpus.py) "
                             "[default %(default)s]")
    parser.add_argument("--sets", default="test,fortunes,licenses",
                        help="held-out tensors of --data, each split into queries and memories "
                             "(in domain: test; the rest out of domain) [default %(default)s]")
    parser.add_argument("--queries", type=int, default=300,
                        help="queries per set: its first items [default %(default)s]")
    parser.add_argument("--max-memories", type=int, default=0,
                        help="at most this many memories per set (0: all the rest)")
    parser.add_argument("--train-key", default="train",
                        help="tensor of --data the baselines are fitted on [default train]")
    parser.add_argument("--train-data", default=None,
                        help="file of --train-key when --data has none (e.g. the corpus "
                             "splits for scripts/embed_dialogs.py's conversations)")
    parser.add_argument("--no-opq", action="store_true", help="skip OPQ+PQ (slowest to fit)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only Read and the decoded memories")
    parser.add_argument("--fit-in-domain", action="store_true",
                        help="also fit every baseline on each set's own memories")
    parser.add_argument("--bank-codec-threshold", type=int, default=0,
                        help="also read banks that fit their own codec once they stage this "
                             "many memories (0: not measured)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def load_sets(path: str, names: list[str], train_key: str
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Sets [N, d] float32 and the training split (None if absent) from the corpus file.

    Raises:
        SystemExit: the file or a set is missing, with how to build it.
    """
    from ..evaluation.datasets import load_arrays

    if not Path(path).is_file():
        raise SystemExit(
            f"{path} does not exist: build the corpus with `scripts/prepare_corpus.py` "
            "(or `--from-embeddings FILE` from existing embeddings), or pass --data")
    arrays = load_arrays(path)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SystemExit(f"{path} has no tensor(s) {missing}; it holds {sorted(arrays)}")

    def flat(x: Any) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).float().numpy())

    train = flat(arrays[train_key]) if train_key in arrays else None
    return {n: flat(arrays[n]) for n in names}, train


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean overlap |found_i & truth_i| / k of id arrays [Q, k] (-1: no hit)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / k
                          for f, t in zip(found, truth, strict=True)]))


def _served(client: Any, name: str, memories: np.ndarray, queries: np.ndarray,
            shape: tuple[int, int]) -> dict[str, Any]:
    """Write the memories through the server; Read every query. Returns found ids [Q, k]
    (memory indices), decoded memories [N, d] and per-Read latencies."""
    n = len(memories)
    client.create_bank(name, n)
    slot_to_index = np.full(n, -1, dtype=np.int64)
    decoded = []
    for start in range(0, n, 1024):
        batch = memories[start:start + 1024].reshape(-1, *shape)
        codes = client.compress(batch)
        written = client.write(codes=codes, bank=name, mode="per_item")
        slot_to_index[[w.slot for w in written]] = np.arange(start, start + len(codes))
        decoded.append(client.decompress(codes).reshape(len(codes), -1))
    found, lat = _read_each(client, name, queries, shape,
                            lambda hits: slot_to_index[[h.slot for h in hits]])
    client.drop_bank(name)
    return {"found": found, "decoded": np.concatenate(decoded), "lat": lat}


def _read_each(client: Any, name: str, queries: np.ndarray, shape: tuple[int, int],
               index_of: Callable[[list[Any]], Any]) -> tuple[np.ndarray, list[float]]:
    """One ``Read`` (top 10, access counts off) per query: found memory indices [Q, k]
    (``index_of(hits)``; -1: no hit) and each Read's latency in seconds."""
    found = np.full((len(queries), K), -1, dtype=np.int64)
    lat: list[float] = []
    client.read(queries[:1].reshape(-1, *shape), bank=name, top_k=K, count_access=False)
    for i in range(len(queries)):
        t0 = time.perf_counter()
        hits = client.read(queries[i:i + 1].reshape(-1, *shape), bank=name, top_k=K,
                           count_access=False)[0].hits
        lat.append(time.perf_counter() - t0)
        found[i, :len(hits)] = index_of(hits)
    return found, lat


def _own_codec(client: Any, name: str, memories: np.ndarray, queries: np.ndarray,
               shape: tuple[int, int], wait_s: float = 600.0) -> dict[str, Any]:
    """``_served`` for a bank that fits its own codec: raw memories written, the fit
    waited for; also each memory's reconstruction (its own top hit)."""
    n = len(memories)
    client.create_bank(name, n)
    for start in range(0, n, 512):
        batch = memories[start:start + 512]
        client.write(batch.reshape(-1, *shape), bank=name, mode="per_item",
                     keys=[str(i) for i in range(start, start + len(batch))])
    deadline = time.monotonic() + wait_s
    while True:  # until the fit ran: adopted, declined, or never due (too few staged)
        codec = client.describe_bank(name).codec
        if codec is None or codec.state in ("own", "served") or codec.declined or (
                codec.state == "staging" and codec.staged < codec.threshold) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found, lat = _read_each(client, name, queries, shape,
                            lambda hits: [int(h.key) for h in hits])
    cos, own_hits = [], 0
    for start in range(0, n, 256):
        batch = memories[start:start + 256]
        for j, r in enumerate(client.read(batch.reshape(-1, *shape), bank=name, top_k=1,
                                          reconstruct=True, count_access=False)):
            hit = r.hits[0]
            if int(hit.key) == start + j:
                own_hits += 1
                x, y = batch[j], hit.reconstruction.reshape(-1)
                cos.append(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)))
    client.drop_bank(name)
    return {"found": found, "lat": lat, "codec": codec, "mean_cosine": float(np.mean(cos)),
            "self_hit": own_hits / n}


def _baseline_rows(methods: list[Any], name: str, memories: np.ndarray, queries: np.ndarray,
                   truth: np.ndarray) -> list[dict[str, Any]]:
    from ..evaluation.metrics import top_k_cosine

    rows = []
    for method in methods:
        row: dict[str, Any] = {"set": name, "method": method.name,
                               "bytes_per_vector": int(method.bytes_per_code)}
        if method.reconstructs:
            decoded = method.decode(method.encode(memories))
            found = top_k_cosine(queries, decoded, K, exclude_self=False)
            row["mean_cosine"] = _mean_cosine(memories, decoded)
        else:
            found = method.search(queries, memories, K)
        rows.append({**row, "recall_at_10": recall(found, truth)})
    return rows


def _mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    return float(np.mean((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apcm.client import MemoryClient

    from ..evaluation.metrics import top_k_cosine
    from ..evaluation.report import budget_baselines

    set_torch_threads(args.torch_threads)
    names = [s for s in args.sets.split(",") if s]
    sets, train = load_sets(args.data, names, args.train_key)
    if args.train_data:
        train = load_sets(args.train_data, [args.train_key], args.train_key)[1]
    split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, x in sets.items():
        if len(x) <= args.queries + K:
            raise SystemExit(f"set {name!r} has {len(x)} items: too few for "
                             f"{args.queries} queries and {K} memories")
        mem = x[args.queries:]
        split[name] = (x[:args.queries], mem[:args.max_memories] if args.max_memories else mem)

    rows: list[dict[str, Any]] = []
    served: dict[str, dict[str, Any]] = {}
    with server_process(args.model, args.device, args.torch_threads) as address, \
            MemoryClient(address, timeout=300.0) as client:
        client.wait_until_serving(120)
        info = client.model_info()
        shape = (int(info.input_shape[0]), int(info.input_shape[1]))
        for name, (queries, memories) in split.items():
            served[name] = _served(client, f"recall-{name}", memories, queries, shape)
            print(f"{name}: {len(memories)} memories, {len(queries)} queries read", flush=True)
    own: dict[str, dict[str, Any]] = {}
    if args.bank_codec_threshold > 0:
        with server_process(args.model, args.device, args.torch_threads,
                            bank_codec_threshold=args.bank_codec_threshold) as address, \
                MemoryClient(address, timeout=600.0) as client:
            client.wait_until_serving(120)
            for name, (queries, memories) in split.items():
                own[name] = _own_codec(client, f"own-{name}", memories, queries, shape)
                print(f"{name}: bank codec {own[name]['codec']}", flush=True)
    label = f"{info.name} ({info.kind}, {info.code_dtype} x {info.code_dim})"
    for name, (queries, memories) in split.items():
        truth = top_k_cosine(queries, memories, K, exclude_self=False)
        s = served[name]
        decoded_ids = top_k_cosine(queries, s["decoded"], K, exclude_self=False)
        same = float(np.mean([set(a.tolist()) == set(b.tolist())
                              for a, b in zip(s["found"], decoded_ids, strict=True)]))
        rows.append({"set": name, "method": f"ApCM Read over gRPC, {label}",
                     "bytes_per_vector": info.bytes_per_code,
                     "recall_at_10": recall(s["found"], truth), "same_top10_as_decoded": same,
                     "p50_ms": percentile_ms(s["lat"], 50), "p99_ms": percentile_ms(s["lat"], 99),
                     "n_memories": len(memories), "n_queries": len(queries)})
        rows.append({"set": name, "method": f"{info.name} decoded memories, exact cosine "
                     "(in-process)", "bytes_per_vector": info.bytes_per_code,
                     "recall_at_10": recall(decoded_ids, truth),
                     "mean_cosine": _mean_cosine(memories, s["decoded"])})
        if name in own:
            o, c = own[name], own[name]["codec"]
            state = f"{c.state}, fitted on {c.fitted_on}" if c.state == "own" else \
                f"{c.state}, {c.declined} fit(s) declined"
            rows.append({"set": name, "method": f"ApCM Read over gRPC, bank's own codec "
                         f"({state})", "bytes_per_vector": info.bytes_per_code,
                         "recall_at_10": recall(o["found"], truth),
                         "mean_cosine": o["mean_cosine"], "p50_ms": percentile_ms(o["lat"], 50),
                         "p99_ms": percentile_ms(o["lat"], 99), "self_hit": o["self_hit"],
                         "held_out_mse": c.held_out_mse, "replaced_mse": c.replaced_mse})
    fit_s = 0.0
    skipped: list[str] = []
    if not args.no_baselines:
        if train is None:
            raise SystemExit(f"{args.data} has no {args.train_key!r} tensor to fit the "
                             "baselines on (or pass --no-baselines)")
        t0 = time.perf_counter()
        methods, skipped = budget_baselines(info.bytes_per_code, train, shape,
                                            opq=not args.no_opq)
        fit_s = time.perf_counter() - t0
        print(f"fitted {len(methods)} baselines in {fit_s:.0f} s", flush=True)
        for name, (queries, memories) in split.items():
            rows += _baseline_rows(methods, name, memories, queries,
                                   top_k_cosine(queries, memories, K, exclude_self=False))
            if args.fit_in_domain:
                local, _ = budget_baselines(info.bytes_per_code, memories, shape,
                                            opq=not args.no_opq)
                for r in _baseline_rows(local, name, memories, queries,
                                        top_k_cosine(queries, memories, K,
                                                     exclude_self=False)):
                    rows.append({**r, "method": f"{r['method']} (fit: in domain)"})
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: order[r["set"]])  # stable: Read, decoded, baselines per set
    own_run = f"-own-{'-'.join(names)}-{info.bytes_per_code}B" if own else ""
    result = {
        # a run with banks' own codecs is a section of its own in the report
        "benchmark": "recall" + own_run,
        "title": "Recall@10 of Read over gRPC vs the decoded memories vs baselines at equal "
                 "bytes (held out, in and out of domain)" + (
                     f": {', '.join(names)} at {info.bytes_per_code} B, banks with their own "
                     "codec, baselines fitted in domain too" if own else ""),
        "machine": machine(),
        "model": {"path": args.model, "name": info.name, "kind": info.kind,
                  "code_dtype": info.code_dtype, "code_dim": info.code_dim,
                  "bytes_per_code": info.bytes_per_code,
                  "compression_ratio": info.compression_ratio},
        "data": {"path": args.data, "sets": ", ".join(
                     f"{n} ({len(m):,} memories, {len(q)} queries, "
                     f"{'in domain' if n in IN_DOMAIN else 'out of domain'})"
                     for n, (q, m) in split.items()),
                 "split": "queries = the first items of each set, memories = the rest",
                 "baselines_fitted_on": f"{args.train_key} ({0 if train is None else len(train):,}"
                                        " items)" + (", and each set's own memories"
                                                     if args.fit_in_domain else "")},
        "params": {"k": K, "torch_threads": args.torch_threads,
                   "read": "one raw embedding per Read, top_k=10, count_access off",
                   "baseline_fit_s": round(fit_s, 1), "skipped": "; ".join(skipped) or "none"},
        "columns": COLUMNS, "rows": rows, "goals": _goals(rows),
    }
    print(markdown_table(rows, COLUMNS))
    return result


def _goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11: Read within 0.01 recall@10 of the decoded memories; Read recall@10 >= 0.97
    in domain and >= 0.95 out of domain."""
    goals = _own_codec_goals(rows)
    for r in rows:
        if "same_top10_as_decoded" not in r:
            continue
        decoded = next(d for d in rows
                       if d["set"] == r["set"] and "decoded memories" in d["method"])
        gap = decoded["recall_at_10"] - r["recall_at_10"]
        goals.append({"goal": f"{r['set']}: Read recall@10 within 0.01 of the decoded memories",
                      "measured": f"{r['recall_at_10']:.3f} vs {decoded['recall_at_10']:.3f} "
                                  f"(same top-10 set for {r['same_top10_as_decoded']:.1%} of "
                                  "queries)", "met": gap <= 0.01})
        floor = 0.97 if r["set"] in IN_DOMAIN else 0.95
        where = "in domain" if r["set"] in IN_DOMAIN else "out of domain"
        goals.append({"goal": f"{r['set']} ({where}): Read recall@10 >= {floor}",
                      "measured": f"{r['recall_at_10']:.3f}",
                      "met": r["recall_at_10"] >= floor})
    return goals


def _own_codec_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 24: a bank with its own codec reads with recall@10 >= the best baseline
    fitted in domain, mean cosine >= 0.997, and as fast as a bank of the served model."""
    goals = []
    for r in rows:
        if "bank's own codec" not in r["method"]:
            continue
        local = [b for b in rows if b["set"] == r["set"] and "(fit: in domain)" in b["method"]]
        served = next(b for b in rows if b["set"] == r["set"] and "p50_ms" in b
                      and "own codec" not in b["method"])
        if local:
            best = max(local, key=lambda b: b["recall_at_10"])
            goals.append({"goal": f"{r['set']}: own-codec Read recall@10 >= the best baseline "
                                  "fitted in domain",
                          "measured": f"{r['recall_at_10']:.3f} vs {best['recall_at_10']:.3f} "
                                      f"({best['method']})",
                          "met": r["recall_at_10"] >= best["recall_at_10"]})
        goals.append({"goal": f"{r['set']}: own-codec mean cosine >= 0.997",
                      "measured": f"{r['mean_cosine']:.4f}", "met": r["mean_cosine"] >= 0.997})
        goals.append({"goal": f"{r['set']}: own-codec Read p50 within 5 % of the served "
                              "model's bank",
                      "measured": f"{r['p50_ms']:.2f} vs {served['p50_ms']:.2f} ms",
                      "met": r["p50_ms"] <= 1.05 * served["p50_ms"]})
    return goals

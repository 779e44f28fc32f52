"""The approximate (IVF) index of large banks (issue 14, item 1): recall against the
exact scan on MiniLM-like data through the shipped model, the forced-exhaustive read
equal to the scan, lists exact under concurrent reads, writes and deletes, the index
kept across a restart, nprobe validation, and what DescribeBank reports."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from float_bounds import (
    U,
    assert_within_bound,
    float32_dot_bound,
    float32_softmax_bound,
    split_magnitude,
)
from safetensors.numpy import load_file

from apcm.client import MemoryClient
from apcm.client.errors import InvalidArgumentError
from apcm.server.codecs.base import Codec, load_codec
from apcm.server.memory import indexing, scan
from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.eviction import make_policy
from apcm.server.memory.export import export, from_export
from apcm.server.memory.ivf import IndexConfig, InvertedLists, list_count
from apcm.server.memory.options import EXHAUSTIVE, ReadOptions
from apcm.v1 import memory_pb2, memory_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model_weights" / "text-minilm.safetensors"
FIXTURES = ROOT / "tests" / "fixtures"
NOISE = 0.025  # per-dim sigma: a noisy copy keeps cosine ~0.9 with its source


@pytest.fixture(scope="module")
def text_codec() -> Codec:
    return load_codec(MODEL)


@pytest.fixture(scope="module")
def minilm() -> np.ndarray:
    """Every real MiniLM embedding in the test fixtures [1212, 384] (unit rows)."""
    v2 = load_file(str(FIXTURES / "text_v2_heldout.safetensors"))
    v1 = load_file(str(FIXTURES / "text_heldout.safetensors"))
    x = np.concatenate([v2["test"], v2["fortunes"], v2["licenses"],
                        v1["test"].reshape(-1, 384), v1["ood"].reshape(-1, 384)])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _noisy(src: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n MiniLM-like vectors: random real embeddings plus noise, renormalised."""
    rng = np.random.default_rng(seed)
    x = src[rng.integers(0, len(src), n)] + rng.normal(0, NOISE, (n, src.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _compress(codec: Codec, x: np.ndarray) -> torch.Tensor:
    return torch.cat([codec.compress(torch.from_numpy(x[i:i + 4096])[:, None, :])
                      for i in range(0, len(x), 4096)])


def _bank(codec: Codec, capacity: int, config: IndexConfig | None) -> MemoryBank:
    return MemoryBank("ix", capacity, code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                      scale=codec.quantizer.scale, device=torch.device("cpu"),
                      policy=make_policy("lfu", 0.0), max_payload_bytes=64, max_key_length=32,
                      metric=codec.similarity_weights, scorer=codec.scorer,
                      index_config=config)


def _fill(bank: MemoryBank, codes: torch.Tensor, metadata: list | None = None) -> None:
    n = codes.shape[0]
    for i in range(0, n, 2000):
        j = min(n, i + 2000)
        bank.apply_write(list(range(i, j)), codes[i:j], [None] * (j - i), [None] * (j - i),
                         list(range(i + 1, j + 1)), metadata[i:j] if metadata else None)


def _slots(result) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [[h.slot for h in r.hits] for r in result.results]


def _check_lists(bank: MemoryBank) -> None:
    """Every occupied slot is in exactly one list, at the position it records, and the
    lists hold nothing else."""
    index = bank.index
    assert index is not None
    lists = index.lists
    occupied = set(torch.nonzero(bank.occupied).flatten().tolist())
    members = np.concatenate([lists.lists[k][:lists.sizes[k]] for k in range(lists.k)])
    assert len(members) == len(set(members.tolist())) == len(occupied)
    assert set(members.tolist()) == occupied
    for k in range(lists.k):
        for p, s in enumerate(lists.lists[k][:lists.sizes[k]].tolist()):
            assert lists.assign[s] == k and lists.pos[s] == p
    free = np.ones(lists.assign.shape[0], dtype=bool)
    free[list(occupied)] = False
    assert (lists.assign[free] == -1).all()


# ---------------------------------------------------------------------- recall
def test_index_recall_at_10_of_the_scan_on_minilm_data(text_codec: Codec,
                                                       minilm: np.ndarray) -> None:
    n = 12_000
    items = _noisy(minilm, n, seed=1)
    bank = _bank(text_codec, n, IndexConfig(threshold=1000, background=False))
    _fill(bank, _compress(text_codec, items))
    assert bank.index is None  # no background builds in this config
    assert indexing.build(bank)
    assert bank.index is not None and bank.index.k == list_count(n)
    _check_lists(bank)
    queries = text_codec.encode_latent(torch.from_numpy(_noisy(minilm, 30, seed=2))[:, None])
    queries = queries.reshape(30, -1)
    exact = bank.read(queries, ReadOptions(top_k=10, count_access=False, nprobe=EXHAUSTIVE))
    approx = bank.read(queries, ReadOptions(top_k=10, count_access=False))
    recall = np.mean([len(set(a) & set(e)) / 10
                      for a, e in zip(_slots(approx), _slots(exact), strict=True)])
    assert recall >= 0.95
    # every list probed: the candidates are every slot, scored as the scan scores them
    # (one query's tables against the scan's decoded product: two summation orders)
    whole = bank.read(queries, ReadOptions(top_k=10, count_access=False, nprobe=bank.index.k))
    unit_q = scan.unit_queries(bank, queries)
    rows = bank.search_vectors(bank.codes[:n])
    inv = bank.inv_norms[:n].double()
    ref = unit_q.double() @ rows.double().T * inv
    offset = text_codec.scorer.queries(torch.zeros(1, unit_q.shape[1]))[0]
    bound = float32_dot_bound(unit_q, rows, magnitude=split_magnitude(unit_q, rows, offset)) \
        * inv + 2 * U * ref.abs()  # and the product with the inverse norm
    weights, weight_bound = float32_softmax_bound(ref, bound, 1.0)
    for i, (w, e) in enumerate(zip(whole.results, exact.results, strict=True)):
        assert [h.slot for h in w.hits] == [h.slot for h in e.hits]
        slots = [h.slot for h in e.hits]
        for read in (w, e):
            assert_within_bound([h.score for h in read.hits], ref[i, slots], bound[i, slots],
                                "scores")
            assert_within_bound([h.weight for h in read.hits], weights[i, slots],
                                weight_bound[i, slots], "weights")


def test_exhaustive_and_soft_reads_of_an_indexed_bank_are_the_scan(text_codec: Codec,
                                                                    minilm: np.ndarray) -> None:
    items = _compress(text_codec, _noisy(minilm, 3000, seed=3))
    indexed = _bank(text_codec, 3000, IndexConfig(threshold=100, background=False))
    plain = _bank(text_codec, 3000, None)
    _fill(indexed, items)
    _fill(plain, items)
    assert indexing.build(indexed)
    queries = text_codec.encode_latent(torch.from_numpy(_noisy(minilm, 8, seed=4))[:, None])
    queries = queries.reshape(8, -1)
    for soft, nprobe in ((False, EXHAUSTIVE), (True, 0), (True, 3)):
        a = indexed.read(queries, ReadOptions(top_k=7, temperature=0.3, soft=soft,
                                              count_access=False, nprobe=nprobe))
        b = plain.read(queries,
                       ReadOptions(top_k=7, temperature=0.3, soft=soft, count_access=False))
        for ra, rb in zip(a.results, b.results, strict=True):
            assert [(h.slot, h.score, h.weight) for h in ra.hits] == \
                [(h.slot, h.score, h.weight) for h in rb.hits]
        if soft:
            assert a.soft is not None and b.soft is not None and torch.equal(a.soft, b.soft)
    with pytest.raises(Exception, match="nprobe"):
        indexed.read(queries, ReadOptions(nprobe=-2))


def test_filtered_reads_of_an_indexed_bank(text_codec: Codec, minilm: np.ndarray) -> None:
    n = 4000
    items = _compress(text_codec, _noisy(minilm, n, seed=5))
    meta = [{"shard": str(i % 50)} for i in range(n)]
    bank = _bank(text_codec, n, IndexConfig(threshold=100, background=False))
    _fill(bank, items, meta)
    assert indexing.build(bank)
    queries = text_codec.encode_latent(torch.from_numpy(_noisy(minilm, 5, seed=6))[:, None])
    queries = queries.reshape(5, -1)
    # 80 matching slots, fewer than a probe gathers: scored exhaustively, so exact
    rare = bank.read(queries, ReadOptions(top_k=10, count_access=False, where={"shard": "7"}))
    exact = bank.read(queries, ReadOptions(top_k=10, count_access=False, where={"shard": "7"},
                      nprobe=EXHAUSTIVE))
    assert _slots(rare) == _slots(exact)
    assert all(s % 50 == 7 for row in _slots(rare) for s in row)
    # a filter too wide for that: probed candidates are masked, the hits still match it
    wide = bank.read(queries,
                     ReadOptions(top_k=10, count_access=False, where={"shard": "7"}, nprobe=1))
    assert all(len(row) == 10 and all(s % 50 == 7 for s in row) for row in _slots(wide))


# ---------------------------------------------------------------------- maintenance
def _float_bank(capacity: int, config: IndexConfig) -> MemoryBank:
    return MemoryBank("f", capacity, code_dim=16, code_dtype="float32", scale=None,
                      device=torch.device("cpu"), policy=make_policy("lfu", 0.0),
                      max_payload_bytes=8, max_key_length=16, index_config=config)


def test_lists_stay_exact_under_concurrent_reads_writes_deletes_and_rebuilds() -> None:
    capacity = 1500
    bank = _float_bank(capacity, IndexConfig(threshold=300, retrain_growth=1.3, nprobe=4))
    centres = torch.randn(20, 16)
    stop = threading.Event()
    errors: list[BaseException] = []

    def codes(n: int, rng: random.Random) -> torch.Tensor:
        pick = torch.tensor([rng.randrange(20) for _ in range(n)])
        return centres[pick] + 0.1 * torch.randn(n, 16)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(150):
                n = rng.randrange(1, 40)
                keys = rng.sample(range(4 * capacity), n)  # overwrites, then evictions
                batch = codes(n, rng)
                with bank.lock:
                    ks, ps = bank.validate_write(batch, [f"k{k}" for k in keys], [])
                    slots = bank.plan_write(ks, bank.writes_total + 1)
                    seqs = list(range(bank.writes_total + 1, bank.writes_total + 1 + n))
                    bank.apply_write(slots, batch, ks, ps, seqs)
                if step % 40 == 39:
                    indexing.build(bank)  # a rebuild racing the writes (or skipped: one runs)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def deleter() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                with bank.lock:
                    slots, _ = bank.resolve_delete(
                        [rng.randrange(capacity) for _ in range(10)], [])
                    bank.free(slots)
                time.sleep(0.001)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def reader() -> None:
        rng = random.Random(9)
        try:
            while not stop.is_set():
                with bank.lock.shared():
                    if bank.occupied_count:
                        result = bank.read(codes(2, rng), ReadOptions(top_k=5, count_access=False))
                        for r in result.results:
                            assert all(bank.occupied[h.slot] for h in r.hits)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    others = [threading.Thread(target=deleter), threading.Thread(target=reader),
              threading.Thread(target=reader)]
    for t in threads + others:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in others:
        t.join()
    assert not errors, errors
    while bank.index_training:  # a background build the writes started
        time.sleep(0.05)
    assert bank.index is not None
    _check_lists(bank)  # kept exact by every write, delete and swap
    assert indexing.build(bank)
    _check_lists(bank)
    with bank.lock:
        bank.clear()
    assert bank.index is None and bank.index_stats().state == "none"


def test_an_index_survives_export_and_older_exports_load_without_one() -> None:
    bank = _float_bank(2000, IndexConfig(threshold=100, background=False))
    x = torch.randn(1500, 16)
    bank.apply_write(list(range(1500)), x, [None] * 1500, [None] * 1500,
                     list(range(1, 1501)))
    bank.free(list(range(0, 1500, 3)))
    assert indexing.build(bank)
    config, arrays = export(bank)
    assert arrays["ivf_assign"].dtype == np.int32 and arrays["ivf_centroids"].ndim == 2
    args = dict(scale=None, device=torch.device("cpu"), max_payload_bytes=8,
                max_key_length=16, index_config=IndexConfig(threshold=100, background=False))
    loaded = from_export(config, arrays, **args)  # type: ignore[arg-type]
    assert loaded.index is not None and loaded.index.k == bank.index.k
    _check_lists(loaded)
    q = torch.randn(4, 16)
    five = ReadOptions(top_k=5)
    assert _slots(loaded.read(q, five)) == _slots(bank.read(q, five))
    older = {k: v for k, v in arrays.items() if not k.startswith("ivf_")}
    plain = from_export(config, older, **args)  # type: ignore[arg-type]
    assert plain.index is None
    assert indexing.build(plain)
    _check_lists(plain)


def test_lists_that_do_not_match_the_slots_are_rebuilt_from_the_stored_centroids() -> None:
    bank = _float_bank(3000, IndexConfig(threshold=100, background=False))
    bank.apply_write(list(range(1500)), torch.randn(1500, 16), [None] * 1500, [None] * 1500,
                     list(range(1, 1501)))
    assert indexing.build(bank)
    _, earlier = export(bank)
    bank.free(list(range(0, 1500, 4)))  # the lists follow every change live
    bank.apply_write(list(range(1500, 2200)), torch.randn(700, 16), [None] * 700,
                     [None] * 700, list(range(1501, 2201)))
    config, arrays = export(bank)
    args = dict(scale=None, device=torch.device("cpu"), max_payload_bytes=8,
                max_key_length=16, index_config=IndexConfig(threshold=100, background=False))
    for stale in ({**arrays, "ivf_assign": earlier["ivf_assign"]},
                  {k: v for k, v in arrays.items() if k != "ivf_assign"}):
        loaded = from_export(config, stale, **args)  # type: ignore[arg-type]
        assert loaded.index is not None and not loaded.index_training
        assert torch.equal(loaded.index.centroids, bank.index.centroids)  # no k-means
        assert loaded.index.trained_at == bank.index.trained_at == 1500
        _check_lists(loaded)
        occupied = torch.nonzero(bank.occupied).flatten().numpy()
        np.testing.assert_array_equal(loaded.index.lists.assign[occupied],
                                      bank.index.lists.assign[occupied])
        q = torch.randn(4, 16)
        assert _slots(loaded.read(q, ReadOptions(top_k=5, nprobe=3))) == \
            _slots(bank.read(q, ReadOptions(top_k=5, nprobe=3)))
    wrong = {**arrays, "ivf_centroids": np.ones((4, 9), np.float32)}
    assert from_export(config, wrong, **args).index is None  # type: ignore[arg-type]


def test_a_new_index_is_snapshotted_at_once_and_a_kill9_restart_serves_it(
        tmp_path: Path) -> None:
    from apcm.server.config import Settings
    from apcm.server.memory.store import MemoryStore
    from apcm.server.persistence.manager import PersistenceManager

    def started() -> tuple[MemoryStore, PersistenceManager]:
        store = MemoryStore(code_dim=16, code_dtype="float32", scale=None,
                            device=torch.device("cpu"), max_capacity=10_000,
                            max_payload_bytes=8, max_key_length=16, default_policy="lfu",
                            default_half_life=100.0, index_config=IndexConfig(threshold=800))
        # the interval is far away: only the index build can bring the snapshot now
        settings = Settings(data_dir=str(tmp_path), snapshot_interval_s=3600.0,
                            snapshot_wal_bytes=0).validated()
        mgr = PersistenceManager(store, settings, "a" * 64, "pca")
        mgr.recover()
        mgr.start()
        return store, mgr

    store, mgr = started()
    store.create_bank("b", 5000)
    mgr.snapshot("before")  # holds the bank, not yet an index
    store.write("b", torch.randn(1000, 16), [], [])  # crosses the threshold: a build
    deadline = time.monotonic() + 60
    while not any("ivf_centroids" in arrays for _, arrays in _banks_on_disk(mgr)):
        assert time.monotonic() < deadline, "no snapshot holds the new index"
        time.sleep(0.05)
    live = store.get("b")
    store.write("b", torch.randn(50, 16), [], [])  # after the snapshot: replayed
    q = torch.randn(3, 16)
    options = ReadOptions(top_k=5, nprobe=2, count_access=False)
    expected = _slots(store.read("b", q, options))
    # kill -9: the old manager never closes, a new process recovers the same directory
    store2, mgr2 = started()
    bank = store2.get("b")
    assert bank.index_stats().state == "ready" and bank.occupied_count == 1050
    assert torch.equal(bank.index.centroids, live.index.centroids)
    _check_lists(bank)
    assert _slots(store2.read("b", q, options)) == expected
    mgr2.close(final_snapshot=False)
    mgr.close(final_snapshot=False)


def _banks_on_disk(mgr) -> list:  # type: ignore[no-untyped-def]
    from apcm.server.persistence.snapshot import read_snapshot

    return [read_snapshot(mgr.snapshots.path(i.name))[1]["b"]
            for i in mgr.snapshots.newest_first(verify=False)]


# ---------------------------------------------------------------------- server
def _wait_ready(client: MemoryClient, bank: str) -> None:
    for _ in range(600):
        info = client.describe_bank(bank)
        if info.index is not None and info.index.state == "ready":
            return
        time.sleep(0.1)
    raise AssertionError(f"bank {bank} was not indexed: {info.index}")


def test_server_indexes_a_bank_reports_it_and_keeps_it_over_a_restart(
        make_server, text_codec: Codec, minilm: np.ndarray, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "data"
    server = make_server(model=MODEL, data_dir=data_dir, index_threshold=2000,
                         index_nprobe=6, embedder="none", metrics_port=0)
    items = _noisy(minilm, 3000, seed=11)
    codes = _compress(text_codec, items).numpy()
    queries = _compress(text_codec, _noisy(minilm, 6, seed=12)).numpy()
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        client.create_bank("big", 4000)
        assert client.describe_bank("big").index.state == "none"
        for i in range(0, len(codes), 500):
            client.write(codes=codes[i:i + 500], mode="per_item", bank="big")
            if i == 1500:  # crossed the threshold: a build starts in the background
                _wait_ready(client, "big")
        info = client.describe_bank("big").index  # later writes joined the lists
        assert (info.state, info.lists, info.trained_at, info.default_nprobe,
                info.indexed_slots, info.threshold) == \
            ("ready", list_count(2000), 2000, 6, 3000, 2000)
        before = client.read(codes=queries, bank="big", top_k=10, count_access=False)
        exact = client.read(codes=queries, bank="big", top_k=10, count_access=False,
                            exhaustive=True)
        every = client.read(codes=queries, bank="big", top_k=10, count_access=False,
                            nprobe=info.lists)
        assert [[h.slot for h in r.hits] for r in every] == \
            [[h.slot for h in r.hits] for r in exact]
        with pytest.raises(InvalidArgumentError, match="nprobe"):
            client.read(codes=queries, bank="big", nprobe=-1)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            request = memory_pb2.ReadRequest(bank="big", nprobe=-3)
            request.codes.CopyFrom(client_tensor(queries[:1]))
            with pytest.raises(grpc.RpcError) as err:
                stub.Read(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "nprobe" in (err.value.details() or "")
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            scraped = response.read().decode()
        for line in (f'apcm_index_lists{{bank="big"}} {float(list_count(2000))}',
                     'apcm_index_slots{bank="big"} 3000.0',
                     'apcm_index_trained_at_slots{bank="big"} 2000.0',
                     'apcm_index_building{bank="big"} 0.0'):
            assert line in scraped.splitlines()
        client.create_snapshot()
    server.stop(grace=0.5)
    again = make_server(model=MODEL, data_dir=data_dir, index_threshold=2000,
                        index_nprobe=6, embedder="none")
    with MemoryClient(f"127.0.0.1:{again.port}", timeout=60.0) as client:
        assert client.describe_bank("big").index == info  # loaded, not rebuilt
        after = client.read(codes=queries, bank="big", top_k=10, count_access=False)
        assert [[h.slot for h in r.hits] for r in after] == \
            [[h.slot for h in r.hits] for r in before]


def client_tensor(x: np.ndarray):  # type: ignore[no-untyped-def]
    from apcm.wire.tensors import to_proto

    return to_proto(x)



def test_probed_and_scanned_fallback_reads_weigh_like_the_scan_at_a_tiny_temperature() -> None:
    bank = _float_bank(2000, IndexConfig(threshold=100, background=False))
    gen = torch.Generator().manual_seed(4)  # a seed whose data has such a near-tie
    x = torch.randn(1500, 16, generator=gen)
    bank.apply_write(list(range(1500)), x, [None] * 1500, [None] * 1500,
                     list(range(1, 1501)))
    assert indexing.build(bank)
    k = bank.index.k
    q = x[:3] + 0.01 * torch.randn(3, 16, generator=gen)
    # every list probed: the candidates are the whole bank; top_k 300 with one list
    # probed: too few candidates, so each query is scanned (exp(-500) would underflow)
    for top_k, nprobe in ((5, k), (300, 1)):
        got = bank.read(q, ReadOptions(top_k=top_k, temperature=1e-3, nprobe=nprobe,
                                       count_access=False))
        exact = bank.read(q, ReadOptions(top_k=top_k, temperature=1e-3, nprobe=EXHAUSTIVE,
                          count_access=False))
        for g, e in zip(got.results, exact.results, strict=True):
            # per slot, not by rank: the two paths round float32 scores differently, and
            # two slots 3e-8 apart (seen at rank 226 of 300) may swap places
            mine = {h.slot: (h.score, h.weight) for h in g.hits}
            theirs = {h.slot: (h.score, h.weight) for h in e.hits}
            assert mine.keys() == theirs.keys()
            slots = sorted(mine)
            np.testing.assert_allclose([mine[s][0] for s in slots],
                                       [theirs[s][0] for s in slots], atol=1e-6)
            np.testing.assert_allclose([mine[s][1] for s in slots],
                                       [theirs[s][1] for s in slots], rtol=1e-4, atol=1e-12)
            assert g.hits[0].slot == e.hits[0].slot and g.hits[0].weight > 0


def test_inverted_lists_count_their_bytes_through_growth_and_shrinking() -> None:
    """``nbytes`` (asked by the memory limit on every write) is kept as lists change,
    not summed over the lists: it must equal the buffers' real size all the same."""
    rng = np.random.default_rng(3)
    lists = InvertedLists.from_assignment(rng.integers(-1, 16, 4000).astype(np.int32), 16,
                                          6000)

    def real() -> int:
        return (lists.assign.nbytes + lists.pos.nbytes + lists.sizes.nbytes
                + sum(b.nbytes for b in lists.lists))

    assert lists.nbytes() == real()
    for _ in range(30):  # bursts into a few lists (doubling), then mass removals (shrink)
        slots = rng.choice(6000, 500, replace=False)
        lists.place(slots, rng.integers(0, 3, 500))
        assert lists.nbytes() == real()
        for slot in rng.choice(6000, 900, replace=False).tolist():
            lists.remove(slot)
        assert lists.nbytes() == real()
    assert len(lists) == int((lists.assign >= 0).sum())

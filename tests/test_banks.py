"""Memory banks through the real client: the paper's write/read, eviction, top-k,
payloads, management, bad input and a 16-thread hammer."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from float_bounds import (
    U,
    assert_within_bound,
    float32_cosine_bound,
    float32_mix_bound,
    float32_softmax_bound,
    pca_decode_bound,
    pca_encode_bound,
)

from apcm.client import (
    AlreadyExistsError,
    InvalidArgumentError,
    MemoryClient,
    NotFoundError,
)

M = 8  # code dim of the test codec (float32 PCA on 8x8 digits)


def basis(*idx: int, scale: float = 1.0) -> np.ndarray:
    """Codes [n, m] that are (scaled) unit vectors along the given axes."""
    codes = np.zeros((len(idx), M), np.float32)
    codes[np.arange(len(idx)), idx] = scale
    return codes


@pytest.fixture
def bank(client: MemoryClient):
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(NotFoundError):
        client.drop_bank(name)


def test_default_bank_exists_at_start(client: MemoryClient) -> None:
    names = {b.name for b in client.list_banks()}
    assert "default" in names
    assert client.describe_bank("default").capacity == 64


def test_paper_write_sequence_and_lfu_eviction(client: MemoryClient, bank: str) -> None:
    """First free slot first; then the least-used slot, ties to the oldest; counter reset."""
    client.create_bank(bank, 3, policy="lfu")
    slots = [client.write(codes=basis(i), bank=bank, keys=[k])[0] for i, k in enumerate("abc")]
    assert [s.slot for s in slots] == [0, 1, 2]
    assert not any(s.evicted for s in slots)
    assert slots[0].sequence < slots[1].sequence < slots[2].sequence

    client.read(codes=basis(0, 0, 1), bank=bank)  # a twice, b once, c never
    info = client.describe_bank(bank)
    assert (info.counter_min, info.counter_max) == (0, 2)

    d = client.write(codes=basis(3), bank=bank, keys=["d"])[0]
    assert (d.slot, d.evicted, d.evicted_key) == (2, True, "c")
    # The paper's pathology: the memory just written has counter 0, so it goes next.
    e = client.write(codes=basis(4), bank=bank, keys=["e"])[0]
    assert (e.slot, e.evicted, e.evicted_key) == (2, True, "d")
    # Equal counters tie-break by age: reading b once more makes a and b equal (2 each)...
    client.read(codes=basis(1), bank=bank)
    client.read(codes=basis(4, 4, 4), bank=bank)  # e overtakes both
    f = client.write(codes=basis(5), bank=bank, keys=["f"])[0]
    assert (f.slot, f.evicted_key) == (0, "a")  # ...and a is older than b
    assert client.describe_bank(bank).evictions_total == 3


@pytest.mark.parametrize("policy, newest_evicted", [("lfu", True), ("lfu_decay", False)])
def test_lfu_decay_does_not_evict_the_newest_memory_first(
    client: MemoryClient, bank, policy: str, newest_evicted: bool
) -> None:
    """Same history under both policies: once-read old memories, then two new writes."""
    client.create_bank(bank, 3, policy=policy, half_life=0.5)
    for i, k in enumerate("abc"):
        client.write(codes=basis(i), bank=bank, keys=[k])
    client.read(codes=basis(0, 1, 2), bank=bank)
    client.write(codes=basis(3), bank=bank, keys=["d"])
    e = client.write(codes=basis(4), bank=bank, keys=["e"])[0]
    assert e.evicted
    assert (e.evicted_key == "d") is newest_evicted
    assert client.describe_bank(bank).policy == policy


def test_mean_write_stores_the_batch_mean_code(client: MemoryClient, bank, codec, digits) -> None:
    client.create_bank(bank, 8)
    x = digits[1700:1704]
    written = client.write(x, bank=bank, payloads=[b"four digits"])
    assert len(written) == 1
    expected = codec.compress(torch.from_numpy(x)).mean(0, keepdim=True)
    hit = client.read(codes=expected.numpy(), bank=bank, reconstruct=True, payloads=True)[0].hits[0]
    assert hit.slot == written[0].slot and hit.payload == b"four digits"
    # the stored code and the query are float32 means of float32 encodes of x: both
    # within z_bound of the exact mean code, so their angle is at most 2 z_bound / |z|
    codes, code_bound = pca_encode_bound(codec, x)
    z = codes.mean(0, keepdim=True)
    z_bound = code_bound.mean(0, keepdim=True) + 2 * (len(x) + 1) * U * codes.abs().mean(0)
    angle = 2 * float(z_bound.norm() / z.norm())
    assert_within_bound([hit.score], [1.0], float32_cosine_bound(z, z)[0] + angle ** 2 / 2,
                        "score of the mean code")
    assert_within_bound(hit.reconstruction.reshape(1, -1),
                        *pca_decode_bound(codec, z, z_bound), "reconstruction")


def test_read_top_k_scores_weights_payloads_soft(client: MemoryClient, bank, codec) -> None:
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(5, M)).astype(np.float32)
    client.create_bank(bank, 10)
    client.write(codes=codes, bank=bank, mode="per_item",
                 payloads=[f"p{i}" for i in range(5)], keys=[f"k{i}" for i in range(5)])
    query = rng.normal(size=(2, M)).astype(np.float32)
    results = client.read(codes=query, bank=bank, top_k=3, temperature=0.5, payloads=True,
                          reconstruct=True, soft=True)
    unit = torch.nn.functional.normalize
    cos = unit(torch.from_numpy(query).double()) @ unit(torch.from_numpy(codes).double()).T
    cos_bound = float32_cosine_bound(query, codes)
    all_weights, all_weight_bounds = float32_softmax_bound(cos, cos_bound, 0.5)
    for q, result in enumerate(results):
        order = torch.argsort(cos[q], descending=True)[:3]
        weights, weight_bound = all_weights[q], all_weight_bounds[q]
        assert [h.key for h in result.hits] == [f"k{i}" for i in order]
        assert_within_bound([h.score for h in result.hits], cos[q, order],
                            cos_bound[q, order], "scores")
        assert_within_bound([h.weight for h in result.hits], weights[order],
                            weight_bound[order], "weights")
        assert [h.payload for h in result.hits] == [f"p{i}".encode() for i in order]
        for h, i in zip(result.hits, order.tolist(), strict=False):
            assert_within_bound(h.reconstruction.reshape(1, -1),
                                *pca_decode_bound(codec, codes[i:i + 1]), "reconstruction")
        soft_code = weights[None] @ torch.from_numpy(codes).double()
        soft_bound = float32_mix_bound(weights[None], weight_bound[None], codes)
        assert_within_bound(result.soft_reconstruction.reshape(1, -1),
                            *pca_decode_bound(codec, soft_code, soft_bound), "soft reconstruction")


def test_read_counts_only_the_best_slot_and_min_score_filters(client: MemoryClient, bank) -> None:
    client.create_bank(bank, 4, policy="lfu")
    client.write(codes=basis(0, 1, 2), bank=bank, mode="per_item")
    before = client.describe_bank(bank)
    hits = client.read(codes=basis(0), bank=bank, top_k=3)[0].hits
    assert len(hits) == 3
    after = client.describe_bank(bank)
    assert after.reads_total == before.reads_total + 1
    assert after.counter_max == 1 and after.counter_min == 0
    filtered = client.read(codes=basis(0), bank=bank, top_k=3, min_score=0.5)[0].hits
    assert [h.slot for h in filtered] == [0]
    client.read(codes=basis(0), bank=bank, count_access=False)
    assert client.describe_bank(bank).reads_total == after.reads_total + 1


def test_read_on_empty_bank_is_empty_not_an_error(client: MemoryClient, bank) -> None:
    client.create_bank(bank, 4)
    results = client.read(codes=basis(0, 1), bank=bank, top_k=2, soft=True)
    assert [r.hits for r in results] == [[], []]
    assert all(r.soft_reconstruction is None for r in results)


def test_keys_upsert_delete_clear_drop(client: MemoryClient, bank) -> None:
    client.create_bank(bank, 4)
    first = client.write(codes=basis(0), bank=bank, keys=["note"], payloads=["v1"])[0]
    again = client.write(codes=basis(1), bank=bank, keys=["note"], payloads=["v2"])[0]
    assert again.slot == first.slot and again.replaced and not again.evicted
    assert client.describe_bank(bank).occupied == 1
    hit = client.read(codes=basis(1), bank=bank, payloads=True)[0].hits[0]
    assert (hit.key, hit.payload) == ("note", b"v2")

    client.write(codes=basis(2, 3), bank=bank, mode="per_item", keys=["x", "y"])
    deleted, missing = client.delete_slots(bank, keys=["x", "nope"])
    assert (deleted, list(missing)) == (1, ["nope"])
    deleted, _ = client.delete_slots(bank, slots=[first.slot])
    assert deleted == 1 and client.describe_bank(bank).occupied == 1
    assert client.clear_bank(bank).occupied == 0
    client.drop_bank(bank)
    with pytest.raises(NotFoundError):
        client.describe_bank(bank)


def test_delete_by_slot_and_sequence_spares_a_rewritten_slot(client: MemoryClient,
                                                             bank: str) -> None:
    """A delete chosen from a read names (slot, sequence): once the slot holds a newer
    memory, the stale delete frees nothing and the newer memory stays."""
    client.create_bank(bank, 2)
    client.write(codes=basis(0, 1), bank=bank, mode="per_item", payloads=["old", "other"])
    seen = client.read(codes=basis(0), bank=bank)[0].hits[0]
    client.delete_slots(bank, slots=[seen.slot])
    newer = client.write(codes=basis(2), bank=bank, payloads=["newer"])[0]
    assert newer.slot == seen.slot  # the freed slot is the first free one

    assert client.delete_slots(bank, slots=[seen.slot], sequences=[seen.sequence],
                               dry_run=True).deleted == 0
    assert client.delete_slots(bank, slots=[seen.slot], sequences=[seen.sequence]).deleted == 0
    kept = client.read(codes=basis(2), bank=bank, payloads=True)[0].hits[0]
    assert (kept.slot, kept.payload) == (seen.slot, b"newer")

    assert client.delete_slots(bank, slots=[kept.slot], sequences=[kept.sequence],
                               dry_run=True).deleted == 1
    assert client.describe_bank(bank).occupied == 2  # a dry run frees nothing
    assert client.delete_slots(bank, slots=[kept.slot], sequences=[kept.sequence]).deleted == 1
    assert client.describe_bank(bank).occupied == 1
    with pytest.raises(InvalidArgumentError, match="one per slot"):
        client.delete_slots(bank, slots=[0, 1], sequences=[kept.sequence])


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda c, b: c.create_bank("bad/name", 4), "name"),
        (lambda c, b: c.create_bank("zero-cap", 0), "capacity"),
        (lambda c, b: c.create_bank("huge", 10**9), "capacity"),
        (lambda c, b: c.read(codes=basis(0), bank=b, top_k=0), "top_k"),
        (lambda c, b: c.read(codes=basis(0), bank=b, temperature=0.0), "temperature"),
        (lambda c, b: c.read(codes=basis(0), bank=b, temperature=-1.0), "temperature"),
        (lambda c, b: c.read(codes=basis(0), bank=b, min_score=float("nan")), "min_score"),
        (lambda c, b: c.read(codes=np.full((1, 8), np.nan, np.float32), bank=b), "NaN"),
        (lambda c, b: c.write(codes=np.zeros((1, 9), np.float32), bank=b), r"\[B, 8\]"),
        (lambda c, b: c.write(codes=basis(0, 1), bank=b, mode="per_item", payloads=[b"x"]),
         "payloads"),
        (lambda c, b: c.read(np.zeros((1, 4, 4), np.float32), bank=b), r"\[B, 8, 8\]"),
        (lambda c, b: c.write(codes=basis(0), bank=b, payloads=[b"x" * 70_000]), "payload"),
        (lambda c, b: c.write(codes=basis(0), bank=b, keys=["k" * 300]), "key"),
        (lambda c, b: c.write(codes=basis(0, 1), bank=b, mode="per_item", keys=["a"]), "keys"),
    ],
)
def test_bad_bank_requests_are_invalid_argument(client: MemoryClient, bank, call, pattern):
    client.create_bank(bank, 4)
    client.write(codes=basis(5), bank=bank)
    with pytest.raises(InvalidArgumentError, match=pattern):
        call(client, bank)
    assert client.describe_bank(bank).occupied == 1  # nothing half-written


def test_a_failing_batch_writes_nothing(client: MemoryClient, bank) -> None:
    client.create_bank(bank, 4)
    with pytest.raises(InvalidArgumentError):
        client.write(codes=basis(0, 1, 2), bank=bank, mode="per_item",
                     payloads=[b"ok", b"ok", b"x" * 70_000])
    assert client.describe_bank(bank).occupied == 0


def test_unknown_bank_and_duplicates(client: MemoryClient, bank) -> None:
    for call in (
        lambda: client.read(codes=basis(0), bank="no-such-bank"),
        lambda: client.write(codes=basis(0), bank="no-such-bank"),
        lambda: client.describe_bank("no-such-bank"),
        lambda: client.drop_bank("no-such-bank"),
        lambda: client.clear_bank("no-such-bank"),
    ):
        with pytest.raises(NotFoundError, match="no-such-bank"):
            call()
    client.create_bank(bank, 4)
    with pytest.raises(AlreadyExistsError):
        client.create_bank(bank, 4)
    assert client.create_bank(bank, 8, exist_ok=True).capacity == 4


def test_sixteen_threads_never_lose_or_duplicate_a_write(server_address: str, bank) -> None:
    capacity, threads, writes_each = 48, 16, 15
    with MemoryClient(server_address) as c:
        c.create_bank(bank, capacity, policy="lfu")
    acked: list[str] = []
    evicted: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    rng = np.random.default_rng(7)
    payload_codes = rng.normal(size=(threads, writes_each, M)).astype(np.float32)

    def worker(t: int) -> None:
        try:
            with MemoryClient(server_address) as c:
                for i in range(writes_each):
                    key = f"t{t}-{i}"
                    w = c.write(codes=payload_codes[t, i : i + 1], bank=bank, keys=[key],
                                payloads=[key])[0]
                    with lock:
                        acked.append(key)
                        if w.evicted:
                            evicted.append(w.evicted_key)
                    c.read(codes=payload_codes[t, i : i + 1], bank=bank, top_k=2)
        except BaseException as e:  # surfaced below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert not errors, errors
    assert len(acked) == threads * writes_each and len(set(evicted)) == len(evicted)
    with MemoryClient(server_address) as c:
        info = c.describe_bank(bank)
        assert info.occupied == capacity
        assert info.evictions_total == len(evicted) == len(acked) - capacity
        # Every acknowledged key is present unless reported evicted, each exactly once.
        for key in set(acked) - set(evicted):
            hit = c.read(codes=payload_codes[int(key[1:].split("-")[0]),
                                             int(key.split("-")[1])][None],
                         bank=bank, payloads=True, count_access=False)[0].hits[0]
            assert (hit.key, hit.payload) == (key, key.encode())
        deleted, missing = c.delete_slots(bank, keys=acked)
        assert deleted == capacity and sorted(missing) == sorted(evicted)


def test_describe_list_and_a_scrape_do_not_wait_for_a_long_read(make_server) -> None:
    """What every metrics scrape calls (describe, list) holds a bank's lock shared, as
    reads do, so a scrape during a long read returns at once instead of stalling."""
    srv = make_server(metrics_port=0)
    with MemoryClient(f"127.0.0.1:{srv.port}", timeout=5.0) as c:
        c.write(codes=basis(0, 1), mode="per_item")
        bank = srv.service.store.get("default")
        with bank.lock.shared():  # a read inside the bank, for as long as it likes
            info = c.describe_bank("default")
            names = [b.name for b in c.list_banks()]
            url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                scrape = response.read().decode()
    assert info.occupied == 2 and names == ["default"]
    assert 'apcm_bank_occupied_slots{bank="default"} 2.0' in scrape

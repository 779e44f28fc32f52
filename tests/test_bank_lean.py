"""Reads at scale on one machine (issue 14): concurrent reads of one bank, columnar
keys / payloads / metadata, memory that grows with what is stored, and snapshots
that skip unchanged banks."""

from __future__ import annotations

import random
import threading

import numpy as np
import torch

from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.columns import ByteColumn, KeyIndex, key_hash, key_hashes
from apcm.server.memory.options import ReadOptions
from apcm.server.memory.slots import INITIAL_ROWS
from apcm.server.memory.store import MemoryStore, StoreState

M = 8


def make_store(**kw) -> MemoryStore:
    args = dict(code_dim=M, code_dtype="float32", scale=None, device=torch.device("cpu"),
                max_capacity=1_000_000, max_payload_bytes=256, max_key_length=64,
                default_policy="lfu", default_half_life=100.0)
    args.update(kw)
    return MemoryStore(**args)


# ---------------------------------------------------------------------- columns
def test_byte_column_and_key_index_agree_with_a_dict_through_compactions():
    rng = random.Random(0)
    col = ByteColumn(300)
    index = KeyIndex(col)
    model: dict[int, bytes] = {}
    for step in range(6000):
        slot = rng.randrange(300)
        old = model.get(slot)
        if old is not None:
            index.remove(old)
        if rng.random() < 0.2:
            col.set(slot, None)
            model.pop(slot, None)
        else:
            value = f"k{rng.randrange(10_000)}-{'x' * rng.randrange(40)}".encode()
            other = index.get(value)
            if other is not None:  # keys are unique: free the other holder first
                index.remove(value)
                col.set(other, None)
                model.pop(other)
            col.set(slot, value)
            index.add(value, slot)
            model[slot] = value
        if step % 997 == 0:
            index.rebuild()
        if step % 1500 == 0:
            data, offsets = col.packed(300)
            copy = ByteColumn.from_packed(data, offsets, 300)
            assert {s: copy.get(s) for s in range(300) if copy.get(s)} == model
    assert col.live == sum(len(v) for v in model.values())
    assert col.used <= 2 * col.live + 4096  # compaction bounds the dead bytes
    assert len(index) == len(model)
    for slot, value in model.items():
        assert col.get(slot) == value and index.get(value) == slot
    assert index.get(b"never-written") is None


# ---------------------------------------------------------------------- concurrency
def test_two_readers_are_inside_one_banks_read_at_once_and_writers_wait():
    s = make_store()
    s.create_bank("b", 1000)
    s.write("b", torch.randn(50, M), [f"k{i}" for i in range(50)], [])
    bank = s.get("b")
    read_done, write_done = threading.Event(), threading.Event()
    with bank.lock.shared():  # a reader inside the bank (stands in for a long scan)
        reader = threading.Thread(target=lambda: (
            s.read("b", torch.randn(2, M), ReadOptions(top_k=3)), read_done.set()))
        reader.start()
        assert read_done.wait(10), "a second reader must not wait for the first"
        writer = threading.Thread(target=lambda: (s.write("b", torch.randn(1, M), [], []),
                                                  write_done.set()))
        writer.start()
        assert not write_done.wait(0.2)  # a writer waits for the readers
        late_done = threading.Event()
        late = threading.Thread(target=lambda: (s.read("b", torch.randn(1, M)),
                                                late_done.set()))
        late.start()
        assert not late_done.wait(0.2)  # a waiting writer holds new readers back
    assert write_done.wait(10) and late_done.wait(10)  # the writer first, then the reader
    reader.join()
    writer.join()
    late.join()
    assert s.describe("b").reads_total == 3


def test_two_real_scans_of_a_big_bank_overlap():
    s = make_store(code_dim=64)
    s.create_bank("big", 200_000)
    s.write("big", torch.randn(200_000, 64), [], [])
    bank = s.get("big")
    seen = []
    stop = threading.Event()

    def watch() -> None:  # samples how many readers are inside the bank
        while not stop.wait(0.0005):
            seen.append(bank.lock.readers())

    def reader() -> None:
        for _ in range(10):
            s.read("big", torch.randn(16, 64), ReadOptions(top_k=5))

    watcher = threading.Thread(target=watch)
    watcher.start()
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    stop.set()
    watcher.join()
    assert max(seen) == 2, "two reads of one bank must be able to scan at the same time"
    assert s.describe("big").reads_total == 2 * 10 * 16


def test_concurrent_readers_and_writers_keep_counters_and_keys_exact():
    s = make_store()
    s.create_bank("b", 10_000)
    s.write("b", torch.randn(10, M), [f"seed{i}" for i in range(10)], [b"p"] * 10)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        gen = torch.Generator().manual_seed(t)
        try:
            for i in range(60):
                keys = [f"w{t}-{i}-{j}" for j in range(3)]
                s.write("b", torch.randn(3, M, generator=gen), keys, [k.encode() for k in keys])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    def reader(t: int) -> None:
        gen = torch.Generator().manual_seed(100 + t)
        try:
            for _ in range(60):
                found = s.read("b", torch.randn(2, M, generator=gen), ReadOptions(top_k=2))
                for r in found.results:
                    for h in r.hits:  # a hit's key, payload and slot agree
                        assert h.key is not None and s.get("b").slot_of(h.key) is not None
                        assert h.payload in (b"p", h.key.encode())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=reader, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    info = s.describe("b")
    bank = s.get("b")
    assert info.occupied == 10 + 4 * 60 * 3 == len(bank._key_index)
    assert info.reads_total == 8 * 60 * 2  # every query counted its best hit exactly once
    assert float(bank.counts.sum()) == info.reads_total  # "lfu": no decay, no eviction
    for t in range(4):
        for i in range(60):
            key = f"w{t}-{i}-2"
            slot = bank.slot_of(key)
            assert slot is not None and bank.key_of(slot) == key
            assert bank.payload_of(slot) == key.encode()


def test_key_hashes_of_many_keys_equal_key_hash_of_each():
    rng = random.Random(1)
    keys = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 16, 16, 63, 200])))
            for _ in range(3000)]
    data = np.frombuffer(b"".join(keys), dtype=np.uint8)
    lengths = np.array([len(k) for k in keys], dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    assert key_hashes(data, starts, lengths).tolist() == [key_hash(k) for k in keys]
    assert key_hashes(data, starts[:0], lengths[:0]).shape == (0,)


def test_a_rebuilt_key_index_finds_keys_whose_probes_wrap_past_the_tables_end():
    # 12 keys -> a 64-cell table; all of them at home in the last two cells
    keys = [k for k in (f"wrap-{i}".encode() for i in range(20000))
            if key_hash(k) & 63 >= 62][:12]
    col = ByteColumn(len(keys))
    for slot, key in enumerate(keys):
        col.set(slot, key)
    index = KeyIndex(col)
    index.rebuild()
    assert index.table.shape[0] == 64
    assert [index.get(k) for k in keys] == list(range(len(keys)))
    assert index.get(b"absent") is None
    index.remove(keys[0])
    assert index.get(keys[0]) is None and index.get(keys[-1]) == len(keys) - 1


# ---------------------------------------------------------------------- memory
def test_memory_grows_with_stored_memories_not_with_capacity():
    s = make_store(code_dtype="int8", code_dim=192, scale=torch.full((192,), 0.02))
    s.create_bank("b", 1_000_000)
    slot = MemoryBank.slot_bytes(192, "int8")
    empty = s.describe("b")
    assert empty.memory_bytes <= INITIAL_ROWS * slot
    assert empty.reserved_bytes == 1_000_000 * slot  # what the memory limit counts
    sizes = []
    for _ in range(4):
        s.write("b", torch.randint(-100, 100, (5000, 192), dtype=torch.int8),
                [f"key-{i:08d}" for i in range(len(sizes) * 5000, len(sizes) * 5000 + 5000)],
                [b"x" * 100] * 5000)
        sizes.append(s.describe("b").memory_bytes)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    stored = 20_000
    raw = stored * (192 + 12)  # codes and keys (payloads are counted apart)
    # per-slot tensors at most doubled, plus the columns' and key index's own arrays
    assert sizes[-1] <= 2 * stored * slot + stored * 12 * 2 + raw, sizes[-1] / stored
    info = s.describe("b")
    assert info.payload_bytes == stored * 100


def test_snapshots_of_older_servers_still_load():
    """Older snapshots hold every slot of the capacity, keys and payloads packed over
    all of them; they load, and trailing free slots are not allocated."""
    s = make_store()
    s.create_bank("b", 5000)
    s.write("b", torch.randn(20, M), [f"k{i}" for i in range(20)],
            [f"p{i}".encode() for i in range(20)])
    s.delete("b", [3], [])
    state = s.export_state()
    config, arrays = state.banks["b"]
    n = arrays["occupied"].shape[0]
    assert n == 20  # ours end at the last occupied slot
    old = {}
    for name, a in arrays.items():
        if name.endswith("_offsets"):
            old[name] = np.concatenate([a, np.full(5000 - n, a[-1])])
        elif name.endswith("_data"):
            old[name] = a
        else:
            old[name] = np.concatenate([a, np.zeros((5000 - n, *a.shape[1:]), a.dtype)])
    t = make_store()
    t.load_state(StoreState(state.last_seq, {"b": (config, old)}))
    bank = t.get("b")
    assert bank.rows <= INITIAL_ROWS and bank.occupied_count == 19
    assert bank.slot_of("k7") == 7 and bank.payload_of(7) == b"p7" and bank.slot_of("k3") is None
    q = torch.randn(2, M)
    assert [[h.slot for h in r.hits] for r in t.read("b", q, ReadOptions(top_k=5)).results] == \
        [[h.slot for h in r.hits] for r in s.read("b", q, ReadOptions(top_k=5)).results]


# ---------------------------------------------------------------------- snapshots
def test_snapshots_reuse_unchanged_banks_and_skip_when_nothing_changed(tmp_path):
    from apcm.server.config import Settings
    from apcm.server.persistence.manager import PersistenceManager
    from apcm.server.persistence.snapshot import read_snapshot

    store = make_store()
    mgr = PersistenceManager(store, Settings(data_dir=str(tmp_path),
                                             snapshot_interval_s=0.0).validated(),
                             "a" * 64, "pca")
    mgr.recover()
    mgr.start()
    for bank in ("big", "small"):
        store.create_bank(bank, 10_000)
        store.write(bank, torch.randn(3000, M), [f"{bank}{i}" for i in range(3000)],
                    [b"payload"] * 3000)
    first = mgr.snapshot()
    assert first.reused_banks == []
    store.write("small", torch.randn(1, M), ["new"], [])
    second = mgr.snapshot()
    assert second.reused_banks == ["big"]  # only "small" was copied from memory
    _, a = read_snapshot(mgr.snapshots.path(first.name))
    _, b = read_snapshot(mgr.snapshots.path(second.name))
    for name, arr in a["big"][1].items():
        np.testing.assert_array_equal(arr, b["big"][1][name])
    store.read("big", torch.randn(4, M))  # counters change, slots do not
    third = mgr.snapshot()
    assert third.reused_banks == ["big", "small"]
    _, c = read_snapshot(mgr.snapshots.path(third.name))
    live = store.export_state()
    for bank in ("big", "small"):
        assert c[bank][0] == live.banks[bank][0]  # config, reads_total included
        for name, arr in live.banks[bank][1].items():
            np.testing.assert_array_equal(c[bank][1][name], arr)
    files = sorted(p.name for p in mgr.snapshots.directory.iterdir())
    asked = mgr.snapshot()  # asked for (CreateSnapshot without a name): always written
    assert not asked.unchanged and asked.reused_banks == ["big", "small"]
    files = sorted(p.name for p in mgr.snapshots.directory.iterdir())
    skipped = mgr.snapshot(automatic=True)  # periodic, with nothing changed
    assert skipped.unchanged and skipped.name == asked.name
    assert sorted(p.name for p in mgr.snapshots.directory.iterdir()) == files
    named = mgr.snapshot("named")  # asked for by name: written, from the reused banks
    assert not named.unchanged and named.reused_banks == ["big", "small"]
    mgr.close(final_snapshot=False)
    fresh = make_store()
    again = PersistenceManager(fresh, Settings(data_dir=str(tmp_path),
                                               snapshot_interval_s=0.0).validated(),
                               "a" * 64, "pca")
    assert again.recover().snapshot == "named"
    restored = fresh.export_state()
    for bank in ("big", "small"):
        assert restored.banks[bank][0] == live.banks[bank][0]
        for name, arr in live.banks[bank][1].items():
            np.testing.assert_array_equal(restored.banks[bank][1][name], arr)

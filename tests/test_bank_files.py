"""Snapshots skip unchanged banks (issue 23): a large bank's slot arrays live in a bank
file that every snapshot in which they are unchanged shares, so a counters-only change
writes only the counters; retention keeps the files kept snapshots name, and a damaged
or missing bank file is detected, never loaded. Real store, manager and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apcm.server.config import Settings
from apcm.server.errors import FailedPrecondition
from apcm.server.memory.store import MemoryStore
from apcm.server.persistence import bankfiles
from apcm.server.persistence.manager import PersistenceManager
from apcm.server.persistence.snapshot import SnapshotCorrupt, read_snapshot

M = 8
HASH = "a" * 64


def _store() -> MemoryStore:
    return MemoryStore(code_dim=M, code_dtype="float32", scale=None, device=torch.device("cpu"),
                       max_capacity=100_000, max_payload_bytes=64, max_key_length=32,
                       default_policy="lfu", default_half_life=100.0)


def _manager(data: Path, store: MemoryStore, **settings: object) -> PersistenceManager:
    base = dict(data_dir=str(data), snapshot_interval_s=0.0, snapshot_bank_file_bytes=4096,
                snapshot_keep=3)
    base.update(settings)
    mgr = PersistenceManager(store, Settings(**base).validated(),  # type: ignore[arg-type]
                             HASH, "pca")
    mgr.recover()
    mgr.start()
    return mgr


def _filled(data: Path, **settings: object) -> tuple[MemoryStore, PersistenceManager]:
    store = _store()
    mgr = _manager(data, store, **settings)
    store.create_bank("big", 10_000)  # ~250 KB of slot arrays: a bank file of its own
    store.write("big", torch.randn(3000, M), [f"k{i}" for i in range(3000)],
                [b"payload-%d" % i for i in range(3000)])
    store.create_bank("small", 100)  # under the threshold: inside the snapshot file
    store.write("small", torch.randn(5, M), [], [])
    return store, mgr


def _bank_files(data: Path) -> list[Path]:
    folder = data / "snapshots" / bankfiles.DIRECTORY
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _assert_holds_live_state(path: Path, store: MemoryStore) -> None:
    _, banks = read_snapshot(path)
    live = store.export_state()
    assert set(banks) == set(live.banks)
    for name, (config, arrays) in live.banks.items():
        assert banks[name][0] == config  # reads_total included
        assert set(banks[name][1]) == set(arrays)
        for array, value in arrays.items():
            np.testing.assert_array_equal(banks[name][1][array], value)


def test_an_unchanged_bank_is_written_once_and_a_counters_change_writes_only_counters(
        tmp_path: Path) -> None:
    store, mgr = _filled(tmp_path)
    first = mgr.snapshot("first")
    assert set(first.bank_files) == {"big"}
    (shared,) = _bank_files(tmp_path)
    stamp = shared.stat()
    store.read("big", torch.randn(50, M))  # reads count accesses: counters only
    second = mgr.snapshot("second")
    assert second.bank_files == first.bank_files and second.reused_banks == ["big", "small"]
    own = mgr.snapshots.path("second").stat().st_size
    # config, header and 16 bytes of counters a slot, not the ~250 KB of the bank
    assert own < 3000 * 16 + 8000 < shared.stat().st_size
    assert second.size_bytes == own + shared.stat().st_size
    assert _bank_files(tmp_path) == [shared]
    assert (shared.stat().st_mtime_ns, shared.stat().st_ino) == (stamp.st_mtime_ns,
                                                                 stamp.st_ino)
    _assert_holds_live_state(mgr.snapshots.path("second"), store)

    store.write("small", torch.randn(1, M), [], [])  # another bank changes
    assert mgr.snapshot("third").bank_files == first.bank_files
    store.write("big", torch.randn(1, M), ["new"], [b"x"])  # the bank itself changes
    fourth = mgr.snapshot("fourth")
    assert fourth.bank_files["big"] != first.bank_files["big"]
    assert shared in _bank_files(tmp_path)  # "second" and "third" still name it
    _assert_holds_live_state(mgr.snapshots.path("fourth"), store)
    for name in ("fifth", "sixth"):
        store.read("big", torch.randn(3, M))
        mgr.snapshot(name)
    # keep 3: "fourth" to "sixth" remain, all naming the new file; the old one is gone
    assert [i.name for i in mgr.list_snapshots()] == ["sixth", "fifth", "fourth"]
    assert _bank_files(tmp_path) == [bankfiles.path(tmp_path / "snapshots",
                                                    fourth.bank_files["big"])]
    mgr.close(final_snapshot=False)

    fresh = _store()
    again = _manager(tmp_path, fresh)
    assert fresh.get("big").occupied_count == 3001 and fresh.get("big").slot_of("new") == 3000
    live = store.export_state()
    for name, (_, arrays) in fresh.export_state().banks.items():
        for array, value in arrays.items():
            np.testing.assert_array_equal(value, live.banks[name][1][array])
    skipped = again.snapshot(automatic=True)  # nothing changed since the restart
    assert skipped.unchanged and skipped.name == "sixth"
    # the restarted server's first snapshot reuses what it recovered from
    before = {p: p.stat().st_mtime_ns for p in _bank_files(tmp_path)}
    fresh.read("big", torch.randn(2, M))
    restarted = again.snapshot("restarted")
    assert restarted.bank_files == fourth.bank_files
    assert restarted.reused_banks == ["big", "small"]
    assert {p: p.stat().st_mtime_ns for p in _bank_files(tmp_path)} == before
    _assert_holds_live_state(again.snapshots.path("restarted"), fresh)
    again.close(final_snapshot=False)


def test_without_bank_files_every_bank_stays_inside_the_snapshot_file(tmp_path: Path) -> None:
    store, mgr = _filled(tmp_path, snapshot_bank_file_bytes=0)
    info = mgr.snapshot("inline")
    assert info.bank_files == {} and _bank_files(tmp_path) == []
    from safetensors import safe_open

    with safe_open(str(mgr.snapshots.path("inline")), framework="np") as f:
        assert f.metadata()["schema_version"] == "1"  # readable by older servers
        assert "bank/big/codes" in f.keys()  # noqa: SIM118
    mgr.close(final_snapshot=False)


def test_a_damaged_or_missing_bank_file_is_detected_and_never_loaded(tmp_path: Path) -> None:
    store, mgr = _filled(tmp_path)
    mgr.snapshot("first")
    store.read("big", torch.randn(5, M))
    mgr.snapshot("second")
    (shared,) = _bank_files(tmp_path)
    good = shared.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x20
    shared.write_bytes(bytes(damaged))
    with pytest.raises(SnapshotCorrupt, match="bank 'big'.*fails its checksum"):
        read_snapshot(mgr.snapshots.path("second"))
    assert [i.valid for i in mgr.list_snapshots()] == [False, False]
    shared.unlink()
    with pytest.raises(SnapshotCorrupt, match="bank 'big'.*is missing"):
        read_snapshot(mgr.snapshots.path("first"))
    mgr.close(final_snapshot=False)
    # both snapshots share the file and the log before them is trimmed: start-up
    # refuses, naming the damage, instead of starting without the bank
    with pytest.raises(FailedPrecondition, match="bank file .* is missing"):
        _manager(tmp_path, _store())
    shared.write_bytes(good)
    fresh = _store()
    _manager(tmp_path, fresh).close(final_snapshot=False)
    assert fresh.get("big").occupied_count == 3000


def test_a_crafted_bank_file_name_cannot_leave_the_snapshot_folder(tmp_path: Path) -> None:
    for digest in ("sha256:../../../etc/passwd", "md5:" + "0" * 64, "sha256:" + "G" * 64):
        with pytest.raises(bankfiles.BankFileError, match="not sha256"):
            bankfiles.path(tmp_path, digest)


def test_start_up_removes_interrupted_bank_file_writes_and_unnamed_files_are_collected(
        tmp_path: Path) -> None:
    store, mgr = _filled(tmp_path)
    mgr.snapshot("first")
    mgr.close(final_snapshot=False)
    folder = tmp_path / "snapshots" / bankfiles.DIRECTORY
    torn = folder / f".{'0' * 64}.safetensors.tmp-4242"  # a write a crash cut short
    torn.write_bytes(b"\0" * 100)
    orphan = folder / f"{'1' * 64}.safetensors"  # written, then the process died
    orphan.write_bytes(b"\0" * 100)
    again = _manager(tmp_path, _store())
    assert not torn.exists() and orphan.exists()
    again.snapshot("second")  # pruning collects what no snapshot names
    assert not orphan.exists() and len(_bank_files(tmp_path)) == 1
    again.close(final_snapshot=False)


def test_a_snapshot_naming_a_crafted_bank_file_is_listed_invalid(tmp_path: Path) -> None:
    store, mgr = _filled(tmp_path)
    mgr.snapshot("first")
    path = mgr.snapshots.path("first")
    raw = path.read_bytes()
    digest = mgr.snapshots.info("first").bank_files["big"]
    path.write_bytes(raw.replace(digest.encode(), b"sha256:" + b"../" * 21 + b"x"))
    (listed,) = mgr.list_snapshots()
    assert not listed.valid and "checksum" in listed.error
    mgr.close(final_snapshot=False)
